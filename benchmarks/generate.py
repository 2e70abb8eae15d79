"""generate: greedy and beam-4 decoding of 32 tokens, mmzoo (KV cache) vs HF ``generate`` (its cache).

Same dimensions as train_step (d256, 4+4 layers, vocab 8192), 96-token source, exactly 32 new tokens
on both sides (EOS is suppressed until then), batch 1 and 32, fp32 inference on both.
Weights are NOT shared: BART is post-norm with an embedding LayerNorm while mmzoo is pre-norm, so no
exact mapping exists; the comparison is per generated token for the same amount of decoding work.

    python -m benchmarks.generate [--reps 5]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import measure_alternating, save, summarize, table
from benchmarks.train_step import VOCAB, build_hf, build_mmzoo
from zoo.generation import generate

NEW = 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--src-len", type=int, default=96)
    args = ap.parse_args()
    torch.manual_seed(0)
    ours, hf = build_mmzoo().eval(), build_hf().eval()
    rows, payload = [], {}
    for batch in (1, 32):
        src = torch.randint(4, VOCAB, (batch, args.src_len))
        mask = torch.ones_like(src, dtype=torch.bool)
        for beams in (1, 4):
            def run_ours():
                with torch.inference_mode():
                    out = generate(ours, {"text": (src, mask)}, max_new_tokens=NEW, num_beams=beams,
                                   min_new_tokens=NEW)
                assert out.shape == (batch, NEW), out.shape

            def run_hf():
                with torch.inference_mode():
                    out = hf.generate(input_ids=src, attention_mask=mask.long(), max_new_tokens=NEW,
                                      min_new_tokens=NEW, num_beams=beams, do_sample=False, use_cache=True,
                                      early_stopping=False)
                assert out.shape[1] >= NEW, out.shape

            times = measure_alternating({"hf": run_hf, "mmzoo": run_ours}, reps=args.reps, warmup=1)
            s = summarize(times, baseline="hf")
            key = f"batch{batch}_beams{beams}"
            payload[key] = s
            rows.append([key, s["hf"]["median_s"] * 1e3, s["mmzoo"]["median_s"] * 1e3,
                         batch * NEW / s["mmzoo"]["median_s"], s["mmzoo"]["speedup_vs_hf"]])
            print(rows[-1], flush=True)
    print(table(rows, ["case", "HF ms", "mmzoo ms", "mmzoo tokens/s", "× HF"]))
    print(f"saved {save('generate', {'args': vars(args), 'new_tokens': NEW, 'results': payload})}")


if __name__ == "__main__":
    main()
