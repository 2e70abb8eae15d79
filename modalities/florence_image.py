"""Florence-2's image tokenizer as a modality: timm's DaViT tower plus Florence-2's projector.

Preprocessing (CPU, DataLoader workers): decode → RGB → bicubic resize to ``image_size`` (768 px for the
published models, no crop) → ImageNet mean/std. The embedder: DaViT's last stage ``[B, D, h, w]`` plus learned
2-D positions (column half | row half of the channels), plus the 1-D temporal sinusoid of frame 0, then the
mean-pooled token followed by the ``h*w`` spatial tokens, projected to ``d_model`` (no bias) and layer-normed:
``1 + h*w`` tokens (577 at 768 px).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modalities.base import (ModalityConfig, PretrainableBackbone, is_ident, list_of, optional, register_modality,
                             upto)
from modalities.image import ImagePreprocessor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the timm DaViT towers of the published models (timm registers both, tag ``msft_florence2``)
TOWERS = ("davit_base_fl", "davit_huge_fl")


@dataclass
class FlorenceImageConfig(ModalityConfig):
    """Config of Florence-2's image tokenizer; saved with the model."""

    tower: str = "davit_base_fl"  # a timm DaViT variant (TOWERS)
    # overrides of the timm variant's sizes (None: the variant's own); tiny test towers set them
    depths: list[int] | None = None
    embed_dims: list[int] | None = None
    num_heads: list[int] | None = None
    window_size: int | None = None
    image_size: int = 768
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_pos_embeddings: int = 50  # rows / columns of the learned 2-D position tables
    max_temporal_embeddings: int = 100  # rows of the 1-D temporal sinusoid
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-5  # the projector's LayerNorm

    def __post_init__(self) -> None:
        if self.tower not in TOWERS:
            raise ValueError(f"FlorenceImageConfig.tower must be one of {TOWERS}, got {self.tower!r}")
        self.mean = tuple(float(x) for x in self.mean)
        self.std = tuple(float(x) for x in self.std)
        for name in ("depths", "embed_dims", "num_heads"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, [int(x) for x in v])
                if len(v) != 4:
                    raise ValueError(f"FlorenceImageConfig.{name} needs 4 stages, got {v}")
        if self.image_size < 32:
            raise ValueError(f"FlorenceImageConfig.image_size must be >= 32, got {self.image_size}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def tower_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``timm.create_model`` for the tower (no classifier, no pretrained download)."""
        kw: dict[str, Any] = {"num_classes": 0, "drop_path_rate": self.drop_path_rate}
        for ours, theirs in (("depths", "depths"), ("embed_dims", "embed_dims"), ("num_heads", "num_heads"),
                             ("window_size", "window_size")):
            if getattr(self, ours) is not None:
                kw[theirs] = tuple(getattr(self, ours)) if ours != "window_size" else int(self.window_size)
        return kw

    def grid(self) -> int:
        """Side of the tower's output grid: the stem's stride 4, then three stride-2 stages (``ceil`` each)."""
        side = math.ceil(self.image_size / 4)
        for _ in range(3):
            side = (side - 1) // 2 + 1  # kernel 3, stride 2, padding 1
        return side

    @property
    def num_tokens(self) -> int:
        return 1 + self.grid() ** 2


class FlorenceImagePreprocessor(ImagePreprocessor):
    """The image preprocessing of :class:`ImagePreprocessor` (bicubic squash to ``image_size``, normalise to
    ``[3, S, S]``) with Florence-2's processor's rescale, ``x * (1/255)`` in float32, so that its pixels equal the
    reference's bit for bit. Takes a :class:`FlorenceImageConfig` (image_size, mean, std). Picklable, for
    DataLoader workers."""

    @staticmethod
    def to_unit(pixels: np.ndarray) -> np.ndarray:
        return pixels * np.float32(1 / 255)


def temporal_sinusoid(positions: int, dim: int) -> torch.Tensor:
    """``[positions, dim]``: sin in the even channels, cos in the odd ones (Florence-2's 1-D cosine embedding)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / half))
    angle = torch.arange(positions, dtype=torch.float32)[:, None] * freq[None, :]  # [P, half]
    table = torch.empty(positions, dim)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle)
    return table


def build_tower(cfg: FlorenceImageConfig) -> nn.Module:
    """timm's DaViT (``davit_base_fl`` / ``davit_huge_fl``, optionally resized), without its classifier head."""
    import timm

    tower = timm.create_model(cfg.tower, pretrained=False, **cfg.tower_kwargs())
    tower.head = nn.Identity()  # the head's norm is not part of Florence-2
    return tower


class FlorenceImageEmbedder(nn.Module):
    """Pixels ``[B, 3, S, S]`` → ``[B, 1 + h*w, d_model]`` image tokens (Florence-2's image features)."""

    def __init__(self, cfg: FlorenceImageConfig, d_model: int):
        super().__init__()
        self.cfg = cfg
        self.tower = build_tower(cfg)
        dim = self.tower.num_features
        self.row_embed = nn.Embedding(cfg.max_pos_embeddings, dim // 2)
        self.col_embed = nn.Embedding(cfg.max_pos_embeddings, dim - dim // 2)
        self.register_buffer("temporal", temporal_sinusoid(cfg.max_temporal_embeddings, dim))
        self.proj = nn.Linear(dim, d_model, bias=False)
        self.norm = nn.LayerNorm(d_model, eps=cfg.norm_eps)

    @property
    def num_tokens(self) -> int:
        return self.cfg.num_tokens

    def positions(self, h: int, w: int) -> torch.Tensor:
        """Learned 2-D positions ``[h, w, D]``: column embedding, then row embedding, along the channels."""
        if max(h, w) > self.cfg.max_pos_embeddings:
            raise ValueError(f"image grid {h}x{w} exceeds max_pos_embeddings={self.cfg.max_pos_embeddings}")
        cols = self.col_embed.weight[:w]  # [w, Dc]
        rows = self.row_embed.weight[:h]  # [h, Dr]
        return torch.cat([cols[None].expand(h, -1, -1), rows[:, None].expand(-1, w, -1)], dim=-1)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels [B, 3, H, W], got {tuple(pixels.shape)}")
        feats = self.tower.forward_features(pixels)  # [B, D, h, w]
        b, dim, h, w = feats.shape
        x = feats.permute(0, 2, 3, 1) + self.positions(h, w)  # [B, h, w, D]
        x = x.reshape(b, h * w, dim) + self.temporal[0]  # one frame: temporal position 0
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, 1 + h*w, D]: pooled token first
        x = self.norm(self.proj(x))
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


def _pretrain_target(d: dict[str, Any]) -> dict[str, Any]:
    """What dense scene pretraining trains: the DaViT tower (with this config's sizes) up to its last stage, the one
    the embedder reads, at the config's image size and normalisation."""
    cfg = FlorenceImageConfig(**d)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.tower_kwargs().items()
              if k not in ("num_classes", "drop_path_rate")}
    return {"backbone": f"timm:{cfg.tower}", "out_index": 3, "image_size": cfg.image_size, "mean": cfg.mean,
            "std": cfg.std, "tower_kwargs": kwargs}


def load_tower_weights(embedder: FlorenceImageEmbedder, path: str | Path) -> None:
    """Load a pretrained features-only DaViT file into the embedder's full tower: timm's feature wrapper names the
    stages ``stages_<i>`` where the tower has ``stages.<i>``. The file and the tower (built without its classifier
    head) must hold the same tensors, of the same shapes; anything else is a ``ValueError`` naming them."""
    from safetensors.torch import load_file

    tower = embedder.tower
    weights = {re.sub(r"^stages_(\d+)\.", r"stages.\1.", k): v for k, v in load_file(str(path)).items()}
    state = tower.state_dict()
    missing = [k for k in state if k not in weights]
    unexpected = [k for k in weights if k not in state]
    resized = [f"{k} {tuple(v.shape)} (tower: {tuple(state[k].shape)})" for k, v in weights.items()
               if k in state and v.shape != state[k].shape]
    if missing or unexpected or resized:
        raise ValueError(f"pretrained backbone {path} does not fit the image tower: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, other shapes {resized[:3]}")
    tower.load_state_dict(weights, strict=False)


# dense scene pretraining (model.image_pretrain) trains the DaViT tower; its file is loaded into the built tower
PRETRAINABLE = PretrainableBackbone(target=_pretrain_target, module=lambda embedder: embedder.tower,
                                    load=load_tower_weights)
# an imported architecture's tower: no modality-type embedding (models with it set type_embed=False)
register_modality("florence_image", config=FlorenceImageConfig, embedder=FlorenceImageEmbedder,
                  preprocess=FlorenceImagePreprocessor, typed=False,
                  field_checks={"tower": is_ident, "depths": optional(list_of(upto(2**10))),
                                "embed_dims": optional(list_of(upto(2**16))), "num_heads": optional(list_of(upto(2**10))),
                                "window_size": optional(upto(2**10)), "image_size": upto(2**14),
                                "max_pos_embeddings": upto(2**14), "max_temporal_embeddings": upto(2**14)},
                  pretrainable=PRETRAINABLE)
