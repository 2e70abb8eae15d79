"""The same load test against LitServe (PyPI ``litserve``), to measure whether its loop keeps the model busy.

    python -m benchmarks.serve_litserve [--clients 64] [--seconds 60]

LitServe's inference worker runs ``decode_request`` (here: base64 → JPEG decode → resize → normalise, the same
:class:`modalities.image.ImagePreprocessor` as zoo-serve) in the loop that runs the batched ``predict``, so the model
waits while requests are decoded. ``predict`` adds up its own seconds; the model-busy fraction is those seconds over
the measured wall time, as for ``benchmarks.serve_load``. Needs ``pip install litserve`` (not a dependency of mmzoo).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.serve_load import ROOT, export_model, load, photos


import litserve as ls  # noqa: E402 — this benchmark needs it


class CaptionAPI(ls.LitAPI):
    """Captioning with zoo's preprocessing in ``decode_request`` (LitServe runs it in the inference loop)."""

    def setup(self, device):
        import torch

        import zoo

        torch.set_num_threads(self.threads)
        self.bundle = zoo.load(self.model_dir)
        self.pre = self.bundle.preprocessor("image")
        self.busy = 0.0

    def decode_request(self, request):
        return self.pre(base64.b64decode(request["image"]))

    def batch(self, inputs):
        import torch

        return torch.stack(inputs)

    def predict(self, x):
        t = time.perf_counter()
        out = self.bundle.caption(x, batch_size=len(x))
        self.busy += time.perf_counter() - t
        Path(self.busy_file).write_text(json.dumps({"busy_s": self.busy}))
        return out

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return {"caption": output}


def serve(args: argparse.Namespace) -> None:
    api = CaptionAPI(max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_ms / 1e3,
                     api_path="/caption")
    api.threads, api.model_dir, api.busy_file = args.threads, str(args.model_dir), args.busy_file
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning",
               generate_client_file=False)


def litserve_mode(folder: Path, images: list[bytes], args: argparse.Namespace) -> dict:
    """Start the LitServe server, warm it up, run the clients for ``args.seconds``; throughput and busy fraction."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    busy = Path(f"/tmp/litserve-busy-{port}.json")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.serve_litserve", "--serve", f"--port={port}",
                             f"--busy-file={busy}", f"--model-dir={folder}", f"--threads={args.threads}",
                             f"--max-batch-size={args.max_batch_size}", f"--batch-timeout-ms={args.batch_timeout_ms}"],
                            env=env, start_new_session=True)
    encode = lambda img: (json.dumps({"image": base64.b64encode(img).decode()}).encode(), "application/json")  # noqa
    try:
        for _ in range(900):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        asyncio.run(load(port, images, args.clients, 5.0, "/caption", encode))  # warm-up
        b0, t0 = json.loads(busy.read_text())["busy_s"], time.perf_counter()
        res = asyncio.run(load(port, images, args.clients, args.seconds, "/caption", encode))
        b1, wall = json.loads(busy.read_text())["busy_s"], time.perf_counter() - t0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    res.update(mode="litserve", model_busy_fraction=round((b1 - b0) / wall, 3))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-timeout-ms", type=float, default=10.0)
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/zoo-serve-bench/ofa-tiny-untrained"))
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--busy-file", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args)
        return
    res = litserve_mode(export_model(args.model_dir), photos(), args)
    print("litserve", json.dumps(res))


if __name__ == "__main__":
    main()
