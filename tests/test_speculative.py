"""Prompt-lookup speculation in the serving worker: the same greedy tokens as plain decoding (several
architectures, many turns, so the cache rollback is exercised), the same distribution when sampling
(a statistical test that can fail), fewer forwards than tokens, and plain steps inside a batch."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from pipeline.params import GenerationParams
from pipeline.serving import Server, ServingLimits, prompt_lookup
from test_serving import models, prompts  # noqa: F401 - the tiny models of every architecture

ARCHS = ["llama", "qwen2", "gpt2", "bloom", "falcon", "mixtral"]
GREEDY = GenerationParams(temperature=0, max_new_tokens=48, repetition_penalty=1.0)


def run(server: Server, prompt: list[int], params: GenerationParams) -> tuple[list[int], int]:
    handle = server.submit(prompt, params)
    tokens = list(handle)
    return tokens, handle.finished.forwards


def repetitive(loaded) -> list[int]:
    text = "The quick brown fox jumps over the lazy dog. " * 3 + "The quick brown"
    return loaded.tokenizer(text)["input_ids"]


def test_prompt_lookup_proposes_what_followed_the_last_ngram() -> None:
    assert prompt_lookup([1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]
    assert prompt_lookup([7, 1, 2, 9, 1, 2], 5) == [9, 1, 2]  # the latest earlier occurrence
    assert prompt_lookup([1, 2, 3], 4) == []  # nothing repeats
    assert prompt_lookup([5, 6, 5], 2) == [6, 5]  # falls back to a 1-gram
    assert prompt_lookup([1, 2, 1, 2], 0) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_are_the_same_with_and_without_speculation(arch: str, models) -> None:  # noqa: F811
    loaded = models[arch]
    server = Server(loaded, ServingLimits())
    try:
        turns_on, forwards, produced = [], 0, 0
        prompt_on = prompt_off = repetitive(loaded)
        for turn in range(3):  # a conversation: each turn's prompt holds the previous replies
            off, _ = run(server, prompt_off, GREEDY.replace(speculate="off"))
            on, used = run(server, prompt_on, GREEDY)
            assert on == off, f"{arch}, turn {turn}: speculation changed the greedy tokens"
            forwards, produced = forwards + used, produced + len(on)
            follow = loaded.tokenizer(" and the lazy dog. The quick")["input_ids"]
            prompt_on, prompt_off = prompt_on + on + follow, prompt_off + off + follow
            turns_on.append(on)
        assert forwards < produced, f"{arch}: speculation never accepted a proposal ({forwards} forwards)"
        penalised = GREEDY.replace(repetition_penalty=1.3)  # greedy with a logits processor
        assert run(server, repetitive(loaded), penalised)[0] == run(server, repetitive(loaded),
                                                                    penalised.replace(speculate="off"))[0]
    finally:
        server.close()


def test_a_batch_of_chats_takes_plain_steps_and_each_gets_its_own_tokens(models) -> None:  # noqa: F811
    from test_serving import collect

    loaded = models["llama"]
    server = Server(loaded, ServingLimits())
    try:
        alone = [run(server, p, GREEDY.replace(speculate="off"))[0] for p in prompts(loaded, 3)]
        handles = [server.submit(p, GREEDY) for p in prompts(loaded, 3)]
        assert collect(handles) == alone
    finally:
        server.close()


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at p = 0.001 (z = 3.09), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts: Counter, expected: dict, n: int) -> tuple[float, int]:
    stat = sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in expected.items() if p > 0)
    assert not [k for k in counts if expected.get(k, 0) == 0], "a token of probability 0 was emitted"
    return stat, sum(1 for p in expected.values() if p > 0) - 1


def test_the_acceptance_rule_keeps_the_model_distribution_on_a_tiny_vocabulary() -> None:
    """The worker's verification step alone, on crafted logits over 5 tokens: whatever is proposed, the
    emitted tokens follow the model's distribution (one proposal: the first token; two proposals: the
    pair). 20,000 seeded draws each, chi-square at p = 0.001; accepting proposals more or less often
    than the rule says fails it."""
    import types

    import torch
    from transformers import LogitsProcessorList, TemperatureLogitsWarper

    from pipeline.serving import _Row

    first = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    second = torch.tensor([0.1, 0.1, 0.5, 0.2, 0.1])
    logits = torch.log(torch.stack([first, second, torch.full((5,), 0.2)]).clamp_min(1e-30))
    logits[0, 4] = -float("inf")
    worker = types.SimpleNamespace(_scores=Server._scores)
    n = 20_000
    for proposal in ([1], [3], [4], [0, 2], [1, 4]):
        singles, pairs = Counter(), Counter()
        for seed in range(n):
            row = _Row(request=None, tokens=[0], length=1,
                       processors=LogitsProcessorList([TemperatureLogitsWarper(1.0)]),
                       generator=torch.Generator().manual_seed(seed))
            accepted, bonus = Server._verify(worker, row, proposal, logits[: len(proposal) + 1])
            emitted = [*accepted, bonus]
            singles[emitted[0]] += 1
            if len(emitted) >= 2:
                pairs[tuple(emitted[:2])] += 1
        stat, df = _chi2(singles, dict(enumerate(first.tolist())), n)
        assert stat < _chi2_critical(df), f"proposal {proposal}: first token chi2 {stat:.1f} ({singles})"
        if len(proposal) == 2:  # when the first proposal is accepted, the second token follows `second`
            kept = {pair: count for pair, count in pairs.items() if pair[0] == proposal[0]}
            m = sum(kept.values())
            stat, df = _chi2(Counter({b: c for (_, b), c in kept.items()}), dict(enumerate(second.tolist())), m)
            assert stat < _chi2_critical(df), f"proposal {proposal}: second token chi2 {stat:.1f}"


def test_unseeded_sampling_speculates_and_seeded_sampling_stays_reproducible(models) -> None:  # noqa: F811
    """End to end: at the lowest temperature the tiny model falls into the loops that prompt lookup
    predicts, and sampled proposals are accepted (unseeded, so up to 3 tries: a rule that rejected every
    sampled proposal fails all three). A seeded request decodes plainly: the same tokens alone as beside
    other chats (test_serving)."""
    loaded = models["llama"]
    server = Server(loaded, ServingLimits())
    params = GenerationParams(temperature=0.01, top_k=4, top_p=1.0, max_new_tokens=160, repetition_penalty=1.0)
    try:
        attempts = [run(server, repetitive(loaded), params) for _ in range(3)]
        seeded, seeded_used = run(server, repetitive(loaded), params.replace(seed=3))
        plain, _ = run(server, repetitive(loaded), params.replace(seed=3, speculate="off"))
    finally:
        server.close()
    assert all(len(tokens) == 160 for tokens, _ in attempts)
    assert any(used < len(tokens) for tokens, used in attempts), \
        f"no sampled proposal was accepted ({[used for _, used in attempts]} forwards for 160 tokens)"
    assert seeded == plain and seeded_used == len(seeded)


def test_speculation_off_lookup_and_draft_are_named_settings() -> None:
    from pipeline.errors import ConfigError

    assert GenerationParams().speculate == "lookup"
    assert GenerationParams(speculate="draft").speculate == "draft"
    with pytest.raises(ConfigError, match="speculate='maybe' is not supported; accepted: \\['off', 'lookup', 'draft'\\]"):
        GenerationParams(speculate="maybe")


# --- a draft model ---------------------------------------------------------------------------------


class Recording(Server):
    """The worker, recording (accepted, proposed) of every verification."""

    def __init__(self, *args, **kwargs) -> None:
        self.verified: list[tuple[int, int]] = []
        super().__init__(*args, **kwargs)

    def _verify(self, row, proposal, logits, q=None):
        accepted, bonus = super()._verify(row, proposal, logits, q)
        self.verified.append((len(accepted), len(proposal)))
        return accepted, bonus


def noisy_copy(loaded, std: float, seed: int = 1):
    """The target's checkpoint loaded again with Gaussian noise on every weight: a draft that agrees with it
    often, not always (its weights are N(0, 0.2), conftest.save_checkpoint)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(loaded.preset.source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
    return model.eval()


def with_draft(loaded, draft):
    import dataclasses

    return dataclasses.replace(loaded, draft=draft, server=None)


# (target, draft): a noisy copy of the target (accepts often, rejects sometimes), or a random model of
# another architecture with the same vocabulary (rejects nearly always).
DRAFT_PAIRS = [("llama", "noisy"), ("qwen2", "gpt2"), ("gpt2", "noisy"), ("bloom", "llama")]


@pytest.mark.parametrize(("arch", "draft_arch"), DRAFT_PAIRS)
def test_greedy_tokens_are_the_same_with_a_draft_model(arch: str, draft_arch: str, models) -> None:  # noqa: F811
    """Several turns of a conversation: the draft's cache drops rejected proposals and catches up on the
    tokens it has not seen (the bonus token, a whole new turn), and so does the model's."""
    loaded = models[arch]
    draft = noisy_copy(loaded, 0.05) if draft_arch == "noisy" else models[draft_arch].model
    server = Recording(with_draft(loaded, draft), ServingLimits())
    try:
        prompt_on = prompt_off = repetitive(loaded)
        for turn in range(3):
            off, _ = run(server, prompt_off, GREEDY.replace(speculate="off"))
            on, _ = run(server, prompt_on, GREEDY.replace(speculate="draft"))
            assert on == off, f"{arch} with a {draft_arch} draft, turn {turn}: the draft changed the greedy tokens"
            follow = loaded.tokenizer(" and the lazy dog. The quick")["input_ids"]
            prompt_on, prompt_off = prompt_on + on + follow, prompt_off + off + follow
        penalised = GREEDY.replace(repetition_penalty=1.3, speculate="draft")  # the draft's q gets the penalty too
        assert run(server, repetitive(loaded), penalised)[0] == run(server, repetitive(loaded),
                                                                    penalised.replace(speculate="off"))[0]
    finally:
        server.close()
    assert server.verified, "the draft never proposed"
    assert any(a < n for a, n in server.verified), "no proposal was ever rejected: the rollback was not exercised"
    if draft_arch == "noisy":
        assert any(a > 0 for a, n in server.verified), f"{arch}: the noisy copy never had a proposal accepted"


def test_a_draft_identical_to_the_model_is_accepted_nearly_always(models) -> None:  # noqa: F811
    loaded = models["llama"]
    server = Server(with_draft(loaded, loaded.model), ServingLimits())
    sampled = GenerationParams(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=96, speculate="draft")
    try:
        greedy, greedy_forwards = run(server, repetitive(loaded), GREEDY.replace(max_new_tokens=96, speculate="draft"))
        plain, plain_forwards = run(server, repetitive(loaded), GREEDY.replace(max_new_tokens=96, speculate="off"))
        tokens, forwards = run(server, repetitive(loaded), sampled)
    finally:
        server.close()
    assert greedy == plain and plain_forwards == len(plain)
    assert len(greedy) / greedy_forwards > 4, f"greedy: {len(greedy)} tokens in {greedy_forwards} forwards"
    # Sampling: p and q are the same distribution up to float rounding, so min(1, p/q) is ~1.
    assert len(tokens) / forwards > 4, f"sampled: {len(tokens)} tokens in {forwards} forwards"


def test_a_batch_with_draft_speculation_takes_plain_steps_and_the_draft_catches_up(models) -> None:  # noqa: F811
    """A chat speculates alone, others join (plain steps; the draft's cache is dropped), it is alone
    again (the draft catches up on every token it missed): the same tokens as without speculation."""
    from test_serving import collect

    loaded = models["llama"]
    server = Recording(with_draft(loaded, noisy_copy(loaded, 0.02)), ServingLimits())
    long = GREEDY.replace(max_new_tokens=80, speculate="draft")
    try:
        expected = [run(server, p, long.replace(speculate="off", max_new_tokens=80 if i == 0 else 12))[0]
                    for i, p in enumerate(prompts(loaded, 3))]
        first = server.submit(prompts(loaded, 1)[0], long)
        stream = iter(first)
        head = [next(stream) for _ in range(10)]
        before = len(server.verified)
        others = [server.submit(p, long.replace(max_new_tokens=12)) for p in prompts(loaded, 3)[1:]]
        rest = collect([_Rest(stream), *others])
    finally:
        server.close()
    assert [head + rest[0], *rest[1:]] == expected
    assert server.peak_batch >= 2 and before > 0 and len(server.verified) > before, server.verified


class _Rest:
    def __init__(self, stream) -> None:
        self.stream = stream

    def __iter__(self):
        return self.stream


def test_speculate_draft_without_a_draft_model_is_refused_and_the_worker_goes_on(models) -> None:  # noqa: F811
    from pipeline.errors import ConfigError

    loaded = models["llama"]
    server = Server(loaded, ServingLimits())
    try:
        with pytest.raises(ConfigError, match="speculate='draft' needs a draft model, and .* was loaded without one"):
            server.submit(repetitive(loaded), GREEDY.replace(speculate="draft"))
        assert len(run(server, repetitive(loaded), GREEDY.replace(max_new_tokens=5))[0]) == 5
    finally:
        server.close()


def _draft_worker(draft_logits):
    """The worker's proposal and verification code over crafted draft logits (one row per position)."""
    import types

    return types.SimpleNamespace(_scores=Server._scores,
                                 _draft_forward=lambda tokens, start, cache: (draft_logits[start: start + 1], cache))


def test_the_draft_rule_keeps_the_model_distribution_on_a_tiny_vocabulary() -> None:
    """Proposals sampled from a draft distribution q unlike p, through the worker's own proposal step and
    its verification: the emitted tokens follow p (the model's, after the same temperature). The first
    token, and the second when the first proposal was kept; 20,000 seeded draws, chi-square at p = 0.001.
    The same draws verified with the draft's q computed without the processors (a q other than the one
    the proposals were drawn from) must fail the test: it can tell a wrong rule."""
    import torch
    from transformers import LogitsProcessorList, TemperatureLogitsWarper

    from pipeline.serving import _Row

    p1, p2 = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0]), torch.tensor([0.1, 0.1, 0.5, 0.2, 0.1])
    q1, q2 = torch.tensor([0.05, 0.15, 0.2, 0.3, 0.3]), torch.tensor([0.3, 0.3, 0.1, 0.2, 0.1])
    target = torch.log(torch.stack([p1, p2, torch.full((5,), 0.2)]))
    draft = torch.log(torch.stack([q1, q2]))
    temperature = LogitsProcessorList([TemperatureLogitsWarper(0.7)])
    expected = [torch.softmax(temperature(None, target[i: i + 1])[0], -1).tolist() for i in range(2)]
    worker = _draft_worker(draft)
    n = 20_000
    results = {}
    raw = [torch.softmax(draft[i], -1) for i in range(2)]  # q without the temperature: not what was sampled
    for rule in ("draft", "q without processors"):
        singles, seconds = Counter(), Counter()
        for seed in range(n):
            row = _Row(request=None, tokens=[0], length=1, processors=temperature,
                       generator=torch.Generator().manual_seed(seed))
            proposal, q = Server._draft_proposal(worker, row, 2)
            accepted, bonus = Server._verify(worker, row, proposal, target[:3], q if rule == "draft" else raw)
            emitted = [*accepted, bonus]
            singles[emitted[0]] += 1
            if len(emitted) >= 2:
                seconds[emitted[1]] += 1
        first, df1 = _chi2(singles, dict(enumerate(expected[0])), n)
        second, df2 = _chi2(seconds, dict(enumerate(expected[1])), sum(seconds.values()))
        results[rule] = (first < _chi2_critical(df1) and second < _chi2_critical(df2), first, second)
    assert results["draft"][0], f"the draft rule changed the distribution: chi2 {results['draft'][1:]}"
    assert not results["q without processors"][0], \
        f"a wrong q passed the test: chi2 {results['q without processors'][1:]}"
