"""florence2: Florence-2-base-sized model, mmzoo vs transformers' ``Florence2ForConditionalGeneration``.

The same random weights on both sides (transformers saves them, mmzoo loads the folder through its key table),
fp32 on the CPU, 768-px images, latency at batch 1 and throughput at batch 8 for ``<CAPTION>`` (beam 3, Florence-2's
default, and greedy) and ``<OD>`` (greedy). Every timed call asserts identical tokens. With random weights the
model never picks EOS on its own, so exactly ``--new`` tokens are generated on both sides (EOS suppressed until
then: ``min_new_tokens = max_new_tokens``): both do the same decoding work, and the workload is one image-tower
pass, one encoder pass over the 577 image + prompt tokens, and ``--new`` decoder steps per row.

    python -m benchmarks.florence2 [--threads N] [--reps 3] [--reps-large 1] [--new 20]
                                   [--batches 1 8] [--cases caption:3 caption:1 od:1]

Times: wall-clock (the table's ratio) and the process CPU time of each call (its ratio too: on a shared machine
it is not inflated by time spent descheduled; with one thread it is the compute time).
Memory: the peak RSS of the process (both models loaded); per contender the peak RSS growth during its timed
calls above the RSS before each call (its working memory: activations, KV cache), sampled every 2 ms; and what
mmzoo's first call keeps (its packed oneDNN weight copies, reused by every later call).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.common import measure_alternating, save, summarize, table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

BASE = dict(image_size=768, depths=(1, 1, 9, 1), dims=(128, 256, 512, 1024), heads=(4, 8, 16, 32), window=12,
            d_model=768, layers=6, n_heads=12, ffn=3072, vocab_rows=51328, max_positions=1024)
PROMPTS = {"caption": "<CAPTION>", "od": "<OD>", "detailed_caption": "<DETAILED_CAPTION>"}
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """Peak growth of the process RSS during the ``with`` block, above its RSS at entry (sampled every 2 ms)."""

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def cpu_info() -> dict[str, Any]:
    """The CPU model name and its AVX-512 flags (from /proc/cpuinfo), for the record."""
    info: dict[str, Any] = {"model": "?", "avx512": []}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and info["model"] == "?":
                info["model"] = value.strip()
            elif key.strip() == "flags" and not info["avx512"]:
                info["avx512"] = sorted(f for f in value.split() if f.startswith("avx512"))
    except OSError:
        pass
    return info


def matmul_peak_gflops(size: int = 2048, reps: int = 8) -> float:
    """This machine's fp32 matmul throughput at the current torch thread count: the best of MKL's sgemm and
    oneDNN's GEMM on packed weights (what mmzoo's linears use), ``size``-square problems."""
    from zoo.onednn import PackedWeight, onednn_available, packed_linear

    a, w = torch.randn(size, size), torch.randn(size, size)
    calls = [lambda: torch.mm(a, w)]
    if onednn_available():
        packed = PackedWeight()
        calls.append(lambda: packed_linear(a, w, None, packed))
    best = float("inf")
    with torch.inference_mode():
        for call in calls:
            call(), call()
            t0 = time.perf_counter()
            for _ in range(reps):
                call()
            best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * size**3 / best / 1e9


def prefix_gflop(ref: Any, inputs: dict[str, Any]) -> float:
    """GFLOP of one image's prefix in transformers (DaViT tower, projector, encoder, first decoder step), counted
    by ``torch.utils.flop_counter``: work that any fp32 implementation of the model does once per image."""
    from torch.utils.flop_counter import FlopCounterMode

    one = {k: v[:1] for k, v in inputs.items()}
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        ref.generate(**one, num_beams=1, max_new_tokens=1, min_new_tokens=1)
    return counter.get_total_flops() / 1e9


def parse_case(case: str) -> tuple[str, int]:
    name, _, beams = case.partition(":")
    if name not in PROMPTS or not beams.isdigit() or int(beams) < 1:
        raise SystemExit(f"bad case {case!r}: expected <{'|'.join(PROMPTS)}>:<beams>, e.g. caption:3")
    return name, int(beams)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--reps", type=int, default=3, help="alternating rounds at batch 1")
    ap.add_argument("--reps-large", type=int, default=1, help="alternating rounds at batches > 1")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up calls of each contender before the first case")
    ap.add_argument("--new", type=int, default=20, help="new tokens per row (EOS suppressed until then)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--cases", nargs="+", default=["caption:3", "caption:1", "od:1"], help="prompt:beams")
    ap.add_argument("--ab", action="store_true",
                    help="also time mmzoo with timm's own DaViT forward (MMZOO_FAST_DAVIT=0): before/after in one run")
    ap.add_argument("--name", default=None, help="results file name (default: florence2[_batch...])")
    args = ap.parse_args()
    cases = [parse_case(c) for c in args.cases]
    if args.threads:
        torch.set_num_threads(args.threads)
    from florence2_reference import build_reference

    from zoo.imported.florence2 import load_folder

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        ref, processor = build_reference(Path(d) / "base", **BASE)
        ours = load_folder(Path(d) / "base")
    ref.eval()
    print(f"params: transformers {sum(p.numel() for p in ref.parameters()) / 1e6:.1f}M, "
          f"mmzoo {ours.num_parameters() / 1e6:.1f}M; torch threads {torch.get_num_threads()}", flush=True)
    # the bound: no fp32 implementation runs an image's prefix faster than its FLOPs at the matmul peak, so no
    # implementation beats transformers by more than its time over (batch x that floor) (decoding left out)
    peak = matmul_peak_gflops()
    g = torch.Generator().manual_seed(0)
    rows, payload = [], {}
    floor_s: float | None = None
    first_call_mib: float | None = None
    for batch in args.batches:
        pixels = torch.randn(batch, 3, 768, 768, generator=g)
        for name, beams in cases:
            prompt = PROMPTS[name]
            inputs = processor(text=[prompt] * batch, images=[torch.zeros(3, 8, 8)] * batch, return_tensors="pt")
            inputs["pixel_values"] = pixels
            if floor_s is None:
                gflop = prefix_gflop(ref, inputs)
                floor_s = gflop / peak
                print(f"prefix {gflop:.1f} GFLOP per image; fp32 matmul peak {peak:.1f} GFLOP/s → at least "
                      f"{floor_s:.2f} s per image", flush=True)
            kw = dict(num_beams=beams, max_new_tokens=args.new, min_new_tokens=args.new, early_stopping=False)
            outs: dict[str, torch.Tensor] = {}
            sides = ["hf", "mmzoo"] + (["mmzoo_timm"] if args.ab else [])
            cpu: dict[str, list[float]] = {k: [] for k in sides}
            mem: dict[str, list[float]] = {k: [] for k in sides}

            def timed(side: str, fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
                def call() -> None:
                    c0 = time.process_time()
                    with torch.inference_mode(), PeakRSS() as p:
                        outs[side] = fn()
                    cpu[side].append(time.process_time() - c0)
                    mem[side].append(p.growth_mib)
                    if side != "hf":
                        assert torch.equal(outs[side], outs["hf"]), f"tokens differ: {side} {name} {beams} {batch}"
                return call

            def timm_tower() -> torch.Tensor:
                os.environ["MMZOO_FAST_DAVIT"] = "0"
                try:
                    return ours.generate_ids(list(pixels), [prompt] * batch, **kw)
                finally:
                    del os.environ["MMZOO_FAST_DAVIT"]

            fns = {"hf": timed("hf", lambda: ref.generate(**inputs, **kw)),
                   "mmzoo": timed("mmzoo", lambda: ours.generate_ids(list(pixels), [prompt] * batch, **kw))}
            if args.ab:
                fns["mmzoo_timm"] = timed("mmzoo_timm", timm_tower)
            reps = args.reps if batch == 1 else args.reps_large
            warmup = args.warmup if not payload else 0  # the first case warms up every contender
            if first_call_mib is None:  # mmzoo's first call packs its weights (kept for later calls)
                rss0 = _rss()
                with torch.inference_mode():
                    ours.generate_ids(list(pixels), [prompt] * batch, **kw)
                first_call_mib = (_rss() - rss0) / 2**20
            times = measure_alternating(fns, reps=reps, warmup=warmup)
            cpu = {k: v[-reps:] for k, v in cpu.items()}  # the timed rounds only
            working = {k: max(v[-reps:]) for k, v in mem.items()}
            s = summarize(times, baseline="hf")
            s_cpu = summarize(cpu, baseline="hf")
            key = f"{name}_batch{batch}_beams{beams}"
            length = outs["hf"].shape[1] - 1
            hf_cpu = s_cpu["hf"]["median_s"]
            bound = hf_cpu / (batch * floor_s)  # the largest speed-up over transformers the prefix allows
            payload[key] = {**s, "cpu_time": s_cpu, "identical_tokens": True, "new_tokens": length, "rounds": reps,
                            "working_mib": working, "prefix_floor_s": batch * floor_s, "bound_vs_hf": bound}
            row = [key, s["hf"]["median_s"], s["mmzoo"]["median_s"], batch / s["hf"]["median_s"],
                   batch / s["mmzoo"]["median_s"], s["mmzoo"]["speedup_vs_hf"], s_cpu["mmzoo"]["speedup_vs_hf"]]
            if args.ab:
                row += [s["mmzoo_timm"]["median_s"], s["mmzoo_timm"]["speedup_vs_hf"],
                        s_cpu["mmzoo_timm"]["speedup_vs_hf"]]
            row += [batch * floor_s, bound]
            rows.append(row + [" / ".join(f"{working[k]:.0f}" for k in sides), f"yes ({length} new)"])
            print(rows[-1], flush=True)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    header = ["case", "transformers s", "mmzoo s", "transformers images/s", "mmzoo images/s", "× transformers",
              "× (CPU time)"]
    if args.ab:
        header += ["mmzoo, timm tower s", "×", "× (CPU time)"]
    mem_names = " / ".join(["transformers", "mmzoo"] + (["timm tower"] if args.ab else []))
    header += ["prefix floor s", "bound × transformers"]
    print(table(rows, header + [f"working MiB ({mem_names})", "same tokens"]))
    print(f"peak RSS of the process (both models): {peak_rss:.0f} MiB; mmzoo's first call kept {first_call_mib:.0f} MiB "
          f"(packed weight copies); {time.perf_counter() - t_start:.0f} s in all")
    name = args.name or ("florence2" if args.batches == [1, 8] else f"florence2_batch{'_'.join(map(str, args.batches))}")
    cpu_model = cpu_info()
    print(f"CPU: {cpu_model['model']}; {' '.join(cpu_model['avx512']) or 'no AVX-512'}")
    record = {"args": vars(args), "cpu": cpu_model, "results": payload, "peak_rss_mib": peak_rss,
              "mmzoo_first_call_kept_mib": first_call_mib, "matmul_peak_gflops": peak, "prefix_floor_s": floor_s}
    print(f"saved {save(name, record)}")


if __name__ == "__main__":
    main()
