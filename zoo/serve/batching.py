"""Dynamic batching across clients.

Requests wait in per-key groups, the key being the task plus its generation options, so that only requests whose
results do not depend on each other's options share a batch. A group goes to the model when it holds
``max_batch_size`` requests or when its oldest request has waited ``batch_timeout_s``, and while the model is busy
requests keep accumulating, so batches grow with the load. Groups are served oldest first. One model thread runs
the batches one at a time.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from zoo.serve.metrics import Metrics


class ModelError(RuntimeError):
    """A batch failed inside the model; every request in it gets a 500 with this message."""


@dataclass
class _Job:
    item: dict[str, Any]
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Collects jobs into batches and runs ``runner(task, options, items) -> (outcomes, model_seconds)`` on one
    model thread. ``submit`` returns the job's :class:`zoo.serve.runner.Outcome`."""

    def __init__(self, runner: Callable[..., Any], metrics: Metrics, max_batch_size: int = 32,
                 batch_timeout_s: float = 0.01):
        if max_batch_size < 1 or batch_timeout_s < 0:
            raise ValueError(f"need max_batch_size >= 1 and batch_timeout >= 0, got {max_batch_size}, "
                             f"{batch_timeout_s}")
        self.runner = runner
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.timeout = batch_timeout_s
        self.groups: dict[Hashable, list[_Job]] = {}  # insertion order = age of the group's oldest job
        self.wakeup = asyncio.Event()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="zoo-model")
        self.task: asyncio.Task | None = None
        self.closing = False

    @staticmethod
    def key(task: str, options: dict[str, Any], exclusive: Hashable = None) -> Hashable:
        """The grouping key; ``exclusive`` (e.g. a request id) keeps a request out of any shared batch."""
        return task, tuple(sorted(options.items())), exclusive

    async def submit(self, key: Hashable, item: dict[str, Any]) -> Any:
        if self.closing:
            raise RuntimeError("the server is shutting down")
        job = _Job(item, asyncio.get_running_loop().create_future())
        self.groups.setdefault(key, []).append(job)
        self.wakeup.set()
        return await job.future

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop(), name="zoo-batcher")

    async def stop(self) -> None:
        """Finish every queued job, then stop the loop and the model thread."""
        self.closing = True
        while self.groups and self.task is not None and not self.task.done():
            self.wakeup.set()
            await asyncio.sleep(0.01)
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    def _next_batch(self) -> tuple[Hashable, list[_Job]] | float:
        """The batch to run now, or the seconds until the oldest group is due."""
        now = time.perf_counter()
        for key, jobs in self.groups.items():  # a full group goes first
            if len(jobs) >= self.max_batch_size:
                return key, self._take(key)
        key, jobs = next(iter(self.groups.items()))
        wait = jobs[0].arrived + self.timeout - now
        if wait <= 0 or self.closing:
            return key, self._take(key)
        return wait

    def _take(self, key: Hashable) -> list[_Job]:
        jobs = self.groups[key]
        batch, rest = jobs[: self.max_batch_size], jobs[self.max_batch_size:]
        if rest:
            self.groups[key] = rest
        else:
            del self.groups[key]
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.groups:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            nxt = self._next_batch()
            if isinstance(nxt, float):
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), nxt)
                except asyncio.TimeoutError:
                    pass
                continue
            (task, options, _), jobs = nxt
            jobs = [j for j in jobs if not j.future.done()]  # a client that went away
            if not jobs:
                continue
            start = time.perf_counter()
            for j in jobs:
                self.metrics.time("queue_ms", (start - j.arrived) * 1e3)
            try:
                outcomes, model_s = await loop.run_in_executor(self.executor, self.runner, task, dict(options),
                                                               [j.item for j in jobs])
            except Exception as e:  # noqa: BLE001 — a model failure fails this batch, not the server
                err = ModelError(f"the model failed on a batch of {len(jobs)} {task} request(s): "
                                 f"{type(e).__name__}: {e}")
                self.metrics.batch(len(jobs), time.perf_counter() - start, time.perf_counter() - start)
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(err)
                continue
            busy = time.perf_counter() - start
            self.metrics.batch(len(jobs), model_s, busy)
            for j, out in zip(jobs, outcomes):
                out.timings["queue_ms"] = (start - j.arrived) * 1e3
                out.timings["batch_size"] = len(jobs)
                if not j.future.done():
                    j.future.set_result(out)
