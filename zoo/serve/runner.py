"""The model side of the server: one batch of ready inputs → batched generate → per-request outputs.

:class:`ModelRunner` runs in the single model thread. With split preprocessing its items are ready arrays from the
worker pool; with ``inline`` preprocessing (``preprocess_workers=0``) it decodes and renders in the model thread
itself, the way a serving loop that decodes requests next to ``predict`` does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from zoo.serve.preprocess import Preprocessor, RequestError, render


@dataclass
class Outcome:
    """One request's result (``value``) or error, with its preprocessing / model / render seconds."""

    value: Any = None
    error: BaseException | None = None
    timings: dict[str, float] = field(default_factory=dict)


class ModelRunner:
    """Runs batches for a :class:`zoo.pretrained.Pretrained`; ``inline`` is a :class:`Preprocessor` when the
    model thread preprocesses itself."""

    def __init__(self, bundle: Any, inline: Preprocessor | None = None):
        self.bundle = bundle
        self.inline = inline

    def __call__(self, task: str, options: dict[str, Any], items: list[dict[str, Any]]) -> tuple[list[Outcome], float]:
        """Outcomes for ``items`` (all of one task and one set of options) and the seconds spent in the model."""
        outs = [Outcome() for _ in items]
        ready: list[tuple[int, dict[str, Any]]] = []
        for i, item in enumerate(items):
            if "ready" in item:
                ready.append((i, item["ready"]))
                continue
            t = time.perf_counter()
            try:
                ready.append((i, self.inline.prepare(task, item["payload"])))
            except RequestError as e:
                outs[i].error = e
            outs[i].timings["preprocess_ms"] = (time.perf_counter() - t) * 1e3
        if not ready:
            return outs, 0.0
        t = time.perf_counter()
        results = self.run(task, options, [r for _, r in ready])
        model_s = time.perf_counter() - t
        for (i, _), value in zip(ready, results):
            outs[i].timings["model_ms"] = model_s * 1e3
            if self.inline is not None:
                t = time.perf_counter()
                value = render(task, value)
                outs[i].timings["render_ms"] = (time.perf_counter() - t) * 1e3
            outs[i].value = value
        return outs, model_s

    @torch.no_grad()
    def run(self, task: str, options: dict[str, Any], ready: list[dict[str, Any]]) -> list[Any]:
        """The batched model call: texts for text tasks, ``[H, W, 3]`` uint8 arrays for text-to-image."""
        b = self.bundle
        ids = [r.get("text_ids") for r in ready]
        if task in ("caption", "vqa"):
            pixels = torch.from_numpy(np.stack([r["pixels"] for r in ready]))
            return b.generate_text_from(task, ids, pixels=pixels, **options)
        if task == "sensor_to_text":
            from modalities.sensor import pad_sensor_batch

            sensor = pad_sensor_batch([(torch.from_numpy(r["values"]), torch.from_numpy(r["valid"])) for r in ready])
            return b.generate_text_from(task, ids, sensor=sensor, **options)
        if task == "text_to_image":
            pixels = b.generate_image([r["text"] for r in ready], output_type="pt", batch_size=len(ready), **options)
            arr = pixels.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            return list(arr)
        raise ValueError(f"unknown task {task!r}")
