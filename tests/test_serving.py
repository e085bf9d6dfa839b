"""The serving worker: continuous batching that gives every request the tokens it gets alone.

Tiny random models of every architecture the project supports, float32 on the CPU. A request's
greedy tokens must not depend on what runs beside it: requests started together, a request joining
a running batch, a neighbour cancelled mid-reply. Seeded sampling likewise. Also: limits, arrival
order, cancel while waiting, one bad request failing alone, context and token budgets.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from conftest import save_checkpoint
from pipeline.budgets import Budgets, GiB
from pipeline.errors import GenerationError
from pipeline.loading import load_model, unload
from pipeline.params import GenerationParams
from pipeline.presets import resolve_model
from pipeline.serving import Server, ServingLimits
from test_architectures import ARCHITECTURES

GREEDY = GenerationParams(temperature=0, max_new_tokens=16, repetition_penalty=1.0)
# Architectures whose cache the worker batches (the others here have sliding windows shorter than
# their context, and are served one request at a time, still with the same tokens).
BATCHED = {"llama", "qwen2", "phi3", "gpt2", "gpt_bigcode", "gpt_neox", "opt", "bloom", "falcon", "mixtral",
           "qwen2_moe"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    """Every architecture loaded once on the CPU, with eos switched off so replies run to their budget."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    root = tmp_path_factory.mktemp("serving")
    loaded = {}
    for arch, kwargs in ARCHITECTURES.items():
        path = save_checkpoint(AutoConfig.for_model(arch, vocab_size=len(tok), **kwargs), root / arch, tok)
        budgets = Budgets(gpu=(), cpu=GiB, disk=False, offload_dir=root / "offload")
        loaded[arch] = load_model(resolve_model(str(path)), budgets)
        loaded[arch].model.generation_config.eos_token_id = None
    yield loaded
    for model in loaded.values():
        unload(model)


def prompts(loaded, n: int = 5) -> list[list[int]]:
    """Prompts of different lengths, so rows are padded differently in the batch."""
    texts = ["Hello", "In the beginning God created the heaven and the earth.", "The quick brown fox",
             "Memory budgets decide which layers live on the GPU, in CPU RAM or on disk. And the earth",
             "darkness was upon the face", "What is your name?"]
    return [loaded.tokenizer(t)["input_ids"] for t in texts[:n]]


@pytest.fixture
def server_for_test():
    servers = []

    def make(loaded, **limits) -> Server:
        servers.append(Server(loaded, ServingLimits(**limits)))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def solo(server: Server, prompt: list[int], params: GenerationParams = GREEDY) -> list[int]:
    return list(server.submit(prompt, params))


def collect(handles) -> list[list[int]]:
    """Read several handles at once (each on its own thread, as clients do)."""
    results: list[list[int] | Exception] = [[] for _ in handles]

    def read(i: int) -> None:
        try:
            results[i] = list(handles[i])
        except Exception as exc:  # noqa: BLE001 - compared by the caller
            results[i] = exc

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(handles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_greedy_tokens_equal_each_request_run_alone(arch: str, models, server_for_test) -> None:
    loaded = models[arch]
    server = server_for_test(loaded)
    batch = prompts(loaded)
    alone = [solo(server, p) for p in batch]
    assert server.peak_batch == 1
    handles = [server.submit(p, GREEDY) for p in batch]
    assert collect(handles) == alone
    assert server.batchable is (arch in BATCHED)
    if arch in BATCHED:
        assert server.peak_batch > 1, "the requests were never decoded together"
    assert all(h.finished.reason == "length" and h.finished.new_tokens == 16 for h in handles)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bloom", "qwen2_moe"])
def test_joining_a_running_batch_and_a_cancelled_neighbour_change_nothing(arch: str, models, server_for_test) -> None:
    loaded = models[arch]
    server = server_for_test(loaded)
    first, *later = prompts(loaded)
    long = GREEDY.replace(max_new_tokens=40)
    expected_first = solo(server, first, long)
    expected_later = [solo(server, p) for p in later]
    running = server.submit(first, long)
    stream = iter(running)
    head = [next(stream) for _ in range(3)]  # the first request is decoding
    neighbour = server.submit(later[0], GREEDY.replace(max_new_tokens=200))
    joining = [server.submit(p, GREEDY) for p in later]
    neighbour_tokens = []
    for token in neighbour:  # cancel the neighbour after two of its tokens
        neighbour_tokens.append(token)
        if len(neighbour_tokens) == 2:
            neighbour.cancel()
    rest = collect([_Rest(stream)] + joining)
    assert head + rest[0] == expected_first
    assert rest[1:] == expected_later
    assert neighbour.finished.reason == "cancelled" and neighbour.finished.new_tokens < 200
    assert neighbour_tokens == expected_later[0][: len(neighbour_tokens)]
    assert server.peak_batch >= 3


class _Rest:
    """The rest of a handle already being read."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def __iter__(self):
        return self.stream


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_seeded_sampling_gives_the_same_tokens_whatever_runs_beside_it(arch: str, models, server_for_test) -> None:
    loaded = models[arch]
    server = server_for_test(loaded)
    seeded = GenerationParams(temperature=0.9, top_p=0.9, top_k=40, repetition_penalty=1.2, max_new_tokens=16,
                              seed=1234)
    prompt, *others = prompts(loaded)
    alone = solo(server, prompt, seeded)
    assert solo(server, prompt, seeded) == alone
    assert solo(server, prompt, seeded.replace(seed=99)) != alone  # the seed matters
    torch.manual_seed(0)  # the process-wide RNG is not what makes it reproducible
    neighbours = [server.submit(p, GenerationParams(temperature=1.2, max_new_tokens=24)) for p in others[:2]]
    neighbours += [server.submit(p, GREEDY) for p in others[2:]]
    results = collect([server.submit(prompt, seeded)] + neighbours)
    assert results[0] == alone
    assert server.peak_batch > 1


def test_a_request_cancelled_while_waiting_never_runs(models, server_for_test) -> None:
    loaded = models["llama"]
    server = server_for_test(loaded, max_batch=1)
    seen: list[int] = []
    hook = loaded.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        first, second = prompts(loaded, 2)
        running = server.submit(first, GREEDY.replace(max_new_tokens=30))
        waiting = server.submit(second, GREEDY)
        waiting.cancel()
        assert len(list(running)) == 30
        assert list(waiting) == []
    finally:
        hook.remove()
    assert waiting.finished.reason == "cancelled" and waiting.finished.new_tokens == 0
    assert len(second) not in seen, "the cancelled request was prefilled"


def test_one_bad_request_fails_alone(models, server_for_test) -> None:
    loaded = models["llama"]
    server = server_for_test(loaded)
    good = prompts(loaded, 3)
    expected = [solo(server, p) for p in good]
    blocker = server.submit(good[0], GREEDY.replace(max_new_tokens=60))  # keeps the worker busy while the rest arrive
    bad = server.submit([1, 2, 10**6], GREEDY)  # a token id the embedding does not have
    handles = [server.submit(p, GREEDY) for p in good]
    results = collect([bad, *handles, blocker])
    assert isinstance(results[0], GenerationError) and "generation failed: IndexError" in str(results[0])
    assert results[1:4] == expected
    assert bad.finished.reason == "error"
    assert solo(server, good[1]) == expected[1]  # the worker goes on


def test_batch_limit_and_arrival_order(models, server_for_test) -> None:
    loaded = models["llama"]
    server = server_for_test(loaded, max_batch=2)
    batch = prompts(loaded, 6)
    assert len({len(p) for p in batch}) == 6  # prompt lengths identify the prefills below
    prefills: list[list[int]] = []
    hook = loaded.model.register_forward_pre_hook(
        lambda module, args, kwargs: prefills.append(kwargs["attention_mask"].sum(-1).tolist())
        if kwargs["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    try:
        # speculation off: its verification forwards also take several tokens, and would count as prefills here
        handles = [server.submit(p, GREEDY.replace(max_new_tokens=8 + 4 * i, speculate="off"))
                   for i, p in enumerate(batch)]
        assert all(len(r) == 8 + 4 * i for i, r in enumerate(collect(handles)))
    finally:
        hook.remove()
    assert server.peak_batch == 2
    order = [length for group in prefills for length in group]
    assert order == [len(p) for p in batch], "requests did not start in arrival order"


def test_cache_budget_makes_requests_wait_for_room(models, server_for_test) -> None:
    loaded = models["llama"]
    server = server_for_test(loaded, cache_gib=1e-6)  # room for a single row
    batch = prompts(loaded, 4)
    expected = [solo(server, p) for p in batch]
    assert collect([server.submit(p, GREEDY) for p in batch]) == expected
    assert server.peak_batch == 1


def test_the_context_ends_a_reply(models, server_for_test) -> None:
    loaded = models["llama"]
    server = server_for_test(loaded)
    context = loaded.context_length
    prompt = [5 + i % 250 for i in range(context - 6)]
    handle = server.submit(prompt, GREEDY.replace(max_new_tokens=100))
    tokens = list(handle)
    assert handle.finished.reason == "length"
    assert len(tokens) == handle.finished.new_tokens == 6 + 1  # the last token needs no cache slot


def test_finished_record_and_closed_server(models) -> None:
    loaded = models["llama"]
    server = Server(loaded, ServingLimits())
    prompt = prompts(loaded, 1)[0]
    handle = server.submit(prompt, GREEDY)
    tokens = list(handle)
    record = handle.finished
    assert record.reason == "length" and record.new_tokens == len(tokens) == 16
    assert record.prompt_tokens == len(prompt)
    assert 0 <= record.queued_seconds <= record.time_to_first_token <= record.seconds
    long = server.submit(prompt, GREEDY.replace(max_new_tokens=10_000 // 100))
    server.close("the model is being reloaded")
    with pytest.raises(GenerationError, match="the model is being reloaded"):
        list(long)
    with pytest.raises(GenerationError, match="the model is being reloaded"):
        server.submit(prompt, GREEDY)


# LLM.int8() decomposes the input columns holding an outlier above the threshold in *any* row of the
# batch: with the default threshold a row's result depends on its neighbours (as in a batched
# `generate`). Without outlier decomposition (threshold 0) and with 4-bit, rows are independent.
@pytest.mark.parametrize(("mode", "threshold"), [("nf4", 6.0), ("int8", 0.0)])
def test_quantized_model_batches_on_the_cpu(mode: str, threshold: float, models, tmp_path: Path,
                                            server_for_test) -> None:
    from pipeline.quantization import QuantSettings

    preset = resolve_model(str(Path(models["llama"].preset.source)))
    budgets = Budgets(gpu=(), cpu=GiB, disk=False, offload_dir=tmp_path / "offload")
    loaded = load_model(preset, budgets, QuantSettings(mode, int8_threshold=threshold))
    loaded.model.generation_config.eos_token_id = None
    try:
        server = server_for_test(loaded)
        batch = prompts(loaded, 4)
        alone = [solo(server, p) for p in batch]
        assert collect([server.submit(p, GREEDY) for p in batch]) == alone
        assert server.peak_batch > 1
    finally:
        server.close()
        unload(loaded)


def test_limits_from_the_app_config_are_validated() -> None:
    from pipeline.errors import ConfigError
    from pipeline.presets import load_app_config

    limits = ServingLimits.from_config(load_app_config().get("serving"))
    assert limits.max_batch >= 1 and limits.cache_gib > 0
    with pytest.raises(ConfigError, match="serving.max_batch=0; accepted: an integer from 1 to 1024"):
        ServingLimits(max_batch=0)
    with pytest.raises(ConfigError, match=r"unknown serving setting\(s\) \['batch'\]"):
        ServingLimits.from_config({"batch": 4})
