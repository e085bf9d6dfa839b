"""Loading a planned model: `from_pretrained` with the explicit device map, bitsandbytes config and an
offload folder of its own; and unloading it so that GPU and CPU memory come back.
"""

from __future__ import annotations

import contextlib
from contextlib import nullcontext
import ctypes
import errno
import gc
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from .budgets import Budgets, free_disk
from .moe import MoeInfo, checkpoint_folder, routed_experts, set_up_routing
from .errors import ConfigError, DoesNotFitError, LoadError, ModelSourceError, PipelineError
from .planning import (MODEL_BUILD_LOCK, Plan, format_bytes, load_model_config, plan_device_map, planned_device,
                       resolve_dtype)
from .presets import ENGINES, Preset
from .quantization import QuantSettings

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]  # (fraction 0..1, what is happening)

DEFAULT_CONTEXT = 2048
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_progress_lock = threading.Lock()  # the weight-progress hook patches a module global
_unload_lock = threading.Lock()


@dataclass
class LoadedModel:
    """A model in memory with everything chat needs; `unload()` gives the memory back."""

    preset: Preset
    plan: Plan
    quant: QuantSettings
    model: Any
    tokenizer: Any
    context_length: int
    offload_dir: Path | None
    load_seconds: float = 0.0
    engine: Any = None  # the OffloadEngine running offloaded layers, or None (accelerate's hooks or none)
    moe: Any = None  # pipeline.moe.MoeInfo for a mixture-of-experts model (its experts' storage and route)
    server: Any = None  # the serving worker (pipeline.serving.Server) that alone runs the model, once started
    draft: Any = None  # the draft model proposing tokens for speculate="draft" (plan.draft says where), or None

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def unload(self) -> None:
        unload(self)


@dataclass(frozen=True)
class Prepared:
    """A plan made for a preset, with what loading it needs."""

    plan: Plan
    quant: QuantSettings
    config: Any  # the model's PretrainedConfig
    engine: bool = False  # run offloaded layers with the offload engine (else accelerate's hooks)
    estimate: Any = None  # pipeline.speed.Estimate: predicted decode tokens/s and time to first token
    what_if: bool = False  # planned for GPUs this machine does not have: it cannot be loaded here
    draft: Any = None  # pipeline.draft.DraftSetup when the preset has a draft model


ENGINE_SLOTS = 2  # GPU slots of the offload engine: one layer computes while the next one arrives
Engine = Literal["auto", "engine", "accelerate"]


def uses_engine(engine: str, budgets: Budgets) -> bool:
    """The offload engine runs offloaded layers when a CUDA GPU computes ("auto"), or when asked for."""
    if engine not in ENGINES:
        raise ConfigError(f"offload={engine!r}; accepted: {list(ENGINES)}")
    return engine == "engine" or (engine == "auto" and budgets.has_gpu and torch.cuda.is_available())


def prepare(
    preset: Preset, budgets: Budgets, quant: QuantSettings | None = None, engine: Engine = "auto",
    what_if: bool = False, estimate_speed: bool = True,
) -> Prepared:
    """Plan a preset under budgets without loading anything but its config.json, with its predicted speed.

    `what_if`: the budgets' GPUs are not this machine's; the plan is priced as a CUDA machine would run
    it (offload engine, compressed transfer) and its speed predicted with assumed link speeds."""
    quant = quant or QuantSettings(mode=preset.quantization, skip_modules=preset.int8_skip_modules)
    config = load_model_config(preset)
    dtype = resolve_dtype(preset.dtype, config, budgets.has_gpu)
    draft = None
    if preset.draft:  # checked (tokenizer) and priced before the target is planned: it takes its budget first
        from .draft import load_tokenizer, plan_draft

        tokenizer = load_tokenizer(preset)
        draft = plan_draft(preset, tokenizer, budgets, _context_length(preset, config, tokenizer))
        budgets = draft.budgets
    use_engine = uses_engine(engine, budgets) or (what_if and engine != "accelerate")
    engine_on_gpu = use_engine and budgets.has_gpu
    plan = plan_device_map(
        config,
        budgets,
        quant,
        dtype,
        model_name=preset.display_name,
        no_split_override=preset.no_split_modules,
        trust_remote_code=preset.trust_remote_code,
        offload_slots=ENGINE_SLOTS if engine_on_gpu else 1,
        compressed_offload=engine_on_gpu and quant.enabled,
    )
    predicted = None
    if estimate_speed:
        from .speed import estimate, machine_speeds, what_if_speeds

        try:
            import psutil

            speeds = what_if_speeds(int(psutil.virtual_memory().available)) if what_if else \
                machine_speeds(budgets.offload_dir)
            predicted = estimate(plan, speeds, engine=use_engine)
        except Exception:  # noqa: BLE001 - a prediction must never stop a plan
            logger.warning("the speed prediction failed", exc_info=True)
    if draft is not None:
        from .planning import with_draft

        plan = with_draft(plan, draft.plan)
    return Prepared(plan, quant, config, use_engine, predicted, what_if, draft)


def load_model(
    preset: Preset,
    budgets: Budgets,
    quant: QuantSettings | None = None,
    *,
    progress: ProgressCallback | None = None,
    allow_pickle: bool | None = None,
    prepared: Prepared | None = None,
    engine: Engine = "auto",
    expert_route: str = "auto",
) -> LoadedModel:
    """Plan (unless `prepared` is given), then load weights into exactly that plan.

    Raises PipelineError subclasses on failure, after removing any partial offload files.
    `expert_route` (MoE models): how offloaded layers' experts run, see pipeline.moe.set_up_routing
    ("auto" measures; "gpu", "cpu", and "whole", the whole-layer baseline, are for benchmarks).
    """
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .versions import warn_if_untested

    warn_if_untested()
    report = progress or (lambda fraction, message: None)
    started = time.perf_counter()
    report(0.0, f"Planning {preset.display_name}")
    prepared = prepared or prepare(preset, budgets, quant, engine)
    if prepared.what_if:
        raise ConfigError("this plan is for GPUs this machine does not have; loading needs the real hardware")
    plan, quant, config = prepared.plan, prepared.quant, prepared.config
    allow_pickle = preset.allow_pickle if allow_pickle is None else allow_pickle
    source = str(preset.local_path or preset.source)
    if preset.local_path is not None:
        _check_local_checkpoint(preset.local_path, allow_pickle)
    if prepared.draft is not None and prepared.draft.preset.local_path is not None:
        _check_local_checkpoint(prepared.draft.preset.local_path, allow_pickle or prepared.draft.preset.allow_pickle)
    if quant.enabled:
        _check_bitsandbytes(plan)
    check_disk_space(prepared, preset, budgets, allow_pickle)

    if preset.trust_remote_code:
        logger.warning(
            "%s runs code from its repository (trust_remote_code: true in its preset): only use presets you trust",
            preset.display_name,
        )
    report(0.05, "Loading tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=preset.trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelSourceError(f"model {preset.source!r}: cannot load its tokenizer ({_first_line(exc)})") from None
    if preset.chat_template:
        tokenizer.chat_template = preset.chat_template

    device_map = _loader_map(plan, prepared.engine, preset, allow_pickle)
    offload_dir = None
    if "disk" in device_map.values() or "disk" in plan.device_map.values():
        offload_dir = _offload_folder(budgets.offload_dir, preset, plan, quant)
    moe_info = None
    try:
        report(0.1, f"Loading weights: {plan.summary}")
        with MODEL_BUILD_LOCK, routed_experts(config) if plan.experts else nullcontext(False) as routed, \
                _weight_progress(lambda f: report(0.1 + 0.85 * f, "Loading weights")):
            model = AutoModelForCausalLM.from_pretrained(
                source,
                device_map=device_map,
                dtype=plan.dtype,
                quantization_config=replace(quant, skip_modules=plan.skip_modules).bnb_config(
                    plan.dtype, offloaded=plan.offloaded and budgets.has_gpu
                ),
                offload_folder=str(offload_dir) if offload_dir else None,
                use_safetensors=None if allow_pickle else True,
                trust_remote_code=preset.trust_remote_code,
            )
        model.eval()
        if bool(routed) != bool(plan.experts):
            raise LoadError(f"{preset.display_name}: the plan priced its experts "
                            f"{'as pipeline.moe stores them' if plan.experts else 'as transformers does'}, but the "
                            "model was built the other way; plan again")
        if routed:
            report(0.95, "Quantizing experts" if plan.experts != "none" else "Placing experts")
            moe_info = _place_experts(model, plan, preset, source, offload_dir, expert_route, prepared.engine)
        offload_engine = _attach_engine(model, plan, quant, offload_dir) if prepared.engine else None
        if moe_info is not None and moe_info.route != "whole":
            moe_info = set_up_routing(moe_info.modules, plan.experts, torch.device(plan.offload_device),
                                      plan.expert_cache_bytes, expert_route)
    except PipelineError:
        _remove_offload(offload_dir)
        raise
    except torch.OutOfMemoryError:
        _remove_offload(offload_dir)
        gc.collect()
        _empty_cuda_cache()
        raise LoadError(
            f"out of GPU memory while loading {preset.display_name} ({plan.summary}); lower the GPU budget"
        ) from None
    except MemoryError:
        _remove_offload(offload_dir)
        gc.collect()
        raise LoadError(f"out of CPU memory while loading {preset.display_name}; lower the CPU budget or use disk") from None
    except OSError as exc:
        _remove_offload(offload_dir)
        gc.collect()
        if exc.errno == errno.ENOSPC:
            where = offload_dir.parent if offload_dir else budgets.offload_dir
            raise LoadError(
                f"the disk is full at {str(where)!r} while writing offload files for {preset.display_name}; "
                "free some space, lower the disk cap, or raise the GPU/CPU budgets (partial files were removed)"
            ) from None
        raise LoadError(f"loading {preset.source!r} failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    except BaseException as exc:  # corrupt shards, missing keys, library errors: all end as one clear LoadError
        _remove_offload(offload_dir)  # also on Ctrl-C or SIGTERM in the middle of loading
        if not isinstance(exc, Exception):
            raise
        gc.collect()
        if "can't allocate memory" in str(exc) or "not enough memory" in str(exc):
            raise LoadError(
                f"out of CPU memory while loading {preset.display_name}; lower the CPU budget or use disk"
            ) from None
        raise LoadError(f"loading {preset.source!r} failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    context = _context_length(preset, config, tokenizer)
    loaded = LoadedModel(preset, plan, quant, model, tokenizer, context, offload_dir, time.perf_counter() - started)
    loaded.engine = offload_engine
    loaded.moe = moe_info
    if moe_info is not None:
        logger.info("%s: %s", preset.display_name, moe_info.describe())
    if prepared.draft is not None:
        from .draft import load_draft

        report(0.96, f"Loading the draft model {prepared.draft.preset.display_name}")
        try:
            loaded.draft = load_draft(prepared.draft, bool(allow_pickle))
        except BaseException as exc:
            unload(loaded)
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, torch.OutOfMemoryError):
                raise LoadError(f"out of GPU memory while loading the draft model {prepared.draft.preset.display_name}; "
                                "lower the GPU budget") from None
            raise LoadError(f"loading the draft model {prepared.draft.preset.source!r} failed: "
                            f"{type(exc).__name__}: {_first_line(exc)}") from exc
    loaded.load_seconds = time.perf_counter() - started
    report(1.0, f"Loaded {preset.display_name}")
    return loaded


def _place_experts(model: Any, plan: Plan, preset: Preset, source: str, offload_dir: Path | None, route: str,
                   engine: bool) -> MoeInfo:
    """Read, quantize and place a MoE model's experts where the plan put their layers (pipeline.moe)."""
    from .moe import RoutedExperts, fill_experts, make_whole

    tiers = {}
    for name, module in model.named_modules():
        if isinstance(module, RoutedExperts):  # several GPUs: each layer's experts on its own GPU
            device = planned_device(name, plan.device_map)
            tiers[name] = f"cuda:{device}" if isinstance(device, int) else str(device)
    compute = torch.device(plan.offload_device)
    modules = fill_experts(model, checkpoint_folder(source, preset.local_path is not None), tiers, plan.experts,
                           plan.dtype, compute, offload_dir)
    if route == "whole":
        make_whole(modules, compute, engine)
        return MoeInfo(mode=plan.experts, route="whole", modules=modules)
    return MoeInfo(mode=plan.experts, route="resident", modules=modules)


def _loader_map(plan: Plan, engine: bool, preset: Preset, allow_pickle: bool) -> dict[str, Any]:
    """The device map handed to transformers.

    Decoder layers the engine will run from RAM are mapped to "disk" for transformers when the
    checkpoint is safetensors: transformers then only indexes them in the checkpoint's files
    (nothing is written), and the engine reads each layer from the memory-mapped file straight
    into its pinned buffer (quantizing it first with compressed transfer). RAM never holds a
    16/32-bit copy of the offloaded layers, so a plan priced at quantized size also holds while loading.
    """
    device_map = dict(plan.device_map)
    if not (engine and plan.compute_device.startswith("cuda") and plan.layer_prefix):
        return device_map
    if _pickle_checkpoint(preset, allow_pickle):
        return device_map  # pickle checkpoints would be re-saved to the offload folder in full: load them to RAM
    for key, device in device_map.items():
        if device == "cpu" and _is_layer_key(key, plan.layer_prefix):
            device_map[key] = "disk"
    return device_map


def _is_layer_key(key: str, prefix: str) -> bool:
    rest = key.removeprefix(prefix + ".")
    return rest != key and rest.isdigit()


def _attach_engine(model: Any, plan: Plan, quant: QuantSettings, offload_dir: Path | None) -> Any:
    from .engine import attach_engine
    from .planning import layer_list

    layers = layer_list(model)
    if layers is None:
        return None
    return attach_engine(model, layers[0], plan.device_map, torch.device(plan.offload_device),
                         slots=plan.offload_slots, align=plan.multi_gpu, quant=replace(quant, skip_modules=plan.skip_modules)
                         if plan.compressed else None, cache_dir=offload_dir)


def unload(loaded: LoadedModel, reason: str = "the model was unloaded") -> None:
    """Free the model's GPU and CPU memory and delete its offload folder. Safe to call twice.

    The serving worker is closed first: its requests end with an error saying `reason`, and nothing
    runs the model after."""
    with _unload_lock:
        if loaded.server is not None:
            loaded.server.close(reason)
            loaded.server = None
        model, loaded.model = loaded.model, None
        loaded.draft = None
        if loaded.engine is not None:
            loaded.engine.close()  # hooks, slots, pinned buffers, the disk reader thread
            loaded.engine = None
        if loaded.moe is not None:  # expert rows (GPU, pinned RAM, memory-mapped files) and the expert cache
            for module in loaded.moe.modules:
                module.rows = module.cache = None
            loaded.moe = None
        if model is not None:
            try:
                from accelerate.hooks import remove_hook_from_submodules

                remove_hook_from_submodules(model)  # hooks hold references to offloaded weights
            except Exception:
                logger.warning("removing accelerate hooks failed", exc_info=True)
            del model
        gc.collect()
        _empty_cuda_cache()
        _trim_malloc()
        _remove_offload(loaded.offload_dir)
        loaded.offload_dir = None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _check_local_checkpoint(path: Path, allow_pickle: bool) -> None:
    files = [p.name for p in path.iterdir() if p.is_file()]
    if any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
        return
    pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES) or f.endswith(".bin.index.json")]
    if pickles and not allow_pickle:
        raise ModelSourceError(
            f"model folder {str(path)!r} has only pickle checkpoints ({', '.join(sorted(pickles)[:3])}); pickle files "
            "can run arbitrary code, so only safetensors are loaded unless you allow pickle explicitly (--allow-pickle)"
        )
    if not pickles:
        raise ModelSourceError(f"model folder {str(path)!r} has no weight files (*.safetensors)")


DISK_MARGIN = 64 * 2**20  # left free beyond the offload files, for the filesystem and the logs


def offload_bytes_written(prepared: Prepared, preset: Preset, allow_pickle: bool | None = None) -> int:
    """Bytes a load writes into its offload folder: the disk tier's weights when they cannot be read in
    place. Safetensors disk layers are read from the checkpoint's own files (nothing written), except
    when the offload engine compresses them (rewritten quantized); a pickle checkpoint's disk layers are
    re-saved in full by transformers."""
    on_disk = int(prepared.plan.bytes_per_device.get("disk", 0))
    if not on_disk:
        return 0
    allow_pickle = preset.allow_pickle if allow_pickle is None else allow_pickle
    if prepared.plan.experts:  # MoE experts on disk are always written (per expert, quantized or not)
        return on_disk
    return on_disk if _pickle_checkpoint(preset, allow_pickle) or (prepared.engine and prepared.plan.compressed) else 0


def _pickle_checkpoint(preset: Preset, allow_pickle: bool) -> bool:
    """Whether transformers will read .bin/.pt (pickle) files: allowed, and no safetensors at hand."""
    return allow_pickle and not (preset.local_path is not None and any(preset.local_path.glob("*.safetensors")))


def check_disk_space(prepared: Prepared, preset: Preset, budgets: Budgets, allow_pickle: bool | None = None) -> None:
    """Refuse, before anything is loaded or unloaded, a load whose offload files would not fit on the disk."""
    needed = offload_bytes_written(prepared, preset, allow_pickle)
    if not needed:
        return
    free = free_disk(budgets.offload_dir)
    if needed + DISK_MARGIN > free:
        raise DoesNotFitError(
            f"loading {preset.display_name} writes {format_bytes(needed)} of offload files to "
            f"{str(budgets.offload_dir)!r}, but only {format_bytes(free)} is free there; free some space, choose "
            "another offload folder, or raise the GPU/CPU budgets")


def _check_bitsandbytes(plan: Plan) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise LoadError(f"quantization {plan.quantization!r} needs bitsandbytes, which failed to import: {exc}") from None


def _offload_folder(root: Path, preset: Preset, plan: Plan, quant: QuantSettings) -> Path:
    """A new folder for this load under the offload root: unique per process and load, so two
    processes (the app and the CLI, two apps) loading the same model never share or delete each
    other's files. Created here; `_remove_offload` removes it and the parents this load created,
    never anything that was there before."""
    key = json.dumps(
        {"source": preset.source, "quant": quant.fingerprint(), "dtype": str(plan.dtype), "map": plan.device_map},
        sort_keys=True,
        default=str,
    )
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in preset.display_name)[:48].strip("-.") or "model"
    root = Path(root).expanduser().resolve()
    unique = f"{hashlib.sha1(key.encode()).hexdigest()[:8]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder = root / f"{slug}-{unique}"
    _created_parents[folder] = [p for p in [root, *root.parents] if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=False)
        probe = folder / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        _remove_offload(folder)
        raise LoadError(f"offload folder {str(root)!r} is not writable ({exc.strerror or exc}); choose another folder") from None
    return folder


_created_parents: dict[Path, list[Path]] = {}  # offload folder -> parents its load created (deepest first)


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()  # fails (and is left alone) unless empty
    except OSError:
        pass


def _remove_offload(folder: Path | None) -> None:
    """Delete a load's own offload folder, then the parents that load created if they are empty now."""
    if folder is None:
        return
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
    for parent in _created_parents.pop(folder, []):
        _rmdir_if_empty(parent)


def _context_length(preset: Preset, config: Any, tokenizer: Any) -> int:
    if preset.context_length:
        return preset.context_length
    for key in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**7:
        return value
    return DEFAULT_CONTEXT


def _empty_cuda_cache() -> None:
    """Give cached GPU memory back, and cached pinned host memory (the engine's buffers), which
    torch's host allocator otherwise keeps for reuse: it would stay in the process's RSS."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        empty_host = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
        empty_host = empty_host or getattr(torch._C, "_host_emptyCache", None)
        if empty_host is not None:
            empty_host()


def _trim_malloc() -> None:
    """Hand freed heap pages back to the OS so RSS drops after unload (glibc keeps them otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _weight_progress(callback: Callable[[float], None]) -> Iterator[None]:
    """Report weight-loading progress by wrapping the tqdm transformers iterates with.

    transformers offers no progress callback for loading; if its internals move, loading still
    works and only the fine-grained progress is lost.
    """
    try:
        from transformers import core_model_loading
    except ImportError:
        yield
        return
    original = getattr(core_model_loading, "tqdm", None)
    if original is None:
        yield
        return

    def tracking(iterable: Any = None, *args: Any, **kwargs: Any) -> Any:
        items = list(iterable) if iterable is not None else []
        total = max(1, len(items))

        def generate() -> Iterator[Any]:
            for index, item in enumerate(items):
                yield item
                callback((index + 1) / total)

        return generate()

    with _progress_lock:
        core_model_loading.tqdm = tracking
        try:
            yield
        finally:
            core_model_loading.tqdm = original
