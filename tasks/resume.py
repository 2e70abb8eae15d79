"""Exact resume: a run killed at any step and resumed from ``last.ckpt`` continues bit-identically.

What a training step reads besides the weights, optimizer and scheduler (which Lightning saves) and how it is kept:

- the sample order and the position within the pass: :class:`ResumableLoader` draws each pass's permutation from
  ``(seed, pass)`` (not from the global RNG) and is ``state_dict``-able, so Lightning stores ``(pass, batches
  served)`` in the checkpoint and the resumed loader skips what was already served (indices only, no data loaded);
- the randomness inside ``Dataset.__getitem__`` (a random caption, a dropped prompt...): each sample is drawn with
  the torch / numpy / Python RNGs seeded from ``(seed, pass, position)`` (:class:`SeededDataset`), in whichever
  worker or in the main process it is loaded, so worker count, worker seeds and prefetching do not matter;
- the global RNGs the step itself uses (dropout, codebook restarts): :class:`ResumeState` saves torch (CPU and
  CUDA), numpy and Python states in the checkpoint and restores them at ``on_train_start``; validation runs on a
  copy of them, so validating does not move the training stream (and a resume need not repeat it).
"""
from __future__ import annotations

import os
import random
from contextlib import contextmanager
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

_MASK = (1 << 63) - 1


def run_seed() -> int:
    """The run's seed (``seed_everything``'s, else torch's initial seed): the base of every loader's order."""
    return int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))


def pass_generator(seed: int, pass_: int) -> torch.Generator:
    """The generator of pass ``pass_`` of a loader seeded with ``seed``."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(pass_) * 7_919 + 17) & _MASK)


class ResumableSampler(DistributedSampler):
    """Shuffled ``(index, sample seed)`` pairs of one pass, split over the data-parallel ranks.

    A ``DistributedSampler`` (Lightning keeps it under ddp/fsdp instead of substituting its own), with the pass
    order a function of ``(seed, pass)``: :meth:`begin` picks the pass and the first position to serve.
    """

    def __init__(self, dataset: Dataset, seed: int):
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(dataset, num_replicas=dist.get_world_size() if distributed else 1,
                         rank=dist.get_rank() if distributed else 0, shuffle=True, seed=seed, drop_last=False)
        self._pass, self._start = 0, 0

    def begin(self, pass_: int, start: int) -> None:
        """The next iteration serves pass ``pass_`` from this rank's sample ``start`` on."""
        self._pass, self._start = pass_, start

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        g = pass_generator(self.seed, self._pass)
        n = len(self.dataset)  # type: ignore[arg-type]
        order = torch.randperm(n, generator=g).tolist()
        seeds = torch.randint(0, 1 << 62, (n,), generator=g).tolist()
        pairs = list(zip(order, seeds))
        pad = self.total_size - n
        while pad > 0:  # as DistributedSampler: repeat from the start so every rank serves as many samples
            pairs += pairs[:pad]
            pad = self.total_size - len(pairs)
        mine = pairs[self.rank:self.total_size:self.num_replicas]
        return iter(mine[self._start:])


class SeededDataset(Dataset):
    """``dataset[i]`` with the torch / numpy / Python RNGs seeded per sample (the key is ``(index, seed)``).

    In the main process (``num_workers=0``) the global RNG states are put back afterwards, so loading a sample
    does not move the stream the training step draws from."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        in_main = get_worker_info() is None
        if in_main:
            saved = torch.default_generator.get_state(), np.random.get_state(), random.getstate()
        torch.default_generator.manual_seed(seed)  # CPU only: CUDA generators are never touched
        np.random.seed(seed & 0xFFFF_FFFF)
        random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            if in_main:
                torch.default_generator.set_state(saved[0])
                np.random.set_state(saved[1])
                random.setstate(saved[2])


class ResumableLoader(DataLoader):
    """The shuffled training loader whose order, per-sample randomness and position are checkpointed.

    Every ``iter()`` starts a new pass (an epoch, or one more cycle of a shorter task's loader in a multi-task
    ``CombinedLoader``). ``state_dict()`` is ``{"pass", "batches"}``: the pass being served and how many batches
    of it were handed out; Lightning saves it with the fit loop and calls :meth:`load_state_dict` before the
    resumed run's first ``iter()``. Lightning fetches without prefetching when a loader has a length, so the
    batches handed out are the batches trained on when a checkpoint is written.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, drop_last: bool = True, **kwargs: Any):
        inner = dataset.dataset if isinstance(dataset, SeededDataset) else dataset  # Lightning may re-instantiate
        kwargs.pop("shuffle", None)
        kwargs.pop("sampler", None)
        super().__init__(SeededDataset(inner), batch_size=batch_size, sampler=ResumableSampler(inner, seed),
                         drop_last=drop_last, **kwargs)
        self.seed = seed
        self._next = (0, 0)  # (pass, first batch) of the next iter()
        self._pos = (0, 0)  # (pass, batches handed out) of the current one

    def __iter__(self) -> Iterator[Any]:
        pass_, start = self._next
        self._next = (pass_ + 1, 0)
        self._pos = (pass_, start)
        assert isinstance(self.sampler, ResumableSampler)
        self.sampler.begin(pass_, start * self.batch_size)  # type: ignore[operator]
        # worker base seeds come from this generator, not from the global RNG (which iter() would move)
        self.generator = pass_generator(self.seed + 1, pass_)
        return self._count(super().__iter__(), pass_, start)

    def _count(self, it: Iterator[Any], pass_: int, start: int) -> Iterator[Any]:
        for n, batch in enumerate(it, start + 1):
            self._pos = (pass_, n)
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"pass": self._pos[0], "batches": self._pos[1]}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass_, batches = int(state["pass"]), int(state["batches"])
        if batches >= len(self):  # the pass was complete: the next one starts from its beginning
            pass_, batches = pass_ + 1, 0
        self._next = self._pos = (pass_, batches)


def collect_rng_states() -> dict[str, Any]:
    """torch (CPU, every CUDA device), numpy and Python RNG states as tensors/ints (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`collect_rng_states` returned."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without moving the global RNGs: work that happens only on a cache miss (pretraining a backbone
    or a tokenizer, generating data) must not change the initialisation of the run that follows it."""
    states = collect_rng_states()
    try:
        yield
    finally:
        set_rng_states(states)


class ResumeState(L.Callback):
    """Saves the RNG states in every checkpoint and restores them when a run resumes; keeps validation off the
    training RNG stream; on resume, drops the log rows of the steps the run will do again (loggers with
    ``drop_rows_from``, e.g. :class:`tasks.csv_log.AppendCSVLogger`)."""

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None
        self._held: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # written during a validation (a checkpoint at on_validation_end): the states training continues from
        return {"rng": self._held if self._held is not None else collect_rng_states()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = state.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.ckpt_path is None:
            return
        for logger in trainer.loggers:  # the steps after the checkpoint run again and log again
            if hasattr(logger, "drop_rows_from"):
                logger.drop_rows_from(trainer.global_step)
        if self._loaded is not None:
            set_rng_states(self._loaded)
            self._loaded = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.state.fn == "fit":
            self._held = collect_rng_states()

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._held is not None:
            set_rng_states(self._held)
            self._held = None
