"""florence2_parts: where Florence-2 generation spends its time, mmzoo vs transformers (CPU time, batch 1).

The same random base-size weights as ``benchmarks/florence2.py``; for ``<CAPTION>`` beam 3 and greedy and ``<OD>``
greedy: the whole generation, the encoding (image tower, projector, text encoder) and their difference (decoding),
plus the image tower alone (transformers', timm's forward on mmzoo's packed weights, and the lean forward of
``zoo/fast_davit.py``). Process CPU time of the fastest of ``--reps`` calls after one warm-up, so that a shared
machine does not inflate it.

    python -m benchmarks.florence2_parts [--threads 1] [--reps 1]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.florence2 import BASE


def cpu_time(fn: Callable[[], Any], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        c = time.process_time()
        fn()
        best = min(best, time.process_time() - c)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from florence2_reference import build_reference

    from zoo.cpu_linears import packed_linears
    from zoo.imported.florence2 import load_folder

    with tempfile.TemporaryDirectory() as d:
        ref, proc = build_reference(Path(d) / "base", **BASE)
        ours = load_folder(Path(d) / "base")
    ref.eval()
    x = torch.randn(1, 3, 768, 768, generator=torch.Generator().manual_seed(0))
    tower = ours.model.embedders["florence_image"].tower
    with torch.inference_mode():
        with packed_linears(ours.model):
            t = {"transformers": cpu_time(lambda: ref.model.vision_tower(x), args.reps),
                 "mmzoo, timm forward": cpu_time(lambda: type(tower).forward_features(tower, x), args.reps),
                 "mmzoo, lean forward": cpu_time(lambda: tower.forward_features(x), args.reps)}
        print("image tower: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()), flush=True)
        for prompt, beams in [("<CAPTION>", 3), ("<CAPTION>", 1), ("<OD>", 1)]:
            inputs = proc(text=[prompt], images=[torch.zeros(3, 8, 8)], return_tensors="pt")
            inputs["pixel_values"] = x
            ids = inputs["input_ids"]
            kw = dict(num_beams=beams, max_new_tokens=20, min_new_tokens=20, early_stopping=False)

            def hf_encode() -> Any:
                feats = ref.model.get_image_features(x).pooler_output
                emb = ref.get_input_embeddings()(ids)
                emb = emb.masked_scatter((ids == ref.config.image_token_id)[..., None].expand_as(emb), feats)
                return ref.model.get_encoder()(inputs_embeds=emb, attention_mask=inputs["attention_mask"])

            our_ids, our_mask = ours._prompt_segment([ours._expand_prompt(prompt)])

            def our_encode() -> Any:
                with packed_linears(ours.model):
                    return ours.model.encode({"florence_image": x, "text": (our_ids, our_mask)})

            hf = cpu_time(lambda: ref.generate(**inputs, **kw), args.reps), cpu_time(hf_encode, args.reps)
            mm = cpu_time(lambda: ours.generate_ids(list(x), [prompt], **kw), args.reps), cpu_time(our_encode, args.reps)
            print(f"{prompt} beams {beams}: transformers {hf[0]:.2f} s = encode {hf[1]:.2f} + decode {hf[0] - hf[1]:.2f}; "
                  f"mmzoo {mm[0]:.2f} s = encode {mm[1]:.2f} + decode {mm[0] - mm[1]:.2f}", flush=True)


if __name__ == "__main__":
    main()
