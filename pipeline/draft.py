"""The draft model of speculative decoding: a smaller model with the target's tokenizer that proposes
tokens for the serving worker to verify (`pipeline.serving`).

Planned with the target, before any weight is read: its tokenizer must be the target's (same vocabulary,
same special tokens), else it is refused naming both models and what differs; its weights and one
chat's KV cache at the context length are taken out of the budget of the device that computes (the
first GPU with a budget, or RAM without one), where it is kept whole. Loaded after the target.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from .budgets import Budgets
from .errors import DoesNotFitError, ModelSourceError
from .planning import MODEL_BUILD_LOCK, DraftPlan, empty_model, format_bytes, load_model_config, resolve_dtype
from .presets import Preset, resolve_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DraftSetup:
    """What planning decided for a draft: its preset, its place and price, the budgets left for the target."""

    preset: Preset
    plan: DraftPlan
    budgets: Budgets  # the target's budgets with the draft's bytes taken out


def load_tokenizer(preset: Preset) -> Any:
    """A preset's tokenizer (small files, no weights)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(preset.local_path or preset.source),
                                             trust_remote_code=preset.trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelSourceError(f"model {preset.source!r}: cannot load its tokenizer ({first})") from None


SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def tokenizer_differences(target: Any, draft: Any) -> list[str]:
    """How two tokenizers differ in what speculation needs to be the same: every token's id, and the
    special tokens (empty when they match)."""
    differences = []
    vocab_t, vocab_d = target.get_vocab(), draft.get_vocab()
    if len(vocab_t) != len(vocab_d):
        differences.append(f"vocabulary of {len(vocab_t)} vs {len(vocab_d)} tokens")
    different = sorted((t for t in vocab_t.keys() | vocab_d.keys() if vocab_t.get(t) != vocab_d.get(t)),
                       key=lambda t: (vocab_t.get(t, 1 << 62), t))
    if different:
        shown = ", ".join(f"{t!r}: {vocab_t.get(t)} vs {vocab_d.get(t)}" for t in different[:3])
        differences.append(f"{len(different)} token(s) with other ids ({shown}{', ...' if len(different) > 3 else ''})")
    for name in SPECIAL:
        pair_t = (getattr(target, name, None), getattr(target, f"{name}_id", None))
        pair_d = (getattr(draft, name, None), getattr(draft, f"{name}_id", None))
        if pair_t != pair_d:
            differences.append(f"{name} {pair_t[0]!r} (id {pair_t[1]}) vs {pair_d[0]!r} (id {pair_d[1]})")
    extra_t, extra_d = set(target.all_special_tokens), set(draft.all_special_tokens)
    if extra_t != extra_d:
        differences.append(f"special tokens only in the target {sorted(extra_t - extra_d)[:5]}, only in the draft "
                           f"{sorted(extra_d - extra_t)[:5]}")
    return differences


def weight_bytes(config: Any, dtype: torch.dtype, trust_remote_code: bool = False) -> int:
    """Bytes of a model's weights and buffers in `dtype`, from its config on the meta device (tied
    weights counted once, as `parameters()` lists them)."""
    model = empty_model(config, trust_remote_code, dtype)
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def cache_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """KV-cache bytes per token of a full-attention decoder: keys and values of every layer,
    2 x layers x key/value heads x head size x element size (Falcon's multi-query: one key/value head)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(config.num_attention_heads)
    kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or heads
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        kv_heads = 1
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * int(config.num_hidden_layers) * int(kv_heads) * int(head_dim) * element


def plan_draft(target: Preset, target_tokenizer: Any, budgets: Budgets, context_length: int) -> DraftSetup:
    """Resolve `target.draft`, refuse it when its tokenizer differs from the target's, and price it on the
    compute device (raises PipelineError subclasses). Reads config and tokenizer files, no weights."""
    assert target.draft, "plan_draft needs a preset with a draft"
    try:
        draft = resolve_model(target.draft)
    except ModelSourceError as exc:
        raise ModelSourceError(f"draft model of {target.display_name}: {exc}") from None
    config = load_model_config(draft)
    differences = tokenizer_differences(target_tokenizer, load_tokenizer(draft))
    if differences:
        raise ModelSourceError(
            f"the draft model {draft.display_name!r} ({draft.source}) does not share the tokenizer of "
            f"{target.display_name!r} ({target.source}): {'; '.join(differences)}; a draft must use the same "
            "tokenizer (a smaller model of the same family)")
    dtype = resolve_dtype(draft.dtype, config, budgets.has_gpu)
    weights = weight_bytes(config, dtype, draft.trust_remote_code)
    cache = cache_bytes_per_token(config, dtype) * context_length
    gpus = [i for i, b in enumerate(budgets.gpu) if b > 0]
    device: int | str = gpus[0] if gpus else "cpu"  # the device that computes: the plan's first GPU, or RAM
    have = budgets.gpu[device] if gpus else budgets.cpu
    where = f"GPU{device}" if gpus else "CPU"
    if weights + cache >= have:  # (the GPU must keep a budget for the target, or it would not compute there)
        raise DoesNotFitError(
            f"the draft model {draft.display_name} needs {format_bytes(weights)} + {format_bytes(cache)} of KV cache "
            f"({context_length} tokens) on {where}, but the {where} budget is {format_bytes(have)}; raise it, or choose "
            "a smaller draft")
    if gpus:
        gpu = list(budgets.gpu)
        gpu[device] -= weights + cache
        left = dataclasses.replace(budgets, gpu=tuple(gpu))
    else:
        left = dataclasses.replace(budgets, cpu=budgets.cpu - weights - cache)
    placed = DraftPlan(draft.display_name, draft.source, device, dtype, weights, cache, context_length)
    return DraftSetup(draft, placed, left)


def load_draft(setup: DraftSetup, allow_pickle: bool = False) -> Any:
    """The draft's weights, whole on its device, in eval mode."""
    from transformers import AutoModelForCausalLM

    preset, placed = setup.preset, setup.plan
    device = f"cuda:{placed.device}" if isinstance(placed.device, int) else "cpu"
    with MODEL_BUILD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(
            str(preset.local_path or preset.source), device_map={"": device}, dtype=placed.dtype,
            use_safetensors=None if allow_pickle or preset.allow_pickle else True,
            trust_remote_code=preset.trust_remote_code)
    model.eval()
    logger.info("draft model %s loaded on %s", preset.display_name, device)
    return model
