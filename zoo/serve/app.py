"""The FastAPI application: one endpoint per task of the loaded model, ``/health``, ``/metrics``, the web page.

A request's CPU work (decoding, resizing, tokenizing, PNG rendering) runs in a process pool; the model thread only
sees ready arrays, batched by :class:`zoo.serve.batching.DynamicBatcher`. With ``preprocess_workers=0`` the model
thread does that work itself before each batch (the comparison the docs measure).

Every error is JSON ``{"error": "..."}``: 4xx for a bad request (413 for an image or upload over the limits), 500
when the model fails on a batch; the server keeps serving either way.
"""

import asyncio
import json
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from zoo.serve import preprocess as prep
from zoo.serve.batching import DynamicBatcher, ModelError
from zoo.serve.metrics import Metrics
from zoo.serve.preprocess import PrepSpec, Preprocessor, RequestError
from zoo.serve.runner import ModelRunner
from zoo.serve.schemas import (TASKS, CaptionResponse, ErrorResponse, Health, SensorResponse, ServeSettings,
                               TextToImageRequest, Timings, VQAResponse)

ERRORS = {code: {"model": ErrorResponse} for code in (404, 413, 415, 422, 500)}
ERRORS[400] = {"model": ErrorResponse}


def available_tasks(bundle: Any) -> list[str]:
    """The tasks this model can serve: those its modalities support, narrowed to its saved task list if any."""
    mods = bundle.model.cfg.modalities
    can = {"caption": "image" in mods, "vqa": "image" in mods, "sensor_to_text": "sensor" in mods,
           "text_to_image": bundle.image_tokenizer is not None}
    saved = set(bundle.tasks or {})
    return [t for t in TASKS if can[t] and (not saved or t in saved)]


def prep_spec(bundle: Any, settings: ServeSettings) -> PrepSpec:
    """What the preprocessing workers need from the bundle (configs, tokenizer, prompts; no weights)."""
    from zoo.pretrained import full_modality_config
    from zoo.task_specs import task_spec

    mods = bundle.model.cfg.modalities
    return PrepSpec(tokenizer_json=bundle.tokenizer.to_str(),
                    image=full_modality_config("image", dict(mods["image"])) if "image" in mods else None,
                    sensor=full_modality_config("sensor", dict(mods["sensor"])) if "sensor" in mods else None,
                    max_text_tokens=bundle.model.cfg.max_positions,
                    prompts={t: task_spec(t).instruction() for t in ("caption", "sensor_to_text")},
                    max_image_side=settings.max_image_side, max_image_pixels=settings.max_image_pixels)


class Server:
    """The state behind the app: the model runner, the batcher, the worker pool and the metrics."""

    def __init__(self, bundle: Any, tasks: list[str], settings: ServeSettings):
        self.bundle, self.tasks, self.settings = bundle, tasks, settings
        self.spec = prep_spec(bundle, settings)
        self.metrics = Metrics()
        self.pool: ProcessPoolExecutor | None = None
        inline = Preprocessor(self.spec) if settings.preprocess_workers == 0 else None
        self.runner = ModelRunner(bundle, inline)
        self.batcher: DynamicBatcher | None = None

    def _new_pool(self) -> ProcessPoolExecutor:
        import multiprocessing as mp

        # spawn: the workers must not inherit the model thread's OpenMP state (fork after torch threads can hang)
        return ProcessPoolExecutor(self.settings.preprocess_workers, mp_context=mp.get_context("spawn"),
                                   initializer=prep.init_worker, initargs=(self.spec,))

    async def start(self) -> None:
        self.batcher = DynamicBatcher(self.runner, self.metrics, self.settings.max_batch_size,
                                      self.settings.batch_timeout_ms / 1e3)
        self.batcher.start()
        if self.settings.preprocess_workers > 0:
            self.pool = self._new_pool()
            loop = asyncio.get_running_loop()
            await asyncio.gather(*[loop.run_in_executor(self.pool, prep.worker_ready)
                                   for _ in range(self.settings.preprocess_workers)])

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    async def _in_pool(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.pool, fn, *args)
        except BrokenProcessPool:  # a worker died (e.g. killed for memory): replace the pool, fail this request
            old, self.pool = self.pool, self._new_pool()
            old.shutdown(wait=False, cancel_futures=True)
            raise ModelError("a preprocessing worker process died while handling this request; "
                             "the pool was restarted") from None

    async def serve(self, task: str, payload: dict[str, Any], options: dict[str, Any],
                    exclusive: bool = False) -> tuple[Any, dict[str, Any]]:
        """Preprocess (pool) → batch (model thread) → render (pool); returns the value and its timings."""
        t0 = time.perf_counter()
        timings: dict[str, Any] = {}
        if self.pool is not None:
            ready, prep_s = await self._in_pool(prep.worker_prepare, task, payload)
            timings["preprocess_ms"] = prep_s * 1e3
            item = {"ready": ready}
        else:
            item = {"payload": payload}
        key = DynamicBatcher.key(task, options, uuid.uuid4().hex if exclusive else None)
        out = await self.batcher.submit(key, item)
        timings.update(out.timings)
        if out.error is not None:
            raise out.error
        value = out.value
        if self.pool is not None and task == "text_to_image":
            value, render_s = await self._in_pool(prep.worker_render, task, value)
            timings["render_ms"] = render_s * 1e3
        timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        for k in ("preprocess_ms", "render_ms"):
            if k in timings:
                self.metrics.time(k, timings[k])
        return value, {k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
        if e.get("type") == "missing":
            parts.append(f"missing field {loc!r}")
        else:
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "; ".join(parts) or "invalid request"


def create_app(bundle: Any, settings: ServeSettings | None = None, tasks: list[str] | None = None) -> FastAPI:
    """The app serving ``bundle`` (a :class:`zoo.pretrained.Pretrained`) for ``tasks`` (default: all it has)."""
    settings = settings or ServeSettings()
    have = available_tasks(bundle)
    if tasks:
        unknown = [t for t in tasks if t not in have]
        if unknown:
            raise ValueError(f"this model cannot serve {unknown}; it has {have}")
    tasks = list(tasks or have)
    if not tasks:
        raise ValueError(f"this model has no servable task (modalities {['text', *bundle.model.cfg.modalities]})")
    server = Server(bundle, tasks, settings)
    max_tokens = bundle.model.cfg.max_positions
    max_body = int(settings.max_upload_mb * 2**20)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.start()
        yield
        await server.stop()

    app = FastAPI(title="mmzoo zoo-serve", version="0.1.0", lifespan=lifespan,
                  description=f"Model `{bundle.source}`; tasks: {', '.join(tasks)}. Errors are JSON "
                              "`{\"error\": ...}`; every result carries its timings.")
    app.state.server = server

    @app.middleware("http")
    async def _count(request: Request, call_next):
        t0 = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            response = _error(413, f"request body of {int(length):,} bytes is over the server's limit of "
                                   f"{max_body:,} bytes (max_upload_mb={settings.max_upload_mb:g})")
        else:
            server.metrics.in_flight += 1
            try:
                response = await call_next(request)
            finally:
                server.metrics.in_flight -= 1
        if request.method == "POST":  # counted per task; any other path as "other" (bounded metrics)
            path = request.url.path.strip("/")
            server.metrics.request(path if path in tasks else "other", response.status_code,
                                   (time.perf_counter() - t0) * 1e3)
        return response

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return _error(exc.status, exc.message)

    @app.exception_handler(ModelError)
    async def _model_error(request: Request, exc: ModelError):
        return _error(500, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error(422, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    def gen_options(max_new_tokens: int | None, num_beams: int | None) -> dict[str, Any]:
        if max_new_tokens is not None and not 1 <= max_new_tokens <= max_tokens:
            raise RequestError(422, f"max_new_tokens: {max_new_tokens} is outside 1..{max_tokens} (the model's "
                                    "max_positions)")
        if num_beams is not None and not 1 <= num_beams <= settings.max_num_beams:
            raise RequestError(422, f"num_beams: {num_beams} is outside 1..{settings.max_num_beams}")
        # the batcher groups on these: requests with different options never share a batch
        return {k: v for k, v in {"max_new_tokens": max_new_tokens, "num_beams": num_beams}.items() if v is not None}

    async def read_upload(f: UploadFile, field: str) -> bytes:
        data = await f.read()
        if len(data) > max_body:
            raise RequestError(413, f"{field}: {len(data):,} bytes is over the limit of {max_body:,} bytes")
        return data

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("zoo.serve").joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/health", response_model=Health, summary="liveness, the model and its tasks")
    async def health() -> Health:
        return Health(status="ok", model=str(bundle.source), tasks=tasks,
                      preprocess=f"{settings.preprocess_workers} worker processes" if settings.preprocess_workers
                      else "inline (model thread)", max_batch_size=settings.max_batch_size,
                      batch_timeout_ms=settings.batch_timeout_ms,
                      limits={"max_upload_mb": settings.max_upload_mb, "max_image_side": settings.max_image_side,
                              "max_image_pixels": settings.max_image_pixels,
                              "max_question_chars": settings.max_question_chars, "max_new_tokens": max_tokens})

    @app.get("/metrics", summary="request counts, batch sizes, queue / preprocess / model / total times")
    async def metrics() -> dict[str, Any]:
        return server.metrics.snapshot()

    if "caption" in tasks:
        @app.post("/caption", response_model=CaptionResponse, responses=ERRORS, summary="caption an image")
        async def caption(image: Annotated[UploadFile, File(description="an image file")],
                          max_new_tokens: Annotated[int | None, Form()] = None,
                          num_beams: Annotated[int | None, Form()] = None) -> CaptionResponse:
            opts = gen_options(max_new_tokens, num_beams)
            text, t = await server.serve("caption", {"image": await read_upload(image, "image")}, opts)
            return CaptionResponse(caption=text, timings=Timings(**t))

    if "vqa" in tasks:
        @app.post("/vqa", response_model=VQAResponse, responses=ERRORS, summary="answer a question about an image")
        async def vqa(image: Annotated[UploadFile, File(description="an image file")],
                      question: Annotated[str, Form(max_length=settings.max_question_chars)],
                      max_new_tokens: Annotated[int | None, Form()] = None,
                      num_beams: Annotated[int | None, Form()] = None) -> VQAResponse:
            opts = gen_options(max_new_tokens, num_beams)
            payload = {"image": await read_upload(image, "image"), "question": question}
            text, t = await server.serve("vqa", payload, opts)
            return VQAResponse(question=question, answer=text, timings=Timings(**t))

    if "sensor_to_text" in tasks:
        @app.post("/sensor_to_text", response_model=SensorResponse, responses=ERRORS,
                  summary="describe a sensor recording (.csv, .tsv, .npz or .npy)")
        async def sensor_to_text(file: Annotated[UploadFile, File(description="a .csv/.tsv/.npz/.npy recording")],
                                 rate: Annotated[float | None, Form(gt=0)] = None,
                                 timestamp_column: Annotated[str | None, Form()] = "timestamp",
                                 time_unit: Annotated[str, Form(pattern="^(s|ms|us|ns)$")] = "s",
                                 max_new_tokens: Annotated[int | None, Form()] = None,
                                 num_beams: Annotated[int | None, Form()] = None) -> SensorResponse:
            opts = gen_options(max_new_tokens, num_beams)
            ts = None if (timestamp_column or "").lower() in ("", "none", "null") else timestamp_column
            payload = {"file": await read_upload(file, "file"), "filename": file.filename or "upload.csv",
                       "options": {"rate": rate, "timestamp_column": ts, "time_unit": time_unit}}
            text, t = await server.serve("sensor_to_text", payload, opts)
            return SensorResponse(description=text, timings=Timings(**t))

    if "text_to_image" in tasks:
        @app.post("/text_to_image", responses={200: {"content": {"image/png": {}},
                                                     "description": "the PNG; timings in the X-Timings header"},
                                               **ERRORS}, response_class=Response, summary="draw a caption")
        async def text_to_image(req: TextToImageRequest) -> Response:
            opts = {k: v for k, v in {"seed": req.seed, "guidance_scale": req.guidance_scale}.items()
                    if v is not None}
            # sampling draws one generator over a batch, so a result depends on its batch: run each alone
            png, t = await server.serve("text_to_image", {"text": req.text}, opts, exclusive=True)
            return Response(png, media_type="image/png", headers={"X-Timings": json.dumps(t)})

    @app.post("/{task}", include_in_schema=False)
    async def unknown(task: str) -> JSONResponse:
        what = "this model has no" if task in TASKS else "unknown task"
        return _error(404, f"{what} {task!r}; this server serves {', '.join(tasks)} (POST /<task>)")

    return app
