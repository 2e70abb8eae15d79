"""Atomic file writes: a reader (or a killed writer) never sees a half-written file."""
from __future__ import annotations

import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_file", "atomic_write_text", "remove_orphan_temps", "file_mode"]

#: The temp files :func:`atomic_file` makes: ``.<name>.<8 chars of mkstemp>.tmp`` next to the target.
TEMP_PATTERN = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_HANG_ENV = "MMZOO_TEST_HANG_IN_WRITE"  # test hook only, see _test_hang
_writes: dict[str, int] = {}


def _umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def _test_hang(name: str) -> None:
    """Tests only: with ``MMZOO_TEST_HANG_IN_WRITE=<file name>:<n>``, the n-th write of a file of that name stops
    after its bytes are in the temp file and before the rename, so a test can SIGKILL it there."""
    spec = os.environ.get(_HANG_ENV)
    if not spec:
        return
    target, _, n = spec.rpartition(":")
    if target != name:
        return
    _writes[name] = _writes.get(name, 0) + 1
    if _writes[name] == int(n):
        while True:
            time.sleep(1)


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temp file next to ``path`` (``mode`` ``"w"`` or ``"wb"``); on a clean exit it is fsynced and
    renamed over ``path``, on an error it is deleted and ``path`` is left as it was. The file gets the mode a
    plain ``open`` would give it (``0o666 & ~umask``), not mkstemp's 0600. A temp file left by a killed writer
    is removed by :func:`remove_orphan_temps`."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            _test_hang(path.name)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(text)
    return Path(path)


def remove_orphan_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files that killed :func:`atomic_file` writers left directly in ``folder`` (only names of
    its own pattern, ``.<name>.XXXXXXXX.tmp``; nothing else, no subfolders). Call it when no writer is running
    in ``folder`` (at the start of a run). Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if TEMP_PATTERN.match(p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
