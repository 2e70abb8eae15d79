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

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from zoo.onednn import (  # noqa: F401
    _PLAIN,
    PackedWeight,
    onednn_available,
    onednn_linear,
    packed_applies,
    packed_linear,
)

#: packed weights per model (by layer id); weak keys: a deleted model takes its packed copies along, and the
#: copies never travel with the model (state_dict, deepcopy, pickle)
_PACKED: weakref.WeakKeyDictionary[nn.Module, dict[int, PackedWeight]] = weakref.WeakKeyDictionary()




def release_packed(model: nn.Module) -> None:
    """Drop ``model``'s packed weight copies (after weight writes that bypass the version counter)."""
    _PACKED.pop(model, None)


def _release_all_after_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    # fused AdamW (what training uses on the CPU) writes the parameters without bumping their version counters,
    # so a packed copy keyed on the version would outlive the step: validation during training then generated with
    # the weights of its first pass (VQA 65.8 % in the loop against 89.4 % from the same checkpoint)
    _PACKED.clear()


register_optimizer_step_post_hook(_release_all_after_step)


def _packed_forward(layer: nn.Linear, packed: PackedWeight):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, layer.weight, layer.bias, packed)

    return forward


def _packed_ffn_forward(ffn: nn.Module, packed: PackedWeight):
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
        m.forward = _packed_forward(m, cache.setdefault(id(m), PackedWeight()))  # type: ignore[method-assign]
    # only plain fc1 layers: a LoRA-wrapped or quantized fc1 must run its own forward
    ffns = [m for m in model.modules() if type(m) is FeedForward and type(m.fc1) is nn.Linear
            and "forward" not in m.__dict__]
    for m in ffns:
        m.forward = _packed_ffn_forward(m, cache.setdefault(id(m.fc1), PackedWeight()))  # type: ignore[method-assign]
    layers += ffns
    from zoo.fast_davit import (
        install,  # Florence-2's timm DaViT tower: its lean forward on the packed weights
    )

    layers += install(model, cache)
    model.__dict__["packed_output"] = cache.setdefault(id(model), PackedWeight())
    try:
        yield
    finally:
        for m in layers:
            del m.__dict__["forward_features" if "forward_features" in m.__dict__ else "forward"]
        model.__dict__["packed_output"] = None
