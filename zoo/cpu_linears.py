"""oneDNN-packed fp32 linear layers for CPU inference.

PyTorch runs fp32 ``nn.Linear`` on the CPU through MKL's sgemm. oneDNN's fp32 GEMM on weights reordered
once into its blocked layout is faster on AVX-512 CPUs (measured in ``benchmarks/generate.py``), and it
computes in full fp32 (no reduced-precision accumulation). :func:`packed_linears` swaps every linear layer
of a model onto that path for the duration of a ``with`` block; generation uses it on the CPU.

Packed weights are cached per layer and rebuilt when the weight changes (its version counter or storage),
so training between two generations never reads stale weights. Anything the packed kernel does not cover
(autograd, other dtypes or devices, a PyTorch build without oneDNN) falls back to ``F.linear``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def onednn_available() -> bool:
    """Whether this PyTorch build has the packed oneDNN linear kernels."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


class _Packed:
    """The packed weight of one linear layer and the weight state it was packed from."""

    __slots__ = ("key", "weight")

    def __init__(self) -> None:
        self.key: tuple[int, int] | None = None
        self.weight: torch.Tensor | None = None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight._version, weight.data_ptr())
        if key != self.key:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            self.key = key
        assert self.weight is not None
        return self.weight


def _packed_forward(layer: nn.Linear, packed: _Packed):
    def forward(x: torch.Tensor) -> torch.Tensor:
        w = layer.weight
        if (x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
            return F.linear(x, w, layer.bias)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed.get(w), layer.bias,
                                                 "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])

    return forward


@contextmanager
def packed_linears(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run every ``nn.Linear`` of ``model`` through packed oneDNN fp32 GEMMs inside the block (CPU, no grad)."""
    if not enabled or not onednn_available():
        yield
        return
    cache: dict[int, _Packed] = model.__dict__.setdefault("_packed_linears", {})
    layers = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in m.__dict__]
    for m in layers:
        m.forward = _packed_forward(m, cache.setdefault(id(m), _Packed()))  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in layers:
            del m.forward
