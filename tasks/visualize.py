"""Sample grids a person can look at: images with their generated text underneath."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from zoo.atomic import atomic_file


def _to_pil(img: torch.Tensor | Image.Image) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    arr = (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def save_grid(images: Sequence[torch.Tensor | Image.Image], texts: Sequence[str], path: str | Path,
              cols: int = 4, cell: int = 160, text_lines: int = 4,
              references: Sequence[str] | None = None) -> Path:
    """Write a grid of ``images`` (``[3,H,W]`` in [0,1] or PIL) with wrapped ``texts`` below each, and under
    them, in green and marked ``ref:``, the ``references`` (the caption / answer / description to compare with)."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    if references is not None and len(references) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(references)} references")
    font = ImageFont.load_default()
    line_h = 12
    ref_lines = 2 if references is not None else 0
    cols = max(1, min(cols, len(images)))
    rows = max(1, -(-len(images) // cols))
    cell_h = cell + (text_lines + ref_lines) * line_h + 6
    canvas = Image.new("RGB", (cols * cell, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    width_chars = max(8, cell // 6)
    for i, (img, text) in enumerate(zip(images, texts)):
        x, y = (i % cols) * cell, (i // cols) * cell_h
        canvas.paste(_to_pil(img).resize((cell - 8, cell - 8), Image.NEAREST), (x + 4, y + 4))
        lines = textwrap.wrap(str(text), width_chars)[:text_lines]
        for j, line in enumerate(lines):
            draw.text((x + 4, y + cell + j * line_h), line, fill="black", font=font)
        if references is not None:
            ref = textwrap.wrap(f"ref: {references[i]}", width_chars)[:ref_lines]
            for j, line in enumerate(ref):
                draw.text((x + 4, y + cell + (len(lines) + j) * line_h), line, fill=(0, 120, 0), font=font)
    with atomic_file(path, "wb") as f:
        canvas.save(f, format="PNG")
    return Path(path)
