"""Shapes: the embedded default dataset, a deterministic generator of small synthetic scenes.

Each image is a 64x64 RGB scene with one to three coloured shapes on a plain light or dark
background with mild Gaussian pixel noise. Every image comes with five reference captions in
the COCO-captions format and with its ground-truth scene (shapes, colours, sizes, positions),
so later tasks (VQA questions, probes) can be derived from the same data.

Layout written by :func:`write_shapes` / :func:`ensure_shapes`::

    root/shapes.json                   marker: format version + generating config (written last)
    root/captions_{split}.json         COCO captions: {"info", "images", "annotations"}
    root/scenes_{split}.json           [{"image_id", "objects": [...], "background": [r, g, b], "tone"}]
    root/images/{split}/{id:06d}.png   the images

Determinism: image ``i`` of a split is drawn from ``np.random.default_rng([seed, split_index, i])``,
so it is identical for the same seed whatever the split sizes are. Image ids are contiguous over
train, val, test (1-based) and therefore unique across splits.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from tasks.data.generated import ensure_generated

__all__ = [
    "FORMAT_VERSION", "SHAPES", "COLOURS", "SIZES", "SPLITS", "ShapesConfig",
    "generate_scene", "render_scene", "captions_for", "write_shapes", "ensure_shapes",
]

#: Bumped whenever the generator's output changes; part of the ``shapes.json`` marker.
FORMAT_VERSION = 1

#: Shape names; these exact words appear in every caption.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")

#: Colour name -> RGB, chosen far apart from one another and from grey backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "green": (30, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (240, 215, 20),
    "purple": (140, 40, 175),
    "orange": (250, 125, 0),
}

#: Size name -> (min, max) object extent across in pixels, at a 64 px image size.
SIZES: dict[str, tuple[int, int]] = {"small": (12, 14), "large": (22, 26)}

SPLITS: tuple[str, ...] = ("train", "val", "test")

_REF_SIZE = 64          # image size the pixel constants above refer to
_SUPERSAMPLE = 4        # shapes are drawn at 4x and box-filtered down (anti-aliasing)
_NOISE_STD = 5.0        # per-pixel Gaussian noise, on 0..255
_GAP = 2                # min free pixels between object bounding boxes (at 64 px)
_AXIS_MARGIN = 4        # min | |dx| - |dy| | between two objects, so "left of" vs "above" is clear
_LEVELS = {"dark": (35, 70), "light": (185, 225)}   # background grey level ranges
_TINT = 10              # per-channel background tint around the grey level


@dataclass
class ShapesConfig:
    """What to generate; stored in the ``shapes.json`` marker to decide whether a dataset is reusable."""

    seed: int = 0
    n_train: int = 8000
    n_val: int = 500
    n_test: int = 500
    image_size: int = 64
    max_objects: int = 3

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}


# ----------------------------------------------------------------------------- scenes

def _boxes_apart(a: dict, b: dict, gap: float) -> bool:
    """True when the axis-aligned bounding boxes of ``a`` and ``b`` are at least ``gap`` apart."""
    return (abs(a["x"] - b["x"]) >= a["r"] + b["r"] + gap
            or abs(a["y"] - b["y"]) >= a["r"] + b["r"] + gap)


def generate_scene(rng: np.random.Generator, image_size: int = 64, max_objects: int = 3) -> dict[str, Any]:
    """Sample a scene: 1..``max_objects`` objects with distinct (colour, shape) pairs.

    Objects are placed by rejection sampling so that their bounding boxes lie inside the canvas
    (1 px border) and at least 2 px apart, and so that for every pair the dominant axis of their
    offset is unambiguous. Objects are returned sorted left to right (then top to bottom).

    Returns ``{"objects": [{"shape", "colour", "size", "x", "y", "r"}], "background": [r, g, b],
    "tone": "light" | "dark"}`` where ``x, y`` is the centre in pixels and ``r`` half the extent.
    """
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    scale = image_size / _REF_SIZE
    tone = "light" if rng.random() < 0.5 else "dark"
    lo, hi = _LEVELS[tone]
    level = int(rng.integers(lo, hi + 1))
    background = [int(np.clip(level + t, 0, 255)) for t in rng.integers(-_TINT, _TINT + 1, size=3)]
    n = int(rng.integers(1, max_objects + 1))
    colour_names = list(COLOURS)
    pairs = [(s, c) for s in SHAPES for c in colour_names]
    chosen = rng.choice(len(pairs), size=n, replace=False)
    gap, axis_margin = _GAP * scale, _AXIS_MARGIN * scale
    while True:  # restart the layout (with new sizes) until every object fits
        objects: list[dict[str, Any]] = []
        for k in chosen:
            shape, colour = pairs[int(k)]
            size = "small" if rng.random() < 0.5 else "large"
            d_lo, d_hi = SIZES[size]
            r = round(int(rng.integers(d_lo, d_hi + 1)) * scale) / 2
            c_lo, c_hi = math.ceil(1 + r), math.floor(image_size - 1 - r)
            for _ in range(50):
                obj = {"shape": shape, "colour": colour, "size": size,
                       "x": int(rng.integers(c_lo, c_hi + 1)), "y": int(rng.integers(c_lo, c_hi + 1)), "r": r}
                if all(_boxes_apart(obj, o, gap)
                       and abs(abs(obj["x"] - o["x"]) - abs(obj["y"] - o["y"])) >= axis_margin
                       for o in objects):
                    objects.append(obj)
                    break
            else:
                break
        if len(objects) == n:
            break
    objects.sort(key=lambda o: (o["x"], o["y"]))
    return {"objects": objects, "background": background, "tone": tone}


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict, ss: int) -> None:
    x, y, r = obj["x"] * ss, obj["y"] * ss, obj["r"] * ss
    fill = COLOURS[obj["colour"]]
    shape = obj["shape"]
    x0, y0, x1, y1 = x - r, y - r, x + r - 1, y + r - 1
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        s = r * 0.9  # same visual weight as the circle
        draw.rectangle([x - s, y - s, x + s - 1, y + s - 1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(x, y0), (x1, y), (x, y1), (x0, y)], fill=fill)
    elif shape == "cross":
        t = r * 0.36
        draw.rectangle([x - t, y0, x + t - 1, y1], fill=fill)
        draw.rectangle([x0, y - t, x1, y + t - 1], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: dict[str, Any], image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` as an ``image_size`` square RGB image (anti-aliased, with Gaussian pixel noise)."""
    ss = _SUPERSAMPLE
    big = Image.new("RGB", (image_size * ss, image_size * ss), tuple(scene["background"]))
    draw = ImageDraw.Draw(big)
    for obj in scene["objects"]:
        _draw_object(draw, obj, ss)
    img = np.asarray(big.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.float32)
    img = img + rng.normal(0.0, _NOISE_STD, size=img.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- captions

_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def _pick(rng: np.random.Generator, options: Sequence[str], p: Sequence[float] | None = None) -> str:
    return options[int(rng.choice(len(options), p=p))]


def _describe(obj: dict, rng: np.random.Generator) -> str:
    size = "small" if obj["size"] == "small" else _pick(rng, ("large", "big"), (0.7, 0.3))
    return f"a {size} {obj['colour']} {obj['shape']}"


def _relation(a: dict, b: dict, rng: np.random.Generator) -> str:
    """Where ``a`` is relative to ``b``, along the dominant axis of their offset."""
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    if abs(dx) >= abs(dy):
        key = "left" if dx < 0 else "right"
    else:
        key = "above" if dy < 0 else "below"
    options = {"left": ("to the left of", "left of"), "right": ("to the right of", "right of"),
               "above": ("above", "over"), "below": ("below", "under")}[key]
    return _pick(rng, options, (0.7, 0.3))


def _location(obj: dict, image_size: int) -> str:
    """Coarse 3x3 location of a single object, e.g. "in the top left" or "on the right"."""
    col = min(int(obj["x"] * 3 // image_size), 2)
    row = min(int(obj["y"] * 3 // image_size), 2)
    v, h = ("top", "middle", "bottom")[row], ("left", "centre", "right")[col]
    if v == "middle" and h == "centre":
        return "in the centre"
    if v == "middle":
        return f"on the {h}"
    if h == "centre":
        return f"at the {v}"
    return f"in the {v} {h}"


def _chain(objs: list[dict], rng: np.random.Generator, image_size: int) -> str:
    """Relational description: "A left of B", "A left of B, which is above C", or "A in the top left"."""
    if len(objs) == 1:
        return f"{_describe(objs[0], rng)} {_location(objs[0], image_size)}"
    text = f"{_describe(objs[0], rng)} {_relation(objs[0], objs[1], rng)} {_describe(objs[1], rng)}"
    for prev, obj in zip(objs[1:], objs[2:]):
        text += f", which is {_relation(prev, obj, rng)} {_describe(obj, rng)}"
    return text


def _listing(objs: list[dict], rng: np.random.Generator) -> str:
    parts = [_describe(o, rng) for o in objs]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _count(n: int, rng: np.random.Generator) -> str:
    noun = _pick(rng, ("objects", "shapes"), (0.6, 0.4)) if n > 1 else _pick(rng, ("object", "shape"), (0.6, 0.4))
    return f"{_NUMBERS.get(n, str(n))} {noun}"


def _t_relation(objs, scene, rng, size):    # a small red circle to the left of a large blue square
    return _chain(objs, rng, size)


def _t_there(objs, scene, rng, size):       # there is a small red circle to the left of ...
    return f"there is {_chain(objs, rng, size)}"


def _t_shows(objs, scene, rng, size):       # the image shows two objects, a small red circle and ...
    verb = _pick(rng, ("the image shows", "the picture shows", "this image shows"), (0.6, 0.2, 0.2))
    return f"{verb} {_count(len(objs), rng)}, {_listing(objs, rng)}"


def _t_picture(objs, scene, rng, size):     # a picture of a small red circle and ... on a dark background
    intro = _pick(rng, ("a picture of", "an image of"), (0.6, 0.4))
    return f"{intro} {_listing(objs, rng)} on a {scene['tone']} background"


def _t_count(objs, scene, rng, size):       # two shapes, a small red circle to the left of ...
    return f"{_count(len(objs), rng)}, {_chain(objs, rng, size)}"


def _t_inverse(objs, scene, rng, size):     # a large blue square to the right of a small red circle
    if len(objs) == 1:
        return f"{_location(objs[0], size)} there is {_describe(objs[0], rng)}"
    return _chain(list(reversed(objs)), rng, size)


def _t_background(objs, scene, rng, size):  # a small red circle ... on a light background
    return f"{_chain(objs, rng, size)} on a {scene['tone']} background"


_TEMPLATES = (_t_relation, _t_there, _t_shows, _t_picture, _t_count, _t_inverse, _t_background)
_COUNT_TEMPLATES = (_t_shows, _t_count)


def captions_for(scene: dict[str, Any], rng: np.random.Generator, n: int = 5,
                 image_size: int | None = None) -> list[str]:
    """``n`` lowercase reference captions for ``scene``, from distinct templates with random synonyms.

    Every caption names each object's size, colour and shape (shape and colour words are always
    the canonical names in :data:`SHAPES` / :data:`COLOURS`); at least one caption states the
    object count. Spatial relations use the dominant axis of the offset between object centres.
    ``image_size`` (for the coarse location of single objects) defaults to 64.
    """
    size = image_size or _REF_SIZE
    objs = sorted(scene["objects"], key=lambda o: (o["x"], o["y"]))
    order = [int(i) for i in rng.permutation(len(_TEMPLATES))]
    chosen = [_TEMPLATES[i] for i in order[:n]] if n <= len(_TEMPLATES) else \
        [_TEMPLATES[order[i % len(_TEMPLATES)]] for i in range(n)]
    if n > 0 and not any(t in _COUNT_TEMPLATES for t in chosen):
        chosen[-1] = _COUNT_TEMPLATES[int(rng.integers(len(_COUNT_TEMPLATES)))]
    return [_shorten(t(objs, scene, rng, size)) for t in chosen]


_MAX_WORDS = 25


def _shorten(caption: str) -> str:
    """Keep captions within :data:`_MAX_WORDS` words by using the short relation synonyms."""
    for long, short in (("to the left of", "left of"), ("to the right of", "right of")):
        if len(caption.split()) <= _MAX_WORDS:
            break
        caption = caption.replace(long, short)
    return caption


# ----------------------------------------------------------------------------- writing

def _marker(cfg: ShapesConfig) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "config": asdict(cfg)}


def write_shapes(root: str | Path, cfg: ShapesConfig | None = None) -> Path:
    """Generate the whole dataset for ``cfg`` into ``root`` (created if missing) and return ``root``.

    This writes in place; the ``shapes.json`` marker is written last. Prefer :func:`ensure_shapes`,
    which generates atomically and reuses a finished dataset.
    """
    cfg = cfg or ShapesConfig()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    next_id, next_ann = 1, 1
    for split_index, split in enumerate(SPLITS):
        n = cfg.split_sizes()[split]
        img_dir = root / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        images, annotations, scenes = [], [], []
        for i in range(n):
            image_id = next_id + i
            rng = np.random.default_rng([cfg.seed, split_index, i])
            scene = generate_scene(rng, cfg.image_size, cfg.max_objects)
            img = render_scene(scene, cfg.image_size, rng)
            caps = captions_for(scene, rng, n=5, image_size=cfg.image_size)
            file_name = f"images/{split}/{image_id:06d}.png"
            img.save(root / file_name, format="PNG", optimize=False)
            images.append({"id": image_id, "file_name": file_name,
                           "width": cfg.image_size, "height": cfg.image_size})
            for cap in caps:
                annotations.append({"id": next_ann, "image_id": image_id, "caption": cap})
                next_ann += 1
            scenes.append({"image_id": image_id, **scene})
        next_id += n
        info = {"description": "Shapes: synthetic scenes of coloured shapes (mmzoo embedded dataset)",
                "version": FORMAT_VERSION, "split": split, "config": asdict(cfg)}
        _dump(root / f"captions_{split}.json", {"info": info, "images": images, "annotations": annotations})
        _dump(root / f"scenes_{split}.json", scenes)
    _dump(root / "shapes.json", _marker(cfg))
    return root


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")), encoding="utf-8")


def ensure_shapes(root: str | Path, cfg: ShapesConfig | None = None, timeout_s: float = 1800.0) -> Path:
    """Return ``root`` holding the Shapes dataset for ``cfg``, generating it on first use.

    If ``root/shapes.json`` matches ``cfg`` and the format version, returns at once. Otherwise the
    dataset is generated into a temporary sibling directory and renamed into place, so an
    interrupted generation never leaves a complete-looking dataset; a dataset made with another
    config is replaced. Concurrent callers serialise on a ``<root>.lock`` sibling file (a lock left
    by a dead process on this host is broken); the waiting ones then find the dataset ready.
    A non-empty ``root`` without a ``shapes.json`` marker is not ours and is never deleted:
    :class:`FileExistsError` is raised instead.
    """
    cfg = cfg or ShapesConfig()
    return ensure_generated(root, "shapes.json", _marker(cfg), lambda folder: write_shapes(folder, cfg), "Shapes",
                            timeout_s)
