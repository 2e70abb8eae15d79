"""How right a planned layout is against the true scene, and the sample grid of the layout route."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from zoo.layout_renderer import Layout

#: object side in pixels per size word at 64 px (Shapes draws 12–14 and 22–26), with 2 px of slack for the bins
SIDE_RANGE = {"small": (10.0, 16.0), "large": (20.0, 28.0)}


def _relation(a: Sequence[float], b: Sequence[float]) -> str:
    """Where box ``a`` lies relative to box ``b`` along the dominant axis of their centres' offset."""
    dx = (a[0] + a[2] - b[0] - b[2]) / 2
    dy = (a[1] + a[3] - b[1] - b[3]) / 2
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_sane(lay: Layout, image_size: int) -> bool:
    """Every box inside the image, about square, of a side that fits its size word, and no two boxes overlapping."""
    boxes = [o["box"] for o in lay.objects]
    for o, b in zip(lay.objects, boxes):
        w, h = (b[2] - b[0]) * image_size, (b[3] - b[1]) * image_size
        lo, hi = SIDE_RANGE.get(o["size"], (0.0, float(image_size)))
        if min(b) < 0 or max(b) > 1 or abs(w - h) > 2.5 or not (lo <= w <= hi and lo <= h <= hi):
            return False
    return all(_iou(a, b) == 0.0 for i, a in enumerate(boxes) for b in boxes[i + 1:])


def layout_scores(pred: Sequence[Layout], truth: Sequence[Layout], image_size: int) -> dict[str, float]:
    """The planner's accuracy per prompt (fractions): ``layout_objects_acc`` (every object's size, colour and
    shape, as a multiset), ``layout_colour_acc`` / ``layout_shape_acc`` (the sets), ``layout_size_acc`` (each
    true object's size on the planned object of its colour and shape), ``layout_count_acc``, ``layout_box_ok``
    (:func:`box_sane`), ``layout_relation_acc`` (pairs of matched objects in the true left/right/above/below
    relation) and ``layout_box_iou`` (mean IoU of matched objects with the true boxes)."""
    if len(pred) != len(truth):
        raise ValueError(f"{len(pred)} planned layouts for {len(truth)} scenes")
    n = max(1, len(truth))
    hits = Counter()
    rel_ok = rel_all = 0
    ious: list[float] = []
    for p, t in zip(pred, truth):
        key = lambda o: (o["size"], o["colour"], o["shape"])  # noqa: E731
        hits["objects"] += Counter(map(key, p.objects)) == Counter(map(key, t.objects))
        hits["colour"] += {o["colour"] for o in p.objects} == {o["colour"] for o in t.objects}
        hits["shape"] += {o["shape"] for o in p.objects} == {o["shape"] for o in t.objects}
        hits["count"] += len(p.objects) == len(t.objects)
        hits["box_ok"] += box_sane(p, image_size)
        by_pair = {(o["colour"], o["shape"]): o for o in p.objects}
        matched = [(o, by_pair.get((o["colour"], o["shape"]))) for o in t.objects]
        hits["size"] += all(q is not None and q["size"] == o["size"] for o, q in matched)
        ious += [_iou(o["box"], q["box"]) if q is not None else 0.0 for o, q in matched]
        for i, (a, qa) in enumerate(matched):
            for b, qb in matched[i + 1:]:
                rel_all += 1
                rel_ok += qa is not None and qb is not None and _relation(qa["box"], qb["box"]) == _relation(a["box"], b["box"])
    out = {f"layout_{k}_acc": hits[k] / n for k in ("objects", "colour", "shape", "size", "count")}
    out["layout_box_ok"] = hits["box_ok"] / n
    out["layout_relation_acc"] = rel_ok / rel_all if rel_all else 1.0
    out["layout_box_iou"] = sum(ious) / len(ious) if ious else 0.0
    return out


def layout_panel(lay: Layout, size: int, colours: dict[str, tuple[int, int, int]] | None = None):
    """A PIL picture of a planned layout: each box outlined (in its colour when known) with its shape word."""
    from PIL import Image, ImageDraw

    panel = Image.new("RGB", (size, size), (235, 235, 235) if lay.tone != "dark" else (60, 60, 60))
    draw = ImageDraw.Draw(panel)
    for o in lay.objects:
        x0, y0, x1, y1 = (v * size for v in o["box"])
        fill = (colours or {}).get(o["colour"], (0, 0, 0))
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=fill, width=2)
        draw.text((x0 + 2, y0 + 1), o["shape"][:3], fill=fill)
    return panel


def save_layout_grid(images: torch.Tensor, layouts: Sequence[Layout], texts: Sequence[str], path: str | Path,
                     cols: int = 4, cell: int = 128) -> Path:
    """``samples.png``: per prompt, the generated image and its planned boxes side by side, the prompt under them."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    from tasks.data.shapes import COLOURS
    from zoo.atomic import atomic_file

    if not (len(images) == len(layouts) == len(texts)):
        raise ValueError(f"{len(images)} images, {len(layouts)} layouts and {len(texts)} texts")
    font, line_h, lines_n = ImageFont.load_default(), 12, 4
    cols = max(1, min(cols, len(images)))
    rows = max(1, -(-len(images) // cols))
    w, h = 2 * cell + 12, cell + lines_n * line_h + 10
    canvas = Image.new("RGB", (cols * w, rows * h), "white")
    draw = ImageDraw.Draw(canvas)
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, (a, lay, text) in enumerate(zip(arr, layouts, texts)):
        x, y = (i % cols) * w, (i // cols) * h
        canvas.paste(Image.fromarray(a).resize((cell, cell), Image.NEAREST), (x + 4, y + 4))
        canvas.paste(layout_panel(lay, cell, COLOURS), (x + cell + 8, y + 4))
        for j, line in enumerate(textwrap.wrap(str(text), max(8, (2 * cell) // 6))[:lines_n]):
            draw.text((x + 4, y + cell + 6 + j * line_h), line, fill="black", font=font)
    with atomic_file(path, "wb") as f:
        canvas.save(f, format="PNG")
    return Path(path)
