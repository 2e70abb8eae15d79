"""Readers for sensor recordings in the formats users have, and the JSONL manifest that lists them.

Recordings: CSV, NPZ and NPY files, read by :mod:`modalities.sensor_io` (formats described there) and
re-exported here.

Manifest (JSONL, one object per line)
    ``{"file": "train/000001.csv", "descriptions": ["the wearer walks ..."], "id": "...", "rate": 50,
    "activities": [{"activity": "walking", "start": 0.0, "end": 4.2}, ...]}`` — only ``file`` is
    required (relative to the manifest's folder); ``description`` (one string) is accepted too, and
    ``activities`` may be a list of names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

# The recording readers are pure numpy and live with the modality (inference reads them too); they are
# re-exported here so ``tasks.data.sensor_formats.read_csv`` etc. keep working.
from modalities.sensor_io import (TIME_UNITS, TIMESTAMP_KEYS, _numeric, _parse_times, _to_float,  # noqa: F401
                                  read_csv, read_npy, read_npz, read_recording, write_csv)


@dataclass
class ManifestRecord:
    """One manifest line: the recording file, its descriptions and (optionally) its activities."""

    id: str
    path: Path
    descriptions: list[str]
    activities: list[str] | None = None
    rate: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # "manifest.jsonl:<line>" for messages


def read_manifest(path: str | Path, root: str | Path | None = None, require_descriptions: bool = True,
                  problems: Any = None, allow_empty: bool = False) -> list[ManifestRecord]:
    """Parse a JSONL manifest; file paths are relative to ``root`` (default: the manifest's folder).

    A bad line raises :class:`~tasks.data.coco.DataError` naming the manifest and the line, or goes to
    ``problems`` (a :class:`tasks.data.validate.Problems`, which skips it under ``skip_bad``). A manifest
    without a record raises unless ``allow_empty``."""
    from modalities.text import read_text_file
    from tasks.data.coco import DataError
    from tasks.data.validate import describe_value

    def fail(message: str) -> None:
        if problems is None:
            raise DataError(message)
        problems.report(message)

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    base = Path(root) if root else path.parent
    records: list[ManifestRecord] = []
    seen: set[str] = set()
    for n, line in enumerate(read_text_file(path, DataError).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{where}: invalid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict) or "file" not in obj:
            fail(f"{where}: each line must be an object with a 'file' key")
            continue
        if not isinstance(obj["file"], str) or not obj["file"].strip():
            fail(f"{where}: 'file' is {describe_value(obj['file'])}, not a file name")
            continue
        descs = obj.get("descriptions", obj.get("description", []))
        descs = [descs] if isinstance(descs, str) else descs
        if not isinstance(descs, list):
            fail(f"{where}: descriptions must be strings; got {describe_value(descs)} for {obj['file']}")
            continue
        if require_descriptions and not descs:
            fail(f"{where}: no 'descriptions' for {obj['file']}")
            continue
        wrong = next((d for d in descs if not isinstance(d, str)), "")
        if not isinstance(wrong, str):
            fail(f"{where}: descriptions must be strings; one is {describe_value(wrong)} ({obj['file']})")
            continue
        if require_descriptions and not all(d.strip() for d in descs):
            fail(f"{where}: an empty description for {obj['file']}")
            continue
        acts = obj.get("activities")
        if acts is not None:
            acts = [a["activity"] if isinstance(a, dict) else str(a) for a in acts]
        rid = str(obj.get("id", Path(obj["file"]).stem))
        if rid in seen:
            fail(f"{where}: duplicate record id {rid!r}")
            continue
        seen.add(rid)
        rate = obj.get("rate")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0):
            fail(f"{where}: 'rate' is {describe_value(rate)}, not a sampling rate in Hz (a number > 0)")
            continue
        extra = {k: v for k, v in obj.items() if k not in ("id", "file", "descriptions", "description", "activities", "rate")}
        records.append(ManifestRecord(rid, base / obj["file"], descs, acts, float(rate) if rate else None, extra,
                                      where))
    if not records and not allow_empty:
        raise DataError(f"manifest {path} lists no recordings")
    return records


def write_manifest(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write manifest rows as JSONL (via a temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path
