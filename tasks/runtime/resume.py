"""Exact resume: a run killed at any step and resumed from ``last.ckpt`` continues bit-identically.

What a training step reads besides the weights, optimizer and scheduler (which Lightning saves) and how it is kept:

- the sample order and the position within the pass: :class:`ResumableLoader` is ``state_dict``-able, so Lightning
  stores ``(pass, batches served, the pass's seed)`` in the checkpoint and the resumed loader serves the rest of
  that pass (skipping indices only, no data loaded);
- the randomness inside ``Dataset.__getitem__`` (a random caption, a dropped prompt...): in the main process it is
  the global stream, restored like the rest; in loader workers (whose RNG states cannot be saved) each sample is
  drawn with the torch / numpy / Python RNGs seeded from its pass seed and position (:class:`SeededDataset`), so
  the worker count, worker seeds and prefetching do not matter;
- the global RNGs the step itself uses (dropout, codebook restarts): :class:`ResumeState` saves torch (CPU and
  CUDA), numpy and Python states in the checkpoint and restores them at ``on_train_start``; validation runs on a
  copy of them, so validating does not move the training stream (and a resume need not repeat it). What happens
  before ``on_validation_start`` is the creation of the validation loader's iterator: one draw of the worker base
  seed, in every validation of the resumed and the uninterrupted run alike, since evaluation loaders with
  persistent workers (which draw at their first iteration only) draw from a generator of their own
  (:func:`eval_generator`).

An uninterrupted run draws exactly what a plain ``DataLoader(shuffle=True)`` draws (one process: each pass's seed
and the worker base seed from the global torch RNG; ddp/fsdp: ``seed + pass`` as ``DistributedSampler``), so the
sample orders, and the results, of runs before this module existed are unchanged.
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


def run_seed() -> int:
    """The run's seed (``seed_everything``'s, else torch's initial seed): the seed of the distributed orders."""
    return int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))


def eval_generator(num_workers: int) -> torch.Generator | None:
    """The ``generator`` of an evaluation loader: its own with persistent workers, whose one worker base seed draw
    at the first validation would otherwise move the global RNG in one validation of the uninterrupted run and in
    another of a resumed one; ``None`` (a draw from the global RNG at every validation, as ever) without."""
    return torch.Generator().manual_seed(0) if num_workers > 0 else None


class ResumableSampler(DistributedSampler):
    """Shuffled ``(index, sample seed)`` pairs of one pass, split over the data-parallel ranks.

    A ``DistributedSampler`` (Lightning keeps it under ddp/fsdp instead of substituting its own). A pass's order
    is ``randperm`` under the pass seed: drawn from the global torch RNG when the pass begins in one process (as
    ``RandomSampler`` does), ``seed + pass`` on several ranks (as ``DistributedSampler`` does). :meth:`begin`
    sets the pass, its seed when known (a resumed pass) and the first sample to serve.
    """

    def __init__(self, dataset: Dataset, seed: int):
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(dataset, num_replicas=dist.get_world_size() if distributed else 1,
                         rank=dist.get_rank() if distributed else 0, shuffle=True, seed=seed, drop_last=False)
        self.pass_seed: int | None = None
        self._pass, self._start = 0, 0

    def begin(self, pass_: int, pass_seed: int | None, start: int) -> None:
        """The next iteration serves pass ``pass_`` (seeded ``pass_seed``, None: draw it) from sample ``start``."""
        self._pass, self.pass_seed, self._start = pass_, pass_seed, start

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        if self.pass_seed is None:
            if self.num_replicas > 1:
                self.pass_seed = self.seed + self._pass
            else:
                self.pass_seed = int(torch.empty((), dtype=torch.int64).random_().item())
        g = torch.Generator().manual_seed(self.pass_seed)
        n = len(self.dataset)  # type: ignore[arg-type]
        order = torch.randperm(n, generator=g).tolist()
        seeds = torch.randint(0, 1 << 62, (n,), generator=g).tolist()  # for the samples loaded in workers
        pairs = list(zip(order, seeds))
        pad = self.total_size - n
        while pad > 0:  # as DistributedSampler: repeat from the start so every rank serves as many samples
            pairs += pairs[:pad]
            pad = self.total_size - len(pairs)
        mine = pairs[self.rank:self.total_size:self.num_replicas]
        return iter(mine[self._start:])


class SeededDataset(Dataset):
    """``dataset[i]`` for the key ``(i, seed)``; in a loader worker the torch / numpy / Python RNGs are first
    seeded with ``seed``, so what a sample draws does not depend on which worker loads it, or what it loaded
    before. In the main process the sample draws from the global stream (which checkpoints carry)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if get_worker_info() is not None:
            torch.manual_seed(seed)
            np.random.seed(seed & 0xFFFF_FFFF)
            random.seed(seed)
        return self.dataset[index]


class ResumableLoader(DataLoader):
    """The shuffled training loader whose order, per-sample randomness and position are checkpointed.

    Every ``iter()`` starts a new pass (an epoch, or one more cycle of a shorter task's loader in a multi-task
    ``CombinedLoader``), lazily: nothing is drawn or started before its first batch is asked for, so a resumed
    run, which creates its iterator before the RNG states are restored, draws what the uninterrupted run drew.
    ``state_dict()`` is ``{"pass", "batches", "seed"}``: the pass being served, how many of its batches were
    handed out, and its seed; Lightning saves it with the fit loop and calls :meth:`load_state_dict` before the
    resumed run's first ``iter()``. Lightning fetches without prefetching when a loader has a length, so the
    batches handed out are the batches trained on when a checkpoint is written.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, drop_last: bool = True, **kwargs: Any):
        inner = dataset.dataset if isinstance(dataset, SeededDataset) else dataset  # Lightning may re-instantiate
        kwargs.pop("shuffle", None)
        kwargs.pop("sampler", None)
        super().__init__(SeededDataset(inner), batch_size=batch_size, sampler=ResumableSampler(inner, seed),
                         drop_last=drop_last, **kwargs)
        self._next: tuple[int, int, int | None] = (0, 0, None)  # (pass, first batch, seed) of the next iter()
        self._pos: tuple[int, int, int | None] = (0, 0, None)  # (pass, batches handed out, seed) of the current

    def __iter__(self) -> Iterator[Any]:
        pass_, start, seed = self._next
        self._next = (pass_ + 1, 0, None)
        return self._serve(pass_, start, seed)

    def _serve(self, pass_: int, start: int, seed: int | None) -> Iterator[Any]:
        sampler = self.sampler
        assert isinstance(sampler, ResumableSampler)
        sampler.begin(pass_, seed, start * self.batch_size)  # type: ignore[operator]
        # the worker base seed: a plain DataLoader draws it from the global RNG for each new iterator, once with
        # persistent workers. A resumed pass or a resumed process's later pass draws nothing (a generator of its own)
        fresh = start == 0 and (pass_ == 0 or not self.persistent_workers)
        self.generator = None if fresh else torch.Generator().manual_seed(pass_)
        for n, batch in enumerate(super().__iter__(), start + 1):
            self._pos = (pass_, n, sampler.pass_seed)
            yield batch

    def state_dict(self) -> dict[str, int]:
        pass_, batches, seed = self._pos
        return {"pass": pass_, "batches": batches, "seed": -1 if seed is None else seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass_, batches, seed = int(state["pass"]), int(state["batches"]), int(state["seed"])
        if batches >= len(self) or seed < 0:  # the pass was complete: the next one starts from its beginning
            self._next = self._pos = (pass_ + 1 if batches else pass_, 0, None)
        else:
            self._next = self._pos = (pass_, batches, seed)


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


_SEED_ENV = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")  # what seed_everything also sets


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without moving the global RNGs (nor the seed environment ``seed_everything`` sets): work that
    happens only on a cache miss (pretraining a backbone, a VQ tokenizer or a probe, generating data) must not
    change the run that follows it."""
    states = collect_rng_states()
    env = {k: os.environ.get(k) for k in _SEED_ENV}
    try:
        yield
    finally:
        set_rng_states(states)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class ResumeState(L.Callback):
    """Saves the RNG states in every checkpoint and restores them when a run resumes; keeps validation off the
    training RNG stream; on resume, drops the log rows of the steps the run will do again (loggers with
    ``drop_rows_from``, e.g. :class:`tasks.runtime.csv_log.AppendCSVLogger`)."""

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None
        self._held: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # written during a validation (a checkpoint at on_validation_end): the states training continues from
        return {"rng": self._held if self._held is not None else collect_rng_states()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = state.get("rng")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:  # rows buffered so far reach the disk before the checkpoint does
            logger.save()

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
