"""CPU-side work of the server, run in worker processes (or inline in the model thread for comparison).

Everything here is a plain function of picklable inputs that returns numpy arrays or bytes, so it runs in a
``ProcessPoolExecutor``: :func:`init_worker` builds the preprocessors once per process from a :class:`PrepSpec`,
:func:`prepare` turns one request's payload into ready inputs, :func:`render` turns a model output into response
bytes. Bad input raises :class:`RequestError` with an HTTP status and a message naming the problem.
"""
from __future__ import annotations

import io
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SENSOR_SUFFIXES = (".csv", ".tsv", ".npz", ".npy")


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx) and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def __reduce__(self):  # survives the trip back from a worker process
        return RequestError, (self.status, self.message)


@dataclass
class PrepSpec:
    """What a worker needs to preprocess requests (no weights): modality configs, the tokenizer and limits."""

    tokenizer_json: str
    image: dict[str, Any] | None = None
    sensor: dict[str, Any] | None = None
    max_text_tokens: int = 64
    prompts: dict[str, str] = field(default_factory=dict)  # task -> fixed instruction (caption, sensor_to_text)
    max_image_side: int = 8192
    max_image_pixels: int = 40_000_000


class Preprocessor:
    """The preprocessors built from a :class:`PrepSpec` (one per worker process)."""

    def __init__(self, spec: PrepSpec):
        from modalities.text import TextTokenizer

        self.spec = spec
        self.tokenizer = TextTokenizer.from_str(spec.tokenizer_json)
        self.image = self.sensor = None
        if spec.image is not None:
            from modalities.image import ImageConfig, ImagePreprocessor

            self.image = ImagePreprocessor(ImageConfig(**spec.image))
        if spec.sensor is not None:
            from modalities.sensor import SensorConfig, SensorTokenizer

            self.sensor = SensorTokenizer(SensorConfig(**spec.sensor))
        self.prompt_ids = {t: self.tokenizer.encode(p) for t, p in spec.prompts.items()}

    # --- inputs -------------------------------------------------------------------------------
    def pixels(self, data: bytes, name: str = "image") -> np.ndarray:
        """Image bytes → normalised ``[3, S, S]`` float32; the size is checked from the header before decoding."""
        from PIL import Image, UnidentifiedImageError

        if not data:
            raise RequestError(400, f"{name}: empty upload (0 bytes)")
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise RequestError(413, f"{name}: image too large ({e})") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise RequestError(400, f"{name}: not an image (cannot identify the format of {len(data)} bytes; "
                                    "send PNG, JPEG, WebP, BMP, GIF or TIFF)") from None
        w, h = img.size
        if max(w, h) > self.spec.max_image_side or w * h > self.spec.max_image_pixels:
            raise RequestError(413, f"{name}: {w}x{h} pixels is over the server's limit of "
                                    f"{self.spec.max_image_side} px per side and {self.spec.max_image_pixels:,} "
                                    "pixels; resize it before sending")
        try:
            img.load()
        except Exception as e:  # noqa: BLE001 — truncated / corrupt data raises OSError, SyntaxError, ...
            raise RequestError(400, f"{name}: cannot decode the {img.format or 'image'} data ({e}); the file is "
                                    "truncated or corrupt") from None
        return self.image(img).numpy()

    def question_ids(self, question: str) -> list[int]:
        q = question.strip()
        if not q:
            raise RequestError(422, "question: empty question")
        ids = self.tokenizer.encode(q)
        if len(ids) > self.spec.max_text_tokens:
            raise RequestError(422, f"question: {len(ids)} tokens is over the model's limit of "
                                    f"{self.spec.max_text_tokens} tokens; shorten it")
        return ids

    def recording(self, data: bytes, filename: str, options: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """An uploaded ``.csv``/``.tsv``/``.npz``/``.npy`` recording → normalised ``(values, valid)`` ``[C, T]``."""
        from modalities.sensor_io import read_recording

        suffix = Path(filename).suffix.lower()
        if suffix not in SENSOR_SUFFIXES:
            raise RequestError(415, f"file: {filename!r} is not a sensor recording; use {', '.join(SENSOR_SUFFIXES)}")
        if not data:
            raise RequestError(400, f"file: {filename!r} is empty (0 bytes)")
        fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="zoo-serve-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                rec = read_recording(tmp, self.sensor.cfg.channels, options.get("rate"),
                                     options.get("timestamp_column", "timestamp"), options.get("time_unit", "s"))
                values, valid = self.sensor(rec)
            except (ValueError, OSError, KeyError, EOFError) as e:  # SensorDataError is a ValueError
                raise RequestError(422, f"file: {str(e).replace(tmp, filename)}") from None
        finally:
            os.unlink(tmp)
        return values.numpy(), valid.numpy()

    # --- one request ---------------------------------------------------------------------------
    def prepare(self, task: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Ready inputs for the model from one request's payload."""
        if task == "caption":
            return {"pixels": self.pixels(payload["image"]), "text_ids": self.prompt_ids["caption"]}
        if task == "vqa":
            ids = self.question_ids(payload["question"])
            return {"pixels": self.pixels(payload["image"]), "text_ids": ids}
        if task == "sensor_to_text":
            values, valid = self.recording(payload["file"], payload["filename"], payload.get("options") or {})
            return {"values": values, "valid": valid, "text_ids": self.prompt_ids["sensor_to_text"]}
        if task == "text_to_image":
            return {"text": payload["text"]}
        raise RequestError(404, f"unknown task {task!r}")


def render(task: str, output: Any) -> Any:
    """A model output → what the response carries (text as is; generated images as PNG bytes)."""
    if task != "text_to_image":
        return output
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(output, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# --- process-pool entry points ------------------------------------------------------------------
_WORKER: Preprocessor | None = None


def init_worker(spec: PrepSpec) -> None:
    """Pool initializer: one thread for torch (the cores belong to the model), build the preprocessors."""
    global _WORKER
    import torch

    torch.set_num_threads(1)
    _WORKER = Preprocessor(spec)


def worker_ready() -> int:
    """A no-op the server runs once per worker at start-up, so that the first requests find warm workers."""
    time.sleep(0.05)
    return os.getpid()


def worker_prepare(task: str, payload: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """:meth:`Preprocessor.prepare` in a worker; returns the inputs and the seconds it took."""
    t = time.perf_counter()
    out = _WORKER.prepare(task, payload)
    return out, time.perf_counter() - t


def worker_render(task: str, output: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = render(task, output)
    return out, time.perf_counter() - t
