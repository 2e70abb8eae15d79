"""The layout renderer: a learned decoder that draws an image from a scene layout (text-to-image's second stage).

A layout is a background tone and a list of objects, each a box ``(x0, y0, x1, y1)`` in ``[0, 1]`` with a shape,
a colour and a size word. The conditioning is spatially aligned, as in layout-map / GLIGEN-style generators:
every pixel of an object's box (one pixel of margin) carries the sum of the object's shape, colour and size
embeddings and of the tone's embedding, the pixel's offset from the box centre in units of the box's half side
(``u, v``, also as sines and cosines of a few frequencies, NeRF-style) and that half side. A per-pixel decoder (an MLP, i.e. 1×1 convolutions over the layout map) turns
these into RGB; the pixels outside every box get the tone's learned background colour. The decoder runs only
on the pixels that boxes cover, a fifth of the image or less, which is what makes it cheap on a CPU.
Nothing is drawn by rule: which pixels of a box a triangle covers, its edges and its colour are learnt from
the images (pixel loss).

Saved in a model folder as ``renderer/config.json`` (the typed keys of :class:`LayoutRendererConfig`, checked on
load) and ``renderer/renderer.safetensors``; nothing else is read.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "renderer.safetensors"
FORMAT = "mmzoo.LayoutRenderer"
#: bounds on a loaded config (a config cannot make loading allocate memory at will)
MAX_WORDS = 1024
LIMITS = {"image_size": 2048, "embed_dim": 4096, "width": 4096, "depth": 64, "octaves": 16}


@dataclass
class LayoutRendererConfig:
    """The renderer's vocabulary of attribute words and its size (the whole saved config)."""

    shapes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle", "diamond", "cross"])
    colours: list[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow", "purple", "orange"])
    sizes: list[str] = field(default_factory=lambda: ["small", "large"])
    tones: list[str] = field(default_factory=lambda: ["light", "dark"])
    image_size: int = 64
    embed_dim: int = 32
    width: int = 64
    depth: int = 3
    octaves: int = 3        # u, v also enter as sin/cos at frequencies pi * 2^0..octaves-1 (sharp edges learn sooner)

    def __post_init__(self) -> None:
        for name in ("shapes", "colours", "sizes", "tones"):
            words = getattr(self, name)
            if (not isinstance(words, list) or not words or len(set(words)) != len(words)
                    or not all(isinstance(w, str) and w.strip() and " " not in w for w in words)):
                raise ValueError(f"LayoutRendererConfig.{name} must be a list of distinct single words, got {words!r}")
            if len(words) > MAX_WORDS:
                raise ValueError(f"LayoutRendererConfig.{name} has {len(words)} words, more than {MAX_WORDS}")
        for name, top in LIMITS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not (0 if name == "octaves" else 1) <= v <= top:
                raise ValueError(f"LayoutRendererConfig.{name} must be an int in [{0 if name == 'octaves' else 1}, "
                                 f"{top}], got {v!r}")

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "LayoutRendererConfig":
        """Build from a loaded JSON object, refusing unknown keys (types are checked by ``__post_init__``)."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known - {"format"})
        if extra:
            raise ValueError(f"{where}: unknown renderer config key(s) {extra}; known: {sorted(known)}")
        if d.get("format", FORMAT) != FORMAT:
            raise ValueError(f"{where}: format {d.get('format')!r} is not {FORMAT!r}")
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None


@dataclass
class Layout:
    """One scene plan: the background tone and its objects (box in ``[0, 1]``, shape, colour and size words)."""

    tone: str
    objects: list[dict[str, Any]]


class LayoutRenderer(nn.Module):
    """Layout → RGB image ``[3, S, S]`` in ``[0, 1]`` (see the module docstring)."""

    def __init__(self, cfg: LayoutRendererConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or LayoutRendererConfig()
        e, w = cfg.embed_dim, cfg.width
        self.shape_embed = nn.Embedding(len(cfg.shapes), e)
        self.colour_embed = nn.Embedding(len(cfg.colours), e)
        self.size_embed = nn.Embedding(len(cfg.sizes), e)
        self.tone_embed = nn.Embedding(len(cfg.tones), e)
        self.background = nn.Linear(e, 3)
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(cfg.octaves, dtype=torch.float32), persistent=False)
        layers: list[nn.Module] = [nn.Linear(e + 3 + 4 * cfg.octaves, w), nn.GELU()]
        for _ in range(cfg.depth - 1):
            layers += [nn.Linear(w, w), nn.GELU()]
        self.pixel = nn.Sequential(*layers, nn.Linear(w, 3))

    # --- words → indices ----------------------------------------------------------------------
    def encode(self, layouts: Sequence[Layout], max_objects: int | None = None) -> dict[str, torch.Tensor]:
        """Tensors of a batch of layouts: ``boxes [B,K,4]``, ``attrs [B,K,3]`` (shape, colour, size indices),
        ``valid [B,K]`` and ``tone [B]``. Objects whose words the renderer does not know raise ``ValueError``."""
        cfg = self.cfg
        k = max(1, max_objects or max((len(lay.objects) for lay in layouts), default=1))
        boxes = torch.zeros(len(layouts), k, 4)
        attrs = torch.zeros(len(layouts), k, 3, dtype=torch.long)
        valid = torch.zeros(len(layouts), k, dtype=torch.bool)
        tone = torch.zeros(len(layouts), dtype=torch.long)
        for i, lay in enumerate(layouts):
            if lay.tone not in cfg.tones:
                raise ValueError(f"layout {i}: unknown tone {lay.tone!r}; the renderer knows {cfg.tones}")
            tone[i] = cfg.tones.index(lay.tone)
            for j, o in enumerate(lay.objects[:k]):
                for a, (key, words) in enumerate((("shape", cfg.shapes), ("colour", cfg.colours),
                                                  ("size", cfg.sizes))):
                    if o.get(key) not in words:
                        raise ValueError(f"layout {i}, object {j}: unknown {key} {o.get(key)!r}; known: {words}")
                    attrs[i, j, a] = words.index(o[key])
                boxes[i, j] = torch.tensor([float(v) for v in o["box"]])
                valid[i, j] = True
        return {"boxes": boxes, "attrs": attrs, "valid": valid, "tone": tone}

    # --- the conditioning map and the decoder -------------------------------------------------
    def box_pixels(self, boxes: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Which pixels each box covers (one pixel of margin): ``inside [B,K,S,S]``, and the offsets ``u [B,K,1,S]``
        and ``v [B,K,S,1]`` of pixel columns / rows from the box centre, in units of the box's half width / height."""
        s = self.cfg.image_size
        dev = self.tone_embed.weight.device
        boxes, valid = boxes.to(dev).float(), valid.to(dev)
        centres = (torch.arange(s, device=dev, dtype=torch.float32) + 0.5) / s  # pixel centres in [0, 1]
        x0, y0, x1, y1 = boxes.unbind(-1)  # [B,K]
        hx, hy = ((x1 - x0) / 2).clamp(min=1 / s), ((y1 - y0) / 2).clamp(min=1 / s)
        u = (centres.view(1, 1, 1, s) - ((x0 + x1) / 2)[..., None, None]) / hx[..., None, None]  # [B,K,1,S]
        v = (centres.view(1, 1, s, 1) - ((y0 + y1) / 2)[..., None, None]) / hy[..., None, None]  # [B,K,S,1]
        mx, my = 1 + 1 / (s * hx[..., None, None]), 1 + 1 / (s * hy[..., None, None])  # one pixel of margin
        inside = (u.abs() <= mx) & (v.abs() <= my) & valid[..., None, None]
        return inside, u, v

    def condition(self, boxes: torch.Tensor, attrs: torch.Tensor, valid: torch.Tensor, tone: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layout map at the pixels boxes cover: ``index [N,3]`` (image, row, column) and ``features``
        ``[N, E+3+4*octaves]`` (object + tone embedding, ``u``, ``v``, half side, sin/cos of ``u``, ``v``). Where boxes overlap, one of them wins."""
        dev = self.tone_embed.weight.device
        attrs, tone = attrs.to(dev), tone.to(dev)
        inside, u, v = self.box_pixels(boxes, valid)
        b, k, y, x = inside.nonzero(as_tuple=True)
        emb = (self.shape_embed(attrs[..., 0]) + self.colour_embed(attrs[..., 1]) + self.size_embed(attrs[..., 2])
               + self.tone_embed(tone)[:, None])  # [B,K,E]
        boxes = boxes.to(dev).float()
        half = ((boxes[..., 2] - boxes[..., 0] + boxes[..., 3] - boxes[..., 1]) / 4)[b, k]  # [N]
        uv = torch.stack([u[b, k, 0, x], v[b, k, y, 0]], 1)  # [N,2]
        waves = (uv[..., None] * self.freqs).flatten(1)  # [N, 2*octaves]
        feats = torch.cat([emb[b, k], uv, half[:, None] * 4, waves.sin(), waves.cos()], 1)
        return torch.stack([b, y, x], 1), feats

    def forward(self, boxes: torch.Tensor, attrs: torch.Tensor, valid: torch.Tensor, tone: torch.Tensor
                ) -> torch.Tensor:
        """Images ``[B, 3, S, S]`` (unclamped; :meth:`render` clamps to ``[0, 1]``)."""
        s = self.cfg.image_size
        back = self.background(self.tone_embed(tone.to(self.tone_embed.weight.device))) + 0.5  # [B,3]
        index, feats = self.condition(boxes, attrs, valid, tone)
        rgb = self.pixel(feats).float() + 0.5  # [N,3]
        b, y, x = index.unbind(1)
        delta = torch.zeros(back.shape[0], s, s, 3, device=back.device, dtype=rgb.dtype)
        delta = delta.index_put((b, y, x), rgb - back.float()[b])  # boxes of a valid layout never overlap
        return (back.float()[:, :, None, None] + delta.permute(0, 3, 1, 2))

    def loss(self, images: torch.Tensor, boxes: torch.Tensor, attrs: torch.Tensor, valid: torch.Tensor,
             tone: torch.Tensor) -> torch.Tensor:
        """Mean squared error against real images ``[B,3,S,S]`` (``uint8`` or ``[0, 1]`` floats)."""
        target = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return F.mse_loss(self(boxes, attrs, valid, tone), target.to(self.tone_embed.weight.device))

    @torch.no_grad()
    def render(self, layouts: Sequence[Layout], batch_size: int = 64) -> torch.Tensor:
        """Images ``[B, 3, S, S]`` in ``[0, 1]`` of layouts (on the CPU)."""
        out = []
        for i in range(0, len(layouts), batch_size):
            t = self.encode(layouts[i: i + batch_size])
            out.append(self(**t).clamp(0, 1).float().cpu())
        if not out:
            return torch.zeros(0, 3, self.cfg.image_size, self.cfg.image_size)
        return torch.cat(out)

    # --- I/O ----------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, **asdict(self.cfg)}, indent=1) + "\n",
                                          encoding="utf-8")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_FILE))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, root: str | Path | None = None) -> "LayoutRenderer":
        """Load ``config.json`` (known, typed, bounded keys only) and ``renderer.safetensors`` (nothing else is
        read) through :mod:`zoo.loading`: every read confined to ``root`` (default: ``folder``), every tensor
        checked by name, shape and dtype."""
        from zoo.loading import (ModelFolderError, check_state, confined, read_json_object, read_safetensors,
                                 refuse_targets)

        folder = Path(folder)
        root = Path(root) if root is not None else folder
        cfg_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for p in (cfg_path, weights):
            if not p.exists() and not p.is_symlink():
                raise FileNotFoundError(f"{folder}: not a layout renderer folder (no {p.name})")
        confined(root, folder, "dir")
        raw = read_json_object(root, cfg_path)
        refuse_targets(raw, str(cfg_path))
        try:
            cfg = LayoutRendererConfig.from_dict(raw, str(cfg_path))
        except ValueError as e:
            raise ModelFolderError(str(e)) from None
        with torch.device("meta"):
            expected = cls(cfg).state_dict()
        state = check_state(read_safetensors(root, weights), expected, weights, str(cfg_path))
        renderer = cls(cfg)
        renderer.load_state_dict(state)
        return renderer.eval()
