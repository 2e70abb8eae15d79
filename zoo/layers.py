"""Transformer primitives: attention with fused projections and a KV cache, cross-attention and the dense FFN.

The encoder/decoder layers that combine them (with the variants of :mod:`zoo.variants`) are in :mod:`zoo.blocks`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo.config import ModelConfig


def use_sdpa(impl: str, device: torch.device) -> bool:
    """SDPA on accelerators and for CPU inference (one fused op per call); for CPU training the explicit
    matmul→softmax→matmul measured 1.1–1.4× faster forward+backward (see NOTES)."""
    return impl == "sdpa" or (impl == "auto" and (device.type != "cpu" or not torch.is_grad_enabled()))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None,
    impl: str,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention over ``q [B,H,T,Dh]``, ``k/v [B,H,S,Dh]``; ``allowed`` broadcasts to ``[B,H,T,S]``."""
    if use_sdpa(impl, q.device):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
    # the scale goes on q (no pass over the scores, forward or backward), and the softmax stays in the scores'
    # dtype: the CPU kernels accumulate bf16 in fp32, and the probabilities were rounded to v's dtype anyway
    # (bf16 training step 1.09x faster than an fp32 softmax and its two casts)
    scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-1, -2))  # [B,H,T,S]
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v)


def causal_allowed(t_new: int, start: int, device: torch.device) -> torch.Tensor:
    """``[1,1,T,start+T]`` mask: query ``start+i`` may see keys ``<= start+i``."""
    q_pos = torch.arange(start, start + t_new, device=device).unsqueeze(1)
    k_pos = torch.arange(start + t_new, device=device).unsqueeze(0)
    return (k_pos <= q_pos).view(1, 1, t_new, start + t_new)


class KVCache:
    """Preallocated per-layer self-attention K/V buffers plus the cross-attention K/V of the source."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, max_len: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, n_heads, max_len, head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        # attention=lfa: per layer, the last kernel-1 inputs of each causal filter convolution
        self.filter_state: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.memory_allowed: torch.Tensor | None = None  # [B,1,1,S]
        self.out_weight_t: torch.Tensor | None = None  # [d, V] output projection for small batches (inference)
        self.rows_per_source = 1  # >1: consecutive rows (beams) share one source row's cross K/V
        self.fast_step: Any = None  # zoo.fast_decode.FastDecodeStep: single-token steps on the CPU's packed path
        self.length = 0
        self.max_len = max_len

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search): ``index [B']`` into the current batch.

        With ``rows_per_source > 1`` the source K/V are shared, so ``index`` must keep every row within its
        source's group of rows (as beam search does); only the self-attention state moves.
        """
        n = self.length
        shared = self.rows_per_source > 1
        for i in range(len(self.k)):
            self.k[i] = self.k[i].index_select(0, index)
            self.v[i] = self.v[i].index_select(0, index)
            if self.cross[i] is not None and not shared:
                ck, cv = self.cross[i]
                self.cross[i] = (ck.index_select(0, index), cv.index_select(0, index))
            if self.filter_state[i] is not None:
                self.filter_state[i] = tuple(s.index_select(0, index) for s in self.filter_state[i])
        if self.memory_allowed is not None and not shared:
            self.memory_allowed = self.memory_allowed.index_select(0, index)
        self.length = n


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.dh = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.impl, self.p = cfg.attn_impl, cfg.attn_dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)  # 3×[B,H,T,Dh]
        if cache is not None:
            start = cache.length
            cache.k[layer][:, :, start:start + t] = k
            cache.v[layer][:, :, start:start + t] = v
            k = cache.k[layer][:, :, :start + t]
            v = cache.v[layer][:, :, :start + t]
        y = attend(q, k, v, allowed, self.impl, self.p if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class CrossAttention(nn.Module):
    """Decoder→encoder attention with a fused KV projection; K/V of the source are cached once."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.dh = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.impl, self.p = cfg.attn_impl, cfg.attn_dropout

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, _ = memory.shape
        k, v = self.kv(memory).view(b, s, 2, self.h, self.dh).permute(2, 0, 3, 1, 4)  # 2×[B,H,S,Dh]
        return k, v

    def forward(self, x: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor],
                allowed: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        bm = memory_kv[0].shape[0]
        if b != bm:  # g consecutive rows per source row (beams): fold them into the query length
            g = b // bm
            q = self.q(x).view(bm, g * t, self.h, self.dh).transpose(1, 2)  # [Bm,H,g*T,Dh]
        else:
            q = self.q(x).view(b, t, self.h, self.dh).transpose(1, 2)  # [B,H,T,Dh]
        y = attend(q, memory_kv[0], memory_kv[1], allowed, self.impl, self.p if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    """Dense GELU MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.approximate = cfg.gelu_approximate  # "none" (exact GELU) or "tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))
