"""Pre-flight checks of a run, after the data is read and before the first step.

A run is refused (:class:`RunConfigError`, naming the file and the setting) when it would train 0 steps
(``trainer.max_steps=0``, ``max_epochs=0``, ``limit_train_batches=0``, or fewer training records than one
batch, e.g. after ``data.skip_bad`` dropped them), when it would never validate (an empty or missing val
split while validation is on; ``trainer.limit_val_batches=0`` turns validation off explicitly), or when
``test=true`` would test on nothing. Datamodules describe their splits through ``split_info(split)``
(:class:`tasks.data_module.SplitInfo`); a multi-task datamodule is checked task by task.
"""
from __future__ import annotations

import math
from typing import Any

from tasks.data.coco import DataError
from tasks.data_module import SplitInfo, empty_split_error


class RunConfigError(DataError):
    """The run as configured would train nothing, never validate or test on nothing."""


def _is_zero(limit: Any) -> bool:
    return limit is not None and not isinstance(limit, bool) and float(limit) == 0.0


def _limited(batches: int, limit: Any) -> int:
    """Batches per epoch after ``trainer.limit_train_batches`` (an int: a count; a float: a fraction)."""
    if limit is None or (isinstance(limit, float) and limit == 1.0):
        return batches
    if isinstance(limit, int):
        return min(batches, limit)
    return int(batches * float(limit))


def check_steps(trainer: Any) -> None:
    """Refuse trainer settings that train 0 steps."""
    if trainer.max_steps == 0:
        raise RunConfigError("trainer.max_steps=0: the run would train 0 steps (use -1 for no step limit, or "
                             "train=false to only test)")
    if trainer.max_epochs == 0:
        raise RunConfigError("trainer.max_epochs=0: the run would train 0 steps (use -1 for no epoch limit, or "
                             "train=false to only test)")
    if _is_zero(trainer.limit_train_batches):
        raise RunConfigError(f"trainer.limit_train_batches={trainer.limit_train_batches}: the run would train 0 "
                             "steps (train=false only tests)")


def check_train_split(info: SplitInfo | None, prefix: str, batch_size: int, trainer: Any) -> None:
    if info is None:
        raise RunConfigError(f"{prefix}: no train split is configured; nothing to train on")
    if info.records == 0:
        raise RunConfigError(f"{empty_split_error(info, 'train')}: nothing to train on")
    world = max(1, int(getattr(trainer, "world_size", 1) or 1))
    units = info.units if info.units is not None else info.records
    batches = math.ceil(units / world) // batch_size if info.batches is not None else None
    if batches is None:
        return
    what = "images" if info.units is not None and info.units != info.records else "records"
    if batches == 0:
        on = f" per device ({world} devices)" if world > 1 else ""
        raise RunConfigError(
            f"{info.source}: {units} training {what}{info.skip_note()} make 0 batches of {prefix}.batch_size="
            f"{batch_size}{on} (the last partial batch is dropped): the run would train 0 steps; lower "
            f"{prefix}.batch_size or add data")
    if not trainer.fast_dev_run and _limited(batches, trainer.limit_train_batches) == 0:
        raise RunConfigError(
            f"{info.source}: trainer.limit_train_batches={trainer.limit_train_batches} of {batches} training "
            "batches is 0 batches: the run would train 0 steps")


def check_eval_split(info: SplitInfo | None, split: str, prefix: str, why: str, fix: str,
                     batch_size: int | None = None, limit: Any = None) -> None:
    if info is None:
        raise RunConfigError(f"{prefix}: no {split} split is configured: {why}; {fix}")
    if info.records == 0:
        raise RunConfigError(f"{empty_split_error(info, split)}: {why}; {fix}")
    if batch_size and isinstance(limit, float) and 0.0 < limit < 1.0:
        batches = math.ceil(info.records / batch_size)
        if int(batches * limit) == 0:
            raise RunConfigError(f"{info.source}: trainer.limit_{split}_batches={limit} of {batches} {split} batches "
                                 f"is 0 batches: {why}; {fix}")


def check_run(cfg: Any, dm: Any, trainer: Any) -> None:
    """Every pre-flight check of ``zoo-train`` / ``zoo-finetune`` (see the module docstring)."""
    train, test = bool(cfg.get("train", True)), bool(cfg.get("test", True))
    if train:
        check_steps(trainer)
    validate = train and not _is_zero(trainer.limit_val_batches)
    subs = list(dm.subs.items()) or [("", dm)]
    for name, sub in subs:
        if not hasattr(sub, "split_info"):
            continue  # a datamodule without split descriptions (e.g. the VQ tokenizer's images)
        prefix = f"data.tasks.{name}" if name else "data"
        if train:
            check_train_split(sub.split_info("train"), prefix, int(sub.batch_size), trainer)
        if validate:
            check_eval_split(sub.split_info("val"), "val", prefix,
                             "training would never validate (no val metrics, no best.ckpt)",
                             "give validation data, or turn validation off explicitly with trainer.limit_val_batches=0",
                             sub.eval_batch_size, trainer.limit_val_batches)
        test_info = sub.split_info("test") if test else None
        if test_info is not None:  # no test split configured: the run skips testing and says so (tasks/cli/train.py)
            check_eval_split(test_info, "test", prefix, "test=true would test on nothing",
                             "give test data or set test=false")
