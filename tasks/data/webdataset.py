"""WebDataset tar shards, streamed with the standard library's ``tarfile``.

A shard is a tar whose consecutive members sharing a key (the basename up to its first dot) form one
sample: ``000123.jpg`` + ``000123.json`` → ``{"__key__": "000123", "jpg": b"...", "json": b"..."}``.

Splitting: the stream of samples (over the shards in order) is dealt round-robin to the
``world_size × num_workers`` consumers (DDP ranks × DataLoader workers): sample ``i`` goes to consumer
``i mod n``. Every sample is yielded exactly once per epoch whatever the number of shards, and the
consumers' shares differ by at most one. A consumer streams every shard's headers but reads (and
decodes) only its own samples' bytes. Shard-level splitting (as ``webdataset``'s ``split_by_node`` /
``split_by_worker`` do) needs at least as many shards as consumers and gives unequal shares when the
shard sizes differ; that is why this reader uses ``tarfile`` rather than adding the ``webdataset``
dependency.
"""
from __future__ import annotations

import glob
import random
import re
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from tasks.data.coco import DataError

__all__ = ["expand_shards", "iter_tar_samples", "TarShardStream"]


def expand_shards(spec: str | Path | list[str | Path]) -> list[str]:
    """Shard paths from a list, a glob (``shards/*.tar``) or brace notation (``shard-{000..009}.tar``)."""
    if isinstance(spec, (list, tuple)):
        return [str(s) for s in spec]
    spec = str(spec)
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        return [spec[: m.start()] + f"{i:0{width}d}" + spec[m.end():] for i in range(lo, hi + 1)]
    found = sorted(glob.glob(spec))
    if not found:
        raise DataError(f"no WebDataset shards match {spec}")
    return found


def _split_name(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    stem, _, ext = base.partition(".")
    prefix = name[: len(name) - len(base)]
    return prefix + stem, ext.lower()


def iter_tar_samples(shard: str, keep: Callable[[int], bool] = lambda i: True, start: int = 0
                     ) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(global index, sample)`` for each sample of ``shard`` (indices from ``start``); the bytes of
    samples whose index fails ``keep`` are skipped unread. The last index is returned via StopIteration."""
    index, key, sample = start - 1, None, None
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_name(member.name)
                if k != key:
                    if sample is not None:
                        yield index, sample
                    index, key = index + 1, k
                    sample = {"__key__": k, "__url__": shard} if keep(index) else None
                if sample is not None:
                    f = tar.extractfile(member)
                    sample[ext] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{shard}: unreadable WebDataset shard after sample {key!r}: {e}") from e
    if sample is not None:
        yield index, sample
    return index + 1


class TarShardStream(IterableDataset):
    """Streams samples from tar shards, split over DDP ranks and DataLoader workers (exactly once each).

    ``transform(sample) -> item`` runs in the worker (decode + preprocess). ``shuffle`` permutes the
    shard order with ``seed + epoch`` (the same in every consumer, so the split stays exact) and mixes
    samples through a ``buffer``-sized shuffle buffer. Call :meth:`set_epoch` each epoch for a new order.
    ``rank`` / ``world_size`` default to the initialised process group.
    """

    def __init__(self, shards: str | list[str], transform: Callable[[dict[str, Any]], Any] | None = None,
                 shuffle: bool = False, seed: int = 0, buffer: int = 256,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.shards = expand_shards(shards)
        self.transform, self.shuffle, self.seed, self.buffer = transform, shuffle, seed, buffer
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _consumer(self) -> tuple[int, int]:
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            ddp = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if ddp else 0
            world = dist.get_world_size() if ddp else 1
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw

    def _samples(self) -> Iterator[dict[str, Any]]:
        me, n = self._consumer()
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(shards)
        start = 0
        for shard in shards:
            it = iter_tar_samples(shard, keep=lambda i: i % n == me, start=start)
            while True:
                try:
                    i, sample = next(it)
                except StopIteration as stop:
                    start = stop.value
                    break
                yield sample

    def __iter__(self) -> Iterator[Any]:
        samples = self._samples()
        if self.shuffle and self.buffer > 1:
            samples = self._buffered(samples)
        for s in samples:
            yield self.transform(s) if self.transform is not None else s

    def _buffered(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        me, _ = self._consumer()
        rng = random.Random((self.seed + self.epoch) * 1000 + me)
        buf: list[dict[str, Any]] = []
        for s in samples:
            if len(buf) < self.buffer:
                buf.append(s)
                continue
            j = rng.randrange(len(buf))
            buf[j], s = s, buf[j]
            yield s
        rng.shuffle(buf)
        yield from buf
