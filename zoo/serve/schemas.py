"""Request / response schemas (they make the OpenAPI docs at ``/docs``) and the server's settings."""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, Field

#: every task the server knows, in page order
TASKS = ("caption", "vqa", "text_to_image", "sensor_to_text")


@dataclass
class ServeSettings:
    """Server settings (``zoo-serve`` arguments)."""

    max_batch_size: int = 32
    batch_timeout_ms: float = 10.0
    preprocess_workers: int = 1  # 0: preprocess inline in the model thread
    max_upload_mb: float = 32.0
    max_image_side: int = 8192
    max_image_pixels: int = 40_000_000
    max_question_chars: int = 300
    max_num_beams: int = 8
    shutdown_timeout_s: float = 60.0


class Timings(BaseModel):
    """Where a request's time went (milliseconds); ``batch_size`` is the batch it ran in."""

    queue_ms: float | None = None
    preprocess_ms: float | None = None
    model_ms: float | None = None
    render_ms: float | None = None
    total_ms: float | None = None
    batch_size: int | None = None


class CaptionResponse(BaseModel):
    caption: str
    timings: Timings


class VQAResponse(BaseModel):
    question: str
    answer: str
    timings: Timings


class SensorResponse(BaseModel):
    description: str
    timings: Timings


class TextToImageRequest(BaseModel):
    """A caption to draw; ``seed`` and ``guidance_scale`` default to the model's saved settings."""

    text: str = Field(min_length=1, max_length=300, description="the caption to draw")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    guidance_scale: float | None = Field(None, ge=0.0, le=20.0)


class ErrorResponse(BaseModel):
    error: str = Field(description="what is wrong with the request, or what failed")


class Health(BaseModel):
    status: str
    model: str
    tasks: list[str]
    preprocess: str
    max_batch_size: int
    batch_timeout_ms: float
    limits: dict[str, float]
