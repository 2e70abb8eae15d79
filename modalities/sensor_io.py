"""Readers (and a writer) for sensor recordings in the file formats users have: pure numpy, no training code.

    CSV   a header row; a timestamp column plus one column per channel, chosen by name (any column
          order, extra columns ignored). Timestamps are numbers in ``time_unit`` or ISO date-times.
          Empty cells, ``nan`` and ``inf`` are missing values (masked by the tokenizer).
    NPZ   either one 1-D array per channel name (plus optional ``timestamp``/``timestamps``), or a 2-D
          ``values`` (or ``data``) array ``[C, T]`` with optional ``channels`` (names), ``timestamps``
          and ``rate``.
    NPY   one 2-D array ``[C, T]`` in the configured channel order; the rate comes from the caller.

Both inference (``zoo``) and training (``tasks.data.sensor_formats``) read recordings through here.
Nothing is unpickled (``allow_pickle=False``).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from modalities.sensor import SensorDataError, SensorRecording

#: file extensions :func:`read_recording` reads
RECORDING_SUFFIXES = (".csv", ".tsv", ".npz", ".npy")
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
TIMESTAMP_KEYS = ("timestamp", "timestamps", "time", "t")


def _to_float(cells: np.ndarray, source: str, names: Sequence[str], header_rows: int = 1) -> np.ndarray:
    """String cells ``[T, K]`` → float64; '' means missing; names the first bad cell on failure."""
    cells = np.char.strip(cells)
    cells = np.where(cells == "", "nan", cells)
    try:
        return cells.astype(np.float64)
    except ValueError:
        for j in range(cells.shape[1]):  # error path only: find the offending cell
            for i, v in enumerate(cells[:, j]):
                try:
                    float(v)
                except ValueError:
                    raise SensorDataError(f"{source}: non-numeric value {str(v)!r} in column {names[j]!r} "
                                          f"at line {i + header_rows + 1}") from None
        raise


def _parse_times(cells: np.ndarray, source: str, column: str, unit: str) -> np.ndarray:
    """Timestamps in seconds from numbers (in ``unit``) or ISO date-time strings."""
    if unit not in TIME_UNITS:
        raise ValueError(f"time_unit must be one of {sorted(TIME_UNITS)}, got {unit!r}")
    try:
        return np.char.strip(cells).astype(np.float64) * TIME_UNITS[unit]
    except ValueError:
        pass
    try:
        ns = np.array(np.char.strip(cells), dtype="datetime64[ns]").astype(np.int64)
    except ValueError:
        raise SensorDataError(f"{source}: timestamp column {column!r} holds neither numbers nor ISO "
                              f"date-times (e.g. {str(cells[0])!r})") from None
    return (ns - ns[0]) * 1e-9


def read_csv(path: str | Path, channels: Sequence[str], timestamp_column: str | None = "timestamp",
             time_unit: str = "s", delimiter: str = ",") -> SensorRecording:
    """A CSV recording with the named ``channels`` (in that order) and optional timestamp column."""
    path = Path(path)
    src = str(path)
    from modalities.text import read_text_file

    rows = list(csv.reader(io.StringIO(read_text_file(path, SensorDataError), newline=""), delimiter=delimiter))
    if not rows:
        raise SensorDataError(f"{src}: empty file (no header row)")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in channels if c not in header]
    if missing:
        raise SensorDataError(f"{src}: missing channel column(s) {missing}; columns are {header}")
    if timestamp_column and timestamp_column not in header:
        raise SensorDataError(f"{src}: no timestamp column {timestamp_column!r}; columns are {header} "
                              "(set timestamp_column: null and give a rate if the file has none)")
    body = [r for r in rows[1:] if any(cell.strip() for cell in r)]
    if not body:
        raise SensorDataError(f"{src}: empty recording (header only)")
    bad = next((i for i, r in enumerate(body) if len(r) != len(header)), None)
    if bad is not None:
        raise SensorDataError(f"{src}: line {bad + 2} has {len(body[bad])} fields, the header has {len(header)}")
    table = np.array(body, dtype=str)  # [T, K]
    cols = [header.index(c) for c in channels]
    values = _to_float(table[:, cols], src, list(channels)).T  # [C, T]
    times = None
    if timestamp_column:
        times = _parse_times(table[:, header.index(timestamp_column)], src, timestamp_column, time_unit)
    return SensorRecording(values=values, channels=list(channels), timestamps=times, source=src)


def _numeric(arr: np.ndarray, src: str, what: str) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        try:
            return arr.astype(np.float64)
        except (TypeError, ValueError):
            raise SensorDataError(f"{src}: non-numeric {what} (dtype {arr.dtype})") from None
    return arr


def read_npz(path: str | Path, channels: Sequence[str], rate: float | None = None) -> SensorRecording:
    """An NPZ recording: per-channel arrays, or ``values [C, T]`` (+ ``channels``/``timestamps``/``rate``)."""
    path = Path(path)
    src = str(path)
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        tkey = next((k for k in TIMESTAMP_KEYS if k in keys), None)
        times = _numeric(z[tkey], src, f"timestamps {tkey!r}") if tkey else None
        if "rate" in keys:
            rate = float(z["rate"])
        if all(c in keys for c in channels):
            arrays = [z[c] for c in channels]
            if any(a.ndim != 1 for a in arrays) or len({a.shape for a in arrays}) != 1:
                raise SensorDataError(f"{src}: per-channel arrays must be 1-D of one length, got "
                                      f"{[a.shape for a in arrays]}")
            values = _numeric(np.stack(arrays), src, "values")
            names: list[str] | None = list(channels)
        else:
            vkey = next((k for k in ("values", "data") if k in keys), None)
            if vkey is None:
                raise SensorDataError(f"{src}: no 'values' array and no arrays named {list(channels)}; keys {sorted(keys)}")
            values = _numeric(z[vkey], src, f"array {vkey!r}")
            names = [str(c) for c in z["channels"]] if "channels" in keys else None
    return SensorRecording(values=values, channels=names, rate=rate, timestamps=times, source=src)


def read_npy(path: str | Path, rate: float | None = None) -> SensorRecording:
    """An NPY array ``[C, T]`` in the configured channel order."""
    src = str(path)
    return SensorRecording(values=_numeric(np.load(path, allow_pickle=False), src, "values"), rate=rate, source=src)


def read_recording(path: str | Path, channels: Sequence[str], rate: float | None = None,
                   timestamp_column: str | None = "timestamp", time_unit: str = "s") -> SensorRecording:
    """Read a ``.csv``/``.tsv``, ``.npz`` or ``.npy`` recording (by file extension)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"sensor recording {path} does not exist")
    if suffix in (".csv", ".tsv"):
        rec = read_csv(path, channels, timestamp_column, time_unit, "\t" if suffix == ".tsv" else ",")
        if rec.timestamps is None:
            rec.rate = rate
        return rec
    if suffix == ".npz":
        return read_npz(path, channels, rate)
    if suffix == ".npy":
        return read_npy(path, rate)
    raise SensorDataError(f"{path}: unsupported recording format {suffix!r}; use .csv, .tsv, .npz or .npy")


def recording_problem(rec: SensorRecording, channels: Sequence[str], min_samples: int = 2) -> str | None:
    """``None`` if ``rec`` can be learnt from, else what is wrong: fewer than ``min_samples`` rows (a single
    row has no time course), or a configured channel without one finite value (all NaN / empty)."""
    values = np.asarray(rec.values)
    if values.ndim != 2:
        return f"expected values [channels, time], got shape {values.shape}"
    if values.shape[1] < min_samples:
        return (f"only {values.shape[1]} sample row(s); a recording needs at least {min_samples} "
                "(a single row has no time course)")
    names = [str(c) for c in rec.channels] if rec.channels is not None else list(channels)
    rows = [names.index(c) for c in channels if c in names] if rec.channels is not None else range(len(names))
    if values.dtype.kind in "biuf":
        dead = [names[i] for i in rows if i < values.shape[0] and not np.isfinite(values[i]).any()]
        if dead:
            return (f"channel(s) {dead} hold no finite value (all NaN/inf/empty over {values.shape[1]} rows); "
                    "drop the recording or fill the channel")
    return None


def write_csv(path: str | Path, values: np.ndarray, channels: Sequence[str], timestamps: np.ndarray,
              decimals: int = 4) -> Path:
    """Write ``values [C, T]`` as CSV with a ``timestamp`` column (seconds) and one column per channel."""
    table = np.column_stack([timestamps, np.asarray(values).T])
    fmt = ["%.4f"] + [f"%.{decimals}f"] * len(channels)
    np.savetxt(path, table, fmt=fmt, delimiter=",", header=",".join(["timestamp", *channels]), comments="")
    return Path(path)
