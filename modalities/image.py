"""Image modality: CPU preprocessing (runs in DataLoader workers) and the patch-feature embedder.

The embedder takes patch features from any timm backbone (``timm:<name>``, ``features_only``), from
an open_clip visual tower (``open_clip:<name>``), or from a plain linear patch embedding
(``patch:<size>``, BEiT-3 / ViT style: timm's ``PatchEmbed``, no CNN), projects them to ``d_model`` and
adds learned 2-D positions.
"""
from __future__ import annotations

import io
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from modalities.base import ModalityConfig, PretrainableBackbone, is_dict, is_pos, register_modality


@dataclass
class ImageConfig(ModalityConfig):
    """Config of the image tokenizer; saved with the model."""

    backbone: str = "timm:resnet10t"
    out_index: int = 2  # timm features_only stage (2 = stride 8 for resnets)
    image_size: int = 64
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: str = "squash"  # squash | center_crop
    # Pretrained weights for the backbone: None (random init), a timm/open_clip tag, or a local file.
    pretrained: str | None = None
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    # Where the learned 2-D positions join the features: "before_norm" (added to the projected features, then
    # LayerNorm; older models) or "after_norm" (added to the normalised features, at a scale the encoder keeps).
    position: str = "before_norm"
    # What the 2-D positions are: "learned" (a row and a column table, random at start) or "sincos" (fixed sines and
    # cosines of the row in half the channels and of the column in the other half: geometry from the first step)
    position_encoding: str = "learned"

    def __post_init__(self) -> None:
        if self.position not in ("before_norm", "after_norm"):
            raise ValueError(f"ImageConfig.position must be 'before_norm' or 'after_norm', got {self.position!r}")
        if self.position_encoding not in ("learned", "sincos"):
            raise ValueError("ImageConfig.position_encoding must be 'learned' or 'sincos', "
                             f"got {self.position_encoding!r}")
        self.mean = tuple(float(x) for x in self.mean)
        self.std = tuple(float(x) for x in self.std)
        if self.resize not in ("squash", "center_crop"):
            raise ValueError(f"ImageConfig.resize must be 'squash' or 'center_crop', got {self.resize!r}")
        if ":" not in self.backbone:
            raise ValueError("ImageConfig.backbone must be 'timm:<name>', 'open_clip:<name>' or 'patch:<size>', "
                             f"got {self.backbone!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


# ------------------------------------------------------------------------------------------------
# Preprocessing (CPU)
# ------------------------------------------------------------------------------------------------
def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (1, L, LA, P, RGBA, I;16, I, F, CMYK, ...) to RGB; alpha over white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("LA", "RGBA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Open an image file (or bytes / PIL image), apply EXIF orientation and return RGB."""
    if isinstance(source, Image.Image):
        img = source
    else:
        fp = io.BytesIO(source) if isinstance(source, bytes) else source
        img = Image.open(fp)
        img.load()  # decode now so truncated files fail here, naming the file
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


class ImagePreprocessor:
    """Decode → RGB → resize → normalize to a ``[3, S, S]`` float tensor. Picklable for workers."""

    def __init__(self, cfg: ImageConfig):
        self.cfg = cfg
        self.mean = np.asarray(cfg.mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(cfg.std, dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, source: str | Path | bytes | Image.Image) -> torch.Tensor:
        img = load_image(source)
        s = self.cfg.image_size
        if getattr(self.cfg, "resize", "squash") == "center_crop":
            img = ImageOps.fit(img, (s, s), Image.BICUBIC)
        elif img.size != (s, s):
            img = img.resize((s, s), Image.BICUBIC)
        arr = self.to_unit(np.asarray(img, dtype=np.float32).transpose(2, 0, 1))  # [3, S, S]
        return torch.from_numpy((arr - self.mean) / self.std)

    @staticmethod
    def to_unit(pixels: np.ndarray) -> np.ndarray:
        """0-255 values to [0, 1]."""
        return pixels / 255.0

    def denormalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Inverse of the normalisation, clamped to [0, 1] (for sample grids)."""
        mean = torch.tensor(self.cfg.mean, device=pixels.device).view(-1, 1, 1)
        std = torch.tensor(self.cfg.std, device=pixels.device).view(-1, 1, 1)
        return (pixels * std + mean).clamp(0, 1)


# ------------------------------------------------------------------------------------------------
# Embedding (inside the model)
# ------------------------------------------------------------------------------------------------
_NAME = re.compile(r"[A-Za-z0-9_]+")
_TIMM_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)?")  # architecture[.pretrained tag]
_OPEN_CLIP_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _rate(v: Any) -> bool:
    return _is_number(v) and 0.0 <= v <= 1.0


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _size(v: Any) -> bool:
    return _pos_int(v) or (isinstance(v, list) and len(v) == 2 and all(_pos_int(x) for x in v))


def _layer_name(v: Any) -> bool:  # timm resolves these strings through its own name → layer tables
    return isinstance(v, str) and (v == "" or bool(_NAME.fullmatch(v)))


#: The backbone keyword arguments a config may set, per backbone kind, with the values each accepts. All of them only
#: shape the architecture; anything that names a file, a URL, a Hub repo, a cache or pretrained weights
#: (``pretrained_cfg_overlay``, ``checkpoint_path``, ``pretrained_image_path``, ``weights_only``, ...) is refused.
BACKBONE_KWARGS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "timm": {
        "drop_rate": _rate, "drop_path_rate": _rate, "attn_drop_rate": _rate, "proj_drop_rate": _rate,
        "pos_drop_rate": _rate, "drop_block_rate": _rate, "output_stride": _pos_int, "norm_layer": _layer_name,
        "act_layer": _layer_name, "stem_type": _layer_name, "stem_width": _pos_int, "embed_dim": _pos_int,
        "depth": _pos_int, "num_heads": _pos_int, "mlp_ratio": lambda v: _is_number(v) and v > 0,
        "patch_size": _size, "img_size": _size, "qkv_bias": lambda v: isinstance(v, bool),
        "class_token": lambda v: isinstance(v, bool), "reg_tokens": lambda v: _pos_int(v) or v == 0,
    },
    "open_clip": {"force_quick_gelu": lambda v: isinstance(v, bool), "force_patch_dropout": _rate,
                  "force_image_size": _size},
    "patch": {"embed_dim": _pos_int},
}


def check_backbone(backbone: str, kwargs: dict[str, Any] | None = None) -> None:
    """Raise ``ValueError`` (message starting with the offending key) unless ``backbone`` is ``timm:<registered
    architecture>``, ``open_clip:<built-in model name>`` or ``patch:<size>`` and every ``kwargs`` entry is in
    :data:`BACKBONE_KWARGS` with an accepted value. Nothing here reads a file or the network: a backbone is
    built from its library's registry only (no ``hf-hub:``, ``local-dir:``, paths or URLs)."""
    kind, sep, name = str(backbone).partition(":")
    if not sep or kind not in BACKBONE_KWARGS:
        raise ValueError(f"backbone: {backbone!r} is not 'timm:<name>', 'open_clip:<name>' or 'patch:<size>'")
    if kind == "timm":
        import timm

        if not _TIMM_NAME.fullmatch(name) or not timm.is_model(name.split(".", 1)[0]):
            raise ValueError(f"backbone: {backbone!r} is not a registered timm architecture (a plain name such as "
                             "'timm:resnet10t'; Hub ids, local folders, paths and URLs are refused)")
    elif kind == "open_clip":
        import open_clip

        if not _OPEN_CLIP_NAME.fullmatch(name) or name not in open_clip.list_models():
            raise ValueError(f"backbone: {backbone!r} is not a built-in open_clip model (a plain name such as "
                             "'open_clip:ViT-B-32'; 'hf-hub:', 'local-dir:', paths and URLs are refused)")
        if "hf_model_name" in (open_clip.get_model_config(name) or {}).get("text_cfg", {}):
            raise ValueError(f"backbone: {backbone!r} has a Hugging Face text tower, which would be fetched from the "
                             "Hub; use an open_clip model with a built-in text tower")
    elif not name.isdigit():
        raise ValueError(f"backbone: {backbone!r}: the patch size must be a positive integer")
    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise ValueError(f"backbone_kwargs: expected an object, got {type(kwargs).__name__}")
    allowed = BACKBONE_KWARGS[kind]
    for key, value in kwargs.items():
        if key not in allowed:
            raise ValueError(f"backbone_kwargs.{key}: not an architecture argument mmzoo passes to {kind} "
                             f"(allowed: {', '.join(sorted(allowed))})")
        if not allowed[key](value):
            raise ValueError(f"backbone_kwargs.{key}: value {value!r} is not accepted")


def _build_backbone(cfg: ImageConfig) -> tuple[nn.Module, str]:
    check_backbone(cfg.backbone, cfg.backbone_kwargs)
    kind, name = cfg.backbone.split(":", 1)
    if kind == "timm":
        import timm

        kwargs: dict[str, Any] = dict(features_only=True, out_indices=(cfg.out_index,), pretrained=False,
                                      **cfg.backbone_kwargs)
        if cfg.pretrained:
            if Path(cfg.pretrained).is_file():
                kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(cfg.pretrained)))
            else:
                kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(tag=cfg.pretrained))
        return timm.create_model(name, **kwargs), "timm"
    if kind == "open_clip":
        import open_clip

        # only the visual tower is used: never fetch base weights for either tower
        model = open_clip.create_model(name, pretrained=cfg.pretrained or None, load_weights=bool(cfg.pretrained),
                                       pretrained_image=False, pretrained_text=False,
                                       device=torch.get_default_device(), **cfg.backbone_kwargs)
        visual = model.visual
        visual.output_tokens = True
        return visual, "open_clip"
    if kind == "patch":
        from timm.layers import PatchEmbed

        if not name.isdigit() or int(name) < 1 or cfg.image_size % int(name):
            raise ValueError(f"image backbone {cfg.backbone!r}: the patch size must be a positive integer dividing "
                             f"image_size={cfg.image_size}")
        if cfg.pretrained:
            raise ValueError(f"image backbone {cfg.backbone!r} is a plain patch embedding: it has no pretrained weights")
        dim = int(cfg.backbone_kwargs.get("embed_dim", 256))
        return PatchEmbed(cfg.image_size, int(name), 3, dim, output_fmt="NHWC", flatten=False), "patch"
    raise ValueError(f"unknown image backbone kind {kind!r} in {cfg.backbone!r}; use 'timm:', 'open_clip:' or 'patch:'")


class ImageEmbedder(nn.Module):
    """Pixels ``[B, 3, S, S]`` → patch embeddings ``[B, N, d_model]`` with 2-D positions."""

    def __init__(self, cfg: ImageConfig, d_model: int):
        super().__init__()
        self.cfg = cfg
        self.backbone, self.kind = _build_backbone(cfg)
        self.channels_last = self.kind == "timm"
        with torch.no_grad():
            was_training = self.backbone.training
            self.backbone.eval()
            feats = self._features(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
            self.backbone.train(was_training)
        _, self.grid_h, self.grid_w, in_dim = feats.shape
        self.proj = nn.Linear(in_dim, d_model)
        self.norm = nn.LayerNorm(d_model)
        # after the norm, features have unit scale per channel: positions start at half of it
        pos_std = 0.35 if cfg.position == "after_norm" else 0.02
        if cfg.position_encoding == "sincos":  # fixed: buffers, not parameters (and not in the state dict)
            row, col = sincos_2d(self.grid_h, self.grid_w, d_model)
            scale = pos_std * 2**0.5  # sin/cos have RMS 1/sqrt(2): the same scale as the learned init
            self.register_buffer("row_pos", scale * row, persistent=False)
            self.register_buffer("col_pos", scale * col, persistent=False)
        else:
            self.row_pos = nn.Parameter(torch.zeros(self.grid_h, 1, d_model))
            self.col_pos = nn.Parameter(torch.zeros(1, self.grid_w, d_model))
            nn.init.normal_(self.row_pos, std=pos_std)
            nn.init.normal_(self.col_pos, std=pos_std)

    @property
    def num_tokens(self) -> int:
        return self.grid_h * self.grid_w

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Backbone features as ``[B, h, w, C]``."""
        if self.kind == "timm":
            if self.channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            fmap = self.backbone(pixels)[-1]  # [B, C, h, w]
            return fmap.permute(0, 2, 3, 1)
        if self.kind == "patch":
            return self.backbone(pixels)  # [B, h, w, C]
        _, tokens = self.backbone(pixels)  # [B, h*w, C]
        b, n, c = tokens.shape
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"open_clip tower returned {n} tokens, not a square grid")
        return tokens.reshape(b, side, side, c)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels [B, 3, H, W], got {tuple(pixels.shape)}")
        feats = self._features(pixels)  # [B, h, w, C]
        pos = self.row_pos + self.col_pos  # [h, w, d]
        if self.cfg.position == "after_norm":
            x = self.norm(self.proj(feats).flatten(1, 2)) + pos.flatten(0, 1)  # [B, h*w, d]
        else:
            x = self.norm((self.proj(feats) + pos).flatten(1, 2))
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return x, mask


def sincos_2d(rows: int, cols: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed 2-D positions: ``row [rows, 1, dim]`` with sines/cosines of the row index in the first half of the
    channels (zeros in the second) and ``col [1, cols, dim]`` with those of the column in the second half. Periods run
    from four grid widths (its sine rises monotonically across the grid: "left of" is one comparison) to a fifth of
    the grid, so neighbouring cells and far apart ones both differ."""
    half = dim // 2
    n_freq = half // 2

    def table(n: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float32)[:, None]
        period = 4 * n * torch.logspace(0, -1.3, n_freq, base=10.0)  # 4n .. n/5 cells
        angle = 2 * torch.pi * pos / torch.clamp(period, min=1e-3)
        t = torch.zeros(n, half)
        t[:, 0:2 * n_freq:2], t[:, 1:2 * n_freq:2] = torch.sin(angle), torch.cos(angle)
        return t

    row = torch.zeros(rows, 1, dim)
    col = torch.zeros(1, cols, dim)
    row[:, 0, :half] = table(rows)
    col[0, :, half:2 * half] = table(cols)
    return row, col


def _check_saved(d: dict[str, Any]) -> None:
    """A saved image config names only a registered backbone with allow-listed arguments."""
    if "backbone" in d or "backbone_kwargs" in d:
        check_backbone(d.get("backbone", ImageConfig.backbone), d.get("backbone_kwargs") or {})


def _pretrain_target(d: dict[str, Any]) -> dict[str, Any]:
    """What dense scene pretraining trains: the backbone at the stage the embedder reads, at its image size."""
    return {"backbone": str(d.get("backbone", "")), "out_index": int(d.get("out_index", 2)),
            "image_size": int(d.get("image_size", 64)), "mean": d.get("mean", (0.5, 0.5, 0.5)),
            "std": d.get("std", (0.5, 0.5, 0.5))}


# dense scene pretraining: the weights file becomes the backbone's `pretrained` file (timm loads it when building)
PRETRAINABLE = PretrainableBackbone(target=_pretrain_target, module=lambda embedder: embedder.backbone,
                                    config_for=lambda path: {"pretrained": path})
register_modality("image", config=ImageConfig, embedder=ImageEmbedder, preprocess=ImagePreprocessor, typed=True,
                  legacy_type_index=1, field_checks={"image_size": is_pos, "backbone_kwargs": is_dict},
                  check=_check_saved, pretrainable=PRETRAINABLE)
