"""Florence-2's OCR / region post-processing and box quantisation as small pure functions (text in, data out).

They give what transformers' ``Florence2Processor.post_process_generation`` gives for the same text and image size
(``tests/test_florence2_post.py`` compares them on hand-written strings). Coordinates: 1000 location bins per side;
a pixel value ``v`` of an image side ``S`` falls in bin ``floor(v / (S / 1000))`` (clamped to 0..999), and bin ``b``
comes back as its centre ``(b + 0.5) * S / 1000`` truncated to an integer, computed in float32 as transformers does.
``parse_boxes`` (``<OD>``, grounding, dense captions) lives in :mod:`zoo.imported.florence2`.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Any, Sequence

import torch

BINS = 1000
_SPECIALS = ("<s>", "</s>", "<pad>")
#: a text line of ``<OCR_WITH_REGION>``: its text, then a quadrilateral as 8 location tokens (x, y per corner)
_QUAD = re.compile(r"(.+?)((?:<loc_\d+>){8})")
_LOC_RUN = re.compile(r"(?:<loc_\d+>){4,}")
_LOC = re.compile(r"<loc_(\d+)>")


def _clean(text: str) -> str:
    for t in _SPECIALS:
        text = text.replace(t, "")
    return text


def parse_text(text: str) -> str:
    """A text task's answer (``<OCR>``, captions, ``<REGION_TO_CATEGORY>``, ``<REGION_TO_DESCRIPTION>``): the text
    without ``<s>`` / ``</s>``, stripped; location tokens are kept (region tasks answer ``label<loc_..>x4``)."""
    return text.replace("<s>", "").replace("</s>", "").strip()


def dequantize_points(bins: Sequence[int], width: int, height: int) -> list[int]:
    """Location bins ``[x0, y0, x1, y1, ...]`` (pairs) → pixel coordinates at the bins' centres, truncated."""
    if len(bins) % 2:
        raise ValueError(f"points need an even number of location bins, got {len(bins)}")
    xy = torch.tensor([int(b) for b in bins], dtype=torch.int64).reshape(-1, 2)
    x = (xy[:, 0] + 0.5) * (width / BINS)
    y = (xy[:, 1] + 0.5) * (height / BINS)
    return torch.stack([x, y], dim=-1).int().flatten().tolist()


def parse_ocr(text: str, width: int, height: int) -> dict[str, list[Any]]:
    """``<OCR_WITH_REGION>`` output ``line<loc_x0><loc_y0>...<loc_x3><loc_y3>...`` → ``{"quad_boxes": [[x0, y0, ...,
    x3, y3], ...], "labels": [line, ...]}`` in pixels of a ``width`` x ``height`` image; text lines not followed by
    8 location tokens are dropped. No quad is filtered by area (transformers' default ``AREA_THRESHOLD`` of 0)."""
    quads, labels = [], []
    for line, locs in _QUAD.findall(_clean(text)):
        quads.append(dequantize_points([int(b) for b in _LOC.findall(locs)], width, height))
        labels.append(line.strip())
    return {"quad_boxes": quads, "labels": labels}


def parse_regions(text: str, width: int, height: int) -> dict[str, list[Any]]:
    """``<REGION_PROPOSAL>`` output (runs of location tokens, 4 per box; text between runs is ignored) →
    ``{"bboxes": [[x0, y0, x1, y1], ...], "labels": ["", ...]}`` in pixels."""
    boxes = []
    for run in _LOC_RUN.findall(_clean(text)):
        bins = [int(b) for b in _LOC.findall(run)]
        for i in range(0, len(bins) - 3, 4):
            boxes.append(dequantize_points(bins[i:i + 4], width, height))
    return {"bboxes": boxes, "labels": [""] * len(boxes)}


def quantize_box(box: Sequence[float], width: int, height: int) -> list[int]:
    """A pixel box ``[x0, y0, x1, y1]`` of a ``width`` x ``height`` image → its 4 location bins (floor of the value
    over the bin size, clamped to 0..999), as Florence-2's post-processor quantises."""
    check_box(box)
    t = torch.tensor([float(v) for v in box], dtype=torch.float32)
    x = (t[0::2] / (width / BINS)).floor().clamp(0, BINS - 1)
    y = (t[1::2] / (height / BINS)).floor().clamp(0, BINS - 1)
    return torch.stack([x, y], dim=-1).flatten().int().tolist()


def check_box(box: Any) -> None:
    """A box is 4 finite numbers ``[x0, y0, x1, y1]`` with ``x0 <= x1`` and ``y0 <= y1``."""
    ok = _sequence(box) and len(box) == 4
    vals = [float(v) for v in box] if ok and all(_number(v) for v in box) else None
    if vals is None or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"a box is 4 finite numbers [x0, y0, x1, y1] in pixels, got {box!r:.200}")
    if vals[0] > vals[2] or vals[1] > vals[3]:
        raise ValueError(f"box {vals} has x0 > x1 or y0 > y1 (expected [x0, y0, x1, y1])")


def _sequence(x: Any) -> bool:
    """A list, tuple, tensor or array (not a string)."""
    return not isinstance(x, (str, bytes)) and hasattr(x, "__len__") and hasattr(x, "__getitem__")


def _number(v: Any) -> bool:
    """A real number (Python, NumPy or a one-element tensor), not a bool."""
    if torch.is_tensor(v):
        return v.numel() == 1 and not v.dtype.is_complex
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def boxes_per_image(box: Any, n: int) -> list[Any]:
    """``n`` boxes from one box ``[x0, y0, x1, y1]`` (for every image) or a list of ``n`` boxes (one per image)."""
    if _sequence(box) and len(box) and all(_number(v) for v in box):
        check_box(box)
        return [box] * n
    boxes = list(box) if _sequence(box) else [box]
    if len(boxes) != n:
        raise ValueError(f"got {n} image(s) but {len(boxes)} boxes (give one box [x0, y0, x1, y1] for all images, "
                         "or one per image)")
    for b in boxes:
        check_box(b)
    return boxes


def location_tokens(bins: Sequence[int]) -> str:
    """``[a, b, c, d]`` → ``<loc_a><loc_b><loc_c><loc_d>``."""
    return "".join(f"<loc_{int(b)}>" for b in bins)


def region_prompt(task: str, box: Sequence[float], width: int, height: int) -> str:
    """A region task's prompt for a pixel box: ``<REGION_TO_CATEGORY><loc_..>x4`` (any ``<REGION_TO_*>`` task)."""
    return task + location_tokens(quantize_box(box, width, height))


def draw_quads(image: Any, result: dict[str, list[Any]], width: int = 2) -> Any:
    """A copy of ``image`` (path / bytes / PIL) with ``result``'s quadrilaterals (``quad_boxes``, OCR regions) and
    their labels drawn."""
    from PIL import ImageDraw

    from modalities.image import load_image

    img = load_image(image).copy()
    draw = ImageDraw.Draw(img)
    colours = ["red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "white"]
    for i, (quad, label) in enumerate(zip(result["quad_boxes"], result["labels"])):
        colour = colours[i % len(colours)]
        points = [(float(quad[j]), float(quad[j + 1])) for j in range(0, len(quad) - 1, 2)]
        draw.line([*points, points[0]], fill=colour, width=width)
        if label:
            draw.text((points[0][0] + 3, points[0][1] + 2), str(label), fill=colour)
    return img
