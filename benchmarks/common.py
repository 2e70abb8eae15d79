"""Shared benchmark harness: alternate contenders in one process, report medians and per-pair ratios."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def measure_alternating(fns: dict[str, Callable[[], Any]], reps: int = 7, warmup: int = 2) -> dict[str, list[float]]:
    """Run each contender ``warmup`` times, then ``reps`` rounds alternating them; seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Median/min/max per contender and the median of per-round ratios ``baseline_time / time``."""
    out: dict[str, dict[str, float]] = {}
    for name, ts in times.items():
        ratios = [b / t for b, t in zip(times[baseline], ts)]
        out[name] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                     f"speedup_vs_{baseline}": statistics.median(ratios)}
    return out


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Achieved GFLOP/s of an n×n matmul in ``dtype`` (the same-run peak that MFU is measured against)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call, from ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count()}


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A Markdown table."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
