"""Compression for cheap CPU inference: dynamic int8 linear layers.

``quantize_int8(model_or_bundle)`` swaps every ``nn.Linear`` (attention projections, FFNs, the MoE router,
image-backbone linears) for a dynamically quantized int8 one: int8 weights, activations quantized per
batch on the fly, fp32 outputs. The tied output projection (an embedding matrix), convolutions and the
batched MoE expert weights stay fp32. CPU only (fbgemm/x86 kernels); the result is for inference.
``zoo-predict ... quantize=int8`` applies it after loading.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

QUANTIZE = ("none", "int8")


def quantize_int8(obj: Any, inplace: bool = False) -> Any:
    """A ``Pretrained`` bundle or ``nn.Module`` with dynamic int8 ``nn.Linear`` layers (on the CPU).

    Returns a quantized copy unless ``inplace``; a bundle comes back with its model replaced.
    """
    model = obj.model if hasattr(obj, "model") and isinstance(obj.model, nn.Module) else obj
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_int8 needs an nn.Module or a Pretrained bundle, got {type(obj).__name__}")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 dynamic quantization runs on the CPU: move the model there first (device=cpu)")
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch >= 2.10 warns that torch.ao quantization is deprecated
        warnings.simplefilter("ignore")
        q = quantize_dynamic(model.eval(), {nn.Linear}, dtype=torch.qint8, inplace=inplace)
    if model is obj:
        return q
    if inplace:
        return obj
    bundle = copy.copy(obj)
    bundle.model = q
    bundle._pre = {}
    return bundle


def apply_quantize(bundle: Any, quantize: str | None) -> Any:
    """``quantize``: ``none`` (or ``None``) | ``int8``."""
    if quantize in (None, "none"):
        return bundle
    if quantize == "int8":
        return quantize_int8(bundle, inplace=True)
    raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's state (int8 packed weights count as stored)."""
    total = 0
    for v in model.state_dict().values():
        if torch.is_tensor(v):
            total += v.numel() * v.element_size()
        elif isinstance(v, tuple):  # packed params of quantized linears: (weight, bias)
            total += sum(t.numel() * t.element_size() for t in v if torch.is_tensor(t))
    return total
