"""Decoding with Hugging Face ``generate``'s semantics, on mmzoo's KV cache.

Imported checkpoints (Florence-2, BART) come with a ``generation_config.json`` written for transformers; to give
the same tokens for the same settings, this module follows transformers' rules (5.x) rather than mmzoo's own
:mod:`zoo.generation`:

- sequences start with ``decoder_start_id`` and are returned with it, padded with ``pad_id`` after EOS;
  ``max_new_tokens`` counts the tokens after the start token;
- processors run in transformers' order on the raw logits (greedy / sampling) or on the log-probabilities
  (beam search): no-repeat n-grams over the whole sequence (start token included), the minimum length, the forced
  first token (``forced_bos_id``), the forced last token at the length limit (``forced_eos_id``); sampling then
  applies temperature, top-k and top-p;
- beam search keeps ``2 * num_beams`` candidates per step, moves finished hypotheses to a per-row pool scored
  ``sum log p / length ** length_penalty``, and stops per ``early_stopping`` (``True``, ``False`` or ``"never"``)
  with transformers' heuristic.

All ids here are the model's (unified) ids; callers translate token ids of the published vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from zoo.cpu_linears import packed_linears

NEG = -1.0e9  # transformers' "very large negative" for finished / impossible beams


@dataclass
class HFGenerationConfig:
    """The subset of transformers' ``GenerationConfig`` this module implements (same names and defaults)."""

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    decoder_start_id: int = 2
    eos_id: int = 2
    pad_id: int = 0
    forced_bos_id: int | None = None
    forced_eos_id: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam sampling (num_beams > 1 with do_sample=True) is not supported")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def _ban_ngrams(seq: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' NoRepeatNGramLogitsProcessor over ``seq [N, t]`` (start token included)."""
    t = seq.shape[1]
    if t + 1 < n or t < n:  # no complete n-gram yet (transformers' rule is the first condition)
        return scores
    grams = seq.unfold(1, n, 1)  # [N, W, n]
    if n == 1:
        banned = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, seq, True)
    else:
        last = seq[:, t - n + 1:]  # [N, n-1]
        match = (grams[:, :, :-1] == last[:, None, :]).all(-1)  # [N, W]
        banned = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device).scatter_add_(
            1, grams[:, :, -1], match.to(torch.int32)) > 0
    return scores.masked_fill(banned, float("-inf"))


def _force(scores: torch.Tensor, token: int) -> torch.Tensor:
    out = torch.full_like(scores, float("-inf"))
    out[:, token] = 0.0
    return out


def process(seq: torch.Tensor, scores: torch.Tensor, cfg: HFGenerationConfig, max_length: int) -> torch.Tensor:
    """transformers' logits processors for ``seq [N, cur_len]`` → processed ``scores [N, V]``."""
    cur_len = seq.shape[1]
    if cfg.no_repeat_ngram_size:
        scores = _ban_ngrams(seq, scores, cfg.no_repeat_ngram_size)
    if cur_len - 1 < cfg.min_new_tokens:
        scores = scores.clone()
        scores[:, cfg.eos_id] = float("-inf")
    if cfg.forced_bos_id is not None and cur_len == 1:
        scores = _force(scores, cfg.forced_bos_id)
    if cfg.forced_eos_id is not None and cur_len == max_length - 1:
        scores = _force(scores, cfg.forced_eos_id)
    return scores


def _warp(scores: torch.Tensor, cfg: HFGenerationConfig) -> torch.Tensor:
    """Sampling warpers: temperature, top-k, top-p (transformers' order and tie rules)."""
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    if cfg.top_k and cfg.top_k < scores.shape[-1]:
        kth = torch.topk(scores, cfg.top_k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - cfg.top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scores


@torch.no_grad()
def greedy_or_sample(model: Any, memory: torch.Tensor, mask: torch.Tensor, cfg: HFGenerationConfig,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy decoding (or multinomial sampling) → ``[B, 1 + T]`` with the start token."""
    b, device = memory.shape[0], memory.device
    max_length = 1 + cfg.max_new_tokens
    cache = model.start_cache(memory, mask, cfg.max_new_tokens)
    seq = torch.full((b, 1), cfg.decoder_start_id, dtype=torch.long, device=device)
    unfinished = torch.ones(b, dtype=torch.bool, device=device)
    cur = seq
    while seq.shape[1] < max_length:
        logits = model.decode(cur, cache=cache)[:, -1].float()
        scores = process(seq, logits, cfg, max_length)
        if cfg.do_sample:
            probs = F.softmax(_warp(scores, cfg), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, cfg.pad_id))
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        unfinished &= nxt != cfg.eos_id
        if not bool(unfinished.any()):
            break
        cur = nxt[:, None]
    return seq


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[b, index[b, j], ...]`` for ``t [B, K, ...]``, ``index [B, J]``."""
    idx = index.view(*index.shape, *([1] * (t.ndim - 2))).expand(*index.shape, *t.shape[2:])
    return t.gather(1, idx)


@torch.no_grad()
def beam_search(model: Any, memory: torch.Tensor, mask: torch.Tensor, cfg: HFGenerationConfig) -> torch.Tensor:
    """transformers' beam search (one returned sequence per row) → ``[B, 1 + T]`` with the start token."""
    b, k, device = memory.shape[0], cfg.num_beams, memory.device
    max_length = 1 + cfg.max_new_tokens
    keep = 2 * k  # one EOS id: max(2, 1 + 1) * num_beams candidates
    top_mask = torch.cat([torch.ones(k, dtype=torch.bool), torch.zeros(keep - k, dtype=torch.bool)]).to(device)
    cache = model.start_cache(memory, mask, cfg.max_new_tokens, rows_per_source=k)
    running = torch.full((b, k, max_length), cfg.pad_id, dtype=torch.long, device=device)
    running[:, :, 0] = cfg.decoder_start_id
    sequences = running.clone()
    running_scores = torch.zeros(b, k, device=device)
    running_scores[:, 1:] = NEG
    beam_scores = torch.full((b, k), NEG, device=device)
    finished = torch.zeros(b, k, dtype=torch.bool, device=device)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=device)
    running_idx = torch.full((b, k, max_length - 1), -1, dtype=torch.long, device=device)
    beam_idx = running_idx.clone()
    offsets = torch.arange(b, device=device)[:, None] * k
    lp = cfg.length_penalty
    cur_len = 1
    cur = running[:, :, 0].reshape(b * k, 1)
    while True:
        logits = model.decode(cur, cache=cache)[:, -1].float()  # [B*K, V]
        logp = process(running[:, :, :cur_len].reshape(b * k, cur_len), F.log_softmax(logits, dim=-1), cfg,
                       max_length)
        v = logp.shape[-1]
        logp = (logp.view(b, k, v) + running_scores[:, :, None]).view(b, k * v)
        top_lp, top_i = torch.topk(logp, keep)  # [B, 2K]
        src, tok = top_i // v, top_i % v
        top_seq = _gather(running, src)
        top_seq[:, :, cur_len] = tok
        top_idx = _gather(running_idx, src)
        top_idx[:, :, cur_len - 1] = src + offsets
        hits = (tok == cfg.eos_id) | (cur_len + 1 >= max_length)  # EOS or the length limit
        # the best K unfinished candidates run on
        run_lp = top_lp + hits.float() * NEG
        nxt = torch.topk(run_lp, k)[1]
        running, running_scores, running_idx = _gather(top_seq, nxt), _gather(run_lp, nxt), _gather(top_idx, nxt)
        # finished candidates among the top K enter the pool of hypotheses
        did_finish = hits & top_mask[None, :]
        fin_lp = top_lp / (cur_len ** lp)
        fin_lp = fin_lp + (finished.all(-1, keepdim=True) & (cfg.early_stopping is True)).float() * NEG
        fin_lp = fin_lp + (~improvable).float() * NEG
        fin_lp = fin_lp + (~did_finish).float() * NEG
        merged_scores = torch.cat([beam_scores, fin_lp], dim=1)
        best = torch.topk(merged_scores, k)[1]
        sequences = _gather(torch.cat([sequences, top_seq], dim=1), best)
        beam_scores = _gather(merged_scores, best)
        beam_idx = _gather(torch.cat([beam_idx, top_idx], dim=1), best)
        finished = _gather(torch.cat([finished, did_finish], dim=1), best)
        cache.reorder(running_idx[:, :, cur_len - 1].reshape(-1))
        cur_len += 1
        # transformers' early-stop heuristic: can a running beam still beat the worst finished one?
        best_len = (max_length - 1) if (cfg.early_stopping == "never" and lp > 0.0) else (cur_len - 1)
        best_running = running_scores[:, :1] / (best_len ** lp)
        worst_finished = torch.where(finished, beam_scores.min(dim=1, keepdim=True)[0], torch.full_like(beam_scores, NEG))
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        open_beam = not (bool(finished.all()) and cfg.early_stopping is True)
        if not (bool(improvable.any()) and open_beam and not bool(hits.all())):
            break
        cur = running[:, :, cur_len - 1].reshape(b * k, 1)
    best_seq, best_idx = sequences[:, 0], beam_idx[:, 0]  # [B, L], [B, L-1]
    length = int((best_idx >= 0).sum(1).max())
    return best_seq[:, :1 + length]


def hf_generate(model: Any, inputs: dict[str, Any], cfg: HFGenerationConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Encode ``inputs`` once and decode with transformers' semantics → ``[B, 1 + T]`` (start token first)."""
    with packed_linears(model):  # fp32 CPU: packed oneDNN GEMMs (a no-op elsewhere)
        memory, mask = model.encode_for_generation(inputs)
        if cfg.num_beams == 1:
            return greedy_or_sample(model, memory, mask, cfg, generator)
        return beam_search(model, memory, mask, cfg)
