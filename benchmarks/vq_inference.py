"""vq_inference: ImageCodeTokenizer.encode / decode (16 images at a time on the CPU) against one forward per
256-image batch, the way the tokenizer ran before ``CPU_CHUNK``; both alternate in one process.

A tokenizer folder gives its codebook size (``--vq <folder>``, e.g. a trained `t2i_shapes` tokenizer); without
one, an untrained 8×8-code ``VQConfig`` with 4096 codes does the same work per image. Images are random.

    python -m benchmarks.vq_inference [--vq <folder>] [--images 2048] [--reps 3]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import measure_alternating, save, summarize, table
from modalities.image_codes import ImageCodeTokenizer, VQConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vq", default=None, help="a VQ tokenizer folder (default: untrained, 4096 codes)")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256, help="the caller's batch (the peer runs it in one forward)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = (ImageCodeTokenizer.from_pretrained(args.vq) if args.vq
           else ImageCodeTokenizer.from_config(VQConfig(num_codes=4096))).eval()
    pixels = torch.rand(args.images, 3, tok.image_size, tok.image_size)
    codes = tok.encode(pixels)
    h, w = tok.grid

    @torch.no_grad()
    def encode_one_forward() -> torch.Tensor:
        return torch.cat([tok.quantize(tok.encode_latents(c))[2] for c in pixels.split(args.batch)])

    @torch.no_grad()
    def decode_one_forward() -> torch.Tensor:
        return torch.cat([tok.decode_latents(tok.vq.quantize.get_codebook_entry(
            c.reshape(-1), (len(c), h, w, tok.code_dim))).clamp(0, 1) for c in codes.split(args.batch)])

    def encode() -> torch.Tensor:
        return torch.cat([tok.encode(c) for c in pixels.split(args.batch)])

    def decode() -> torch.Tensor:
        return torch.cat([tok.decode(c) for c in codes.split(args.batch)])

    if not torch.equal(encode(), encode_one_forward()):
        raise AssertionError("chunked encoding changed the codes")
    if not torch.allclose(decode(), decode_one_forward(), atol=1e-5):
        raise AssertionError("chunked decoding changed the pixels")
    results, rows = {}, []
    for kind, ours, peer in (("encode", encode, encode_one_forward), ("decode", decode, decode_one_forward)):
        times = measure_alternating({"mmzoo": ours, "one_forward": peer}, reps=args.reps, warmup=1)
        s = summarize(times, baseline="one_forward")
        results[kind] = s
        rows.append([kind, args.images / s["mmzoo"]["median_s"], args.images / s["one_forward"]["median_s"],
                     s["mmzoo"]["speedup_vs_one_forward"]])
    print(table(rows, ["", "mmzoo images/s", f"one forward per {args.batch} images/s", "speedup"]))
    print("saved", save("vq_inference", {"args": vars(args), "num_codes": tok.num_codes, "results": results}))


if __name__ == "__main__":
    main()
