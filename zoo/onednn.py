"""oneDNN fp32 GEMM primitives on weights packed once into oneDNN's blocked layout (CPU inference).

:mod:`zoo.cpu_linears` swaps a model's linear layers onto them; :mod:`zoo.fast_davit` uses them in its lean DaViT
forward. Both import from here, so neither imports the other's user.
"""
from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn


def onednn_available() -> bool:
    """Whether packed oneDNN linears are on: this PyTorch build has the kernels, and ``MMZOO_CPU_PACKED`` is
    not ``0`` (set it to ``0`` for MKL's exact fp32 numbers, for example to compare with a sharded run)."""
    ops = torch.ops.mkldnn
    return (os.environ.get("MMZOO_CPU_PACKED", "1") != "0" and torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


class PackedWeight:
    """The packed weight of one linear layer and the weight state it was packed from."""

    __slots__ = ("key", "source", "weight")

    def __init__(self) -> None:
        self.source: weakref.ref | None = None  # the weight tensor object it was packed from
        self.key: tuple[int, int] | None = None  # (its version counter, its storage address) then
        self.weight: torch.Tensor | None = None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight._version, weight.data_ptr())
        if self.source is None or self.source() is not weight or key != self.key:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            self.source, self.key = weakref.ref(weight), key
        assert self.weight is not None
        return self.weight


_PLAIN = (torch.Tensor, nn.Parameter)  # not DTensor or other tensor subclasses


def packed_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` runs on the packed kernel: plain fp32 CPU tensors, outside autograd."""
    return (type(weight) in _PLAIN and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)))


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedWeight,
                  gelu: str | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (then ``F.gelu(approximate=gelu)`` when ``gelu`` is ``"none"`` or ``"tanh"``),
    through the packed oneDNN kernel where it applies (CPU fp32, no grad); the GELU is then fused into the GEMM."""
    if not packed_applies(x, weight):
        y = F.linear(x, weight, bias)
        return y if gelu is None else F.gelu(y, approximate=gelu)
    # single rows too: in a decoding loop the weights stream from memory rather than cache, and the packed
    # layout streams faster (batch-1 greedy 9 % faster than with MKL for the small layers, although MKL wins
    # cache-hot microbenchmarks of those)
    out = onednn_linear(x.reshape(-1, x.shape[-1]), packed.get(weight), bias, gelu)
    return out.view(*x.shape[:-1], out.shape[-1])


def onednn_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None,
                  gelu: str | None = None) -> torch.Tensor:
    """The oneDNN GEMM of 2-D ``x`` with an already packed weight, the GELU (``"none"`` or ``"tanh"``) fused in when
    given. No checks: callers make sure the packed path applies (:func:`packed_applies`)."""
    act, alg = ("none", "") if gelu is None else ("gelu", gelu)
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, act, [], alg)
