"""Backbone variants chosen by ``ModelConfig`` (never on the default dense/standard path).

* ``ffn="multiway"`` (BEiT-3 / VLMo): shared attention, one dense FFN expert per modality; every position
  uses the expert of its modality. Encoder layers have an expert per input modality (``text`` + the model's
  modalities) and route by segment; decoder layers one per target modality (``text``, plus ``image_codes``
  when the model has it) and route by the range of each input token in the unified vocabulary.
* ``ffn="moe"`` (Switch Transformer / GLaM): ``num_experts`` bias-free GELU experts, top-1 or top-2
  routing, a per-expert capacity with token dropping (training only) and the Switch load-balancing loss.
* ``attention="lfa"`` (Yuan 2.0 localized filtering): two depthwise 1-D convolutions + residual LayerNorm
  before self-attention; queries and keys read the filtered sequence, values the raw one. Causal in the
  decoder, whose KV cache keeps the last ``kernel - 1`` inputs of each convolution.

Expert parallelism (how MoE scales past one device)
---------------------------------------------------
Dispatch here builds the ``[experts, capacity, d]`` buffer that expert parallelism shards: with ``E``
experts over ``P`` ranks, each rank keeps ``E / P`` experts' weights, and the buffer's expert axis is
exchanged with one ``all_to_all`` before the expert matmuls and one after (GShard). In Lightning this is a
``ModelParallelStrategy`` job: its ``configure_model`` hook gets a 2-D device mesh (data × expert); the
expert weights are placed with ``torch.distributed.tensor`` ``Shard(0)`` on the expert dimension and the
rest of the model is wrapped with FSDP2 (``fully_shard``) over the data dimension; ``MoEFeedForward`` would
then swap its local ``bmm`` for ``all_to_all → bmm on local experts → all_to_all``. With plain ``ddp``
every rank holds all experts (data parallel only), which is what works today: capacity is computed per
rank and the dispatch buffer keeps every expert in the graph, so no parameter is ever unused.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.config import ModelConfig
from zoo.layers import FeedForward, KVCache, attend


# --- multiway -----------------------------------------------------------------------------------
def multiway_experts(cfg: ModelConfig, decoder: bool = False) -> tuple[str, ...]:
    """Expert names of a multiway FFN in a fixed order: encoder ``text`` + the model's modalities; decoder
    the modalities it can generate (``text``, ``image_codes``)."""
    if decoder:
        return ("text", *(m for m in ("image_codes",) if m in cfg.modalities))
    typed = sorted((m for m in cfg.modalities if m in cfg.type_index), key=cfg.type_index.__getitem__)
    return ("text", *typed)


class MultiwayFeedForward(nn.Module):
    """One dense FFN per modality, chosen per position by ``route``: an expert index for every position
    (``int``), contiguous spans ``[(expert, length), ...]`` along the sequence (encoder segments), or a
    per-position index tensor ``[B,T]`` (mixed decoder targets)."""

    def __init__(self, cfg: ModelConfig, decoder: bool = False):
        super().__init__()
        self.experts = nn.ModuleDict({m: FeedForward(cfg) for m in multiway_experts(cfg, decoder)})

    def forward(self, x: torch.Tensor, route: int | list[tuple[int, int]] | torch.Tensor) -> torch.Tensor:
        experts = list(self.experts.values())
        if isinstance(route, int):
            return experts[route](x)
        if isinstance(route, list):  # segments: slice, no gather/scatter
            parts, start = [], 0
            for e, n in route:
                parts.append(experts[e](x[:, start:start + n]))
                start += n
            return torch.cat(parts, dim=1)
        b, t, d = x.shape
        flat, r = x.reshape(b * t, d), route.reshape(b * t)
        out: torch.Tensor | None = None
        for e, ffn in enumerate(experts):  # a loop over experts, not tokens
            idx = (r == e).nonzero().squeeze(1)
            y = ffn(flat.index_select(0, idx))  # an empty selection keeps the expert in the graph
            if out is None:
                out = y.new_zeros(b * t, d)
            out.index_copy_(0, idx, y)
        return out.view(b, t, d)


# --- mixture of experts -------------------------------------------------------------------------
class MoEFeedForward(nn.Module):
    """Top-k routed bias-free GELU experts with capacity-limited, vectorised dispatch.

    After each forward, :attr:`aux_loss` holds the Switch load-balancing loss
    ``E * sum_e f_e * P_e`` (``f_e``: share of tokens whose first choice is expert ``e``; ``P_e``: mean
    router probability of ``e``; 1.0 when balanced) and :attr:`stats` the expert utilisation (share of
    routed assignments per expert) and the dropped fraction (assignments over capacity). Top-2 gates are
    renormalised over the two choices; first choices fill the capacity before second choices (GShard).
    Capacity ``ceil(capacity_factor * k * N / E)`` applies in training; evaluation drops nothing, so a token's
    output never depends on the rest of the batch (cached decoding equals uncached).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, d, f = cfg.num_experts, cfg.d_model, cfg.ffn_dim
        self.num_experts, self.k, self.capacity_factor = e, cfg.moe_top_k, cfg.moe_capacity_factor
        self.router = nn.Linear(d, e, bias=False)
        self.w1 = nn.Parameter(torch.randn(e, d, f) * 0.02)
        self.w2 = nn.Parameter(torch.randn(e, f, d) * 0.02)
        self.approximate = cfg.gelu_approximate
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}

    def capacity(self, n_tokens: int, counts: torch.Tensor) -> int:
        if self.training:
            return max(1, math.ceil(self.capacity_factor * self.k * n_tokens / self.num_experts))
        return max(1, int(counts.max()))  # evaluation: room for every assignment

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B,T,d]``; ``valid [B,T]`` (True = real token): padding is neither routed nor counted."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        keep_idx = None
        if valid is not None and not bool(valid.all()):
            keep_idx = valid.reshape(-1).nonzero().squeeze(1)
            flat = flat.index_select(0, keep_idx)
        n, e, k = flat.shape[0], self.num_experts, self.k
        probs = self.router(flat).float().softmax(-1)  # [N,E]
        gate, expert = probs.topk(k, dim=-1)  # [N,k]
        if k > 1:
            gate = gate / gate.sum(-1, keepdim=True)
        onehot = F.one_hot(expert, e)  # [N,k,E]
        first = onehot[:, 0].float()
        self.aux_loss = e * (first.mean(0) * probs.mean(0)).sum() if n else probs.sum() * 0
        counts = onehot.sum((0, 1))  # [E] assignments per expert
        cap = self.capacity(n, counts)
        # position of every assignment in its expert's queue, first choices before second choices
        choice_major = onehot.transpose(0, 1).reshape(k * n, e)  # [kN,E]
        pos = (choice_major.cumsum(0) * choice_major).sum(-1) - 1  # [kN]
        exp_id, gates = expert.t().reshape(-1), gate.t().reshape(-1)
        src = torch.arange(n, device=x.device).repeat(k)  # token of each assignment
        kept = pos < cap
        slot, src, gates = (exp_id * cap + pos)[kept], src[kept], gates[kept]
        buf = flat.new_zeros(e * cap, d).index_copy(0, slot, flat.index_select(0, src))
        h = F.gelu(torch.bmm(buf.view(e, cap, d), self.w1), approximate=self.approximate)  # [E,C,f]
        y = torch.bmm(h, self.w2).view(e * cap, d)  # [E*C,d]
        y = y.index_select(0, slot) * gates.to(y.dtype)[:, None]
        out = y.new_zeros(n, d).index_add_(0, src, y)  # dropped tokens get 0 (the residual carries them)
        if keep_idx is not None:
            out = out.new_zeros(b * t, d).index_copy_(0, keep_idx, out)
        with torch.no_grad():
            total = max(1, k * n)
            self.stats = {"utilisation": counts.float() / total,
                          "dropped": (1.0 - kept.float().sum() / total) if n else counts.new_zeros((), dtype=torch.float)}
        return out.view(b, t, d)


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the MoE layers' load-balancing losses from the last forward (``None`` without MoE)."""
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def moe_stats(model: nn.Module) -> dict[str, float]:
    """Mean over MoE layers of the last forward's dropped fraction and per-expert utilisation."""
    layers = [m for m in moe_layers(model) if m.stats]
    if not layers:
        return {}
    util = torch.stack([m.stats["utilisation"] for m in layers]).mean(0)
    out = {"moe_dropped_frac": float(torch.stack([m.stats["dropped"] for m in layers]).mean())}
    out.update({f"moe_util_e{i}": float(u) for i, u in enumerate(util)})
    out["moe_util_max"] = float(util.max())
    return out


def active_parameters(model: nn.Module) -> int:
    """Parameters used per token: multiway counts one expert per layer, MoE ``top_k`` experts."""
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, MultiwayFeedForward):
            per = [sum(p.numel() for p in ffn.parameters()) for ffn in m.experts.values()]
            total -= sum(per) - max(per)
        elif isinstance(m, MoEFeedForward):
            total -= (m.num_experts - m.k) * (m.w1[0].numel() + m.w2[0].numel())
    return total


# --- localized filtering attention --------------------------------------------------------------
class LocalFilter(nn.Module):
    """Yuan 2.0's local filter: ``LN(conv2(conv1(x)) + x)`` with depthwise 1-D convolutions.

    Causal: both convolutions look back ``kernel - 1`` positions. Bidirectional (encoder): the first looks
    back and the second ahead, a window centred on each position. Padding positions are zeroed first.
    """

    def __init__(self, d: int, kernel: int, causal: bool, eps: float):
        super().__init__()
        self.conv1 = nn.Conv1d(d, d, kernel, groups=d)
        self.conv2 = nn.Conv1d(d, d, kernel, groups=d)
        self.norm = nn.LayerNorm(d, eps=eps)
        self.p, self.causal = kernel - 1, causal

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None,
                state: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``x [B,T,d]`` → filtered ``[B,T,d]`` and the new state (the last ``kernel-1`` inputs of each
        convolution, ``2×[B,d,kernel-1]``); ``state`` continues a causal sequence (KV-cache decoding)."""
        p = self.p
        if valid is not None:
            x = x * valid[..., None].to(x.dtype)
        h = x.transpose(1, 2)  # [B,d,T]
        in1 = torch.cat([state[0], h], dim=2) if state is not None else F.pad(h, (p, 0))
        y1 = self.conv1(in1)  # [B,d,T]
        if self.causal:
            in2 = torch.cat([state[1], y1], dim=2) if state is not None else F.pad(y1, (p, 0))
        else:
            if valid is not None:
                y1 = y1 * valid[:, None, :].to(y1.dtype)
            in2 = F.pad(y1, (0, p))
        y2 = self.conv2(in2)
        new_state = (in1[..., in1.shape[-1] - p:], in2[..., in2.shape[-1] - p:])
        return self.norm(y2.transpose(1, 2) + x), new_state

    def empty_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.zeros(batch, self.conv1.in_channels, self.p, device=device, dtype=dtype)
        return z, z.clone()


class LFASelfAttention(nn.Module):
    """Self-attention with a local filter: Q/K from the filtered sequence, V from the input (Yuan 2.0)."""

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        d = cfg.d_model
        self.h, self.dh, self.causal = cfg.n_heads, d // cfg.n_heads, causal
        self.filter = LocalFilter(d, cfg.lfa_kernel, causal, cfg.norm_eps)
        self.qk = nn.Linear(d, 2 * d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.impl, self.p = cfg.attn_impl, cfg.attn_dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, t, d = x.shape
        # encoder: ``allowed`` is the key-padding mask [B,1,1,S] (or None); decoder: the causal mask
        valid = allowed[:, 0, 0, :] if (not self.causal and allowed is not None) else None
        state = None
        if cache is not None:
            state = cache.filter_state[layer] or self.filter.empty_state(b, x.device, x.dtype)
        f, new_state = self.filter(x, valid, state)
        if cache is not None:
            cache.filter_state[layer] = new_state
        q, k = self.qk(f).view(b, t, 2, self.h, self.dh).permute(2, 0, 3, 1, 4)  # 2×[B,H,T,Dh]
        v = self.v(x).view(b, t, self.h, self.dh).transpose(1, 2)  # [B,H,T,Dh]
        if cache is not None:
            start = cache.length
            cache.k[layer][:, :, start:start + t] = k
            cache.v[layer][:, :, start:start + t] = v
            k, v = cache.k[layer][:, :, :start + t], cache.v[layer][:, :, :start + t]
        y = attend(q, k, v, allowed, self.impl, self.p if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


# --- builders (called by zoo.blocks only for non-default configs) ------------------------------
def build_ffn(cfg: ModelConfig, decoder: bool = False) -> nn.Module:
    if cfg.ffn == "multiway":
        return MultiwayFeedForward(cfg, decoder)
    if cfg.ffn == "moe":
        return MoEFeedForward(cfg)
    raise ValueError(f"no variant feed-forward {cfg.ffn!r}")


def build_self_attention(cfg: ModelConfig, causal: bool) -> nn.Module:
    if cfg.attention == "lfa":
        return LFASelfAttention(cfg, causal)
    raise ValueError(f"no variant attention {cfg.attention!r}")


def route_info(cfg: ModelConfig, decoder: bool = False) -> dict[str, int]:
    """Multiway: expert index of every modality name (encoder or decoder layers)."""
    return {m: i for i, m in enumerate(multiway_experts(cfg, decoder))}
