"""Helpers for tests: photo-like images written in every PIL mode the readers must handle."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: file name → PIL mode it is saved in (CMYK and the EXIF-rotated one as JPEG)
MODES = {"rgb.jpg": "RGB", "gray.png": "L", "gray_alpha.png": "LA", "rgba.png": "RGBA", "palette.png": "P",
         "bilevel.png": "1", "deep16.png": "I;16", "cmyk.jpg": "CMYK", "rotated.jpg": "RGB"}


def photo(seed: int, w: int = 48, h: int = 40) -> Image.Image:
    """A photo-like RGB image: smooth gradients, a few soft blobs and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w, y / h, (x + y) / (w + h)], -1) * rng.uniform(80, 200, size=3)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, 12)
        img += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None] * rng.uniform(-90, 90, size=3)
    img += rng.normal(0, 6, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_image(path: Path, mode: str, seed: int = 0, exif_rotate: bool = False) -> Path:
    """Write a photo-like image in ``mode`` to ``path`` (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = photo(seed)
    if mode == "I;16":
        arr = (np.asarray(img.convert("L"), dtype=np.uint16) * 257)
        img = Image.fromarray(arr.astype("<u2"))  # uint16 → mode I;16
    elif mode == "P":
        img = img.quantize(64)
    elif mode != "RGB":
        img = img.convert(mode)
    if exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90° clockwise when displayed
        img.save(path, exif=exif)
    else:
        img.save(path)
    return path


def write_mode_images(folder: Path, seed: int = 0) -> list[Path]:
    """One image per entry of :data:`MODES` under ``folder``."""
    return [write_image(folder / name, mode, seed + i, exif_rotate=name == "rotated.jpg")
            for i, (name, mode) in enumerate(MODES.items())]
