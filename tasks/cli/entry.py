"""What every Hydra command (zoo-train, zoo-finetune, zoo-eval) does around its job: help before anything heavy is
imported, the config resolvers, and bad data reported as one line instead of a traceback."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig


def start_command(prog: str) -> None:
    """Answer ``--help`` for ``prog`` (before Hydra, torch or Lightning load) and register the config resolvers."""
    from tasks.cli.help import maybe_print_help

    maybe_print_help(prog)
    from tasks.runtime.resolvers import register_resolvers

    register_resolvers()


def run_job(job: Callable[[DictConfig], dict[str, Any] | None], cfg: DictConfig) -> float | None:
    """Run ``job(cfg)``; a :class:`DataError` exits with its message; returns the run's ``optimized_metric`` (sweeps)."""
    from tasks.data.coco import DataError

    try:
        metrics = job(cfg)
    except DataError as e:  # bad data, or a run that would train nothing: the message, not a traceback
        raise SystemExit(f"error: {e}") from None
    opt = cfg.get("optimized_metric")
    return metrics.get(opt) if opt and metrics else None
