"""Classifier-free guided decoding of a fixed number of tokens (text-to-image codes) with the KV cache.

The conditional and unconditional sources run as one ``[2B]`` batch through the decoder; at every step
the next-token logits are ``cond + (scale - 1) * (cond - uncond)`` (= ``uncond + scale * (cond - uncond)``,
and exactly ``cond`` at ``scale == 1``), then constrained and sampled with the shared sampler.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.cpu_linears import packed_linears
from zoo.generation import _apply_constraints, sample_next
from zoo.vocab import BOS_ID


def _pad_memory(memory: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - memory.shape[1]
    return F.pad(memory, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


@torch.no_grad()
def guided_sample(model, cond: dict, num_tokens: int, *, uncond: dict | None = None, guidance_scale: float = 1.0,
                  allowed: torch.Tensor | None = None, do_sample: bool = True, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, use_cache: bool = True,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Exactly ``num_tokens`` tokens per row of ``cond`` → ``[B, num_tokens]`` (EOS is never emitted).

    ``uncond`` holds the unconditional source, either with ``B`` rows or one row broadcast to ``B``;
    without it (or with ``guidance_scale`` of None) decoding is plain conditional sampling.
    """
    with packed_linears(model):  # fp32 CPU: oneDNN GEMMs on packed weights (a no-op elsewhere)
        return _guided_sample(model, cond, num_tokens, uncond, guidance_scale, allowed, do_sample, temperature,
                              top_k, top_p, use_cache, generator)


def _guided_sample(model, cond: dict, num_tokens: int, uncond: dict | None, guidance_scale: float,
                   allowed: torch.Tensor | None, do_sample: bool, temperature: float, top_k: int, top_p: float,
                   use_cache: bool, generator: torch.Generator | None) -> torch.Tensor:
    memory, mask = model.encode(cond)
    b = memory.shape[0]
    if uncond is not None:
        mem_u, mask_u = model.encode(uncond)
        if mem_u.shape[0] == 1:
            mem_u, mask_u = mem_u.expand(b, -1, -1), mask_u.expand(b, -1)
        if mem_u.shape[0] != b:
            raise ValueError(f"uncond has {mem_u.shape[0]} rows; expected 1 or {b}")
        s = max(memory.shape[1], mem_u.shape[1])
        memory, mask = _pad_memory(memory, mask, s)
        mem_u, mask_u = _pad_memory(mem_u, mask_u, s)
        memory, mask = torch.cat([memory, mem_u]), torch.cat([mask, mask_u])  # [2B,S]
    n = memory.shape[0]
    out = torch.empty((b, num_tokens), dtype=torch.long, device=memory.device)
    cur = torch.full((n, 1), BOS_ID, dtype=torch.long, device=memory.device)
    cache = model.start_cache(memory, mask, num_tokens) if use_cache else None
    seq = cur
    for step in range(num_tokens):
        if cache is not None:
            logits = model.decode(cur, cache=cache)[:, -1].float()
        else:
            logits = model.decode(seq, memory, mask)[:, -1].float()
        if uncond is not None:
            c, u = logits[:b], logits[b:]
            logits = c + (guidance_scale - 1.0) * (c - u)
        logits = _apply_constraints(logits, step, out[:, :step], allowed, (), min_new_tokens=num_tokens)
        nxt = sample_next(logits, temperature, top_k, top_p, generator) if do_sample else logits.argmax(-1)
        out[:, step] = nxt
        cur = (torch.cat([nxt, nxt]) if uncond is not None else nxt)[:, None]
        if cache is None:
            seq = torch.cat([seq, cur], dim=1)
    return out
