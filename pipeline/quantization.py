"""Quantization settings: what bitsandbytes does to which modules, and what that costs in bytes.

transformers quantizes the Linear layers of modules placed on the compute device only. With an
offload tier, modules mapped to "cpu"/"disk" are left in the model dtype (the 8-bit
`llm_int8_enable_fp32_cpu_offload` rule, which 4-bit follows too), so the planner prices them at
full size.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .presets import QUANTIZATIONS, Quantization

COMPUTE_DTYPES = ("auto", "float16", "bfloat16", "float32")
# Skip-list entries reach `re.match` in transformers' module filter (and `_should_convert` here), so a
# pattern such as "model\\.laye(.|.)*@" backtracks for minutes per module name. Only plain dotted module
# names are accepted: without quantifiers or groups, matching them is linear in the name's length.
MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
MAX_SKIP_MODULES = 64
MAX_MODULE_NAME = 200


@dataclass(frozen=True)
class QuantSettings:
    """bitsandbytes settings chosen by the user (or a preset's default)."""

    mode: Quantization = "none"
    int8_threshold: float = 6.0  # outlier threshold of LLM.int8()
    skip_modules: tuple[str, ...] = ("lm_head",)  # kept in 16/32-bit (8-bit and 4-bit alike)
    compute_dtype: str = "auto"  # 4-bit matmul dtype; "auto" follows the model dtype
    double_quant: bool = True  # 4-bit: quantize the quantization constants too

    def __post_init__(self) -> None:
        if self.mode not in QUANTIZATIONS:
            raise ConfigError(f"quantization={self.mode!r}; accepted: {list(QUANTIZATIONS)}")
        threshold = self.int8_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1000:
            raise ConfigError(f"int8_threshold={threshold!r}; accepted: a number from 0 to 1000 (default 6.0)")
        if isinstance(self.skip_modules, str):
            object.__setattr__(self, "skip_modules", tuple(s.strip() for s in self.skip_modules.split(",") if s.strip()))
        if not isinstance(self.skip_modules, (list, tuple)) or not all(isinstance(s, str) for s in self.skip_modules):
            raise ConfigError(f"skip_modules={self.skip_modules!r}; accepted: a list of module names")
        if len(self.skip_modules) > MAX_SKIP_MODULES:
            raise ConfigError(f"skip_modules has {len(self.skip_modules)} entries; accepted: at most {MAX_SKIP_MODULES}")
        for name in self.skip_modules:
            if len(name) > MAX_MODULE_NAME or not MODULE_NAME.fullmatch(name):
                shown = name if len(name) <= 60 else name[:57] + "..."
                raise ConfigError(
                    f"skip_modules entry {shown!r} is not a module name; accepted: plain dotted module names of at "
                    f"most {MAX_MODULE_NAME} characters, such as 'lm_head' or 'model.layers.0.mlp' (letters, digits, "
                    "'_' and '.', no patterns)"
                )
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules))
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype={self.compute_dtype!r}; accepted: {list(COMPUTE_DTYPES)}")
        if not isinstance(self.double_quant, bool):
            raise ConfigError(f"double_quant={self.double_quant!r} must be true or false")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def bnb_config(self, model_dtype: torch.dtype, offloaded: bool) -> Any:
        """The `BitsAndBytesConfig` for `from_pretrained`, or None without quantization."""
        if not self.enabled:
            return None
        from transformers import BitsAndBytesConfig

        if self.mode == "int8":
            return BitsAndBytesConfig(
                load_in_8bit=True,
                llm_int8_threshold=float(self.int8_threshold),
                llm_int8_skip_modules=list(self.skip_modules),
                llm_int8_enable_fp32_cpu_offload=offloaded,
            )
        compute = model_dtype if self.compute_dtype == "auto" else getattr(torch, self.compute_dtype)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.mode,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=self.double_quant,
            llm_int8_skip_modules=list(self.skip_modules),
            llm_int8_enable_fp32_cpu_offload=offloaded,
        )


def _should_convert(name: str, patterns: list[str]) -> bool:
    try:  # transformers' own matcher, so pricing agrees with what it will quantize
        from transformers.quantizers.quantizers_utils import should_convert_module

        return should_convert_module(name, patterns)
    except ImportError:
        boundary = r"(?:(?<=\.)|(?=\.|$))"
        return not any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) for p in patterns)


def quantized_weight_names(model: nn.Module, settings: QuantSettings) -> list[str]:
    """Names of the weights bitsandbytes would quantize when their module is on the compute device."""
    if not settings.enabled:
        return []
    skip = list(settings.skip_modules) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    names = []
    for name, module in model.named_modules():
        is_linear = type(module) is nn.Linear or type(module).__name__ == "Conv1D"
        if is_linear and _should_convert(name, skip):
            names.append(f"{name}.weight")
    return names


def special_dtypes(model: nn.Module, settings: QuantSettings) -> dict[str, Any] | None:
    """accelerate `special_dtypes` pricing quantized weights at 1 byte (int8) or half a byte (4-bit)."""
    if not settings.enabled:
        return None
    from accelerate.utils import CustomDtype

    target = torch.int8 if settings.mode == "int8" else CustomDtype.INT4
    return {name: target for name in quantized_weight_names(model, settings)}


# bitsandbytes' CPU 4-bit kernel (AVX512-bf16 path) packs weights in blocks of 32 output rows.
CPU_4BIT_BLOCK_N = 32


def cpu_4bit_unsupported(model: nn.Module, settings: QuantSettings) -> list[str]:
    """Linear modules bitsandbytes cannot run in 4-bit on a CPU (out_features not a multiple of 32,
    e.g. MoE routers and shared-expert gates); the planner keeps them unquantized."""
    if settings.mode not in ("nf4", "fp4"):
        return []
    names = set(quantized_weight_names(model, settings))
    modules = dict(model.named_modules())
    bad = []
    for weight in names:
        module = modules[weight.removesuffix(".weight")]
        out_features = getattr(module, "out_features", None) or module.weight.shape[0]
        in_features = getattr(module, "in_features", None) or module.weight.shape[-1]
        if out_features % CPU_4BIT_BLOCK_N or in_features % 2:
            bad.append(weight.removesuffix(".weight"))
    return sorted(bad)
