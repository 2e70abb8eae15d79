"""Generated datasets on disk, made once and atomically: the protocol the embedded Shapes and Motion share.

A generated dataset folder holds a JSON *marker* file naming what made it (format version and config).
:func:`ensure_generated` returns at once when the marker matches; otherwise it writes the dataset into a
temporary sibling folder and renames it into place, so an interrupted generation never leaves a
complete-looking dataset. Concurrent callers serialise on a ``<root>.lock`` sibling file (:func:`acquire_lock`).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable

__all__ = ["acquire_lock", "ensure_generated", "marker_matches"]


def marker_matches(path: Path, marker: dict[str, Any]) -> bool:
    """Whether the JSON file ``path`` exists and holds exactly ``marker``."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) == marker
    except (OSError, ValueError):
        return False


def _lock_is_stale(lock: Path, max_age_s: float) -> bool:
    try:
        info = lock.read_text().split()
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return False  # vanished or unreadable: just retry
    if len(info) >= 2 and info[0] == socket.gethostname():
        try:
            os.kill(int(info[1]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            pass
        return False
    return age > max_age_s  # another host (shared file system) or a half-written lock


def acquire_lock(lock: Path, timeout_s: float, max_age_s: float = 3600.0) -> None:
    """Create ``lock`` exclusively (holding ``<host> <pid>``), waiting up to ``timeout_s`` for another holder.
    A lock left by a dead process on this host, or older than ``max_age_s`` from another host, is broken."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _lock_is_stale(lock, max_age_s):
                lock.unlink(missing_ok=True)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s:.0f}s for {lock}; delete it if no generation is running")
            time.sleep(0.2)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return


def ensure_generated(root: str | Path, marker_name: str, marker: dict[str, Any], write: Callable[[Path], Any],
                     dataset: str, timeout_s: float = 1800.0) -> Path:
    """Return ``root`` holding the dataset whose marker file ``root/marker_name`` equals ``marker``.

    Otherwise ``write(folder)`` generates it (writing the marker last) into a temporary sibling folder that
    then replaces ``root``; a dataset made with another config is replaced. A non-empty ``root`` without the
    marker file is not ours and is never deleted: :class:`FileExistsError` names it. ``dataset`` names the
    dataset in that error.
    """
    root = Path(root).expanduser().absolute()
    if marker_matches(root / marker_name, marker):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    lock = root.with_name(root.name + ".lock")
    acquire_lock(lock, timeout_s)
    try:
        if marker_matches(root / marker_name, marker):
            return root  # another process made it while this one waited
        if root.exists() and not (root / marker_name).exists() and any(root.iterdir()):
            raise FileExistsError(f"{root} exists, is not empty and has no {marker_name} marker; "
                                  f"refusing to overwrite it with the {dataset} dataset")
        for stale in root.parent.glob(root.name + ".tmp-*"):  # we hold the lock: killed generations' leftovers
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            t0 = time.perf_counter()
            print(f"[mmzoo] generating the {dataset} dataset into {root} (once; cached after)", flush=True)
            write(tmp)
            print(f"[mmzoo] {dataset} dataset written in {time.perf_counter() - t0:.0f} s", flush=True)
            old = None
            if root.exists():
                old = root.with_name(f"{root.name}.tmp-old-{uuid.uuid4().hex[:8]}")
                os.replace(root, old)
            os.replace(tmp, root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return root
    finally:
        lock.unlink(missing_ok=True)
