"""A lean single-token decoder step for CPU inference on packed weights.

Inside :func:`zoo.cpu_linears.packed_linears`, a cached decoding step of the plain decoder (standard
attention, dense FFN) runs the same kernels as the module path (``layer_norm``, packed oneDNN GEMMs,
``attend``) in the same order, so its logits are bit-identical, but it calls them directly: no
``nn.Module`` dispatch, dropout, routing or mask building per layer and token. With d256 layers one
token's kernels take about as long as that Python overhead, so batch-1 greedy decoding gets about a
third faster (``benchmarks/generate.py``).

Models it does not cover run the module path: other layer types (attention or FFN variants, LoRA or
quantized linears), forward hooks, training mode, autograd, autocast, or tensors the packed kernels refuse.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as nn_module

from zoo.cpu_linears import _PACKED, onednn_linear, packed_applies
from zoo.blocks import DecoderLayer
from zoo.layers import CrossAttention, FeedForward, KVCache, SelfAttention, attend


def _hooked_or_training(module: nn.Module) -> bool:
    """Whether any submodule has forward hooks or is in training mode (dropout would run)."""
    return any(m._forward_hooks or m._forward_pre_hooks or m.training for m in module.modules())


def _global_hooks() -> bool:
    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def _plain_layer(layer: nn.Module) -> bool:
    sa, ca, ff = getattr(layer, "self_attn", None), getattr(layer, "cross_attn", None), getattr(layer, "ffn", None)
    return (type(layer) is DecoderLayer and type(sa) is SelfAttention and type(ca) is CrossAttention
            and type(ff) is FeedForward
            and all(type(lin) is nn.Linear for lin in (sa.qkv, sa.out, ca.q, ca.out, ff.fc1, ff.fc2)))


class FastDecodeStep:
    """One cached single-token step of a plain :class:`~zoo.model.UnifiedSeq2Seq` decoder → logits ``[B,1,V]``.

    Built by :meth:`build` for one generation call (the packed weights are resolved once, so weights must not
    change while it lives); ``None`` where the model or the moment is not covered.
    """

    def __init__(self, model: nn.Module, packed: dict[int, Any]):
        self.model = model
        self.h, self.dh = model.cfg.n_heads, model.head_dim
        self.impl = model.cfg.attn_impl

        def w(lin: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
            return packed[id(lin)].get(lin.weight), lin.bias

        self.layers = []
        for layer in model.decoder:
            sa, ca, ff = layer.self_attn, layer.cross_attn, layer.ffn
            self.layers.append((layer.ln1, layer.ln2, layer.ln3, w(sa.qkv), w(sa.out), w(ca.q), w(ca.out),
                                w(ff.fc1), w(ff.fc2), ff.approximate))
        self.out_weight = model.__dict__["packed_output"].get(model.embed_tokens.weight)
        self.out_bias = model.final_logits_bias if model.cfg.logits_bias else None
        self.norm_first = model.cfg.norm_first

    @classmethod
    def build(cls, model: nn.Module, memory: torch.Tensor) -> "FastDecodeStep | None":
        """The step for ``model`` decoding against ``memory``, or ``None`` when the module path must run."""
        if model.training or model.__dict__.get("packed_output") is None:  # set only where oneDNN is available
            return None
        cfg = model.cfg
        if cfg.ffn != "dense" or cfg.attention != "standard" or cfg.grad_checkpointing:
            return None
        if not packed_applies(memory, model.embed_tokens.weight) or torch.is_grad_enabled():
            return None
        if torch.is_autocast_enabled(memory.device.type):  # activations change dtype between the kernels
            return None
        if not all(_plain_layer(layer) for layer in model.decoder) or _global_hooks():
            return None
        extra = [model.dec_embed_norm] if cfg.embed_norm else []
        if any(_hooked_or_training(m) for m in (model.decoder, model.dec_norm, model.embed_tokens, *extra,
                                                  *model.decoder_position_tables())):
            return None
        packed = _PACKED.get(model)
        if packed is None:
            return None
        needed = [lin for layer in model.decoder
                  for lin in (layer.self_attn.qkv, layer.self_attn.out, layer.cross_attn.q, layer.cross_attn.out,
                              layer.ffn.fc1, layer.ffn.fc2)]
        if any(id(lin) not in packed for lin in needed) or not all(packed_applies(memory, lin.weight) for lin in needed):
            return None
        return cls(model, packed)

    def __call__(self, tgt_in: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits ``[B,1,V]`` of one new token per row ``tgt_in [B,1]``; extends ``cache``."""
        model, h, dh, lin = self.model, self.h, self.dh, onednn_linear
        b = tgt_in.shape[0]
        start = cache.length
        if start + 1 > model.cfg.max_positions:
            raise ValueError(f"decoder length {start + 1} exceeds max_positions={model.cfg.max_positions}")
        x = F.embedding(tgt_in, model.embed_tokens.weight, model.embed_tokens.padding_idx)
        if model.cfg.embed_scale:
            x = x * model.embed_mult
        x = x + model.decoder_positions(start, 1)  # [B,1,d]
        d = x.shape[-1]
        x = x.view(b, d)
        if model.cfg.embed_norm:
            ln = model.dec_embed_norm
            x = F.layer_norm(x, (d,), ln.weight, ln.bias, ln.eps)
        if not self.norm_first:
            return self._post_norm_layers(x, cache, start)
        bm = cache.cross[0][0].shape[0]
        g = b // bm  # rows (beams) per source row
        for i, (ln1, ln2, ln3, qkv, out, cq, cout, fc1, fc2, gelu) in enumerate(self.layers):
            # self-attention over the cache
            y = F.layer_norm(x, (d,), ln1.weight, ln1.bias, ln1.eps)
            q, k, v = lin(y, *qkv).view(b, 1, 3, h, dh).permute(2, 0, 3, 1, 4)
            cache.k[i][:, :, start:start + 1] = k
            cache.v[i][:, :, start:start + 1] = v
            y = attend(q, cache.k[i][:, :, :start + 1], cache.v[i][:, :, :start + 1], None, self.impl)
            x = x + lin(y.transpose(1, 2).reshape(b, d), *out)
            # cross-attention on the source's cached K/V (beams folded into the query length)
            y = F.layer_norm(x, (d,), ln2.weight, ln2.bias, ln2.eps)
            q = lin(y, *cq).view(bm, g, h, dh).transpose(1, 2)
            mk, mv = cache.cross[i]
            y = attend(q, mk, mv, cache.memory_allowed, self.impl)
            x = x + lin(y.transpose(1, 2).reshape(b, d), *cout)
            # feed-forward, the GELU fused into the first GEMM
            y = F.layer_norm(x, (d,), ln3.weight, ln3.bias, ln3.eps)
            x = x + lin(lin(y, *fc1, gelu), *fc2)
        cache.length += 1
        x = F.layer_norm(x, (d,), model.dec_norm.weight, model.dec_norm.bias, model.dec_norm.eps)
        return lin(x, self.out_weight, self.out_bias).view(b, 1, -1)

    def _post_norm_layers(self, x: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """The layers of a post-norm decoder (``norm_first=False``, BART): ``x = ln(x + f(x))``, no final norm."""
        h, dh, lin = self.h, self.dh, onednn_linear
        b, d = x.shape
        bm = cache.cross[0][0].shape[0]
        g = b // bm
        for i, (ln1, ln2, ln3, qkv, out, cq, cout, fc1, fc2, gelu) in enumerate(self.layers):
            q, k, v = lin(x, *qkv).view(b, 1, 3, h, dh).permute(2, 0, 3, 1, 4)
            cache.k[i][:, :, start:start + 1] = k
            cache.v[i][:, :, start:start + 1] = v
            y = attend(q, cache.k[i][:, :, :start + 1], cache.v[i][:, :, :start + 1], None, self.impl)
            x = F.layer_norm(x + lin(y.transpose(1, 2).reshape(b, d), *out), (d,), ln1.weight, ln1.bias, ln1.eps)
            q = lin(x, *cq).view(bm, g, h, dh).transpose(1, 2)
            mk, mv = cache.cross[i]
            y = attend(q, mk, mv, cache.memory_allowed, self.impl)
            x = F.layer_norm(x + lin(y.transpose(1, 2).reshape(b, d), *cout), (d,), ln2.weight, ln2.bias, ln2.eps)
            x = F.layer_norm(x + lin(lin(x, *fc1, gelu), *fc2), (d,), ln3.weight, ln3.bias, ln3.eps)
        cache.length += 1
        return lin(x, self.out_weight, self.out_bias).view(b, 1, -1)
