"""Load test of ``zoo-serve`` on loopback against a sequential loop of Python-API caption calls.

    python -m benchmarks.serve_load [--clients 64] [--seconds 60] [--baseline-seconds 20] [--modes split,inline]

1. Exports an untrained ``ofa-tiny`` (d256, 4+4 layers, ResNet-10t stem at 64 px) captioning model folder: the
   throughput of greedy decoding does not depend on the weights, but an untrained model never emits EOS early, so
   every caption runs the full ``max_new_tokens`` (32) steps: the worst case.
2. Baseline: ``bundle.caption(jpeg_bytes)`` one image at a time in this process (what ``zoo-predict`` does per file).
3. For each mode, starts ``zoo-serve`` (``split``: ``preprocess_workers=1``; ``inline``: ``preprocess_workers=0``,
   decoding in the model thread), runs ``--clients`` asyncio clients for ``--seconds`` (each sends a JPEG photo from
   scikit-image's samples, waits for the answer, sends the next), and reads ``/metrics`` before and after.
   ``litserve`` in ``--modes`` runs the same load against LitServe (:mod:`benchmarks.serve_litserve`).

Loopback only. Results: ``benchmarks/results/serve_load.json`` and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TEXTS = ["a small red circle above a blue square", "two green triangles", "what colour is the circle?",
         "a photo of a person", "a cat on a table", "a cup of coffee"] * 50


def export_model(folder: Path) -> Path:
    """An untrained ofa-tiny captioning model folder (once)."""
    if (folder / "config.json").is_file():
        return folder
    import torch

    import zoo
    from modalities.text import TextTokenizer
    from zoo.pretrained import Pretrained

    tok = TextTokenizer.train(TEXTS, vocab_size=1024)
    torch.manual_seed(0)
    model = zoo.create_model("ofa-tiny", vocab={"text_size": tok.vocab_size, "image_code_size": 512, "loc_bins": 100})
    return Pretrained(model.eval(), tok, tasks={"caption": {"max_new_tokens": 32, "num_beams": 1}}).save_pretrained(
        folder, card={"name": "ofa-tiny (untrained, for serving benchmarks)"})


def photos() -> list[bytes]:
    """scikit-image's colour sample photos as JPEG bytes (quality 90, native sizes 300–512 px)."""
    from PIL import Image
    from skimage import data

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "immunohistochemistry"):
        try:
            arr = getattr(data, name)()
        except Exception:  # noqa: BLE001 — a sample that needs a download
            continue
        buf = io.BytesIO()
        Image.fromarray(np.asarray(arr)[..., :3]).convert("RGB").save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 1), "p95_ms": round(float(np.percentile(a, 95)), 1),
            "p99_ms": round(float(np.percentile(a, 99)), 1), "mean_ms": round(float(a.mean()), 1)}


def baseline(folder: Path, images: list[bytes], seconds: float, threads: int) -> dict[str, Any]:
    """Sequential Python-API caption calls, one image at a time."""
    import torch

    import zoo

    torch.set_num_threads(threads)
    bundle = zoo.load(folder)
    for img in images:  # warm-up
        bundle.caption(img)
    lat, t0, i = [], time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        bundle.caption(images[i % len(images)])
        lat.append(time.perf_counter() - t)
        i += 1
    wall = time.perf_counter() - t0
    return {"requests": i, "seconds": round(wall, 2), "requests_per_s": round(i / wall, 2), **pct(lat)}


# --- a minimal HTTP/1.1 keep-alive client on asyncio streams (no extra dependency) ---------------
def multipart(img: bytes, boundary: str = "zooservebench") -> tuple[bytes, str]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"photo.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + img + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int, body: bytes,
                  ctype: str, path: str = "/caption") -> tuple[int, bytes]:
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(l.split(":", 1)[1]) for l in lines if l.lower().startswith("content-length:"))
    return status, await reader.readexactly(length)


async def load(port: int, images: list[bytes], clients: int, seconds: float, path: str = "/caption",
               encode: Any = multipart) -> dict[str, Any]:
    """``clients`` connections, each sending its next request when the last one is answered, for ``seconds``."""
    bodies = [encode(img) for img in images]
    lat: list[float] = []
    errors: dict[str, int] = {}
    stop = time.perf_counter() + seconds

    async def client(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        try:
            while time.perf_counter() < stop:
                body, ctype = bodies[i % len(bodies)]
                t = time.perf_counter()
                try:
                    status, payload = await request(reader, writer, port, body, ctype, path)
                except (OSError, asyncio.IncompleteReadError) as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                if status == 200 and json.loads(payload).get("caption") is not None:
                    lat.append(time.perf_counter() - t)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1
                i += clients
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*[client(k) for k in range(clients)])
    wall = time.perf_counter() - t0
    return {"requests": len(lat), "errors": errors, "seconds": round(wall, 2),
            "requests_per_s": round(len(lat) / wall, 2), **pct(lat)}


def get_json(port: int, path: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.loads(r.read())


def serve_mode(folder: Path, images: list[bytes], mode: str, args: argparse.Namespace) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = 0 if mode == "inline" else args.workers
    cmd = [sys.executable, "-m", "zoo.serve", f"pretrained={folder}", f"port={port}", f"threads={args.threads}",
           f"max_batch_size={args.max_batch_size}", f"batch_timeout_ms={args.batch_timeout_ms}",
           f"preprocess_workers={workers}", "log_level=warning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env)
    try:
        for _ in range(600):
            try:
                get_json(port, "/health")
                break
            except OSError:
                time.sleep(0.2)
        asyncio.run(load(port, images, args.clients, 5.0))  # warm-up
        m0, t0 = get_json(port, "/metrics"), time.perf_counter()
        res = asyncio.run(load(port, images, args.clients, args.seconds))
        m1, wall = get_json(port, "/metrics"), time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    batches = m1["batches"] - m0["batches"]
    items = sum(int(k) * v for k, v in m1["batch_sizes"].items()) - sum(int(k) * v for k, v in m0["batch_sizes"].items())
    res.update(mode=mode, preprocess_workers=workers, batches=batches,
               mean_batch_size=round(items / max(batches, 1), 2),
               model_busy_fraction=round((m1["model_busy_s"] - m0["model_busy_s"]) / wall, 3),
               model_thread_busy_fraction=round((m1["model_thread_busy_s"] - m0["model_thread_busy_s"]) / wall, 3),
               server_queue_ms_p50=m1["times"]["queue_ms"].get("p50"),
               server_model_ms_p50=m1["times"]["model_ms"].get("p50"),
               server_preprocess_ms_p50=m1["times"]["preprocess_ms"].get("p50"))
    return res


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
        flags = next((l for l in out.splitlines() if l.startswith("Flags")), "")
        return f"{name} ({os.cpu_count()} cpus, {'avx512' if 'avx512f' in flags else 'no avx512'}" \
               f"{', avx512_bf16' if 'avx512_bf16' in flags else ''})"
    except Exception:  # noqa: BLE001
        return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--baseline-seconds", type=float, default=20.0)
    p.add_argument("--modes", default="split,inline")
    p.add_argument("--workers", type=int, default=1, help="preprocess_workers in split mode")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-timeout-ms", type=float, default=10.0)
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/zoo-serve-bench/ofa-tiny-untrained"))
    p.add_argument("--out", type=Path, default=RESULTS / "serve_load.json")
    args = p.parse_args()
    folder = export_model(args.model_dir)
    images = photos()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    base = baseline(folder, images, args.baseline_seconds, args.threads)
    print("baseline", json.dumps(base), flush=True)
    runs = []
    for mode in args.modes.split(","):
        if mode == "litserve":  # the same load against LitServe (needs pip install litserve)
            from benchmarks.serve_litserve import litserve_mode

            r = litserve_mode(folder, images, args)
        else:
            r = serve_mode(folder, images, mode, args)
        r["speedup_vs_sequential"] = round(r["requests_per_s"] / base["requests_per_s"], 2)
        print(mode, json.dumps(r), flush=True)
        runs.append(r)
    result = {"started": started, "cpu": cpu_name(), "clients": args.clients, "seconds": args.seconds,
              "max_batch_size": args.max_batch_size, "batch_timeout_ms": args.batch_timeout_ms,
              "threads": args.threads, "images": len(images), "baseline": base, "serve": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(args.out.read_text()) if args.out.is_file() else []
    args.out.write_text(json.dumps([*history, result], indent=1) + "\n")
    print(f"\n{started}, {result['cpu']}, {args.clients} clients x {args.seconds:g} s, ofa-tiny (untrained)")
    print("| run | req/s | p50 ms | p95 ms | p99 ms | errors | mean batch | model busy | vs sequential |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| sequential Python API | {base['requests_per_s']} | {base['p50_ms']} | {base['p95_ms']} | "
          f"{base['p99_ms']} | 0 | 1 | | 1.00× |")
    for r in runs:
        name = "LitServe (decode in the model loop)" if r["mode"] == "litserve" else f"zoo-serve {r['mode']}"
        print(f"| {name} | {r['requests_per_s']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
              f"{sum(r['errors'].values())} | {r.get('mean_batch_size', '')} | {r['model_busy_fraction']:.0%} | "
              f"{r['speedup_vs_sequential']:.2f}× |")


if __name__ == "__main__":
    main()
