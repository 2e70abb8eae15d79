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


def read_manifest(path: str | Path, root: str | Path | None = None, require_descriptions: bool = True) -> list[ManifestRecord]:
    """Parse a JSONL manifest; file paths are relative to ``root`` (default: the manifest's folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    base = Path(root) if root else path.parent
    records: list[ManifestRecord] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "file" not in obj:
                raise ValueError(f"{where}: each line must be an object with a 'file' key")
            descs = obj.get("descriptions", obj.get("description", []))
            descs = [descs] if isinstance(descs, str) else list(descs)
            if require_descriptions and not descs:
                raise ValueError(f"{where}: no 'descriptions' for {obj['file']}")
            if not all(isinstance(d, str) for d in descs):
                raise ValueError(f"{where}: descriptions must be strings")
            acts = obj.get("activities")
            if acts is not None:
                acts = [a["activity"] if isinstance(a, dict) else str(a) for a in acts]
            rid = str(obj.get("id", Path(obj["file"]).stem))
            if rid in seen:
                raise ValueError(f"{where}: duplicate record id {rid!r}")
            seen.add(rid)
            rate = obj.get("rate")
            extra = {k: v for k, v in obj.items() if k not in ("id", "file", "descriptions", "description", "activities", "rate")}
            records.append(ManifestRecord(rid, base / obj["file"], descs, acts, float(rate) if rate else None, extra))
    if not records:
        raise ValueError(f"manifest {path} lists no recordings")
    return records


def write_manifest(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write manifest rows as JSONL (via a temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path
