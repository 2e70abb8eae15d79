"""``zoo-serve``: serve a pretrained model over HTTP (FastAPI + uvicorn), with a web page at ``/``.

    zoo-serve pretrained=<arch.tag|folder|hf-hub:org/name> [tasks=caption,vqa] [host=127.0.0.1] [port=8000]
              [device=cpu] [precision=fp32|bf16] [max_batch_size=32] [batch_timeout_ms=10]
              [preprocess_workers=1] [threads=<cores>]

Endpoints: POST /caption, /vqa, /sensor_to_text (multipart uploads), /text_to_image (JSON → PNG); GET /health,
/metrics, /docs (OpenAPI), / (the web page). ``preprocess_workers=0`` decodes and tokenizes in the model thread.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Sequence

USAGE = __doc__.strip() + """

more: [revision=] [allow_pickle=false] [max_upload_mb=32] [max_image_side=8192] [max_image_pixels=40000000]
      [max_question_chars=300] [max_num_beams=8] [shutdown_timeout_s=60] [log_level=info]"""


def main(argv: Sequence[str] | None = None) -> None:
    from zoo.cli import parse_kv
    from zoo.serve.schemas import ServeSettings

    d = ServeSettings()
    args = parse_kv(sys.argv[1:] if argv is None else list(argv),
                    {"pretrained": ..., "tasks": None, "host": "127.0.0.1", "port": 8000, "device": None,
                     "precision": "fp32", "revision": None, "allow_pickle": False, "threads": 0,
                     "max_batch_size": d.max_batch_size, "batch_timeout_ms": d.batch_timeout_ms,
                     "preprocess_workers": d.preprocess_workers, "max_upload_mb": d.max_upload_mb,
                     "max_image_side": d.max_image_side, "max_image_pixels": d.max_image_pixels,
                     "max_question_chars": d.max_question_chars, "max_num_beams": d.max_num_beams,
                     "shutdown_timeout_s": d.shutdown_timeout_s, "log_level": "info"}, USAGE)
    import torch
    import uvicorn

    from zoo.hub import load
    from zoo.serve.app import create_app

    settings = ServeSettings(**{k: args[k] for k in ServeSettings.__dataclass_fields__})
    if args["precision"] not in ("fp32", "bf16"):
        raise SystemExit(f"error: precision must be fp32 or bf16, got {args['precision']!r}")
    torch.set_num_threads(args["threads"] or os.cpu_count() or 1)
    try:
        bundle = load(args["pretrained"], revision=args["revision"], allow_pickle=args["allow_pickle"],
                      device=args["device"])
        bundle.precision = args["precision"]
        tasks = [t.strip() for t in args["tasks"].split(",") if t.strip()] if args["tasks"] else None
        app = create_app(bundle, settings, tasks)
    except (OSError, ValueError, NotImplementedError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"[zoo-serve] {bundle!r} on http://{args['host']}:{args['port']} (page /, docs /docs)", file=sys.stderr)
    # uvicorn finishes in-flight requests on SIGTERM/SIGINT, then re-raises the signal to the handler it found:
    # make that a clean exit
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    uvicorn.run(app, host=args["host"], port=args["port"], log_level=args["log_level"],
                timeout_graceful_shutdown=int(settings.shutdown_timeout_s))


def _exit_cleanly(signum: int, frame: object) -> None:
    print(f"[zoo-serve] stopped ({signal.Signals(signum).name}) after finishing in-flight requests", file=sys.stderr)
    raise SystemExit(0)


if __name__ == "__main__":
    main()
