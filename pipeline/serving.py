"""The serving core: one worker thread owns a loaded model and answers every chat with it, batched.

Clients (the app, the CLI, the HTTP API) submit requests of prompt token ids with sampling
parameters, a token budget and a cancel handle, and read token ids back; the text layer over
them is `pipeline.textstream`. Nothing else runs the model.

Continuous batching: each decode step runs every active request in one forward, so offloaded
weights cross the link once per step for all chats. New requests are prefilled together (left
padded) and merged into the running batch before the next step; finished or cancelled requests
leave at once and their cache rows are dropped.

How the batch is laid out, and why: one transformers `DynamicCache` for all rows, every row's
tokens right-aligned in it and masked on the left (a row joining a longer batch is padded on the
left, and so is the batch when a longer row joins). Each row gets its own position ids, so every
architecture that takes a 2-D attention mask works unchanged: Llama-likes and MoE through
position ids, GPT-2 through learned positions, Bloom through ALiBi computed from the mask. This
needs only batch-dimension cat/select and left padding of the cache tensors, which
`DynamicLayer` exposes as plain `keys`/`values` attributes. transformers' own continuous
batching (`generate_batch`, paged attention) was not usable: it needs the AttentionInterface,
which Bloom lacks, and failed under inference mode. A cache this layout cannot merge
(sliding windows shorter than the context, state-space layers) is served one request at a time.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError, GenerationError
from .params import GenerationParams

logger = logging.getLogger(__name__)

# Workers run on a few long-lived threads, not a new thread per model: CUDA libraries keep
# per-thread state (cuBLAS handles and workspaces) that a thread's exit does not give back
# (measured on an H100: +4.4 MiB of RSS per thread).
_THREADS = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="serving")  # one per open Server

FINISH_REASONS = ("eos", "length", "stop", "cancelled", "error")


@dataclass(frozen=True)
class ServingLimits:
    """How much the worker runs at once (configs/app.yaml, `serving:`)."""

    max_batch: int = 16  # requests decoded together in one forward
    cache_gib: float = 2.0  # KV-cache memory for all running requests together
    max_waiting: int = 256  # requests queued beyond the running ones; more are refused

    def __post_init__(self) -> None:
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or not 1 <= self.max_batch <= 1024:
            raise ConfigError(f"serving.max_batch={self.max_batch!r}; accepted: an integer from 1 to 1024")
        cache = self.cache_gib
        if isinstance(cache, bool) or not isinstance(cache, (int, float)) or not 0 < cache <= 4096:
            raise ConfigError(f"serving.cache_gib={cache!r}; accepted: a number of GiB above 0 and at most 4096")
        if isinstance(self.max_waiting, bool) or not isinstance(self.max_waiting, int) or self.max_waiting < 0:
            raise ConfigError(f"serving.max_waiting={self.max_waiting!r}; accepted: an integer >= 0")

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> ServingLimits:
        data = dict(config or {})
        allowed = {"max_batch", "cache_gib", "max_waiting"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"unknown serving setting(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**data)


@dataclass
class Finished:
    """The final record of a request."""

    reason: str = ""  # one of FINISH_REASONS
    prompt_tokens: int = 0
    new_tokens: int = 0
    queued_seconds: float = 0.0  # from submit to the start of its prefill
    time_to_first_token: float | None = None  # from submit to its first new token
    seconds: float = 0.0  # from submit to the end
    error: str = ""  # what failed, for reason "error"
    forwards: int = 0  # forwards that produced its tokens (prefill included): tokens/forward > 1 with speculation


class Handle:
    """A submitted request: iterate for its new token ids; `finished` is its record afterwards.

    Iterating raises GenerationError if the request failed. `cancel()` (or the cancel event given at
    submit) ends it within one decode step; a request cancelled while it waits never runs.
    """

    def __init__(self, cancel: threading.Event) -> None:
        self.cancel_event = cancel
        self.stop_requested = False  # the text layer saw a stop string: finish with reason "stop"
        self.finished: Finished | None = None
        self._queue: queue.SimpleQueue[list[int] | Finished] = queue.SimpleQueue()

    def cancel(self) -> None:
        self.cancel_event.set()

    def stop(self) -> None:
        """End the request because the client has what it wanted (a stop string)."""
        self.stop_requested = True
        self.cancel_event.set()

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._queue.get()
            if isinstance(item, Finished):
                self.finished = item
                if item.reason == "error":
                    raise GenerationError(item.error)
                return
            yield from item

    def close(self) -> None:
        """The client stopped reading: cancel the request if it still runs."""
        if self.finished is None:
            self.cancel_event.set()


@dataclass
class _Request:
    prompt: list[int]
    params: GenerationParams
    handle: Handle
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class _Row:
    """A running request: its tokens so far and its sampler."""

    request: _Request
    tokens: list[int]  # prompt + generated, for the repetition penalty
    length: int  # real (unmasked) tokens in the cache for this row
    generated: int = 0
    last: int = 0  # the token to feed at the next step
    first_token_at: float | None = None
    started: float = 0.0
    processors: Any = None
    generator: torch.Generator | None = None
    forwards: int = 1  # the prefill produced the first token (draft-model forwards are not counted)
    spec_k: int = 8  # how many tokens speculation proposes next (adapts to acceptance)
    draft_cache: Any = None  # the draft model's KV cache of this chat (speculate="draft"), or None
    draft_length: int = 0  # tokens of `tokens` in draft_cache; the draft catches up on the rest before proposing


@dataclass(frozen=True)
class _Close:
    reason: str


class Server:
    """The one worker that runs a loaded model. Create with `Server(loaded)`; `close()` ends it.

    `loaded` is a `pipeline.loading.LoadedModel` (model, tokenizer, context length, plan, and its draft
    model when it has one).
    """

    def __init__(self, loaded: Any, limits: ServingLimits | None = None) -> None:
        self.loaded = loaded
        self.limits = limits or ServingLimits()
        self.model = loaded.model
        self.device = torch.device(loaded.plan.compute_device)
        self.context_length = int(loaded.context_length)
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        self.eos = frozenset([eos] if isinstance(eos, int) else (eos or []))
        tokenizer = loaded.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad = int(pad) if pad is not None else 0
        params = inspect.signature(self.model.forward).parameters
        # transformers renamed `past_key_values` to `cache` (5.2x; the GPU machine has 5.17): use the model's word.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._position_ids = "position_ids" in params
        self._logits_to_keep = "logits_to_keep" in params
        self.draft = getattr(loaded, "draft", None)  # a smaller model with the same tokenizer (speculate="draft")
        if self.draft is not None:
            params = inspect.signature(self.draft.forward).parameters
            self._draft_cache_arg = "cache" if "cache" in params else "past_key_values"
            self._draft_position_ids = "position_ids" in params
            self._draft_logits_to_keep = "logits_to_keep" in params
            self._draft_device = next(self.draft.parameters()).device
            config = self.draft.config.get_text_config()
            positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
            self._draft_limit = min(self.context_length, positions) if isinstance(positions, int) else self.context_length
        self._vocab = 0  # the target's logits width, from its first forward (a draft's logits are cut or padded to it)
        self.batchable: bool | None = None  # decided from the first cache the model makes
        self._bytes_per_token: int | None = None
        self._inbox: queue.SimpleQueue[_Request | _Close] = queue.SimpleQueue()
        self._waiting: deque[_Request] = deque()
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [batch, cached length], 1 where a row has a real token
        self._closed: str | None = None
        self._lock = threading.Lock()  # guards _closed against submit
        self.steps = 0  # decode steps run (tests and stats)
        self.peak_batch = 0
        # Tests: called on the worker with (handles, logits [rows, vocab]) at every prefill and step.
        self.probe: Callable[[list[Handle], torch.Tensor], None] | None = None
        self._future = _THREADS.submit(self._run)

    # --- client side ------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting) + self._inbox.qsize()

    def submit(self, prompt: Sequence[int], params: GenerationParams, cancel: threading.Event | None = None) -> Handle:
        """Queue a request; raises GenerationError when the worker is closed or the queue is full."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ConfigError("the prompt is empty: at least one token is needed")
        room = self.context_length - len(prompt)
        if room < 1:
            raise ConfigError(f"the prompt is {len(prompt)} tokens; the context holds {self.context_length}")
        if params.speculate == "draft" and self.draft is None:
            preset = getattr(self.loaded, "preset", None)
            name = getattr(preset, "display_name", "the loaded model")
            raise ConfigError(f"speculate='draft' needs a draft model, and {name} was loaded without one: attach one "
                              "(a smaller model with the same tokenizer) with 'draft:' in its preset or --draft "
                              "PRESET_OR_PATH, or choose speculation 'lookup' or 'off'")
        handle = Handle(cancel or threading.Event())
        with self._lock:
            if self._closed is not None:
                raise GenerationError(self._closed)
            if self.waiting >= self.limits.max_waiting + self.limits.max_batch:
                raise GenerationError(
                    f"the server is busy: {self.waiting} requests are waiting (serving.max_waiting="
                    f"{self.limits.max_waiting}); try again shortly"
                )
            self._inbox.put(_Request(prompt, params, handle))
        return handle

    def close(self, reason: str = "the model was unloaded", timeout: float = 600) -> None:
        """Fail every running and waiting request with `reason` and stop the worker (waits for it)."""
        with self._lock:
            if self._closed is None:
                self._closed = reason
                self._inbox.put(_Close(reason))
        try:
            self._future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            logger.error("the serving worker did not stop within %s s", timeout)

    # --- worker side ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    if not self._take_commands(block=not self._rows):
                        return
                    self._drop_cancelled_waiting()
                    self._admit()
                    if self._rows:
                        self._decode_step()
        except BaseException as exc:  # noqa: BLE001 - a bug here must not leave clients hanging
            logger.exception("the serving worker failed")
            self._fail_all(f"the serving worker failed: {type(exc).__name__}: {exc}")
            with self._lock:
                self._closed = self._closed or f"the serving worker failed: {exc}"
            self._drain_after_close()

    def _take_commands(self, block: bool) -> bool:
        """Move new requests to the waiting line; False when closed."""
        while True:
            try:
                item = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
            except queue.Empty:
                if block and not self._waiting:
                    continue  # idle: keep waiting
                return True
            block = False
            if isinstance(item, _Close):
                self._fail_all(item.reason)
                self._drain_after_close()
                return False
            self._waiting.append(item)

    def _drain_after_close(self) -> None:
        reason = self._closed or "the model was unloaded"
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Request):
                self._finish_request(item, "error", error=reason)

    def _fail_all(self, reason: str) -> None:
        for row in self._rows:
            self._finish_row(row, "error", error=reason)
        self._rows, self._cache, self._mask = [], None, None
        while self._waiting:
            self._finish_request(self._waiting.popleft(), "error", error=reason)

    def _drop_cancelled_waiting(self) -> None:
        if any(r.handle.cancel_event.is_set() for r in self._waiting):
            keep = deque()
            for request in self._waiting:
                if request.handle.cancel_event.is_set():
                    self._finish_request(request, "stop" if request.handle.stop_requested else "cancelled")
                else:
                    keep.append(request)
            self._waiting = keep

    def _reserved_tokens(self, request: _Request) -> int:
        return min(self.context_length, len(request.prompt) + request.params.max_new_tokens)

    def _fits(self, joining: list[_Request], request: _Request) -> bool:
        """Whether the cache budget holds the batch with `request`: every row padded to the longest
        reservation (prompt + max_new_tokens), as the batch's layout may need in the worst case."""
        if self._bytes_per_token is None:
            return not joining and not self._rows  # the first request tells the cache's size per token
        rows = [r.request for r in self._rows] + joining + [request]
        longest = max(self._reserved_tokens(r) for r in rows)
        return len(rows) * longest * self._bytes_per_token <= self.limits.cache_gib * 2**30

    def _admit(self) -> None:
        """Prefill waiting requests, in arrival order, as far as the batch and cache limits allow."""
        limit = self.limits.max_batch if self.batchable is not False else 1
        joining: list[_Request] = []
        while self._waiting and len(self._rows) + len(joining) < limit:
            request = self._waiting[0]
            if not self._fits(joining, request):
                if self._rows or joining:
                    break  # wait for running requests to finish; later arrivals wait behind this one
                logger.warning("one request needs more KV cache than serving.cache_gib allows; running it alone")
            joining.append(self._waiting.popleft())
            if self.batchable is None:
                break  # the first prefill decides whether this model's cache can be batched
        if joining:
            self._prefill(joining)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                 keep: int = 1) -> tuple:
        """Logits of the last position [batch, vocab] (of the last `keep` positions [batch, keep, vocab]
        when keep > 1) and the cache."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, self._cache_arg: cache,
                                  "use_cache": True}
        if self._position_ids:
            kwargs["position_ids"] = positions
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = keep
        out = self.model(**kwargs)
        logits = out.logits[:, -1, :] if keep == 1 else out.logits[:, -keep:, :]
        return logits.float(), getattr(out, self._cache_arg)

    def _prefill(self, requests: list[_Request]) -> None:
        try:
            logits, cache, mask = self._prefill_forward(requests)
            self._vocab = logits.shape[-1]
        except Exception as exc:  # noqa: BLE001 - each request is retried alone so a bad one fails alone
            if len(requests) > 1:
                for request in requests:
                    self._prefill([request])
                return
            self._finish_request(requests[0], "error", error=_describe(exc))
            return
        if self.batchable is None:
            self.batchable = _mergeable(cache, self.context_length)
            self._bytes_per_token = _bytes_per_token(cache)
            if not self.batchable:
                logger.info("this model's cache cannot be batched (%s): requests run one at a time",
                            ", ".join(sorted({type(layer).__name__ for layer in _layers(cache)})))
        now = time.perf_counter()
        rows = []
        for request in requests:
            row = _Row(request, list(request.prompt), len(request.prompt), started=now)
            row.processors, row.generator = _sampler(request.params, self.device)
            rows.append(row)
        keep = self._sample_and_emit(rows, logits)
        if not keep:
            return
        index = torch.tensor(keep, device=mask.device)
        if len(keep) < len(rows):
            cache.batch_select_indices(index)
            mask = mask[index]
        rows = [rows[i] for i in keep]
        if self._cache is None:
            self._cache, self._mask, self._rows = cache, mask, rows
        else:
            self._cache, self._mask = _merge(self._cache, self._mask, cache, mask)
            self._rows = self._rows + rows
        self.peak_batch = max(self.peak_batch, len(self._rows))

    def _prefill_forward(self, requests: list[_Request]) -> tuple[torch.Tensor, Any, torch.Tensor]:
        width = max(len(r.prompt) for r in requests)
        ids = torch.full((len(requests), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, request in enumerate(requests):  # left padding: every row's last token is the newest
            ids[i, width - len(request.prompt):] = torch.tensor(request.prompt)
            mask[i, width - len(request.prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        logits, cache = self._forward(ids, mask, positions, None)
        return logits, cache, mask

    def _decode_step(self) -> None:
        rows = self._rows
        if len(rows) == 1 and self._speculative_step(rows[0]):
            return
        if len(rows) > 1:  # the draft runs for a chat alone: the plan holds one chat's draft cache, not a batch's
            for row in rows:
                row.draft_cache = None  # alone again, the draft catches up on the whole conversation in one forward
        ids = torch.tensor([[r.last] for r in rows], dtype=torch.long, device=self.device)  # [batch, 1]
        positions = torch.tensor([[r.length] for r in rows], dtype=torch.long, device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        try:
            logits, self._cache = self._forward(ids, self._mask, positions, self._cache)
        except Exception as exc:  # noqa: BLE001 - the whole batch shared this forward
            error = _describe(exc)
            logger.error("decode step failed for %d request(s): %s", len(rows), error)
            for row in rows:
                self._finish_row(row, "error", error=error)
            self._rows, self._cache, self._mask = [], None, None
            return
        self.steps += 1
        for row in rows:
            row.length += 1
            row.forwards += 1
        keep = self._sample_and_emit(rows, logits)
        if len(keep) == len(rows):
            return
        self._rows = [rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        # Rows are right-aligned: columns left of the longest remaining row are padding for all.
        excess = self._mask.shape[1] - max(r.length for r in self._rows)
        if excess > 0:
            _crop_left(self._cache, excess)
            self._mask = self._mask[:, excess:]

    def _speculative_step(self, row: _Row) -> bool:
        """Speculation for a chat decoding alone: propose k tokens, verify them all in one forward of the
        model, keep the longest accepted prefix plus one token of the model's own, and drop the rest from
        the cache. Proposals come from prompt lookup (the tokens that followed the latest earlier
        occurrence of the conversation's last n-gram) or from the draft model (k tokens decoded by it,
        from its own cache of this chat).

        Acceptance is exact for greedy decoding (a proposal is kept when it is the model's choice) and
        distribution-preserving for sampling (the speculative-sampling rule, `_verify`). A batch of
        several chats takes plain steps, with either kind of proposal: its forward already carries every
        chat over the offloaded weights, and rows that accept different numbers of tokens would leave the
        shared cache ragged. Seeded sampling decodes plainly too (its tokens must not depend on what runs
        beside it). Returns False when no step was taken.

        transformers' assisted generation does the same inside `generate`; it cannot be used here, where
        the worker owns the cache and the batch, so the loop is written out. Its verification rule is the
        one of transformers' private `_speculative_sampling`, which draws from the process-wide RNG; the
        worker draws from each request's own generator, so `_verify` writes the rule out too."""
        params = row.request.params
        if params.speculate == "off" or not self.batchable or row.request.handle.cancel_event.is_set():
            return False
        drafting = params.speculate == "draft"
        if drafting and self.draft is None:
            return False  # (submit refuses such a request)
        if row.generator is not None and params.seed is not None:
            # A seeded sample is the same whatever runs beside it; speculation (only for a chat alone)
            # would draw its random numbers differently, so seeded sampling decodes plainly.
            return False
        room = min(params.max_new_tokens - row.generated - 1, self.context_length - row.length - 2)
        if drafting:
            room = min(room, self._draft_limit - len(row.tokens))  # the draft sees tokens + k - 1 positions
        if room < 1:
            return False
        q = None  # the draft's distributions of its sampled proposals; None: point masses (or greedy)
        try:
            if drafting:
                proposal, q = self._draft_proposal(row, min(row.spec_k, DRAFT_MAX_K, room))
            else:
                proposal = prompt_lookup(row.tokens, min(row.spec_k, room))
        except Exception as exc:  # noqa: BLE001 - the draft's forward or sampling failed: this chat fails alone
            self._finish_row(row, "error", error=_describe(exc))
            self._rows, self._cache, self._mask = [], None, None
            return True
        if not proposal:
            return False
        n = len(proposal)
        ids = torch.tensor([[row.last, *proposal]], dtype=torch.long, device=self.device)
        positions = torch.arange(row.length, row.length + n + 1, device=self.device).unsqueeze(0)
        mask = torch.cat([self._mask, self._mask.new_ones((1, n + 1))], dim=1)
        try:
            logits, cache = self._forward(ids, mask, positions, self._cache, keep=n + 1)  # [1, n+1, vocab]
            accepted, bonus = self._verify(row, proposal, logits[0], q)
        except Exception as exc:  # noqa: BLE001 - this chat's forward or sampling failed
            self._finish_row(row, "error", error=_describe(exc))
            self._rows, self._cache, self._mask = [], None, None
            return True
        self.steps += 1
        row.forwards += 1
        most = DRAFT_MAX_K if drafting else SPEC_MAX_K
        row.spec_k = min(most, row.spec_k + 2) if len(accepted) == n else max(1, row.spec_k - 1)
        drop = n - len(accepted)  # rejected proposals: their cache entries go
        if drop:
            cache.crop(-drop)  # a negative count removes that many newest positions (transformers 4.x-5.x)
            mask = mask[:, : mask.shape[1] - drop]
        self._cache, self._mask = cache, mask
        if drafting:
            # The draft's cache holds tokens + proposal[:n-1]; it keeps the accepted ones and catches up on
            # the rest (the last proposal when all were accepted, the bonus token) before its next proposal.
            kept = min(len(accepted), n - 1)
            if n - 1 - kept:
                row.draft_cache.crop(-(n - 1 - kept))
            row.draft_length = len(row.tokens) + kept
        row.length += 1 + len(accepted)
        now = time.perf_counter()
        for token in [*accepted, bonus]:
            if not self._emit(row, token, now):
                self._rows, self._cache, self._mask = [], None, None
                return True
        return True

    def _draft_proposal(self, row: _Row, k: int) -> tuple[list[int], list[torch.Tensor] | None]:
        """k tokens decoded by the draft model after the row's tokens, and, when sampling, the draft's
        distribution q [vocab] of each, made with the row's own logits processors (temperature, top-k,
        top-p, repetition penalty), as the model's p will be. Its first forward feeds every token its
        cache has not seen (the whole conversation the first time, else the bonus token and any tokens
        decoded in a batch meanwhile)."""
        if row.draft_cache is None:
            row.draft_length = 0
        pending = row.tokens[row.draft_length:]
        start, cache = row.draft_length, row.draft_cache
        proposal: list[int] = []
        dists: list[torch.Tensor] = []
        for _ in range(k):
            logits, cache = self._draft_forward(pending, start, cache)
            row.draft_cache = cache
            start += len(pending)
            row.draft_length = start
            scores = self._scores(row, proposal, logits)
            if row.generator is None:
                token = int(scores.argmax(dim=-1))
            else:
                q = _probabilities(scores)[0]
                token = int(torch.multinomial(q, 1, generator=row.generator))
                dists.append(q)
            proposal.append(token)
            pending = [token]
        return proposal, (dists if row.generator is not None else None)

    def _draft_forward(self, tokens: list[int], start: int, cache: Any) -> tuple[torch.Tensor, Any]:
        """The draft's logits [1, vocab] after `tokens` (at positions start..), as float on the model's
        device and as wide as the model's logits (cut, or padded with -inf: ids only one model has)."""
        device = self._draft_device
        kwargs: dict[str, Any] = {
            "input_ids": torch.tensor([tokens], dtype=torch.long, device=device),
            "attention_mask": torch.ones((1, start + len(tokens)), dtype=torch.long, device=device),
            self._draft_cache_arg: cache, "use_cache": True}
        if self._draft_position_ids:
            kwargs["position_ids"] = torch.arange(start, start + len(tokens), device=device).unsqueeze(0)
        if self._draft_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.draft(**kwargs)
        logits = out.logits[:, -1, :].float().to(self.device)  # [1, draft vocab]
        width = self._vocab or logits.shape[-1]
        if logits.shape[-1] > width:
            logits = logits[:, :width]
        elif logits.shape[-1] < width:
            logits = torch.cat([logits, logits.new_full((1, width - logits.shape[-1]), -float("inf"))], dim=-1)
        return logits, getattr(out, self._draft_cache_arg)

    def _verify(self, row: _Row, proposal: list[int], logits: torch.Tensor,
                q: list[torch.Tensor] | None = None) -> tuple[list[int], int]:
        """The accepted prefix of `proposal` and the token that follows it, from the model's logits [n+1, vocab].

        Sampling follows the speculative-sampling rule: proposal j, drawn from q_j, is kept with
        probability min(1, p_j/q_j); on rejection the token comes from norm(max(p_j - q_j, 0)). `q`: the
        draft's distributions [vocab] (the same processors as p); None: point masses (prompt lookup), for
        which the rule keeps a proposal with probability p_j and otherwise samples p_j without it."""
        accepted: list[int] = []
        for j, token in enumerate(proposal):
            scores = self._scores(row, accepted, logits[j : j + 1])
            if row.generator is None:  # greedy: keep the proposal only if it is the model's choice
                choice = int(scores.argmax(dim=-1))
                if choice != token:
                    return accepted, choice
            else:
                probs = _probabilities(scores)[0]
                drafted = float(q[j][token]) if q is not None else 1.0
                if float(torch.rand((), generator=row.generator, device=probs.device)) * drafted >= float(probs[token]):
                    if q is None:
                        residual = probs.clone()
                        residual[token] = 0.0  # max(p - q, 0) for a point-mass proposal q
                    else:
                        residual = (probs - q[j]).clamp_min(0.0)
                    if float(residual.sum()) <= 0:  # p == q: a rejection has probability 0
                        return accepted, token
                    return accepted, int(torch.multinomial(residual / residual.sum(), 1, generator=row.generator))
            accepted.append(token)
        scores = self._scores(row, accepted, logits[len(proposal) : len(proposal) + 1])
        if row.generator is None:
            return accepted, int(scores.argmax(dim=-1))
        return accepted, int(torch.multinomial(_probabilities(scores)[0], 1, generator=row.generator))

    @staticmethod
    def _scores(row: _Row, accepted: list[int], logits: torch.Tensor) -> torch.Tensor:
        if row.processors is None:
            return logits
        ids = torch.tensor([row.tokens + accepted], dtype=torch.long, device=logits.device)
        return row.processors(ids, logits)

    def _emit(self, row: _Row, token: int, now: float) -> bool:
        """Hand one token to the row's client; False when the row has finished."""
        handle = row.request.handle
        if handle.cancel_event.is_set():
            self._finish_row(row, "stop" if handle.stop_requested else "cancelled")
            return False
        row.generated += 1
        row.tokens.append(token)
        row.last = token
        if row.first_token_at is None:
            row.first_token_at = now
        if token in self.eos:
            self._finish_row(row, "eos")
            return False
        handle._queue.put([token])
        if row.generated >= row.request.params.max_new_tokens or row.length + 1 > self.context_length:
            self._finish_row(row, "length")
            return False
        return True

    def _sample_and_emit(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Pick each row's next token, hand it to its client, and return the indices of rows that go on."""
        if self.probe is not None:
            self.probe([r.request.handle for r in rows], logits)
        greedy = [i for i, r in enumerate(rows) if r.processors is None]
        picked: dict[int, int] = {}
        if greedy:
            best = logits[greedy].argmax(dim=-1).tolist()
            picked.update(zip(greedy, best))
        keep = []
        now = time.perf_counter()
        for i, row in enumerate(rows):
            handle = row.request.handle
            if handle.cancel_event.is_set():
                self._finish_row(row, "stop" if handle.stop_requested else "cancelled")
                continue
            if i not in picked:
                try:
                    picked[i] = _sample(row, logits[i : i + 1])
                except Exception as exc:  # noqa: BLE001 - a sampling failure ends this request alone
                    self._finish_row(row, "error", error=_describe(exc))
                    continue
            if self._emit(row, picked[i], now):
                keep.append(i)
        return keep

    def _finish_row(self, row: _Row, reason: str, error: str = "") -> None:
        row.draft_cache = None
        request = row.request
        now = time.perf_counter()
        ttft = row.first_token_at - request.submitted if row.first_token_at is not None else None
        self._deliver(request, Finished(reason, len(request.prompt), row.generated, row.started - request.submitted,
                                        ttft, now - request.submitted, error, row.forwards))

    def _finish_request(self, request: _Request, reason: str, error: str = "") -> None:
        now = time.perf_counter()
        self._deliver(request, Finished(reason, len(request.prompt), 0, now - request.submitted, None,
                                        now - request.submitted, error))

    @staticmethod
    def _deliver(request: _Request, finished: Finished) -> None:
        request.handle.finished = finished
        request.handle._queue.put(finished)


# --- sampling ------------------------------------------------------------------------------------


def _sampler(params: GenerationParams, device: torch.device) -> tuple[Any, torch.Generator | None]:
    """transformers' own logits processors, as `generate` builds them, and a generator of the request's
    own (seeded, or from the OS): the process-wide RNG is never used. None for plain greedy."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.greedy:
        return (processors or None), None
    processors.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    generator = torch.Generator(device=device)
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    generator.manual_seed(seed)
    return processors, generator


def _sample(row: _Row, logits: torch.Tensor) -> int:
    """One token for one row from its logits [1, vocab]."""
    ids = torch.tensor([row.tokens], dtype=torch.long, device=logits.device)
    scores = row.processors(ids, logits)
    if row.generator is None:  # greedy with a repetition penalty
        return int(scores.argmax(dim=-1))
    return int(torch.multinomial(_probabilities(scores), 1, generator=row.generator))


def _probabilities(scores: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(scores, dim=-1)
    if not torch.isfinite(probs).all() or float(probs.sum()) <= 0:
        raise GenerationError("sampling failed: the probabilities are not finite (try a higher temperature)")
    return probs


SPEC_MAX_K = 16  # most tokens proposed at once
DRAFT_MAX_K = 8  # most tokens a draft model proposes at once (each costs one draft forward)
NGRAM_MAX = 3  # prompt lookup matches the conversation's last 3, 2 or 1 tokens


def prompt_lookup(tokens: list[int], k: int, ngram_max: int = NGRAM_MAX) -> list[int]:
    """Up to `k` proposed next tokens: what followed the latest earlier occurrence of the longest
    suffix n-gram of `tokens` (n = ngram_max .. 1), as transformers' prompt-lookup decoding proposes.
    Vectorized with numpy: this runs before every step of a lone chat."""
    import numpy as np

    if k < 1 or len(tokens) < 2:
        return []
    array = np.asarray(tokens, dtype=np.int64)
    for n in range(min(ngram_max, len(tokens) - 1), 0, -1):
        suffix = array[-n:]
        windows = np.lib.stride_tricks.sliding_window_view(array[:-1], n)  # starts 0 .. len-1-n
        hits = np.nonzero((windows == suffix).all(axis=1))[0]
        for start in hits[::-1]:
            follow = array[start + n : start + n + k]
            if len(follow):
                return follow.tolist()
    return []


def _describe(exc: BaseException) -> str:
    if isinstance(exc, GenerationError):
        return str(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of GPU memory during generation; lower the GPU budget, max_new_tokens or serving.cache_gib"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"generation failed: {type(exc).__name__}: {first}"


# --- the batched cache -----------------------------------------------------------------------------


def _layers(cache: Any) -> list[Any]:
    return list(getattr(cache, "layers", None) or [])


def _mergeable(cache: Any, context_length: int) -> bool:
    """True when every cache layer is a plain key/value layer this module can pad and merge: a
    DynamicLayer, or a sliding-window layer whose window never slides within the context."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = _layers(cache)
    if not layers:
        return False
    for layer in layers:
        if type(layer) is DynamicLayer:
            continue
        if type(layer) is DynamicSlidingWindowLayer and layer.sliding_window > context_length:
            continue
        return False
    return True


def _bytes_per_token(cache: Any) -> int:
    total = 0
    for layer in _layers(cache):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(keys, torch.Tensor) and keys.dim() == 4 and keys.shape[0] and keys.shape[2]:
            per = keys.shape[0] * keys.shape[2]
            total += (keys.numel() * keys.element_size() + values.numel() * values.element_size()) // per
    return max(1, total)


def _set(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    layer.keys, layer.values = keys, values
    if hasattr(layer, "cumulative_length"):  # sliding-window layers count what they hold
        layer.cumulative_length = keys.shape[-2]


def _pad_left(cache: Any, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Prepend `n` masked columns to every row: [batch, heads, seq, dim] -> [batch, heads, n + seq, dim]."""
    if n <= 0:
        return mask
    for layer in _layers(cache):
        if not getattr(layer, "is_initialized", False):
            continue
        k, v = layer.keys, layer.values
        _set(layer, torch.cat([k.new_zeros((*k.shape[:2], n, k.shape[3])), k], dim=-2),
             torch.cat([v.new_zeros((*v.shape[:2], n, v.shape[3])), v], dim=-2))
    return torch.cat([mask.new_zeros((mask.shape[0], n)), mask], dim=1)


def _crop_left(cache: Any, n: int) -> None:
    for layer in _layers(cache):
        if getattr(layer, "is_initialized", False):
            _set(layer, layer.keys[:, :, n:], layer.values[:, :, n:])


def _merge(cache: Any, mask: torch.Tensor, new: Any, new_mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """The running batch followed by the newly prefilled rows, padded on the left to one length."""
    width = max(mask.shape[1], new_mask.shape[1])
    mask = _pad_left(cache, mask, width - mask.shape[1])
    new_mask = _pad_left(new, new_mask, width - new_mask.shape[1])
    for layer, other in zip(_layers(cache), _layers(new), strict=True):
        if not getattr(layer, "is_initialized", False):
            continue
        _set(layer, torch.cat([layer.keys, other.keys], dim=0), torch.cat([layer.values, other.values], dim=0))
    return cache, torch.cat([mask, new_mask], dim=0)



_attach_lock = threading.Lock()


def server_for(loaded: Any, limits: ServingLimits | None = None) -> Server:
    """The serving worker of a loaded model, started on first use (limits from configs/app.yaml)."""
    with _attach_lock:
        if loaded.server is None:
            if not loaded.loaded:
                raise GenerationError("the model was unloaded")
            if limits is None:
                from .presets import load_app_config

                limits = ServingLimits.from_config(load_app_config().get("serving"))
            loaded.server = Server(loaded, limits)
        return loaded.server
