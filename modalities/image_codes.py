"""Image-code modality: a ``diffusers.VQModel`` turns an image into a grid of discrete code ids and back.

The tokenizer works on pixels in ``[0, 1]`` (``[B,3,H,W]``); codes are raw codebook ids in
``[0, num_codes)`` (``[B,h,w]``), mapped into the unified vocabulary's image-code range with
:meth:`ImageCodeTokenizer.to_unified`. A tokenizer is saved as a plain diffusers folder
(``config.json`` + ``diffusion_pytorch_model.safetensors``); loading reads only those two files. A tokenizer built
with ``VQConfig.local_encoder`` adds one key to ``config.json`` (:data:`LOCAL_ENCODER_KEY`), which mmzoo's loader
honours and plain ``diffusers`` ignores.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modalities.base import register_modality

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
#: :meth:`ImageCodeTokenizer.encode` / ``decode`` run on the CPU this many images at a time: on the 2-core CPU, 16 at
#: a time encoded 3.1× and decoded 4.4× faster than 256 (the activations stay in cache), with the same codes
#: (``python -m benchmarks.vq_inference``)
CPU_CHUNK = 16


@dataclass
class VQConfig:
    """Architecture of a small ``VQModel``: ``len(channels) - 1`` downsamplings of ``image_size``."""

    image_size: int = 64
    channels: tuple[int, ...] = (16, 32, 64, 64)  # 4 blocks: 64 px → 8×8 codes
    layers_per_block: int = 1
    latent_channels: int = 16
    num_codes: int = 512
    norm_num_groups: int = 8
    beta: float = 0.25  # commitment weight (diffusers' VectorQuantizer uses 0.25)
    local_encoder: bool = False  # each code reads only its neighbourhood (see localise_encoder)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if not self.channels:
            raise ValueError("VQConfig.channels must name at least one block")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"every channel count {self.channels} must be divisible by norm_num_groups={self.norm_num_groups}")
        if self.image_size % self.factor:
            raise ValueError(f"image_size={self.image_size} is not divisible by the downsampling factor {self.factor}")
        if self.num_codes < 2:
            raise ValueError(f"num_codes must be >= 2, got {self.num_codes}")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        """Code grid ``(h, w)`` of one image."""
        n = self.image_size // self.factor
        return n, n

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def build_vqmodel(cfg: VQConfig) -> nn.Module:
    """A fresh ``diffusers.VQModel`` for ``cfg``."""
    from diffusers import VQModel

    n = len(cfg.channels)
    vq = VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.channels,
        layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels, sample_size=cfg.image_size,
        num_vq_embeddings=cfg.num_codes, norm_num_groups=cfg.norm_num_groups, vq_embed_dim=cfg.latent_channels,
        mid_block_add_attention=not cfg.local_encoder,
    )
    return localise_encoder(vq) if cfg.local_encoder else vq


#: ``config.json`` key (beside diffusers' own) that marks a tokenizer built by :func:`localise_encoder`
LOCAL_ENCODER_KEY = "mmzoo_local_encoder"


def localise_encoder(vq: nn.Module) -> nn.Module:
    """Make ``vq``'s codes local, in place: a code then depends on its own neighbourhood, not the whole image.

    diffusers' encoder normalises every feature map over the whole image (GroupNorm) and, with
    ``mid_block_add_attention``, attends across it, so one object changes codes everywhere, the image border
    included (and the border comes first in raster order). Here the encoder's GroupNorms become BatchNorms
    (batch statistics in training, fixed running statistics when encoding) and its convolutions, the strided
    ones included, pad by replicating the edge, so a plain background gets the same code at the border as
    inside. (A per-pixel LayerNorm also makes codes local but lost shape detail; no normalisation collapsed
    the codebook.) :data:`LOCAL_ENCODER_KEY` in the config tells :meth:`ImageCodeTokenizer.from_pretrained`
    to redo this before loading the weights.
    """
    if getattr(vq.encoder.mid_block, "attentions", [None])[0] is not None:
        raise ValueError("a local encoder needs a VQModel built with mid_block_add_attention=False")
    from diffusers.models.downsampling import Downsample2D

    for module in vq.encoder.modules():
        if isinstance(module, Downsample2D) and module.use_conv and module.padding == 0:
            module.padding = 1  # pad on all sides, not zeros on the right and bottom only
            module.conv = _replicate_padded(module.conv, 1)
    for parent in list(vq.encoder.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                norm = nn.BatchNorm2d(child.num_channels, eps=child.eps).to(child.weight.device)
                norm.load_state_dict(child.state_dict(), strict=False)
                setattr(parent, name, norm)
            elif isinstance(child, nn.Conv2d) and child.padding != (0, 0) and child.padding_mode == "zeros":
                setattr(parent, name, _replicate_padded(child, child.padding))
    vq.register_to_config(**{LOCAL_ENCODER_KEY: True})
    return vq


def _replicate_padded(conv: nn.Conv2d, padding: int | tuple[int, int]) -> nn.Conv2d:
    """A copy of ``conv`` (same weights) that pads by ``padding`` replicating the edge."""
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                    conv.groups, conv.bias is not None, padding_mode="replicate")
    new.load_state_dict(conv.state_dict())
    return new.to(conv.weight.device, conv.weight.dtype)


def vqmodel_from_config(config: dict[str, Any]) -> nn.Module:
    """A fresh ``diffusers.VQModel`` for a saved ``config.json`` (localised when it carries :data:`LOCAL_ENCODER_KEY`)."""
    from diffusers import VQModel

    local = bool(config.get(LOCAL_ENCODER_KEY, False))
    vq = VQModel.from_config({k: v for k, v in config.items() if k != LOCAL_ENCODER_KEY})
    return localise_encoder(vq) if local else vq


class ImageCodeTokenizer(nn.Module):
    """Image ↔ VQ code grid with a ``diffusers.VQModel``; pixels in ``[0,1]``, codes ``[B,h,w]``."""

    def __init__(self, vq: nn.Module):
        super().__init__()
        self.vq = vq
        c = vq.config
        blocks = len(c.block_out_channels)
        self.factor = 2 ** (blocks - 1)
        self.image_size = int(c.sample_size)
        self.num_codes = int(c.num_vq_embeddings)
        self.code_dim = int(c.vq_embed_dim or c.latent_channels)

    @classmethod
    def from_config(cls, cfg: VQConfig | dict[str, Any]) -> "ImageCodeTokenizer":
        cfg = cfg if isinstance(cfg, VQConfig) else VQConfig(**cfg)
        return cls(build_vqmodel(cfg))

    @property
    def grid(self) -> tuple[int, int]:
        n = self.image_size // self.factor
        return n, n

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w

    # --- pixels ↔ latents ↔ codes -------------------------------------------------------------
    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels [B,3,H,W], got shape {tuple(pixels.shape)}")
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {tuple(pixels.shape[-2:])}")

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Continuous encoder output ``[B,c,h,w]`` for pixels in ``[0,1]``."""
        self._check_pixels(pixels)
        return self.vq.encode(pixels * 2 - 1).latents

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z_q [B,c,h,w] with straight-through gradient, codebook+commitment loss, codes [B,h,w])``."""
        with torch.autocast(latents.device.type, enabled=False):  # nearest-code search in fp32
            z_q, loss, (_, _, idx) = self.vq.quantize(latents.float())
        b, _, h, w = latents.shape
        return z_q, loss, idx.view(b, h, w)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B,3,H,W]`` (unclamped, ~[0,1]) from quantized latents."""
        return (self.vq.decode(z_q, force_not_quantize=True).sample + 1) / 2

    @staticmethod
    def _chunks(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.split(CPU_CHUNK) if x.device.type == "cpu" and len(x) > CPU_CHUNK else (x,)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Code ids ``[B,h,w]`` (long, in ``[0, num_codes)``) of pixels ``[B,3,H,W]`` in ``[0,1]``."""
        self._check_pixels(pixels)
        return torch.cat([self.quantize(self.encode_latents(c))[2] for c in self._chunks(pixels)])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B,3,H,W]`` in ``[0,1]`` of code ids ``[B,h,w]`` (or ``[B,h*w]``)."""
        h, w = self.grid
        if codes.ndim == 2 and codes.shape[1] == h * w:
            codes = codes.view(-1, h, w)
        if codes.ndim != 3 or tuple(codes.shape[1:]) != (h, w):
            raise ValueError(f"expected codes [B,{h},{w}] or [B,{h * w}], got shape {tuple(codes.shape)}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.num_codes:
            raise ValueError(f"code ids must lie in [0, {self.num_codes}), got [{lo}, {hi}]")
        z_q = self.vq.quantize.get_codebook_entry(codes.reshape(-1), (codes.shape[0], h, w, self.code_dim))
        return torch.cat([self.decode_latents(z).clamp(0, 1) for z in self._chunks(z_q)])

    # --- codebook compaction ------------------------------------------------------------------
    @torch.no_grad()
    def code_usage(self, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """How often each code is chosen over images ``[N,3,H,W]`` (``uint8`` or ``[0,1]`` floats): ``[num_codes]``."""
        counts = torch.zeros(self.num_codes, dtype=torch.long)
        for chunk in pixels.split(batch_size):
            chunk = chunk.float() / 255 if chunk.dtype == torch.uint8 else chunk.float()
            counts += torch.bincount(self.encode(chunk).flatten().cpu(), minlength=self.num_codes)
        return counts

    @torch.no_grad()
    def compacted(self, usage: torch.Tensor, min_distance: float) -> "ImageCodeTokenizer":
        """A copy whose codebook keeps only codes at least ``min_distance`` apart (in code space).

        Codes are visited from the most used; a code closer than ``min_distance`` to one already kept, or
        never used, is dropped, and latents then snap to the nearest kept code. A trained codebook spends
        many entries on near-copies of frequent content (plain backgrounds), so tiny pixel noise flips
        codes from image to image; after compaction equal content gets equal codes, which makes the code
        sequences far easier for a generator to model. The kept codes are renumbered ``0..k-1``.
        """
        if usage.shape != (self.num_codes,):
            raise ValueError(f"usage must have shape ({self.num_codes},), got {tuple(usage.shape)}")
        if min_distance < 0:
            raise ValueError(f"min_distance must be >= 0, got {min_distance}")
        device = self.vq.quantize.embedding.weight.device
        weight = self.vq.quantize.embedding.weight.detach().float().cpu()
        dist = torch.cdist(weight, weight)
        keep: list[int] = []
        for i in usage.argsort(descending=True, stable=True).tolist():
            if usage[i] == 0:
                break
            if not keep or float(dist[i, keep].min()) >= min_distance:
                keep.append(i)
        if len(keep) < 2:
            raise ValueError(f"min_distance={min_distance} keeps {len(keep)} code(s); use a smaller distance")
        vq = vqmodel_from_config({**self.vq.config, "num_vq_embeddings": len(keep)})
        state = self.vq.state_dict()
        state["quantize.embedding.weight"] = state["quantize.embedding.weight"][keep]
        vq.load_state_dict(state)
        return type(self)(vq.to(device).eval())

    # --- unified vocabulary -------------------------------------------------------------------
    def check_layout(self, layout: Any) -> None:
        """Raise unless the layout's image-code range holds this codebook."""
        if layout.image_code_size < self.num_codes:
            raise ValueError(f"the vocabulary reserves {layout.image_code_size} image codes but the VQ codebook "
                             f"has {self.num_codes}; use a model with vocab.image_code_size >= {self.num_codes}")

    def to_unified(self, codes: torch.Tensor, layout: Any) -> torch.Tensor:
        """Codes → unified vocabulary ids (same shape)."""
        self.check_layout(layout)
        return layout.codes_to_unified(codes)

    def from_unified(self, ids: torch.Tensor, layout: Any) -> torch.Tensor:
        """Unified ids → codes; raises if any id lies outside this codebook's slice of the range."""
        codes = layout.unified_to_codes(ids)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise ValueError(f"ids outside the image-code range [{layout.image_code_start}, "
                             f"{layout.image_code_start + self.num_codes})")
        return codes

    def allowed_mask(self, layout: Any) -> torch.Tensor:
        """Boolean ``[V]`` mask of exactly this codebook's ids in the unified vocabulary (no EOS)."""
        self.check_layout(layout)
        mask = torch.zeros(layout.size, dtype=torch.bool)
        mask[layout.image_code_start: layout.image_code_start + self.num_codes] = True
        return mask

    # --- save / load as a diffusers folder ----------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` + safetensors weights (a ``diffusers`` ``VQModel`` folder)."""
        folder = Path(folder)
        self.vq.save_pretrained(folder, safe_serialization=True)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "ImageCodeTokenizer":
        """Load a saved folder; only ``config.json`` and safetensors are read (no pickle, no code)."""
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{folder} is not a VQ tokenizer folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        cfg = json.loads((folder / CONFIG_FILE).read_text())
        if cfg.get("_class_name") != "VQModel":
            raise ValueError(f"{folder}/{CONFIG_FILE} describes {cfg.get('_class_name')!r}, not a VQModel")
        from safetensors.torch import load_file

        vq = vqmodel_from_config(cfg)
        vq.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return cls(vq.eval())


# image codes are decoder targets (unified-vocabulary ids); their VQ tokenizer is saved beside the model
register_modality("image_codes", typed=True, legacy_type_index=2)
