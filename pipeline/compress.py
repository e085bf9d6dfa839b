"""Compressed transfer: offloaded decoder layers kept in RAM/disk and moved to the GPU quantized.

transformers quantizes only the modules it places on the compute device; modules mapped to
"cpu"/"disk" stay 16/32-bit (the `llm_int8_enable_fp32_cpu_offload` rule), so they cost 2-4x the
RAM and the link bandwidth. For the layers the offload engine runs, this module does what
transformers does to a resident layer, on the compute device: the same bitsandbytes modules
(`Linear8bitLt` / `Linear4bit`, built as `replace_with_bnb_linear` builds them) and the same
quantize calls (`int8_vectorwise_quant`, `quantize_4bit` with the module's blocksize). The
quantized tensors then come back to host memory as the layer's pieces; the engine binds its slot
views to the module's parameters and quantization states before each forward. The result
computes with bitsandbytes' own kernels on exactly the bytes a fully resident load would hold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .quantization import QuantSettings

Target = tuple[Any, str, bool]  # (owner object, attribute name, is an nn.Parameter)


@dataclass
class Piece:
    """One tensor of an offloaded layer: where its bytes go at bind time, and its host value."""

    targets: tuple[Target, ...]
    value: torch.Tensor  # on the CPU


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _bnb_module(linear: nn.Module, config: Any) -> nn.Module:
    """The bitsandbytes module transformers would put in place of `linear` (on the meta device)."""
    import bitsandbytes as bnb

    if _is_conv1d(linear):
        in_features, out_features = linear.weight.shape
    else:
        in_features, out_features = linear.in_features, linear.out_features
    with torch.device("meta"):
        if config.quantization_method() == "llm_int8":
            module = bnb.nn.Linear8bitLt(in_features, out_features, linear.bias is not None,
                                         has_fp16_weights=False, threshold=config.llm_int8_threshold)
        else:
            module = bnb.nn.Linear4bit(in_features, out_features, linear.bias is not None,
                                       config.bnb_4bit_compute_dtype,
                                       compress_statistics=config.bnb_4bit_use_double_quant,
                                       quant_type=config.bnb_4bit_quant_type,
                                       quant_storage=config.bnb_4bit_quant_storage)
    module.source_cls = type(linear)
    module.requires_grad_(False)
    return module


def _quantize(module: nn.Module, weight: torch.Tensor, device: torch.device) -> list[Piece]:
    """Quantize `weight` into `module` on `device`; return the quantized tensors, moved to the CPU.

    The module keeps empty placeholders on `device`; the engine points them at slot memory.
    """
    import bitsandbytes as bnb

    empty = torch.empty(0, device=device)
    if isinstance(module, bnb.nn.Linear8bitLt):
        # Int8Params._quantize: float16 on the device, then row-wise absmax quantization.
        CB, SCB, _ = bnb.functional.int8_vectorwise_quant(weight.contiguous().to(device=device, dtype=torch.float16))
        module.weight = bnb.nn.Int8Params(empty.to(torch.int8), requires_grad=False, has_fp16_weights=False)
        module.state.CB = module.weight.data
        module.state.SCB = empty.float()
        return [
            Piece(((module, "weight", True), (module.state, "CB", False)), CB.cpu()),
            Piece(((module.state, "SCB", False),), SCB.cpu()),
        ]
    # Params4bit(value, **old.__dict__).to(device), as transformers' Bnb4bitQuantize does.
    meta = module.weight
    param = bnb.nn.Params4bit(weight.to(device), requires_grad=False, **meta.__dict__).to(device)
    state = param.quant_state
    pieces = [Piece(((module, "weight", True),), param.data.cpu())]
    for owner in (state, state.state2) if state.nested else (state,):
        for name in ("absmax", "code", "offset"):
            value = getattr(owner, name, None)
            if isinstance(value, torch.Tensor):
                pieces.append(Piece(((owner, name, False),), value.cpu()))
                setattr(owner, name, empty.to(value.dtype))
    param.data = empty.to(param.dtype)
    module.weight = param
    return pieces


def quantize_layer(
    layer: nn.Module,
    convert: set[str],
    sources: dict[str, Callable[[], torch.Tensor]],
    quant: QuantSettings,
    dtype: torch.dtype,
    device: torch.device,
) -> list[Piece]:
    """Replace the linear modules of `layer` named in `convert` (names relative to the layer) by their
    bitsandbytes modules quantized on `device`, and return every tensor of the layer as pieces.

    `sources` gives each parameter's current value by its name relative to the layer (accelerate
    keeps offloaded values on the CPU or in safetensors files). Parameters not quantized keep the
    dtype they were loaded in. Every parameter left on the module is an empty tensor on `device`.
    """
    config = quant.bnb_config(dtype, offloaded=True)
    pieces: list[Piece] = []
    modules = dict(layer.named_modules())
    for name in sorted(convert):
        linear = modules[name]
        weight = sources[f"{name}.weight"]().to(linear.weight.dtype)
        if _is_conv1d(linear):
            weight = weight.T  # Conv1D stores (in, out); bitsandbytes quantizes (out, in), as transformers does
        module = _bnb_module(linear, config)
        module.train(linear.training)  # bitsandbytes picks its kernels by mode (the model is in eval mode)
        pieces += _quantize(module, weight, device)
        if linear.bias is not None:
            module.bias = nn.Parameter(torch.empty(0, dtype=linear.bias.dtype, device=device), requires_grad=False)
            pieces.append(Piece(((module, "bias", True),), sources[f"{name}.bias"]().to(linear.bias.dtype)))
        layer.set_submodule(name, module)
    converted = tuple(f"{name}." for name in convert)
    for prefix, owner in layer.named_modules():
        if prefix in convert:
            continue
        for name, param in list(owner.named_parameters(recurse=False)):
            full = f"{prefix}.{name}" if prefix else name
            if full.startswith(converted):
                continue
            pieces.append(Piece(((owner, name, True),), sources[full]().to(param.dtype)))
            owner._parameters[name] = nn.Parameter(torch.empty(0, dtype=param.dtype, device=device),
                                                   requires_grad=False)
    return pieces


def linears_by_layer(model: nn.Module, layer_prefix: str, quant: QuantSettings) -> dict[int, set[str]]:
    """Per decoder layer index, the names (relative to the layer) of the linear modules transformers
    would quantize were the layer on the GPU: the rule that also prices them in the planner."""
    from .quantization import quantized_weight_names

    start = f"{layer_prefix}."
    by_layer: dict[int, set[str]] = {}
    for name in quantized_weight_names(model, quant):
        if name.startswith(start):
            index, _, rest = name[len(start):].partition(".")
            by_layer.setdefault(int(index), set()).add(rest.removesuffix(".weight"))
    return by_layer
