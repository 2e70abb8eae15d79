"""t2i_generate: time to generate a batch of 16 Shapes images (8×8 = 64 VQ codes each) with ofa-tiny,
with and without the KV cache, unguided and with classifier-free guidance (a 2× decoder batch).

Untrained weights: the decoding work per token is the same as for a trained model. The VQ decode of
the codes to pixels is timed separately (it does not depend on the cache).

With ``--folder`` (an exported model): ``zoo.load(folder).generate_image`` on 16 Shapes prompts end to end (for a
layout-route model: the plan, then the renderer; each timed too), after one warm-up call.

    python -m benchmarks.t2i_generate [--reps 3] [--threads N] [--folder <exported model>]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import zoo
from modalities.image_codes import ImageCodeTokenizer, VQConfig
from zoo.guidance import guided_sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--folder", default=None, help="an exported text-to-image model: time generate_image on it")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.folder:
        return time_folder(args.folder, args.batch, args.reps)
    torch.manual_seed(0)
    model = zoo.create_model("ofa-tiny", vocab={"text_size": 1024, "image_code_size": 512, "loc_bins": 100}).eval()
    vq = ImageCodeTokenizer.from_config(VQConfig()).eval()
    layout = model.layout
    ids = torch.randint(layout.text_start, layout.image_code_start, (args.batch, 30))  # ~ a prompt's length
    cond = {"text": (ids, torch.ones_like(ids, dtype=torch.bool))}
    u = ids[:1, :9]
    uncond = {"text": (u, torch.ones_like(u, dtype=torch.bool))}
    allowed = vq.allowed_mask(layout)
    print(f"batch {args.batch}, {vq.num_tokens} codes per image, threads {torch.get_num_threads()}")
    codes = None
    for scale in (1.0, 3.0):
        for cache in (True, False):
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = guided_sample(model, cond, vq.num_tokens, uncond=uncond if scale != 1.0 else None,
                                        guidance_scale=scale, allowed=allowed, top_k=32, use_cache=cache,
                                        generator=torch.Generator().manual_seed(0))
                times.append(time.perf_counter() - t0)
            codes = layout.unified_to_codes(out)
            print(f"guidance {scale:3.1f}  kv_cache {str(cache):5s}  median {statistics.median(times) * 1000:8.0f} ms "
                  f"(min {min(times) * 1000:.0f})")
    t0 = time.perf_counter()
    with torch.inference_mode():
        vq.decode(codes)
    print(f"VQ decode of {args.batch} code grids to 64 px: {(time.perf_counter() - t0) * 1000:.0f} ms")


PROMPTS = ["a small red triangle to the left of a large blue circle", "a picture of a large green cross on a dark background",
           "two shapes, a small yellow diamond above a small purple square", "there is a large orange circle in the top left",
           "the image shows three objects, a small blue cross, a large red square and a small green diamond",
           "a large purple triangle below a small orange cross", "a small green circle at the bottom",
           "a large yellow square right of a small blue triangle, which is above a large red diamond"]


def time_folder(folder: str, batch: int, reps: int) -> None:
    """Median wall time of ``generate_image`` on ``batch`` prompts with a loaded model (warm-up call excluded)."""
    from zoo.layout_generation import plan_layouts

    m = zoo.load(folder)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    m.generate_image(prompts[:2])
    runs = {"generate_image": lambda: m.generate_image(prompts)}
    if m.renderer is not None:
        runs["plan_layout"] = lambda: plan_layouts(m, prompts)
        plans = plan_layouts(m, prompts)
        runs["renderer"] = lambda: m.renderer.render(plans)
    print(f"{folder}: {batch} prompts, threads {torch.get_num_threads()}")
    for name, fn in runs.items():
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        print(f"{name:15s} median {statistics.median(times) * 1000:8.1f} ms (min {min(times) * 1000:.1f})")


if __name__ == "__main__":
    main()
