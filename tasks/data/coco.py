"""Reader for the COCO-captions format: ``{"images": [...], "annotations": [...]}``."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modalities.text import read_text_file


class DataError(ValueError):
    """A dataset record is malformed; the message names the file and the record."""


@dataclass
class CaptionRecord:
    """One image with all its reference captions."""

    image_id: Any
    path: Path
    captions: list[str] = field(default_factory=list)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = read_text_file(path, DataError)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


def describe_value(x: Any) -> str:
    """``x`` for an error message: its JSON type and (short) value, e.g. ``a number (42)``, ``null``."""
    if x is None:
        return "null"
    kind = ("a boolean" if isinstance(x, bool) else "a number" if isinstance(x, (int, float))
            else "a list" if isinstance(x, (list, tuple)) else "an object" if isinstance(x, dict)
            else "a string" if isinstance(x, str) else f"a {type(x).__name__}")
    text = repr(x)
    return f"{kind} ({text if len(text) <= 60 else text[:57] + '...'})"


def _raise(message: str) -> None:
    raise DataError(message)


def read_coco_captions(json_path: str | Path, image_root: str | Path | None = None,
                       check_files: bool = True, problems: Any = None) -> list[CaptionRecord]:
    """Read a COCO captions file; ``file_name`` is resolved against ``image_root`` (default: its folder).

    Raises :class:`DataError` naming the file and record for a missing image file, an empty caption,
    an annotation that points at an unknown image, or a structurally wrong file. With a
    :class:`tasks.data.validate.Problems` collector, bad records go to ``problems.report`` instead
    (which skips them when ``skip_bad``).
    """
    fail = problems.report if problems is not None else _raise
    json_path = Path(json_path)
    root = Path(image_root) if image_root is not None else json_path.parent
    data = read_json(json_path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{json_path}: not a COCO captions file (needs 'images' and 'annotations' lists)")
    for key in ("images", "annotations"):
        if not isinstance(data[key], list):
            raise DataError(f"{json_path}: '{key}' is {describe_value(data[key])}, not a list")
    records: dict[Any, CaptionRecord] = {}
    skipped: set[Any] = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            fail(f"{json_path}: images[{i}] lacks 'id' or 'file_name': {img}")
            continue
        if not isinstance(img["file_name"], str) or not img["file_name"].strip():
            fail(f"{json_path}: images[{i}] (id={img['id']}) has file_name {describe_value(img['file_name'])}, "
                 "not a file name")
            skipped.add(img["id"])
            continue
        path = root / img["file_name"]
        if check_files and not path.is_file():
            fail(f"{json_path}: images[{i}] (id={img['id']}) points at missing file {path}")
            skipped.add(img["id"])
            continue
        if img["id"] in records:
            fail(f"{json_path}: images[{i}] repeats image id {img['id']}")
            continue
        records[img["id"]] = CaptionRecord(img["id"], path)
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            fail(f"{json_path}: annotations[{i}] is not an object")
            continue
        image_id, caption = ann.get("image_id"), ann.get("caption")
        if image_id in skipped:
            continue  # its image was already reported
        if image_id not in records:
            fail(f"{json_path}: annotations[{i}] (id={ann.get('id')}) points at unknown image_id {image_id!r}")
            continue
        if not isinstance(caption, str):
            fail(f"{json_path}: annotations[{i}] (id={ann.get('id')}, image_id={image_id}) has caption "
                 f"{describe_value(caption)}, not a string")
            continue
        if not caption.strip():
            fail(f"{json_path}: annotations[{i}] (id={ann.get('id')}, image_id={image_id}) has an empty caption")
            continue
        records[image_id].captions.append(caption.strip())
    if problems is not None:  # validated reading: an image left without any caption is a bad record too
        for image_id in [k for k, r in records.items() if not r.captions]:
            fail(f"{json_path}: image id={image_id} ({records.pop(image_id).path.name}) has no caption")
    return list(records.values())
