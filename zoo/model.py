"""The unified encoder-decoder: modality segments in, unified-vocabulary tokens out."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from modalities.base import get_modality
from zoo.config import ModelConfig
from zoo.cpu_linears import packed_applies, packed_linear
from zoo.fast_decode import FastDecodeStep
from zoo.blocks import DecoderLayer, EncoderLayer
from zoo.layers import KVCache, causal_allowed
from zoo.vocab import PAD_ID

# A segment value is a tensor (pixels, ...) or a tuple (ids, mask) for token segments.
#: cached decoding with at most this many rows projects onto the vocabulary through a transposed weight copy
SMALL_DECODE_ROWS = 8
Segments = dict[str, Any]


#: image pixels per encoder chunk in CPU generation (one 768-px image, 256 of 64 px): a batch of large images
#: overflows the caches (Florence-2-base's 768-px prefix took 19 % longer per image at batch 8 than one at a time)
GENERATION_CHUNK_PIXELS = 2**20


def _rows(inputs: Segments) -> int:
    first = next(iter(inputs.values()))
    return int((first[0] if isinstance(first, (tuple, list)) else first).shape[0])


def _slice_rows(inputs: Segments, start: int, stop: int) -> Segments:
    """Rows ``start:stop`` of every segment (tensors, or tuples of tensors such as text ``(ids, mask)``)."""
    return {k: type(v)(t[start:stop] for t in v) if isinstance(v, (tuple, list)) else v[start:stop]
            for k, v in inputs.items()}


def build_embedder(name: str, mcfg: dict[str, Any], d_model: int) -> nn.Module:
    """The ``nn.Module`` that embeds one configured modality (through the modality registry; text segments use
    the shared token embedding)."""
    return get_modality(name).build_embedder(mcfg, d_model)


class UnifiedSeq2Seq(nn.Module):
    """OFA-style encoder-decoder over concatenated modality segments and one unified vocabulary.

    ``encode({"image": pixels, "text": (ids, mask)})`` concatenates the segments in the dict's order,
    each with its modality-type embedding; ``decode`` predicts over the unified vocabulary with a
    token embedding tied to the output projection.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.layout = cfg.layout
        d = cfg.d_model
        self.embed_tokens = nn.Embedding(self.layout.size, d, padding_idx=PAD_ID)
        #: token embeddings are multiplied by this (``embed_scale``: sqrt(d_model), BART's scale_embedding)
        self.embed_mult = math.sqrt(d) if cfg.embed_scale else 1.0
        self.enc_pos = nn.Embedding(cfg.max_positions + cfg.pos_offset, d)
        self.dec_pos = nn.Embedding(cfg.max_positions + cfg.pos_offset, d)
        if cfg.dec_grid is not None:
            self.dec_row = nn.Embedding(cfg.dec_grid[0], d)
            self.dec_col = nn.Embedding(cfg.dec_grid[1], d)
        if cfg.type_embed:
            self.type_embed = nn.Embedding(cfg.num_types, d)
        self.embedders = nn.ModuleDict({n: build_embedder(n, m, d) for n, m in cfg.modalities.items()})
        if cfg.embed_norm:  # BART's layernorm_embedding, on each side's input
            self.enc_embed_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
            self.dec_embed_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        # post-norm layers end normalised: no final LayerNorm
        self.enc_norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.norm_first else nn.Identity()
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.dec_norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.norm_first else nn.Identity()
        if cfg.logits_bias:  # BART's final_logits_bias: a buffer, not trained
            self.register_buffer("final_logits_bias", torch.zeros(self.layout.size))
        self.drop = nn.Dropout(cfg.dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if name.startswith("embedders."):
                continue  # backbones keep their own init
            if name == "embed_tokens.weight":
                # the token embedding is also the output projection: at std 0.02 the words the model must copy
                # from its input (colours, shapes, left/right) collapsed onto one direction (cosine 0.91-0.95 after
                # 1585 steps of layout planning) and were never told apart; at d**-0.5 they are (docs/text_to_image.md)
                nn.init.normal_(p, std=self.cfg.d_model ** -0.5)
            elif p.ndim == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
        with torch.no_grad():
            self.embed_tokens.weight[PAD_ID].zero_()

    @property
    def head_dim(self) -> int:
        return self.cfg.d_model // self.cfg.n_heads

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_active_parameters(self) -> int:
        """Parameters used per token (differs from :meth:`num_parameters` for multiway and MoE FFNs)."""
        if self.cfg.ffn == "dense":
            return self.num_parameters()
        from zoo.variants import active_parameters

        return active_parameters(self)

    def moe_aux_loss(self) -> torch.Tensor | None:
        """The MoE load-balancing loss of the last forward, summed over layers (``None`` unless ffn=moe)."""
        if self.cfg.ffn != "moe":
            return None
        from zoo.variants import moe_aux_loss

        return moe_aux_loss(self)

    def moe_stats(self) -> dict[str, float]:
        """Expert utilisation and dropped-token fraction of the last forward (empty unless ffn=moe)."""
        if self.cfg.ffn != "moe":
            return {}
        from zoo.variants import moe_stats

        return moe_stats(self)

    # --- encoder ------------------------------------------------------------------------------
    def embed_segments(self, inputs: Segments, repeats: dict[str, torch.Tensor] | None = None,
                       spans: list[tuple[str, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenate embedded segments → ``x [B,S,d]``, ``mask [B,S]`` (True = real token).

        ``repeats[name]`` (``[b]`` counts summing to ``B``) embeds that segment once per row and repeats
        each row, e.g. one image embedded once for all of its questions. ``spans``, if given, receives
        ``(modality, length)`` of every segment in order.
        """
        xs, masks = [], []
        for name, value in inputs.items():
            if name == "text":
                ids, mask = value
                if ids.shape[1] > self.cfg.max_positions:
                    raise ValueError(f"text segment of {ids.shape[1]} tokens exceeds max_positions={self.cfg.max_positions}")
                x = self.embed_tokens(ids) * self.embed_mult if self.cfg.embed_scale else self.embed_tokens(ids)
                if self.cfg.enc_positions == "segment":
                    off = self.cfg.pos_offset
                    x = x + self.enc_pos.weight[off:off + ids.shape[1]]
            elif name in self.embedders:
                x, mask = self.embedders[name](*value) if isinstance(value, tuple) else self.embedders[name](value)
            else:
                raise KeyError(f"model has no embedder for input {name!r}; it has {['text', *self.embedders]}")
            if repeats is not None and name in repeats:
                x, mask = x.repeat_interleave(repeats[name], dim=0), mask.repeat_interleave(repeats[name], dim=0)
            xs.append(x + self.type_embed.weight[self.cfg.type_index[name]] if self.cfg.type_embed else x)
            masks.append(mask)
            if spans is not None:
                spans.append((name, x.shape[1]))
        if not xs:
            raise ValueError("encode() needs at least one input segment")
        x, mask = torch.cat(xs, dim=1), torch.cat(masks, dim=1)
        if self.cfg.enc_positions == "sequence":  # one position per encoder token, whatever its segment (BART)
            if x.shape[1] > self.cfg.max_positions:
                raise ValueError(f"encoder input of {x.shape[1]} tokens exceeds max_positions={self.cfg.max_positions}")
            off = self.cfg.pos_offset
            x = x + self.enc_pos.weight[off:off + x.shape[1]]
        if self.cfg.embed_norm:
            x = self.enc_embed_norm(x)
        return x, mask

    def encode(self, inputs: Segments, repeats: dict[str, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the encoder; returns ``memory [B,S,d]`` and its mask ``[B,S]`` (``repeats``: see
        :meth:`embed_segments`)."""
        spans: list[tuple[str, int]] | None = [] if self.cfg.ffn == "multiway" else None
        x, mask = self.embed_segments(inputs, repeats, spans)
        x = self.drop(x)
        allowed = None if bool(mask.all()) else mask[:, None, None, :]  # [B,1,1,S]; no padding → no masking
        route = None if self.cfg.ffn == "dense" else self._encoder_route(mask, spans)
        for layer in self.encoder:
            if self.cfg.grad_checkpointing and self.training:
                x = checkpoint(layer, x, allowed, route, use_reentrant=False)
            else:
                x = layer(x, allowed, route)
        return self.enc_norm(x), mask

    def encode_for_generation(self, inputs: Segments, max_pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode` without gradients, in chunks of rows on the CPU when the rows carry large images (at most
        ``max_pixels`` image pixels a chunk, :data:`GENERATION_CHUNK_PIXELS` by default). Rows are encoded
        independently either way."""
        max_pixels = GENERATION_CHUNK_PIXELS if max_pixels is None else max_pixels
        rows = _rows(inputs)
        pixels = max((v.shape[-2] * v.shape[-1] for v in inputs.values() if torch.is_tensor(v) and v.ndim == 4),
                     default=0)
        chunk = max(1, max_pixels // pixels) if pixels else rows
        if torch.is_grad_enabled() or chunk >= rows or next(self.parameters()).device.type != "cpu":
            return self.encode(inputs)
        parts = [self.encode(_slice_rows(inputs, i, i + chunk)) for i in range(0, rows, chunk)]
        if len({m.shape[1] for m, _ in parts}) > 1:  # a segment trimmed its padding per chunk: encode at once
            return self.encode(inputs)
        return torch.cat([m for m, _ in parts]), torch.cat([k for _, k in parts])

    # --- routed feed-forward inputs (ffn=multiway|moe) ----------------------------------------
    def _encoder_route(self, mask: torch.Tensor, spans: list[tuple[str, int]] | None) -> Any:
        """Multiway: each segment's expert, as ``[(expert index, length), ...]``; MoE: the real-token mask."""
        if self.cfg.ffn == "moe":
            return None if bool(mask.all()) else mask
        from zoo.variants import route_info

        index = route_info(self.cfg)
        return [(index[name], n) for name, n in spans]

    def decoder_route(self, tgt_in: torch.Tensor) -> Any:
        """Multiway: the expert of each position's target modality, from its input token's vocabulary range
        (image codes → ``image_codes`` when the model has that expert, all else → ``text``; one ``int`` when
        every position is text); MoE: the real-token mask."""
        if self.cfg.ffn == "dense":
            return None
        if self.cfg.ffn == "moe":
            return tgt_in != PAD_ID
        from zoo.variants import route_info

        index = route_info(self.cfg, decoder=True)
        if "image_codes" not in index:
            return index["text"]
        lo, hi = self.layout.ranges()["image_codes"]
        route = torch.full_like(tgt_in, index["text"])
        return route.masked_fill((tgt_in >= lo) & (tgt_in < hi), index["image_codes"])

    # --- decoder ------------------------------------------------------------------------------
    def start_cache(self, memory: torch.Tensor, memory_mask: torch.Tensor, max_len: int,
                    rows_per_source: int = 1) -> KVCache:
        """A KV cache with the source's cross-attention K/V projected once.

        ``rows_per_source`` > 1 decodes that many consecutive rows per source row (the beams of beam
        search) against one copy of the source's K/V: cross-attention reads the source once per step for
        all of its beams instead of once per beam.
        """
        if max_len > self.cfg.max_positions:
            raise ValueError(f"max_len={max_len} exceeds max_positions={self.cfg.max_positions}")
        if rows_per_source < 1:
            raise ValueError(f"rows_per_source must be >= 1, got {rows_per_source}")
        rows = memory.shape[0] * rows_per_source
        cache = KVCache(len(self.decoder), rows, self.cfg.n_heads, self.head_dim, max_len, memory.device,
                        memory.dtype)
        # contiguous K/V: SDPA reads the strided projection views 2.7x slower, once per token and layer
        cache.cross = [tuple(t.contiguous() for t in layer.cross_attn.project_memory(memory))
                       for layer in self.decoder]
        cache.memory_allowed = None if bool(memory_mask.all()) else memory_mask[:, None, None, :]
        cache.rows_per_source = rows_per_source
        # inside packed_linears, logits() runs on oneDNN's packed copy (faster still)
        packed = self.__dict__.get("packed_output") is not None and packed_applies(memory, self.embed_tokens.weight)
        if rows <= SMALL_DECODE_ROWS and not torch.is_grad_enabled() and not packed:
            # a few rows per step: one [d, V] contiguous copy of the tied output weight makes the per-token
            # projection a plain GEMV (measured 4x faster than F.linear's transposed read on the CPU)
            cache.out_weight_t = self.embed_tokens.weight.t().contiguous()
        if packed:  # plain decoders skip the module dispatch per token (same kernels, same numbers)
            cache.fast_step = FastDecodeStep.build(self, memory)
        return cache

    def decoder_position_tables(self) -> list[nn.Embedding]:
        """The embeddings :meth:`decoder_positions` reads: ``dec_pos``, plus the grid's row and column tables."""
        return [self.dec_pos] + ([self.dec_row, self.dec_col] if self.cfg.dec_grid is not None else [])

    def decoder_positions(self, start: int, t: int) -> torch.Tensor:
        """Position embeddings ``[t, d]`` of decoder positions ``start .. start+t-1``.

        With ``cfg.dec_grid = [H, W]``, position ``p < H*W`` (whose output predicts code ``p`` of a raster-order
        grid) also gets ``row[p // W] + col[p % W]``.
        """
        off = self.cfg.pos_offset
        pos = self.dec_pos.weight[start + off:start + off + t]
        if self.cfg.dec_grid is None:
            return pos
        h, w = self.cfg.dec_grid
        end = min(start + t, h * w)
        if end <= start:
            return pos
        cells = torch.arange(start, end, device=pos.device)
        grid = self.dec_row.weight[cells // w] + self.dec_col.weight[cells % w]
        return torch.cat([pos[:end - start] + grid, pos[end - start:]])

    def decode_hidden(self, tgt_in: torch.Tensor, memory: torch.Tensor | None = None,
                      memory_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Decoder hidden states ``[B,T,d]`` for input ids ``[B,T]``; extends ``cache`` if given."""
        b, t = tgt_in.shape
        start = cache.length if cache is not None else 0
        if start + t > self.cfg.max_positions:
            raise ValueError(f"decoder length {start + t} exceeds max_positions={self.cfg.max_positions}")
        x = self.embed_tokens(tgt_in)
        if self.cfg.embed_scale:
            x = x * self.embed_mult
        x = x + self.decoder_positions(start, t)
        if self.cfg.embed_norm:
            x = self.dec_embed_norm(x)
        x = self.drop(x)
        self_allowed = None if (cache is not None and t == 1) else causal_allowed(t, start, x.device)
        if cache is None:
            mem_allowed = None if bool(memory_mask.all()) else memory_mask[:, None, None, :]
            mem_kv = [layer.cross_attn.project_memory(memory) for layer in self.decoder]
        else:
            mem_allowed, mem_kv = cache.memory_allowed, cache.cross
        route = None if self.cfg.ffn == "dense" else self.decoder_route(tgt_in)
        for i, layer in enumerate(self.decoder):
            if self.cfg.grad_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, self_allowed, mem_kv[i], mem_allowed, None, 0, route, use_reentrant=False)
            else:
                x = layer(x, self_allowed, mem_kv[i], mem_allowed, cache, i, route)
        if cache is not None:
            cache.length += t
        return self.dec_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output projection onto the unified vocabulary (plus ``final_logits_bias`` with ``logits_bias``)."""
        bias = self.final_logits_bias if self.cfg.logits_bias else None
        packed = self.__dict__.get("packed_output")  # inside zoo.cpu_linears.packed_linears (generation)
        if packed is not None:
            return packed_linear(hidden, self.embed_tokens.weight, bias, packed)
        return F.linear(hidden, self.embed_tokens.weight, bias)

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor | None = None,
               memory_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        if cache is not None and cache.fast_step is not None and tgt_in.shape[1] == 1:
            return cache.fast_step(tgt_in, cache)
        hidden = self.decode_hidden(tgt_in, memory, memory_mask, cache)
        if cache is not None and cache.out_weight_t is not None:  # start_cache: small batches, no packed weights
            out = hidden @ cache.out_weight_t
            return out + self.final_logits_bias if self.cfg.logits_bias else out
        return self.logits(hidden)

    def forward(self, inputs: Segments, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[B,T,V]``."""
        memory, mask = self.encode(inputs)
        return self.decode(tgt_in, memory, mask)
