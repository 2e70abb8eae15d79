"""florence2: Florence-2-base-sized model, mmzoo vs transformers' ``Florence2ForConditionalGeneration``.

The same random weights on both sides (transformers saves them, mmzoo loads the folder through its key table),
fp32 on the CPU, 768-px images, prompts ``<CAPTION>`` and ``<OD>``, beam 3 (Florence-2's default) and greedy,
latency at batch 1 and throughput at batch 8. Every timed call asserts identical tokens. Exactly ``--new`` tokens
are generated on both sides (EOS suppressed until then) so both do the same decoding work.

    python -m benchmarks.florence2 [--reps 3] [--new 20]
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import measure_alternating, save, summarize, table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

BASE = dict(image_size=768, depths=(1, 1, 9, 1), dims=(128, 256, 512, 1024), heads=(4, 8, 16, 32), window=12,
            d_model=768, layers=6, n_heads=12, ffn=3072, vocab_rows=51328, max_positions=1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--beams", type=int, nargs="+", default=[3, 1])
    ap.add_argument("--prompts", nargs="+", default=["<CAPTION>", "<OD>"])
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    from florence2_reference import build_reference

    from zoo.imported.florence2 import load_folder

    with tempfile.TemporaryDirectory() as d:
        ref, processor = build_reference(Path(d) / "base", **BASE)
        ours = load_folder(Path(d) / "base")
    ref.eval()
    print(f"params: transformers {sum(p.numel() for p in ref.parameters()) / 1e6:.1f}M, "
          f"mmzoo {ours.num_parameters() / 1e6:.1f}M", flush=True)
    g = torch.Generator().manual_seed(0)
    rows, payload = [], {}
    for batch in args.batches:
        pixels = torch.randn(batch, 3, 768, 768, generator=g)
        for prompt in args.prompts:
            inputs = processor(text=[prompt] * batch, images=[torch.zeros(3, 8, 8)] * batch, return_tensors="pt")
            inputs["pixel_values"] = pixels
            for beams in args.beams:
                kw = dict(num_beams=beams, max_new_tokens=args.new, min_new_tokens=args.new, early_stopping=False)
                outs = {}

                def run_hf():
                    with torch.inference_mode():
                        outs["hf"] = ref.generate(**inputs, **kw)

                def run_ours():
                    with torch.inference_mode():
                        outs["mmzoo"] = ours.generate_ids(list(pixels), [prompt] * batch, **kw)
                    assert torch.equal(outs["mmzoo"], outs["hf"]), "tokens differ"

                times = measure_alternating({"hf": run_hf, "mmzoo": run_ours}, reps=args.reps, warmup=args.warmup)
                s = summarize(times, baseline="hf")
                key = f"{prompt.strip('<>').lower()}_batch{batch}_beams{beams}"
                payload[key] = {**s, "identical_tokens": True, "tokens": list(outs["hf"].shape)}
                rows.append([key, s["hf"]["median_s"], s["mmzoo"]["median_s"],
                             batch / s["mmzoo"]["median_s"], s["mmzoo"]["speedup_vs_hf"], "yes"])
                print(rows[-1], flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(table(rows, ["case", "transformers s", "mmzoo s", "mmzoo images/s", "× transformers", "same tokens"]))
    print(f"peak RSS of the process (both models): {peak:.0f} MiB")
    name = "florence2" if args.batches == [1, 8] else f"florence2_batch{'_'.join(map(str, args.batches))}"
    print(f"saved {save(name, {'args': vars(args), 'results': payload, 'peak_rss_mib': peak})}")


if __name__ == "__main__":
    main()
