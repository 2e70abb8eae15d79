"""``zoo-predict``: run a pretrained model on files from the shell (no Lightning, no Hydra).

    zoo-predict pretrained=<arch.tag|folder|hf-hub:org/name> task=caption input=cat.jpg
    zoo-predict pretrained=... task=vqa input='imgs/*.png' question="what colour is the circle?"
    zoo-predict pretrained=... task=vqa input=questions.jsonl        # {"image": ..., "question": ...} per line
    zoo-predict pretrained=... task=t2i input=prompts.txt out=generated/   # one prompt per line
    zoo-predict pretrained=... task=t2i input="a red circle" output=generated/ guidance_scale=3 seed=0
    zoo-predict pretrained=... task=sensor input=recordings/ out=descriptions.json
    zoo-predict pretrained=hf-hub:microsoft/Florence-2-base task=detect input=photos/ out=boxes.json   # + boxes/*.png
    zoo-predict pretrained=florence2-base.ms task=ground input=cat.jpg text="a cat on a mat"

Results print as JSON lines, or go to ``out`` (``output`` is the same; a ``.json`` file; a folder of PNG files
for ``t2i``, whose JSON lines print).
"""
from __future__ import annotations

import glob
import json
import sys
from pathlib import Path
from typing import Any, Sequence

TASKS = ("caption", "vqa", "t2i", "sensor", "detect", "ground")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SENSOR_EXTS = {".npy", ".npz", ".csv", ".tsv"}
USAGE = __doc__.strip() + """

arguments: pretrained= task= input= [question=] [text=] [out=|output=] [batch_size=32] [max_new_tokens=] [num_beams=]
           [device=cpu] [revision=] [allow_pickle=false] [precision=fp32|bf16] [quantize=none|int8]
t2i:           [guidance_scale=<saved, 3.0>] [seed=<saved, 0>]
sensor files:  [timestamp_column=timestamp|null] [time_unit=s|ms|us|ns] [rate=<Hz, files without timestamps>]"""


def collect_files(spec: str, exts: set[str]) -> list[Path]:
    """A file, every matching file in a folder (sorted), or a glob's matches."""
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in exts)
        if not files:
            raise FileNotFoundError(f"input folder {spec} has no files with extension {sorted(exts)}")
        return files
    files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
    if not files:
        raise FileNotFoundError(f"input {spec!r} matches no file")
    return files


def read_vqa_records(path: Path) -> list[dict[str, Any]]:
    """``{"image", "question"}`` records from a JSON list or JSONL file (image paths relative to the file)."""
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(l) for l in text.splitlines() if l.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "image" not in r or "question" not in r:
            raise ValueError(f"{path}: record {i} needs 'image' and 'question' keys, got {r!r}")
        img = Path(r["image"])
        out.append({"image": img if img.is_absolute() else path.parent / img, "question": str(r["question"])})
    return out


def read_prompts(spec: str | None, text: str | None) -> list[str]:
    """``text``, or the prompts of ``spec``: a ``.txt`` file / folder / glob (one prompt per line), else
    ``spec`` itself as the one prompt."""
    if text:
        return [text]
    if not spec:
        raise ValueError("t2i needs text=... or input=<prompt | .txt file with one prompt per line>")
    p = Path(spec)
    if not p.exists() and not glob.glob(spec) and not spec.endswith(".txt"):
        return [spec]  # a literal prompt
    lines = [l.strip() for f in collect_files(spec, {".txt"}) for l in f.read_text(encoding="utf-8").splitlines()]
    return [l for l in lines if l]


def predict(bundle: Any, task: str, inputs: str | None, *, question: str | None = None, text: str | None = None,
            batch_size: int = 32, out: str | None = None, sensor_read: dict[str, Any] | None = None,
            t2i: dict[str, Any] | None = None, **gen: Any) -> list[dict[str, Any]]:
    """Run ``task`` over the inputs; returns one JSON-able record per input. ``sensor_read`` holds
    :meth:`Pretrained.describe`'s file-reading options (``rate``, ``timestamp_column``, ``time_unit``),
    ``t2i`` :meth:`Pretrained.generate_image`'s sampling options (``guidance_scale``, ``seed``, ...)."""
    gen = {k: v for k, v in gen.items() if v is not None}
    if task == "caption":
        files = collect_files(_need(inputs, task), IMAGE_EXTS)
        caps = bundle.caption([str(f) for f in files], batch_size=batch_size, **gen)
        return [{"input": str(f), "caption": c} for f, c in zip(files, caps)]
    if task == "vqa":
        src = _need(inputs, task)
        if Path(src).suffix in (".json", ".jsonl") and Path(src).is_file():
            recs = read_vqa_records(Path(src))
        else:
            if not question:
                raise ValueError("vqa needs question=... (or input=<.json/.jsonl with image and question>)")
            recs = [{"image": f, "question": question} for f in collect_files(src, IMAGE_EXTS)]
        answers = bundle.answer([str(r["image"]) for r in recs], [r["question"] for r in recs],
                                batch_size=batch_size, **gen)
        return [{"input": str(r["image"]), "question": r["question"], "answer": a} for r, a in zip(recs, answers)]
    if task == "sensor":
        files = collect_files(_need(inputs, task), SENSOR_EXTS)
        descs = bundle.describe([str(f) for f in files], batch_size=batch_size, **(sensor_read or {}), **gen)
        return [{"input": str(f), "description": d} for f, d in zip(files, descs)]
    if task == "t2i":
        prompts = read_prompts(inputs, text)
        images = bundle.generate_image(prompts, batch_size=batch_size,
                                       **{k: v for k, v in (t2i or {}).items() if v is not None})
        folder = Path(out or "t2i_outputs")
        if folder.suffix == ".json":
            folder = folder.with_suffix("")
        folder.mkdir(parents=True, exist_ok=True)
        recs = []
        for i, (p, img) in enumerate(zip(prompts, images)):
            path = folder / f"{i:04d}.png"
            _save_image(img, path)
            recs.append({"text": p, "image": str(path)})
        return recs
    if task in ("detect", "ground"):  # box tasks (Florence-2): JSON boxes + a PNG per image with the boxes drawn
        return _predict_boxes(bundle, task, _need(inputs, task), text, batch_size, out, gen)
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


def _predict_boxes(bundle: Any, task: str, inputs: str, text: str | None, batch_size: int, out: str | None,
                   gen: dict[str, Any]) -> list[dict[str, Any]]:
    if not hasattr(bundle, "detect"):
        raise NotImplementedError(f"task {task} needs a model with boxes (Florence-2); this one is {bundle!r}")
    from zoo.imported.florence2 import draw_boxes

    files = collect_files(inputs, IMAGE_EXTS)
    if task == "ground" and not text:
        raise ValueError("ground needs text=<the phrase or caption to ground>")
    paths = [str(f) for f in files]
    results = (bundle.detect(paths, batch_size=batch_size, **gen) if task == "detect"
               else bundle.ground(paths, [text] * len(paths), batch_size=batch_size, **gen))
    folder = (Path(out).with_suffix("") if out else Path(f"{task}_outputs")).parent / "boxes"
    folder.mkdir(parents=True, exist_ok=True)
    recs = []
    for f, res in zip(files, results):
        png = folder / f"{f.stem}.png"
        draw_boxes(f, res).save(png)
        recs.append({"input": str(f), **({"text": text} if text else {}), **res, "png": str(png)})
    return recs


def _need(inputs: str | None, task: str) -> str:
    if not inputs:
        raise ValueError(f"task {task} needs input=<file|folder|glob>")
    return inputs


def _save_image(img: Any, path: Path) -> None:
    import numpy as np
    import torch
    from PIL import Image

    if isinstance(img, Image.Image):
        img.save(path)
        return
    arr = img.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy() \
        if torch.is_tensor(img) else np.asarray(img)
    Image.fromarray(arr).save(path)


def main(argv: Sequence[str] | None = None) -> None:
    from zoo.cli import parse_kv

    args = parse_kv(sys.argv[1:] if argv is None else list(argv),
                    {"pretrained": ..., "task": ..., "input": None, "question": None, "text": None, "out": None,
                     "batch_size": 32, "max_new_tokens": None, "num_beams": None, "device": None, "revision": None,
                     "allow_pickle": False, "precision": "fp32", "quantize": "none", "timestamp_column": "timestamp", "time_unit": "s",
                     "rate": None, "guidance_scale": None, "seed": None, "output": None}, USAGE)
    if args["task"] not in TASKS:
        raise SystemExit(f"error: task must be one of {TASKS}, got {args['task']!r}")
    from zoo.hub import load

    try:
        bundle = load(args["pretrained"], revision=args["revision"], allow_pickle=args["allow_pickle"],
                      device=args["device"])
        bundle.precision = args["precision"]
        if args["quantize"] != "none":  # dynamic int8 linear layers (CPU), see zoo/compress.py
            from zoo.compress import apply_quantize

            bundle = apply_quantize(bundle, args["quantize"])
        gen = {k: int(args[k]) for k in ("max_new_tokens", "num_beams") if args[k] is not None}
        t2i = {"guidance_scale": float(args["guidance_scale"]) if args["guidance_scale"] is not None else None,
               "seed": int(args["seed"]) if args["seed"] is not None else None}
        sensor_read = {"timestamp_column": args["timestamp_column"], "time_unit": args["time_unit"],
                       "rate": float(args["rate"]) if args["rate"] is not None else None}
        results = predict(bundle, args["task"], args["input"], question=args["question"], text=args["text"],
                          batch_size=args["batch_size"], out=args["out"] or args["output"], sensor_read=sensor_read,
                          t2i=t2i, **gen)
    except (OSError, ValueError, NotImplementedError) as e:
        raise SystemExit(f"error: {e}") from None
    out = args["out"] or args["output"]
    if out and args["task"] != "t2i":
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        print(f"[mmzoo] {len(results)} results -> {path}", file=sys.stderr)
    else:
        for r in results:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
