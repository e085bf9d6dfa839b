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


def test_speculation_off_and_draft_are_named_settings() -> None:
    from pipeline.errors import ConfigError

    assert GenerationParams().speculate == "lookup"
    with pytest.raises(ConfigError, match=r"speculate='draft' is not supported \(a draft model is not available yet\)"):
        GenerationParams(speculate="draft")
    with pytest.raises(ConfigError, match="accepted: \\['off', 'lookup'\\]"):
        GenerationParams(speculate="maybe")
