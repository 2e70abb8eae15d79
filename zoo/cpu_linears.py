"""oneDNN-packed fp32 linear layers for CPU inference.

PyTorch runs fp32 ``nn.Linear`` on the CPU through MKL's sgemm. oneDNN's fp32 GEMM on weights reordered
once into its blocked layout is faster on AVX-512 CPUs (measured in ``benchmarks/generate.py``), and it
computes in full fp32 (no reduced-precision accumulation). :func:`packed_linears` swaps every linear layer
of a model onto that path for the duration of a ``with`` block, with the dense feed-forward's GELU fused into
its first GEMM (batch-32 greedy decoding 7 % faster); generation uses it on the CPU.

Packed weights are cached per layer and rebuilt when the weight changes: another tensor object, another
storage, or an in-place update (its version counter), so an optimizer step or ``load_state_dict`` between two
generations never leaves stale weights. Writes that bypass the version counter (``weight.data.copy_(...)``)
are not seen: call :func:`release_packed` after them. Anything the packed kernel does not cover (autograd,
other dtypes or devices, sharded (DTensor / FSDP) parameters, a PyTorch build without oneDNN) runs
``F.linear``.
"""
from __future__ import annotations

import os
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook


def onednn_available() -> bool:
    """Whether packed oneDNN linears are on: this PyTorch build has the kernels, and ``MMZOO_CPU_PACKED`` is
    not ``0`` (set it to ``0`` for MKL's exact fp32 numbers, for example to compare with a sharded run)."""
    ops = torch.ops.mkldnn
    return (os.environ.get("MMZOO_CPU_PACKED", "1") != "0" and torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


class _Packed:
    """The packed weight of one linear layer and the weight state it was packed from."""

    __slots__ = ("source", "key", "weight")

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


#: packed weights per model (by layer id); weak keys: a deleted model takes its packed copies along, and the
#: copies never travel with the model (state_dict, deepcopy, pickle)
_PACKED: "weakref.WeakKeyDictionary[nn.Module, dict[int, _Packed]]" = weakref.WeakKeyDictionary()


_PLAIN = (torch.Tensor, nn.Parameter)  # not DTensor or other tensor subclasses


def release_packed(model: nn.Module) -> None:
    """Drop ``model``'s packed weight copies (after weight writes that bypass the version counter)."""
    _PACKED.pop(model, None)


def _release_all_after_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    # fused AdamW (what training uses on the CPU) writes the parameters without bumping their version counters,
    # so a packed copy keyed on the version would outlive the step: validation during training then generated with
    # the weights of its first pass (VQA 65.8 % in the loop against 89.4 % from the same checkpoint)
    _PACKED.clear()


register_optimizer_step_post_hook(_release_all_after_step)


def packed_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` runs on the packed kernel: plain fp32 CPU tensors, outside autograd."""
    return (type(weight) in _PLAIN and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)))


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: _Packed,
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


def _packed_forward(layer: nn.Linear, packed: _Packed):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, layer.weight, layer.bias, packed)

    return forward


def _packed_ffn_forward(ffn: nn.Module, packed: _Packed):
    """``fc2(gelu(fc1(x)))`` with the GELU fused into fc1's GEMM (fc1's own hooks are not called)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        return ffn.fc2(packed_linear(x, ffn.fc1.weight, ffn.fc1.bias, packed, gelu=ffn.approximate))

    return forward


@contextmanager
def packed_linears(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run every ``nn.Linear`` of ``model`` through packed oneDNN fp32 GEMMs inside the block (CPU, no grad).

    A model with a tied output projection reads ``model.packed_output`` (a packed copy of its embedding, or
    ``None`` outside the block). Nested blocks on one model are no-ops.
    """
    if (not enabled or not onednn_available() or model.__dict__.get("packed_output") is not None
            or any(type(p) not in _PLAIN for p in model.parameters())):  # sharded (FSDP) or subclassed weights
        yield
        return
    cache = _PACKED.setdefault(model, {})
    from zoo.layers import FeedForward

    layers = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in m.__dict__]
    for m in layers:
        m.forward = _packed_forward(m, cache.setdefault(id(m), _Packed()))  # type: ignore[method-assign]
    # only plain fc1 layers: a LoRA-wrapped or quantized fc1 must run its own forward
    ffns = [m for m in model.modules() if type(m) is FeedForward and type(m.fc1) is nn.Linear
            and "forward" not in m.__dict__]
    for m in ffns:
        m.forward = _packed_ffn_forward(m, cache.setdefault(id(m.fc1), _Packed()))  # type: ignore[method-assign]
    layers += ffns
    from zoo.fast_davit import install  # Florence-2's timm DaViT tower: its lean forward on the packed weights

    layers += install(model, cache)
    model.__dict__["packed_output"] = cache.setdefault(id(model), _Packed())
    try:
        yield
    finally:
        for m in layers:
            del m.__dict__["forward_features" if "forward_features" in m.__dict__ else "forward"]
        model.__dict__["packed_output"] = None
