"""Encoder and decoder layers: pre-norm (or post-norm) stacks of the :mod:`zoo.layers` primitives, with the
feed-forward / self-attention variants of :mod:`zoo.variants` where the config asks for them."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zoo import variants
from zoo.config import ModelConfig
from zoo.layers import CrossAttention, FeedForward, KVCache, SelfAttention


def build_ffn(cfg: ModelConfig, decoder: bool = False) -> nn.Module:
    """Dense FFN, or a variant from :mod:`zoo.variants` (``cfg.ffn``)."""
    if cfg.ffn == "dense":
        return FeedForward(cfg)
    return variants.build_ffn(cfg, decoder)


def build_self_attention(cfg: ModelConfig, causal: bool) -> nn.Module:
    """Standard self-attention, or a variant from :mod:`zoo.variants` (``cfg.attention``)."""
    if cfg.attention == "standard":
        return SelfAttention(cfg)
    return variants.build_self_attention(cfg, causal)


class EncoderLayer(nn.Module):
    """Pre-norm: ``x + attn(ln1(x))``, then ``x + ffn(ln2(x))``; post-norm (``norm_first=False``, BART):
    ``ln1(x + attn(x))``, then ``ln2(x + ffn(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = build_self_attention(cfg, causal=False)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = build_ffn(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None, route: Any = None) -> torch.Tensor:
        # route: input of a routed FFN (multiway: expert index / segment spans / [B,T] indices; moe: real-token mask)
        if not self.norm_first:
            x = self.ln1(x + self.drop(self.attn(x, allowed)))
            return self.ln2(x + self.drop(self.ffn(x) if route is None else self.ffn(x, route)))
        x = x + self.drop(self.attn(self.ln1(x), allowed))
        h = self.ln2(x)
        return x + self.drop(self.ffn(h) if route is None else self.ffn(h, route))


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention and FFN; pre-norm, or post-norm with ``norm_first=False``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = build_self_attention(cfg, causal=True)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.cross_attn = CrossAttention(cfg)
        self.ln3 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = build_ffn(cfg, decoder=True)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, self_allowed: torch.Tensor | None,
                memory_kv: tuple[torch.Tensor, torch.Tensor], memory_allowed: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0, route: Any = None) -> torch.Tensor:
        if not self.norm_first:
            x = self.ln1(x + self.drop(self.self_attn(x, self_allowed, cache, layer)))
            x = self.ln2(x + self.drop(self.cross_attn(x, memory_kv, memory_allowed)))
            return self.ln3(x + self.drop(self.ffn(x) if route is None else self.ffn(x, route)))
        x = x + self.drop(self.self_attn(self.ln1(x), self_allowed, cache, layer))
        x = x + self.drop(self.cross_attn(self.ln2(x), memory_kv, memory_allowed))
        h = self.ln3(x)
        return x + self.drop(self.ffn(h) if route is None else self.ffn(h, route))
