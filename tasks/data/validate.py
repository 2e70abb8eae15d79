"""Pre-flight dataset checks: every record is checked when the run starts, not hours in.

Readers report each bad record (missing image, unreadable or truncated file, empty text, malformed
JSON, annotation pointing at an unknown image) to a :class:`Problems` collector. By default the first
one raises :class:`~tasks.data.coco.DataError` naming the file and the record; with
``skip_bad=True`` (``data.skip_bad=true``) bad records are dropped, and :meth:`Problems.log` says how
many and which.

Paths are confined to the data root: a record whose file resolves (``..``, an absolute path, a symlink)
outside ``data.root`` / ``data.image_root`` is a bad record unless ``data.allow_outside_root=true``.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

from tasks.data.coco import DataError, describe_value

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["DataError", "Problems", "check_image", "check_images", "filter_records", "outside_roots", "describe_value",
           "confine_roots"]


class Problems:
    """Collects bad records; raises at the first one unless ``skip_bad``."""

    def __init__(self, skip_bad: bool = False, source: str = "dataset"):
        self.skip_bad, self.source = skip_bad, source
        self.messages: list[str] = []

    def report(self, message: str) -> None:
        """A record is bad: raise (default) or remember it to be skipped."""
        if not self.skip_bad:
            raise DataError(message)
        self.messages.append(message)

    def __len__(self) -> int:
        return len(self.messages)

    def log(self, limit: int = 20) -> None:
        """Log how many records were skipped and which (the first ``limit`` in full)."""
        if not self.messages:
            return
        shown = "\n  ".join(self.messages[:limit])
        more = f"\n  ... and {len(self.messages) - limit} more" if len(self.messages) > limit else ""
        log.warning("%s: skipped %d bad record(s) (data.skip_bad=true):\n  %s%s",
                    self.source, len(self.messages), shown, more)


def confine_roots(allow_outside_root: bool, *roots: str | Path | None) -> list[Path] | None:
    """The folders record paths must stay inside (``None``: anywhere, ``data.allow_outside_root=true``)."""
    if allow_outside_root:
        return None
    return [Path(r) for r in dict.fromkeys(str(r) for r in roots if r)]


def outside_roots(path: str | Path, roots: Sequence[str | Path] | None) -> str | None:
    """``None`` if ``path`` (symlinks and ``..`` resolved) lies inside one of ``roots``, else why not."""
    if roots is None:
        return None
    real = Path(os.path.realpath(path))
    for root in roots:
        if real.is_relative_to(os.path.realpath(root)):
            return None
    shown = " or ".join(str(r) for r in roots)
    return (f"path {str(path)!r} resolves to {real}, outside the data root {shown} "
            "(set data.allow_outside_root=true to read files there)")


def check_image(path: str | Path) -> str | None:
    """``None`` if ``path`` is a fully decodable image, else why not (missing, unreadable, truncated)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        return "missing image file"
    try:
        with Image.open(path) as img:
            img.load()  # full decode: truncated files fail here (verify() misses some)
    except UnidentifiedImageError:
        return "not a readable image"
    except (OSError, SyntaxError, ValueError) as e:
        return f"unreadable or truncated image ({e})"
    return None


def check_images(paths: Iterable[str | Path], workers: int = 4) -> dict[Path, str]:
    """Decode every distinct path (threads: PIL releases the GIL while decoding) → ``{path: problem}``."""
    unique = sorted({Path(p) for p in paths})
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(check_image, unique, chunksize=64))
    return {p: r for p, r in zip(unique, results) if r is not None}


def filter_records(records: Sequence[T], path_of: Callable[[T], Any], describe: Callable[[T], str],
                   problems: Problems, check_files: str = "decode",
                   roots: Sequence[str | Path] | None = None) -> list[T]:
    """Drop (or raise on) records whose image lies outside ``roots`` (when given), or is missing or undecodable.

    ``check_files``: ``decode`` (open and decode every image once), ``exists`` (only stat it) or
    ``none``. ``describe(record)`` names the record in the message (file and record index/id).
    """
    if roots is not None:
        inside = []
        for r in records:
            why = outside_roots(path_of(r), roots)
            if why is None:
                inside.append(r)
            else:
                problems.report(f"{describe(r)}: {why}")
        records = inside
    if check_files == "none":
        return list(records)
    if check_files == "exists":
        bad = {Path(p): "missing image file" for p in {path_of(r) for r in records} if not Path(p).is_file()}
    elif check_files == "decode":
        bad = check_images(path_of(r) for r in records)
    else:
        raise ValueError(f"check_files must be decode|exists|none, got {check_files!r}")
    if not bad:
        return list(records)
    kept = []
    for r in records:
        why = bad.get(Path(path_of(r)))
        if why is None:
            kept.append(r)
        else:
            problems.report(f"{describe(r)}: {why}: {path_of(r)}")
    return kept
