"""Generation with the KV cache: greedy and batched beam search under per-step token constraints.

A *constraint* is a boolean ``allowed [V]`` mask (e.g. ``layout.allowed_mask("text")``) or a callable
``(step, prefix [N,t], logits [N,V]) -> logits`` applied at every step (tries, n-gram blocking, ...).
Generated sequences exclude BOS, include EOS, and are padded with PAD afterwards.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from zoo.vocab import BOS_ID, EOS_ID, PAD_ID

LogitsProcessor = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def _apply_constraints(logits: torch.Tensor, step: int, prefix: torch.Tensor,
                       allowed: torch.Tensor | None, processors: Sequence[LogitsProcessor],
                       min_new_tokens: int) -> torch.Tensor:
    neg = torch.finfo(logits.dtype).min
    if allowed is not None:
        logits = logits.masked_fill(~allowed.to(logits.device), neg)
    for proc in processors:
        logits = proc(step, prefix, logits)
    logits[:, PAD_ID] = neg
    if step < min_new_tokens:
        logits[:, EOS_ID] = neg
    return logits


@torch.no_grad()
def greedy_search(model, memory: torch.Tensor, memory_mask: torch.Tensor, max_new_tokens: int,
                  allowed: torch.Tensor | None = None, processors: Sequence[LogitsProcessor] = (),
                  min_new_tokens: int = 0, use_cache: bool = True) -> torch.Tensor:
    """Greedy decoding → ``[B, T]`` token ids (T ≤ max_new_tokens)."""
    b = memory.shape[0]
    device = memory.device
    out = torch.full((b, max_new_tokens), PAD_ID, dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    cur = torch.full((b, 1), BOS_ID, dtype=torch.long, device=device)
    cache = model.start_cache(memory, memory_mask, max_new_tokens) if use_cache else None
    seq = cur
    steps = 0
    for step in range(max_new_tokens):
        if cache is not None:
            logits = model.decode(cur, cache=cache)[:, -1]
        else:
            logits = model.decode(seq, memory, memory_mask)[:, -1]
        logits = _apply_constraints(logits.float(), step, out[:, :step], allowed, processors, min_new_tokens)
        nxt = logits.argmax(-1)
        nxt = torch.where(finished, torch.full_like(nxt, PAD_ID), nxt)
        out[:, step] = nxt
        finished |= nxt == EOS_ID
        steps = step + 1
        if bool(finished.all()):
            break
        cur = nxt[:, None]
        if cache is None:
            seq = torch.cat([seq, cur], dim=1)
    return out[:, :steps]


@torch.no_grad()
def beam_search(model, memory: torch.Tensor, memory_mask: torch.Tensor, max_new_tokens: int,
                num_beams: int = 4, allowed: torch.Tensor | None = None,
                processors: Sequence[LogitsProcessor] = (), min_new_tokens: int = 0,
                length_penalty: float = 1.0) -> torch.Tensor:
    """Batched beam search → best hypothesis per row, ``[B, T]``.

    Finished beams stay in the beam with a frozen score; beams are ranked by
    ``sum log p / length ** length_penalty`` at every step and at the end.
    """
    b, k = memory.shape[0], num_beams
    device = memory.device
    memory = memory.repeat_interleave(k, dim=0)
    memory_mask = memory_mask.repeat_interleave(k, dim=0)
    cache = model.start_cache(memory, memory_mask, max_new_tokens)
    n = b * k
    tokens = torch.full((n, max_new_tokens), PAD_ID, dtype=torch.long, device=device)
    raw = torch.zeros(b, k, device=device)
    raw[:, 1:] = float("-inf")  # only beam 0 is live at the start
    lengths = torch.zeros(n, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    cur = torch.full((n, 1), BOS_ID, dtype=torch.long, device=device)
    steps = 0
    for step in range(max_new_tokens):
        logits = model.decode(cur, cache=cache)[:, -1].float()
        logits = _apply_constraints(logits, step, tokens[:, :step], allowed, processors, min_new_tokens)
        logp = torch.log_softmax(logits, dim=-1)  # [N,V]
        # finished beams may only extend with PAD at no cost
        logp = torch.where(finished[:, None], torch.full_like(logp, float("-inf")), logp)
        logp[:, PAD_ID] = torch.where(finished, 0.0, float("-inf"))
        v = logp.shape[-1]
        new_len = (lengths + (~finished).float()).view(b, k, 1)  # [B,K,1]
        cand_raw = raw.unsqueeze(-1) + logp.view(b, k, v)  # [B,K,V]
        cand_norm = cand_raw / new_len.clamp(min=1.0) ** length_penalty
        top_norm, top_idx = cand_norm.view(b, k * v).topk(k, dim=-1)  # [B,K]
        beam_idx, tok = top_idx // v, top_idx % v
        flat = (beam_idx + torch.arange(b, device=device)[:, None] * k).view(-1)  # [N]
        raw = cand_raw.view(b, k * v).gather(1, top_idx)
        cache.reorder(flat)
        tokens = tokens.index_select(0, flat)
        lengths = new_len.view(-1).index_select(0, flat)
        finished = finished.index_select(0, flat)
        tok = tok.view(-1)
        tokens[:, step] = tok
        finished = finished | (tok == EOS_ID)
        steps = step + 1
        if bool(finished.all()):
            break
        cur = tok[:, None]
    final = raw / lengths.view(b, k).clamp(min=1.0) ** length_penalty
    best = final.argmax(-1) + torch.arange(b, device=device) * k
    return tokens.index_select(0, best)[:, :steps]


def generate(model, inputs: dict, max_new_tokens: int, num_beams: int = 1, **kwargs) -> torch.Tensor:
    """Encode ``inputs`` once and decode (greedy when ``num_beams == 1``)."""
    memory, mask = model.encode(inputs)
    if num_beams == 1:
        kwargs.pop("length_penalty", None)
        return greedy_search(model, memory, mask, max_new_tokens, **kwargs)
    return beam_search(model, memory, mask, max_new_tokens, num_beams=num_beams, **kwargs)
