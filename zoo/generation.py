"""Generation with the KV cache: greedy and batched beam search under per-step token constraints.

A *constraint* is a boolean ``allowed [V]`` mask (e.g. ``layout.allowed_mask("text")``) or a callable
``(step, prefix [N,t], logits [N,V]) -> logits`` applied at every step (tries, n-gram blocking, ...).
Generated sequences exclude BOS, include EOS, and are padded with PAD afterwards.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from zoo.cpu_linears import packed_linears
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
                  min_new_tokens: int = 0, use_cache: bool = True, do_sample: bool = False,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy decoding (or sampling with ``do_sample``) → ``[B, T]`` token ids (T ≤ max_new_tokens).

    Sampling draws from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens
    and to the smallest set whose probability reaches ``top_p``, after the constraints.
    """
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
        nxt = sample_next(logits, temperature, top_k, top_p, generator) if do_sample else logits.argmax(-1)
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
    cache = model.start_cache(memory, memory_mask, max_new_tokens, rows_per_source=k)  # one source K/V per row
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
    """Encode ``inputs`` once and decode (greedy when ``num_beams == 1``).

    ``no_repeat_ngram_size=n`` adds a :class:`NoRepeatNGram` processor; ``do_sample``, ``temperature``,
    ``top_k``, ``top_p`` and ``generator`` select sampling (``num_beams == 1`` only).
    """
    ngram = kwargs.pop("no_repeat_ngram_size", 0)
    if ngram:
        kwargs["processors"] = [*kwargs.get("processors", ()), NoRepeatNGram(ngram)]
    if num_beams > 1 and kwargs.pop("do_sample", False):
        raise ValueError("sampling (do_sample=True) needs num_beams=1")
    with packed_linears(model):  # fp32 CPU: oneDNN GEMMs on packed weights (a no-op elsewhere)
        memory, mask = model.encode_for_generation(inputs)
        if num_beams == 1:
            kwargs.pop("length_penalty", None)
            return greedy_search(model, memory, mask, max_new_tokens, **kwargs)
        for k in ("temperature", "top_k", "top_p", "generator"):
            kwargs.pop(k, None)
        return beam_search(model, memory, mask, max_new_tokens, num_beams=num_beams, **kwargs)


# --- sampling and extra logits processors ----------------------------------------------------
def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row of ``logits [N,V]`` with temperature, top-k and nucleus (top-p) filtering."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float() / temperature
    neg = float("-inf")
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, neg)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, neg)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class NoRepeatNGram:
    """Processor: forbid any token that would repeat an n-gram already in the generated prefix."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"no_repeat_ngram_size must be >= 1, got {n}")
        self.n = n

    def __call__(self, step: int, prefix: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        n, t = self.n, prefix.shape[1]
        if t < n:  # no complete n-gram yet
            return logits
        if n == 1:
            banned = torch.zeros_like(logits, dtype=torch.int32).scatter_add_(
                1, prefix, (prefix != PAD_ID).to(torch.int32))
        else:
            grams = prefix.unfold(1, n, 1)  # [N, W, n] every n-gram so far
            last = prefix[:, t - n + 1:]  # [N, n-1] the current context
            match = (grams[:, :, :-1] == last[:, None, :]).all(-1).to(torch.int32)  # [N, W]
            banned = torch.zeros_like(logits, dtype=torch.int32).scatter_add_(1, grams[:, :, -1], match)
        return logits.masked_fill(banned > 0, torch.finfo(logits.dtype).min)


class PrefixTrie:
    """Processor: the generated sequence must spell one of ``sequences`` followed by EOS.

    Closed-set decoding (e.g. VQA over candidate answers) with greedy or beam search. The trie is
    stored as sorted ``node * V + token`` edge keys, so the per-step state walk and the mask are a few
    vectorised tensor ops for the whole batch, whatever the number of candidates.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], vocab_size: int):
        children: dict[tuple[int, int], int] = {}
        n_nodes = 1
        for seq in sequences:
            if not len(seq):
                raise ValueError("PrefixTrie: empty candidate sequence")
            node = 0
            for tok in [*map(int, seq), EOS_ID]:
                if not 0 <= tok < vocab_size:
                    raise ValueError(f"PrefixTrie: token {tok} outside the vocabulary [0, {vocab_size})")
                nxt = children.get((node, tok))
                if nxt is None:
                    nxt = children[(node, tok)] = n_nodes
                    n_nodes += 1
                node = nxt
        self.vocab_size = vocab_size
        edges = sorted(children.items())
        self.keys = torch.tensor([p * vocab_size + t for (p, t), _ in edges], dtype=torch.long)
        self.child = torch.tensor([c for _, c in edges], dtype=torch.long)
        self.parent = torch.tensor([p for (p, _), _ in edges], dtype=torch.long)
        self.token = torch.tensor([t for (_, t), _ in edges], dtype=torch.long)
        self.num_sequences = len(sequences)

    def states(self, prefix: torch.Tensor) -> torch.Tensor:
        """Trie node reached by each row of ``prefix [N,t]`` (-1 once it left the trie)."""
        keys, child = self.keys.to(prefix.device), self.child.to(prefix.device)
        state = torch.zeros(prefix.shape[0], dtype=torch.long, device=prefix.device)
        for s in range(prefix.shape[1]):
            key = state * self.vocab_size + prefix[:, s]
            pos = torch.searchsorted(keys, key).clamp(max=len(keys) - 1)
            found = (keys[pos] == key) & (state >= 0)
            state = torch.where(found, child[pos], torch.full_like(state, -1))
        return state

    def __call__(self, step: int, prefix: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        state = self.states(prefix)  # [N]
        parent, token = self.parent.to(logits.device), self.token.to(logits.device)
        # ok[N, E]: edge e leaves the row's node; scatter those tokens into an allowed mask
        ok = parent[None, :] == state[:, None]
        allowed = torch.zeros(logits.shape, dtype=torch.int32, device=logits.device).scatter_add_(
            1, token[None, :].expand_as(ok).contiguous(), ok.to(torch.int32)) > 0
        allowed[~allowed.any(1), EOS_ID] = True  # past the end or off the trie (finished rows): only EOS
        return logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
