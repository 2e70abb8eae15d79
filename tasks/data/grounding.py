"""Visual grounding references: OFA's "which region does the text describe?" task, RefCOCO style.

A grounding file lists images and referring expressions with their boxes (COCO ``[x, y, w, h]`` pixels)::

    {"images": [{"id", "file_name", "width", "height"}, ...],
     "refs": [{"image_id", "sentence", "bbox": [x, y, w, h]}, ...]}

The target of a reference is its box as four location tokens ``x0 y0 x1 y1`` of the unified vocabulary
(``loc_bins`` bins over each image side), as in OFA. Used as an auxiliary target beside VQA
(``data.aux_grounding``): it teaches the model to find the object a phrase names, which colour, existence
and relation questions all need.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modalities.text import read_text_file
from tasks.data.coco import DataError
from tasks.data.validate import Problems
from zoo.instructions import GROUNDING_PROMPT
from zoo.vocab import VocabLayout

__all__ = ["GroundingRef", "read_grounding", "box_to_loc_ids", "shapes_refs", "grounding_prompt"]


@dataclass(frozen=True)
class GroundingRef:
    """One referring expression: the image file, the phrase and its box ``(x0, y0, x1, y1)`` in [0, 1]."""

    path: Path
    sentence: str
    box: tuple[float, float, float, float]


def grounding_prompt(sentence: str) -> str:
    """The grounding instruction for one phrase."""
    return GROUNDING_PROMPT.format(sentence.strip())


def read_grounding(path: str | Path, image_root: str | Path | None = None,
                   problems: Problems | None = None) -> list[GroundingRef]:
    """Read and check a grounding file; a bad record raises a ``DataError`` naming the file and the record
    (or is skipped and logged with ``problems.skip_bad``)."""
    path = Path(path)
    problems = problems if problems is not None else Problems(False, str(path))
    try:
        data = json.loads(read_text_file(path, DataError))  # a byte that is not UTF-8: named by line and column
    except DataError as e:
        problems.report(str(e))
        return []
    except FileNotFoundError:
        problems.report(f"{path}: grounding file not found")
        return []
    except ValueError as e:
        problems.report(f"{path}: malformed JSON ({e})")
        return []
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("refs"), list):
        problems.report(f"{path}: expected an object with 'images' and 'refs' lists")
        return []
    root = Path(image_root) if image_root is not None else path.parent
    images: dict[Any, tuple[Path, float, float]] = {}
    for i, im in enumerate(data["images"]):
        try:
            w, h = float(im["width"]), float(im["height"])
            if w <= 0 or h <= 0:
                raise ValueError("width and height must be > 0")
            images[im["id"]] = (root / im["file_name"], w, h)
        except (KeyError, TypeError, ValueError) as e:
            problems.report(f"{path}: images[{i}] is not {{id, file_name, width, height}} ({e!r})")
    out = []
    for i, ref in enumerate(data["refs"]):
        where = f"{path}: refs[{i}]"
        if not isinstance(ref, dict):
            problems.report(f"{where} is not an object")
            continue
        if ref.get("image_id") not in images:
            problems.report(f"{where} points at unknown image_id {ref.get('image_id')!r}")
            continue
        sentence = ref.get("sentence")
        if not isinstance(sentence, str) or not sentence.strip():
            problems.report(f"{where} has an empty or missing 'sentence'")
            continue
        img_path, w, h = images[ref["image_id"]]
        try:
            x, y, bw, bh = (float(v) for v in ref["bbox"])
        except (KeyError, TypeError, ValueError):
            problems.report(f"{where}: 'bbox' must be [x, y, w, h] numbers, got {ref.get('bbox')!r}")
            continue
        if bw <= 0 or bh <= 0 or x < -0.5 or y < -0.5 or x + bw > w + 0.5 or y + bh > h + 0.5:
            problems.report(f"{where}: bbox {ref['bbox']} is empty or outside the {w:g}x{h:g} image")
            continue
        box = (max(x / w, 0.0), max(y / h, 0.0), min((x + bw) / w, 1.0), min((y + bh) / h, 1.0))
        out.append(GroundingRef(img_path, sentence.strip(), box))
    return out


def box_to_loc_ids(box: tuple[float, float, float, float], layout: VocabLayout) -> list[int]:
    """``(x0, y0, x1, y1)`` in [0, 1] → four unified location-token ids (``layout.loc_bins`` bins per side)."""
    if layout.loc_bins < 2:
        raise ValueError(f"grounding targets need location tokens; the model's vocabulary has loc_bins={layout.loc_bins}")
    n = layout.loc_bins - 1
    return [layout.loc_start + min(max(round(v * n), 0), n) for v in box]


def shapes_refs(scenes: list[dict[str, Any]], files: dict[Any, str], image_size: int) -> dict[str, Any]:
    """The grounding file of one Shapes split: every object as ``"<size> <colour> <shape>"`` with its box."""
    refs = []
    for scene in scenes:
        for o in scene["objects"]:
            x0, y0 = max(o["x"] - o["r"], 0.0), max(o["y"] - o["r"], 0.0)
            x1, y1 = min(o["x"] + o["r"], image_size), min(o["y"] + o["r"], image_size)
            refs.append({"image_id": scene["image_id"], "sentence": f"{o['size']} {o['colour']} {o['shape']}",
                         "bbox": [x0, y0, x1 - x0, y1 - y0]})
    images = [{"id": i, "file_name": f, "width": image_size, "height": image_size} for i, f in files.items()]
    return {"images": images, "refs": refs}
