"""Shapes images as one tensor per split, their captions and their attribute labels (colour, shape, count).

Used by the VQ tokenizer task, the text-to-image datamodule and the attribute probe. A split's images
are decoded once into ``uint8 [N,3,H,W]`` (8000 images of 64 px ≈ 98 MB).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tasks.data.shapes import COLOURS, SHAPES

MAX_COUNT = 3  # ShapesConfig.max_objects of the embedded data; counts are classes 1..MAX_COUNT


def read_split(root: str | Path, split: str) -> tuple[list[int], list[Path], list[list[str]]]:
    """``(image ids, image paths, captions per image)`` of a COCO-captions split file."""
    root = Path(root)
    path = root / f"captions_{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no {path}; generate Shapes first (tasks.data.shapes.ensure_shapes)")
    d = json.loads(path.read_text())
    caps: dict[int, list[str]] = {}
    for a in d["annotations"]:
        caps.setdefault(int(a["image_id"]), []).append(str(a["caption"]))
    ids = [int(im["id"]) for im in d["images"]]
    paths = [root / im["file_name"] for im in d["images"]]
    return ids, paths, [caps.get(i, []) for i in ids]


def load_images(paths: list[Path]) -> torch.Tensor:
    """Decode RGB images of one size into ``uint8 [N,3,H,W]``."""
    if not paths:
        raise ValueError("no images to load")
    arrs = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1:
        raise ValueError(f"images of different sizes {sorted(shapes)}; resize them to one size first")
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def scene_labels(root: str | Path, split: str, ids: list[int]) -> dict[str, torch.Tensor]:
    """Attribute labels of each image from ``scenes_{split}.json``, in the order of ``ids``.

    ``colour [N,6]`` and ``shape [N,5]`` are multi-hot presence (orders of ``COLOURS`` / ``SHAPES``);
    ``count [N]`` is the number of objects minus one.
    """
    path = Path(root) / f"scenes_{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: attribute labels need the Shapes scene files")
    scenes = {int(s["image_id"]): s for s in json.loads(path.read_text())}
    missing = [i for i in ids if i not in scenes]
    if missing:
        raise KeyError(f"{path} has no scene for image ids {missing[:5]}")
    colours, shapes = list(COLOURS), list(SHAPES)
    colour = torch.zeros(len(ids), len(colours))
    shape = torch.zeros(len(ids), len(shapes))
    count = torch.zeros(len(ids), dtype=torch.long)
    for row, i in enumerate(ids):
        objs: list[dict[str, Any]] = scenes[i]["objects"]
        if not 1 <= len(objs) <= MAX_COUNT:
            raise ValueError(f"image {i} has {len(objs)} objects; the probe reads counts 1..{MAX_COUNT}")
        for o in objs:
            colour[row, colours.index(o["colour"])] = 1
            shape[row, shapes.index(o["shape"])] = 1
        count[row] = len(objs) - 1
    return {"colour": colour, "shape": shape, "count": count}


def scene_grid_targets(root: str | Path, split: str, ids: list[int], grid: int,
                       image_size: int, strict: bool = True) -> dict[str, torch.Tensor]:
    """Dense per-cell labels of each image: which ``grid × grid`` cells hold an object's centre, and its class.

    ``image_size`` is the size of the stored images (the scenes' pixel coordinates), whatever size a model
    reads them at.

    ``objectness [N,g,g]`` is 1.0 in the cell holding an object's centre; ``shape`` / ``colour [N,g,g]``
    are that object's class index there and -100 (ignored by cross-entropy) elsewhere. Shapes objects are
    ≥ 12 px across with ≥ 2 px between boxes, so two centres never share a cell while cells are ≤ 12 px;
    on a coarser grid two centres in one cell raise a ``ValueError`` (``strict``) or keep the first.
    """
    path = Path(root) / f"scenes_{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: dense scene labels need the Shapes scene files")
    scenes = {int(s["image_id"]): s for s in json.loads(path.read_text())}
    cell = image_size / grid
    objectness = torch.zeros(len(ids), grid, grid)
    shape = torch.full((len(ids), grid, grid), -100, dtype=torch.long)
    colour = torch.full((len(ids), grid, grid), -100, dtype=torch.long)
    colours, shapes = list(COLOURS), list(SHAPES)
    for row, i in enumerate(ids):
        if i not in scenes:
            raise KeyError(f"{path} has no scene for image id {i}")
        for o in scenes[i]["objects"]:
            cx, cy = min(int(o["x"] // cell), grid - 1), min(int(o["y"] // cell), grid - 1)
            if objectness[row, cy, cx]:
                if strict:
                    raise ValueError(f"{path}: image {i} has two object centres in one cell of a {grid}×{grid} "
                                     "grid; use a finer grid")
                continue  # coarse grids (small test models): the cell keeps its first object
            objectness[row, cy, cx] = 1.0
            shape[row, cy, cx] = shapes.index(o["shape"])
            colour[row, cy, cx] = colours.index(o["colour"])
    return {"objectness": objectness, "shape": shape, "colour": colour}


def split_dense_logits(out: torch.Tensor) -> dict[str, torch.Tensor]:
    """``[B, 1+5+6, g, g]`` head output → ``objectness [B,g,g]``, ``shape [B,5,g,g]``, ``colour [B,6,g,g]``."""
    n_shape = len(SHAPES)
    return {"objectness": out[:, 0], "shape": out[:, 1:1 + n_shape], "colour": out[:, 1 + n_shape:]}


def data_marker(root: str | Path) -> dict[str, Any]:
    """The generator marker (``shapes.json``) of a Shapes folder, ``{}`` without one: part of cache keys."""
    path = Path(root) / "shapes.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def grid_to_sets(objectness: torch.Tensor, shape: torch.Tensor, colour: torch.Tensor) -> dict[str, torch.Tensor]:
    """Image-level labels from dense logits: ``objectness [B,g,g]``, ``shape [B,5,g,g]``, ``colour [B,6,g,g]``.

    Cells whose objectness logit is > 0 are objects; the colour / shape sets are the multi-hot union of
    their classes and ``count`` the number of such cells minus one (clamped to the class range), the
    label format of :func:`scene_labels`.
    """
    found = objectness > 0  # [B,g,g]
    shapes = (F.one_hot(shape.argmax(1), len(SHAPES)) * found[..., None]).amax((1, 2)).float()
    colours = (F.one_hot(colour.argmax(1), len(COLOURS)) * found[..., None]).amax((1, 2)).float()
    count = (found.flatten(1).sum(1) - 1).clamp(0, MAX_COUNT - 1)
    return {"colour": colours, "shape": shapes, "count": count}


def dense_scene_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Loss of dense predictions against :func:`scene_grid_targets`: objectness BCE (×5, as most cells are
    empty) plus the shape and colour cross-entropies at object cells."""
    return (5 * F.binary_cross_entropy_with_logits(logits["objectness"], targets["objectness"])
            + F.cross_entropy(logits["shape"], targets["shape"])
            + F.cross_entropy(logits["colour"], targets["colour"]))
