"""Server metrics: request counts, batch sizes, queue / preprocessing / model / total times, model-busy seconds."""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any

import numpy as np


class Summary:
    """Count, sum and percentiles over the last ``window`` observations (milliseconds)."""

    def __init__(self, window: int = 20000):
        self.count, self.total = 0, 0.0
        self.recent: deque[float] = deque(maxlen=window)

    def add(self, ms: float) -> None:
        self.count += 1
        self.total += ms
        self.recent.append(ms)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"count": self.count, "mean": round(self.total / self.count, 3) if self.count else None}
        if self.recent:
            p = np.percentile(np.fromiter(self.recent, float), [50, 95, 99])
            d.update(p50=round(p[0], 3), p95=round(p[1], 3), p99=round(p[2], 3), max=round(max(self.recent), 3))
        return d


class Metrics:
    """Thread-safe counters the event loop and the model thread update; :meth:`snapshot` is ``/metrics``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self.batches = 0
        self.model_busy_s = 0.0  # inside batched forward/generate
        self.model_thread_busy_s = 0.0  # the model thread occupied (model + inline preprocessing / rendering)
        self.times = {k: Summary() for k in ("queue_ms", "preprocess_ms", "model_ms", "render_ms", "total_ms")}
        self.in_flight = 0

    def request(self, task: str, status: int, total_ms: float | None = None) -> None:
        with self.lock:
            self.requests[(task, status)] += 1
            if total_ms is not None and status == 200:
                self.times["total_ms"].add(total_ms)

    def time(self, name: str, ms: float) -> None:
        with self.lock:
            self.times[name].add(ms)

    def batch(self, size: int, model_s: float, thread_s: float) -> None:
        with self.lock:
            self.batches += 1
            self.batch_sizes[size] += 1
            self.model_busy_s += model_s
            self.model_thread_busy_s += thread_s
            self.times["model_ms"].add(model_s * 1e3)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            by_task: dict[str, dict[str, int]] = {}
            for (task, status), n in sorted(self.requests.items()):
                by_task.setdefault(task, {})[str(status)] = n
            items = sum(k * v for k, v in self.batch_sizes.items())
            return {
                "uptime_s": round(time.time() - self.started, 3),
                "requests": by_task,
                "requests_total": sum(self.requests.values()),
                "in_flight": self.in_flight,
                "batches": self.batches,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "mean_batch_size": round(items / self.batches, 3) if self.batches else None,
                "model_busy_s": round(self.model_busy_s, 4),
                "model_thread_busy_s": round(self.model_thread_busy_s, 4),
                "times": {k: v.to_dict() for k, v in self.times.items()},
            }
