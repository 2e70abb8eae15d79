"""train_step: one AdamW step of the mmzoo backbone vs ``transformers.BartForConditionalGeneration``.

Identical dimensions (d256, 4+4 layers, 4 heads, FFN 1024, vocab 8192), batch 32, 96 source and 32
target tokens, dropout 0 on both. Contenders alternate in one process.

    python -m benchmarks.train_step [--reps 7] [--batch 32]
"""
from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

from benchmarks.common import count_flops, matmul_peak, measure_alternating, save, summarize, table

D, LAYERS, HEADS, FFN, VOCAB = 256, 4, 4, 1024, 8192


def build_mmzoo():
    from zoo.config import ModelConfig
    from zoo.model import UnifiedSeq2Seq

    cfg = ModelConfig(arch="bench", d_model=D, n_heads=HEADS, enc_layers=LAYERS, dec_layers=LAYERS, ffn_dim=FFN,
                      vocab={"text_size": VOCAB - 4}, modalities={})
    return UnifiedSeq2Seq(cfg)


def build_hf():
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=VOCAB, d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS,
                     encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                     decoder_ffn_dim=FFN, max_position_embeddings=256, dropout=0.0, attention_dropout=0.0,
                     activation_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     decoder_start_token_id=1, forced_eos_token_id=None)
    return BartForConditionalGeneration(cfg)


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def make_steps(batch: int, src_len: int, tgt_len: int, bf16: bool = True) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, VOCAB, (batch, src_len), generator=g)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    tgt = torch.randint(4, VOCAB, (batch, tgt_len + 1), generator=g)
    tgt_in, labels = tgt[:, :-1], tgt[:, 1:]

    ours, hf = build_mmzoo(), build_hf()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)  # what mmzoo's tasks configure
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def ours_step(bf16: bool):
        def step():
            with autocast(bf16):
                memory, mask = ours.encode({"text": (src, src_mask)})
                logits = ours.logits(ours.decode_hidden(tgt_in, memory, mask))
                loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))
            loss.backward()
            opt_ours.step()
            opt_ours.zero_grad(set_to_none=True)
        return step

    def hf_step(bf16: bool):
        def step():
            with autocast(bf16):
                out = hf(input_ids=src, attention_mask=src_mask.long(), decoder_input_ids=tgt_in)
                loss = F.cross_entropy(out.logits.float().view(-1, VOCAB), labels.reshape(-1))
            loss.backward()
            opt_hf.step()
            opt_hf.zero_grad(set_to_none=True)
        return step

    steps = {"hf_fp32": hf_step(False), "mmzoo_fp32": ours_step(False)}
    precision = {"hf_fp32": "fp32", "mmzoo_fp32": "fp32"}
    if bf16:
        steps.update(hf_bf16=hf_step(True), mmzoo_bf16=ours_step(True))
        precision.update(hf_bf16="bf16", mmzoo_bf16="bf16")
    return steps, precision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--src-len", type=int, default=96)
    ap.add_argument("--tgt-len", type=int, default=32)
    ap.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                    help="auto: time bf16 only where the CPU has native bf16")
    args = ap.parse_args()
    torch.manual_seed(0)
    from tasks.runtime.resolvers import cpu_has_bf16

    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and cpu_has_bf16())
    if not bf16:  # emulated bf16 runs about 100x slower (minutes per step): nothing worth timing
        print("[benchmark] bf16 skipped: this CPU has no native bf16 (no AVX512-BF16 / AMX); --bf16 on forces it")
    steps, precision = make_steps(args.batch, args.src_len, args.tgt_len, bf16)
    flops = {k: count_flops(fn) for k, fn in steps.items()}
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if bf16 else {})}
    peaks = {k: matmul_peak(dt) for k, dt in dtypes.items()}
    times = measure_alternating(steps, reps=args.reps)
    peaks = {k: max(peaks[k], matmul_peak(dt)) for k, dt in dtypes.items()}
    summary = summarize(times, baseline="hf_fp32")
    rows = []
    for name, s in summary.items():
        sec = s["median_s"]
        gflops = flops[name] / sec / 1e9
        s.update(samples_per_s=args.batch / sec, tokens_per_s=args.batch * (args.src_len + args.tgt_len) / sec,
                 gflop_per_step=flops[name] / 1e9, achieved_gflops=gflops, precision=precision[name],
                 mfu=gflops / peaks[precision[name]])
        same = "hf_bf16" if precision[name] == "bf16" else "hf_fp32"
        s["speedup_vs_hf_same_precision"] = summary[same]["median_s"] / sec
        rows.append([name, sec * 1e3, s["samples_per_s"], s["achieved_gflops"], f"{s['mfu']:.0%}",
                     s["speedup_vs_hf_fp32"], s["speedup_vs_hf_same_precision"]])
    print("matmul peak (same run): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    print(table(rows, ["contender", "ms/step", "samples/s", "GFLOP/s", "MFU", "× HF fp32", "× HF same prec."]))
    path = save("train_step", {"args": vars(args), "matmul_peak_gflops": peaks, "results": summary})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
