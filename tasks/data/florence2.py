"""Florence-2 fine-tuning data: ``(image, prompt, target)`` records from the standard formats, one converter per
task kind.

- **detection** (COCO instances JSON) → prompt ``<OD>``, target ``label<loc_x0><loc_y0><loc_x1><loc_y1>...`` per
  object (left to right), boxes quantised into Florence-2's 1000 bins per side (:func:`quantize_boxes`);
- **caption** (COCO captions JSON) → ``<CAPTION>`` → one of the image's captions;
- **grounding** (RefCOCO-like ``{"images", "refs"}``, :mod:`tasks.data.grounding`) →
  ``<CAPTION_TO_PHRASE_GROUNDING>phrase`` → ``phrase<loc_..>x4``;
- **vqa** (VQAv2 questions + annotations, :func:`tasks.data.formats.read_vqa`) → the question → the answer.

Every bad record is reported through :class:`tasks.data.validate.Problems` with the file and the record it is
(raised at once, or skipped and logged with ``data.skip_bad=true``). :func:`write_shapes_instances` writes the
embedded Shapes data's boxes as COCO instances files (category = the shape's name).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tasks.data.coco import DataError, describe_value, read_coco_captions, read_json
from tasks.data.validate import Problems
from zoo.imported.florence2 import quantize_boxes

KINDS = ("detection", "caption", "grounding", "vqa")
#: the task token each kind trains (VQA: the question itself is the prompt)
TASK_TOKENS = {"detection": "<OD>", "caption": "<CAPTION>", "grounding": "<CAPTION_TO_PHRASE_GROUNDING>", "vqa": ""}


@dataclass(frozen=True)
class FlorenceRecord:
    """One training / evaluation example: the image, the prompt (a task token, possibly followed by its input,
    or free text), the target texts (training draws one per visit) and what the metric scores against."""

    id: Any
    path: Path
    prompt: str
    targets: tuple[str, ...]
    reference: Any = None
    size: tuple[float, float] | None = None  # (width, height) the boxes were quantised with
    source: str = field(default="", compare=False)  # file and record, for messages


def loc_tokens(bins: Sequence[int]) -> str:
    return "".join(f"<loc_{int(b)}>" for b in bins)


def od_target(boxes: Sequence[Sequence[float]], labels: Sequence[str], width: float, height: float) -> str:
    """Florence-2's ``<OD>`` text for pixel boxes ``[x0, y0, x1, y1]`` and their labels."""
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
    if not boxes:
        return ""
    return "".join(f"{label}{loc_tokens(b)}" for label, b in zip(labels, quantize_boxes(boxes, width, height)))


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ------------------------------------------------------------------------------------------------
# detection: COCO instances
# ------------------------------------------------------------------------------------------------
def read_coco_instances(path: str | Path, image_root: str | Path | None = None,
                        problems: Problems | None = None) -> list[FlorenceRecord]:
    """A COCO instances file → one ``<OD>`` record per image (images without objects give an empty target;
    ``iscrowd`` annotations are left out). Reference: ``{"boxes": [[x0, y0, x1, y1], ...], "labels": [...]}``
    in pixels."""
    path = Path(path)
    problems = problems if problems is not None else Problems(False, str(path))
    root = Path(image_root) if image_root is not None else path.parent
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                    "categories")):
        raise DataError(f"{path}: not a COCO instances file (needs 'images', 'annotations' and 'categories' lists)")
    names: dict[Any, str] = {}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("name"), str) or not c["name"].strip():
            problems.report(f"{path}: categories[{i}] is not {{id, name}} with a non-empty name: {c!r:.120}")
            continue
        if "<" in c["name"] or ">" in c["name"]:
            problems.report(f"{path}: categories[{i}] (id={c['id']}) name {c['name']!r} contains '<' or '>' "
                            "(they would read as Florence-2 tokens)")
            continue
        names[c["id"]] = c["name"].strip()
    images: dict[Any, tuple[Path, float, float]] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            problems.report(f"{path}: images[{i}] lacks 'id' or a 'file_name' string: {im!r:.120}")
            continue
        w, h = im.get("width"), im.get("height")
        if not (_number(w) and _number(h) and w > 0 and h > 0):
            problems.report(f"{path}: images[{i}] (id={im['id']}) needs positive 'width' and 'height', got "
                            f"{describe_value(w)} x {describe_value(h)}")
            continue
        if im["id"] in images:
            problems.report(f"{path}: images[{i}] repeats image id {im['id']!r}")
            continue
        images[im["id"]] = (root / im["file_name"], float(w), float(h))
    objects: dict[Any, list[tuple[list[float], str]]] = {k: [] for k in images}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict):
            problems.report(f"{where} is not an object")
            continue
        where += f" (id={ann.get('id')}, image_id={ann.get('image_id')})"
        if ann.get("image_id") not in images:
            problems.report(f"{where} points at an unknown image_id")
            continue
        if ann.get("category_id") not in names:
            problems.report(f"{where} has an unknown category_id {describe_value(ann.get('category_id'))}")
            continue
        if ann.get("iscrowd"):
            continue
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
            problems.report(f"{where}: 'bbox' must be [x, y, w, h] numbers, got {describe_value(bbox)}")
            continue
        _, w, h = images[ann["image_id"]]
        x, y, bw, bh = (float(v) for v in bbox)
        if bw <= 0 or bh <= 0 or x < -0.5 or y < -0.5 or x + bw > w + 0.5 or y + bh > h + 0.5:
            problems.report(f"{where}: bbox {bbox} is empty or outside the {w:g}x{h:g} image")
            continue
        box = [max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)]
        objects[ann["image_id"]].append((box, names[ann["category_id"]]))
    out = []
    for image_id, (img, w, h) in images.items():
        objs = sorted(objects[image_id], key=lambda o: (o[0][0], o[0][1]))  # left to right, then top to bottom
        boxes, labels = [o[0] for o in objs], [o[1] for o in objs]
        out.append(FlorenceRecord(image_id, img, "<OD>", (od_target(boxes, labels, w, h),),
                                  {"boxes": boxes, "labels": labels}, (w, h), f"{path}: image id={image_id}"))
    return out


# ------------------------------------------------------------------------------------------------
# captions, grounding, VQA: the project's readers, turned into Florence-2 records
# ------------------------------------------------------------------------------------------------
def read_caption_records(path: str | Path, image_root: str | Path | None = None,
                         problems: Problems | None = None) -> list[FlorenceRecord]:
    """A COCO captions file → one ``<CAPTION>`` record per image; every caption is a target (and a reference)."""
    path = Path(path)
    problems = problems if problems is not None else Problems(False, str(path))
    recs = read_coco_captions(path, image_root, check_files=False, problems=problems)
    return [FlorenceRecord(r.image_id, r.path, "<CAPTION>", tuple(r.captions), list(r.captions),
                           source=f"{path}: image id={r.image_id}") for r in recs]


def read_grounding_records(path: str | Path, image_root: str | Path | None = None,
                           problems: Problems | None = None) -> list[FlorenceRecord]:
    """A RefCOCO-like grounding file → ``<CAPTION_TO_PHRASE_GROUNDING>phrase`` → ``phrase<loc_..>x4`` per
    referring expression (ids are the refs' indices). Reference: ``{"box": [x0, y0, x1, y1]}`` in [0, 1]."""
    from tasks.data.grounding import read_grounding

    path = Path(path)
    problems = problems if problems is not None else Problems(False, str(path))
    out = []
    for i, ref in enumerate(read_grounding(path, image_root, problems)):
        phrase = ref.sentence
        if "<" in phrase or ">" in phrase:
            problems.report(f"{path}: ref {phrase!r} contains '<' or '>' (they would read as Florence-2 tokens)")
            continue
        bins = quantize_boxes([[v * 1000 for v in ref.box]], 1000, 1000)[0]  # a normalised box, on a 1000-px side
        out.append(FlorenceRecord(i, ref.path, f"<CAPTION_TO_PHRASE_GROUNDING>{phrase}",
                                  (f"{phrase}{loc_tokens(bins)}",), {"box": list(ref.box)}, (1.0, 1.0),
                                  f"{path}: ref {i} ({phrase!r})"))
    return out


def read_vqa_records(questions: str | Path, annotations: str | Path | None, image_root: str | Path,
                     problems: Problems | None = None) -> list[FlorenceRecord]:
    """VQAv2 questions (+ annotations) → the question as prompt, the answer as target; reference: the VQAv2
    annotation (every human answer) for :func:`tasks.metrics.vqa_scores`."""
    from tasks.data.formats import read_vqa

    problems = problems if problems is not None else Problems(False, str(questions))
    out = []
    for r in read_vqa(questions, annotations, image_root, problems=problems):
        if not r.answer:
            problems.report(f"{questions}: question id={r.question_id} has no answer to train on")
            continue
        out.append(FlorenceRecord(r.question_id, r.path, r.question, (r.answer,), r.annotation(),
                                  source=f"{questions}: question id={r.question_id}"))
    return out


def read_records(kind: str, path: str | Path, image_root: str | Path | None = None,
                 problems: Problems | None = None, annotations: str | Path | None = None) -> list[FlorenceRecord]:
    """The records of one file of task ``kind`` (``detection | caption | grounding | vqa``)."""
    if kind == "detection":
        return read_coco_instances(path, image_root, problems)
    if kind == "caption":
        return read_caption_records(path, image_root, problems)
    if kind == "grounding":
        return read_grounding_records(path, image_root, problems)
    if kind == "vqa":
        return read_vqa_records(path, annotations, image_root if image_root is not None else Path(path).parent,
                                problems)
    raise ValueError(f"data.kind must be one of {KINDS}, got {kind!r}")


# ------------------------------------------------------------------------------------------------
# Shapes → COCO instances
# ------------------------------------------------------------------------------------------------
def shapes_instances(scenes: list[dict[str, Any]], images: list[dict[str, Any]], image_size: int) -> dict[str, Any]:
    """The COCO instances dict of one Shapes split: every object's box, category = its shape's name."""
    from tasks.data.shapes import SHAPES

    cats = {s: i + 1 for i, s in enumerate(SHAPES)}
    anns = []
    for scene in scenes:
        for o in scene["objects"]:
            x0, y0 = max(o["x"] - o["r"], 0.0), max(o["y"] - o["r"], 0.0)
            x1, y1 = min(o["x"] + o["r"], image_size), min(o["y"] + o["r"], image_size)
            anns.append({"id": len(anns) + 1, "image_id": scene["image_id"], "category_id": cats[o["shape"]],
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    return {"images": [{"id": im["id"], "file_name": im["file_name"], "width": image_size, "height": image_size}
                       for im in images],
            "annotations": anns, "categories": [{"id": i, "name": s} for s, i in cats.items()]}


def write_shapes_instances(root: str | Path, splits: Sequence[str] = ("train", "val", "test")) -> list[Path]:
    """Write ``instances_{split}.json`` beside a generated Shapes dataset's captions (again only when the dataset's
    ``shapes.json`` marker changed)."""
    root = Path(root)
    marker = json.loads((root / "shapes.json").read_text())
    size = int((marker.get("config") or {}).get("image_size", 64))
    out = []
    for split in splits:
        dest = root / f"instances_{split}.json"
        if not dest.is_file() or json.loads(dest.read_text()).get("info", {}).get("shapes") != marker:
            scenes = json.loads((root / f"scenes_{split}.json").read_text())
            images = json.loads((root / f"captions_{split}.json").read_text())["images"]
            data = {"info": {"description": f"Shapes {split} boxes (mmzoo)", "shapes": marker},
                    **shapes_instances(scenes, images, size)}
            tmp = dest.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(data), encoding="utf-8")
            tmp.replace(dest)
        out.append(dest)
    return out
