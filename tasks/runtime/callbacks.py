"""Lightning plugins and callbacks: atomic checkpoints, run artifacts, throughput."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from zoo.atomic import atomic_file, atomic_write_text


class MonitoredCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that waits quietly for its monitored metric.

    Lightning's saves the top-k at the end of a training epoch that ran no validation, and warns that the monitor
    is missing. In mmzoo that is normal (a time budget or a step total validates once after the loop, and
    :func:`tasks.cli.train.save_final_best` writes ``best.ckpt`` then), so this one skips that save instead.
    """

    def _generate_state_key(self, **kwargs: Any) -> str:
        return f"ModelCheckpoint{kwargs!r}"  # the parent's key: checkpoints resume and export either way

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if self.monitor is not None and self.monitor not in monitor_candidates:
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically (:func:`zoo.atomic.atomic_file`): a kill never corrupts ``last``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        with atomic_file(path, "wb") as f:
            torch.save(checkpoint, f)


def write_task_artifacts(task: Any, folder: str | Path, stage: str, predictions_file: str = "predictions.json",
                         samples_file: str = "samples.png") -> None:
    """A task's ``stage`` predictions (``task.format_predictions``) and sample grid (``task.write_samples``)."""
    if stage not in task.predictions:
        return
    preds = task.format_predictions(task.predictions[stage])
    atomic_write_text(Path(folder) / predictions_file, json.dumps(preds, indent=1))
    task.write_samples(Path(folder) / samples_file, stage)


class RunArtifacts(L.Callback):
    """After each validation/test epoch, write the task's predictions (official format) and sample grid."""

    def __init__(self, output_dir: str, predictions_file: str = "predictions.json", samples_file: str = "samples.png"):
        self.output_dir = Path(output_dir)
        self.predictions_file, self.samples_file = predictions_file, samples_file

    def _write(self, trainer: L.Trainer, task: Any, stage: str) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        started = time.time()
        writer = getattr(task, "write_artifacts", None)  # a multi-task model writes one pair per task
        if writer is not None:
            writer(self.output_dir, stage, self.predictions_file, self.samples_file)
        else:
            write_task_artifacts(task, self.output_dir, stage, self.predictions_file, self.samples_file)
        stem, suffix = Path(self.samples_file).stem, Path(self.samples_file).suffix
        grids = [p for p in sorted(self.output_dir.glob(f"{stem}*{suffix}")) if p.stat().st_mtime >= started - 1]
        if grids and trainer.loggers:  # the experiment loggers show the grids too (TensorBoard, W&B, MLflow, ...)
            from tasks.runtime.logger_images import log_images_to_loggers

            log_images_to_loggers(trainer, grids, stage)

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._write(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._write(trainer, pl_module, "test")


def count_targets(batch: dict[str, Any]) -> int:
    """Decoder targets in a batch; a multi-task batch (``{task: batch}``) counts every task's."""
    if "labels" in batch:
        return len(batch["labels"])
    if "ids" in batch:
        return len(batch["ids"])
    return sum(count_targets(b) for b in batch.values() if isinstance(b, dict))


class TimeBudget(L.Callback):
    """Fit the training run into ``minutes`` of wall-clock time on whatever machine runs it.

    Steps ``start``..``start + window`` are timed; the step total then becomes what fits in the budget
    (measured on rank 0 and broadcast, so every rank stops at the same step and follows the same learning-rate
    schedule). Steps often slow down after the first ones (data workers fall from prefetching into the step's
    way), so the total is estimated again at the ``rechecks`` fractions of the run, from the pace since the last
    estimate. It sets ``trainer.fit_loop.epoch_loop.max_steps`` and ``pl_module.budget_steps``, which the
    warm-up + cosine schedule of :func:`tasks.base.warmup_cosine` reads, so the decay completes in the budget.
    The total is saved in checkpoints: a resumed run keeps it. ``whole_epochs=True`` rounds the total down to
    whole epochs (at least one), so a run that validates every epoch validates its final weights.
    """

    def __init__(self, minutes: float, start: int = 10, window: int = 20, min_steps: int = 50,
                 whole_epochs: bool = False, rechecks: Sequence[float] = (0.25, 0.5, 0.75),
                 deadline_s: float | None = None):
        if minutes <= 0:
            raise ValueError(f"TimeBudget minutes must be > 0, got {minutes}")
        if any(not 0 < f < 1 for f in rechecks):
            raise ValueError(f"TimeBudget rechecks are fractions of the run in (0, 1), got {list(rechecks)}")
        self.seconds, self.start, self.window, self.min_steps = 60.0 * minutes, start, window, min_steps
        self.whole_epochs, self.rechecks = whole_epochs, sorted(rechecks)
        # deadline_s (tasks.runtime.budget): the loop ends that many seconds after the run started, whatever came before
        self.deadline_s = deadline_s
        self.total: int | None = None
        self._t_fit: float | None = None
        self._t_start: float | None = None
        self._checks: list[int] = []
        self._last: tuple[int, float] | None = None  # (step, time) of the last estimate

    def _apply(self, trainer: L.Trainer, pl_module: Any) -> None:
        trainer.fit_loop.epoch_loop.max_steps = self.total
        pl_module.budget_steps = self.total

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._t_fit = time.perf_counter()
        if self.deadline_s is not None and self.total is None:
            from tasks.runtime.budget import elapsed_s

            spent = elapsed_s()
            self.seconds = max(60.0, self.deadline_s - spent)
            if trainer.is_global_zero:
                print(f"[mmzoo] {spent / 60:.1f} min spent before training: the training loop gets "
                      f"{self.seconds / 60:.1f} min", flush=True)
        if self.total is not None:  # resumed
            self._apply(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.total is None and trainer.global_step == self.start:
            self._t_start = time.perf_counter()
            self._last = (self.start, self._t_start)

    def _estimate(self, trainer: L.Trainer) -> tuple[int, float]:
        """(step total that fits the budget at the pace since the last estimate, that pace in s/step)."""
        now, step = time.perf_counter(), trainer.global_step
        assert self._last is not None
        per_step = (now - self._last[1]) / max(1, step - self._last[0])
        self._last = (step, now)
        began = self._t_fit if self._t_fit is not None else self._t_start
        left = self.seconds - (now - (began if began is not None else now))
        total = max(self.min_steps, step + 1, step + int(left / per_step))
        epoch = trainer.num_training_batches // max(1, trainer.accumulate_grad_batches)
        if self.whole_epochs and 0 < epoch < float("inf"):
            total = max(1, total // epoch) * epoch
        return int(trainer.strategy.broadcast(total, src=0)), per_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._t_start is None:
            return
        step = trainer.global_step
        if self.total is None:
            if step < self.start + self.window:
                return
            self.total, per_step = self._estimate(trainer)
            self._checks = [self.start + int(f * (self.total - self.start)) for f in self.rechecks]
            self._checks = [c for c in self._checks if c > step]
        elif self._checks and step >= self._checks[0]:
            self._checks.pop(0)
            before = self.total
            self.total, per_step = self._estimate(trainer)
            if self.total == before:
                return
        else:
            return
        self._apply(trainer, pl_module)
        if trainer.is_global_zero:
            print(f"[mmzoo] time budget {self.seconds / 60:.1f} min: {per_step:.2f} s/step at step {step} → "
                  f"{self.total} steps")

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = state.get("total")


class Throughput(L.Callback):
    """Logs ``train/samples_per_sec`` (decoder targets per second, all ranks) over training steps only."""

    def __init__(self) -> None:
        self.samples = 0
        self.seconds = 0.0
        self._t0: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self.samples += count_targets(batch) * trainer.world_size
            self._t0 = None

    @property
    def samples_per_sec(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.seconds:
            pl_module.log("train/samples_per_sec", self.samples_per_sec, rank_zero_only=True)

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples, self.seconds = state["samples"], state["seconds"]
