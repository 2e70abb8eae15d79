"""``zoo-predict``: run a pretrained model on files from the shell (no Lightning, no Hydra).

examples:
    zoo-predict pretrained=exports/quickstart task=caption input=photo.png
    zoo-predict pretrained=<arch.tag|folder|hf-hub:org/name> task=caption input=cat.jpg
    zoo-predict pretrained=... task=vqa input='imgs/*.png' question="what colour is the circle?"
    zoo-predict pretrained=... task=vqa input=questions.jsonl        # {"image": ..., "question": ...} per line
    zoo-predict pretrained=... task=t2i input=prompts.txt out=generated/   # one prompt per line
    zoo-predict pretrained=... task=t2i input="a red circle" output=generated/ guidance_scale=3 seed=0
    zoo-predict pretrained=... task=sensor input=recordings/ out=descriptions.json
    zoo-predict pretrained=hf-hub:microsoft/Florence-2-base task=detect input=photos/ out=boxes.json   # + boxes/*.png
    zoo-predict pretrained=florence2-base.ms task=ground input=cat.jpg text="a cat on a mat"
    zoo-predict pretrained=florence2-base.ms task=caption detail=paragraph input=photos/
    zoo-predict pretrained=florence2-base.ms task=ocr regions=true input=scans/ out=ocr.json    # + boxes/*.png (quads)
    zoo-predict pretrained=florence2-base.ms task=region box=10,20,200,240 input=cat.jpg          # region=category
    zoo-predict pretrained=florence2-base.ms task=region region=proposals input=cat.jpg out=regions.json

Results print as JSON lines, or go to ``out`` (``output`` is the same; a ``.json`` file; a folder of PNG files
for ``t2i``, whose JSON lines print). An unreadable input file stops the run with an error naming it; with
``skip_bad=true`` the readable files are still processed and each unreadable one gets a result
``{"input": ..., "error": ...}`` (also listed on stderr). Option clashes (``precision=bf16 quantize=int8``,
``device=cuda`` without CUDA) are refused before the model loads.
"""
from __future__ import annotations

import glob
import json
import sys
from pathlib import Path
from typing import Any, Sequence

TASKS = ("caption", "vqa", "t2i", "sensor", "detect", "ground", "ocr", "region")
#: Florence-2's tasks with boxes: JSON plus a PNG per image with the boxes drawn
BOX_TASKS = ("detect", "ground", "ocr", "region")
REGIONS = ("category", "description", "proposals")
DETAILS = ("short", "detailed", "paragraph")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SENSOR_EXTS = {".npy", ".npz", ".csv", ".tsv"}
USAGE = __doc__.strip() + """

arguments: pretrained= task= input= [question=] [text=] [out=|output=] [batch_size=32] [max_new_tokens=] [num_beams=]
           [device=cpu] [revision=] [allow_pickle=false] [precision=fp32|bf16] [quantize=none|int8] [skip_bad=false]
Florence-2:    caption [detail=short|detailed|paragraph]; detect [text=<vocabulary>]; ground text=<phrase>;
               ocr [regions=false|true];
               region box=x0,y0,x1,y1 (pixels) [region=category|description], or region region=proposals
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
    from modalities.text import read_text_file

    text = read_text_file(path)
    try:
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(l) for l in text.splitlines() if l.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of {{image, question}} records")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "image" not in r or "question" not in r:
            raise ValueError(f"{path}: record {i} needs 'image' and 'question' keys, got {r!r}")
        if not isinstance(r["image"], str) or not isinstance(r["question"], str):
            raise ValueError(f"{path}: record {i}: 'image' and 'question' must be strings, got {r!r}")
        if not r["question"].strip():
            raise ValueError(f"{path}: record {i} ({r['image']}) has a blank question")
        img = Path(r["image"])
        out.append({"image": img if img.is_absolute() else path.parent / img, "question": r["question"]})
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
    from modalities.text import read_text_file

    lines = [l.strip() for f in collect_files(spec, {".txt"}) for l in read_text_file(f).splitlines()]
    return [l for l in lines if l]


def check_options(precision: str = "fp32", quantize: str | None = "none", device: str | None = None) -> None:
    """Refuse option values and clashes before any loading work, with the fix in the message."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    if quantize not in (None, "none", "int8"):
        raise ValueError(f"quantize must be none or int8, got {quantize!r}")
    if quantize == "int8" and precision == "bf16":
        raise ValueError("precision=bf16 and quantize=int8 do not combine: int8 dynamic quantization computes in fp32 "
                         "(choose one: quantize=int8 with precision=fp32, or precision=bf16 without quantize)")
    if device:
        import torch

        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device={device!r} is not a device name (cpu, cuda, cuda:1, mps): {e}") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device={device} but torch sees no CUDA GPU on this machine "
                                 "(torch.cuda.is_available() is False); use device=cpu")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"device={device} but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device={device} but MPS is not available on this machine; use device=cpu")
        if quantize == "int8" and dev.type != "cpu":
            raise ValueError(f"quantize=int8 runs on the CPU only; drop quantize or use device=cpu (got device={device})")


def parse_box(spec: str | None) -> list[float] | None:
    """``"x0,y0,x1,y1"`` (pixels) → 4 floats, checked; ``None`` stays ``None``."""
    if spec is None:
        return None
    from zoo.imported.florence2_post import check_box

    try:
        box = [float(v) for v in str(spec).replace(" ", "").split(",")]
    except ValueError:
        raise ValueError(f"box must be x0,y0,x1,y1 in pixels, got {spec!r}") from None
    check_box(box)
    return box


def check_task_args(task: str, *, text: str | None = None, detail: str | None = None, regions: bool = False,
                    box: Any = None, region: str = "category") -> None:
    """Refuse a task's missing or misplaced arguments before the model loads, naming the fix."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if task == "ground" and not (text and text.strip()):
        raise ValueError("ground needs text=<the phrase or caption to ground>")
    if detail is not None and (task != "caption" or detail not in DETAILS):
        raise ValueError(f"detail={detail!r}: caption detail is one of {DETAILS} (Florence-2, task=caption only)")
    if regions and task != "ocr":
        raise ValueError(f"regions=true is for task=ocr, not task={task}")
    if task == "region":
        if region not in REGIONS:
            raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
        if region != "proposals" and box is None:
            raise ValueError(f"task=region region={region} needs box=x0,y0,x1,y1 (pixels of each image); "
                             "region=proposals needs none")
        if region == "proposals" and box is not None:
            raise ValueError("box= is for region=category|description; region=proposals finds the regions itself")
    elif box is not None:
        raise ValueError(f"box= is for task=region, not task={task}")


def _readable(items: list[Any], read: Any, skip_bad: bool, skipped: dict[str, str]) -> list[tuple[Any, Any]]:
    """``(item, read(item))`` for each item that reads; a failure raises naming the file, or with ``skip_bad``
    is recorded in ``skipped`` (file → why)."""
    ok = []
    for item in items:
        path = item["image"] if isinstance(item, dict) else item
        try:
            ok.append((item, read(path)))
        except Exception as e:  # unreadable, truncated, not an image / a recording: name the file
            why = str(e) if str(path) in str(e) else f"{path}: {e}"
            if not skip_bad:
                raise ValueError(f"cannot read input {why} (skip_bad=true processes the readable files and lists "
                                 "the rest)") from None
            skipped[str(path)] = why
    return ok


def predict(bundle: Any, task: str, inputs: str | None, *, question: str | None = None, text: str | None = None,
            batch_size: int = 32, out: str | None = None, sensor_read: dict[str, Any] | None = None,
            t2i: dict[str, Any] | None = None, skip_bad: bool = False, detail: str | None = None,
            regions: bool = False, box: Any = None, region: str = "category", **gen: Any) -> list[dict[str, Any]]:
    """Run ``task`` over the inputs; returns one JSON-able record per input. ``sensor_read`` holds
    :meth:`Pretrained.describe`'s file-reading options (``rate``, ``timestamp_column``, ``time_unit``),
    ``t2i`` :meth:`Pretrained.generate_image`'s sampling options (``guidance_scale``, ``seed``, ...).
    Each input file is read in batches of ``batch_size``; an unreadable one raises naming it, or with
    ``skip_bad`` gets ``{"input": file, "error": why}`` in place of its result. Florence-2: ``detail`` (caption),
    ``regions`` (ocr), ``box`` and ``region`` (region); see :func:`check_task_args`."""
    gen = {k: v for k, v in gen.items() if v is not None}
    check_task_args(task, text=text, detail=detail, regions=regions, box=box, region=region)
    if detail is not None and not _is_florence2(bundle):
        raise NotImplementedError(f"detail= is Florence-2's caption option; this model is {bundle!r}")
    if _is_florence2(bundle) and task == "caption":
        gen["detail"] = detail or "short"
    if task in ("caption", "vqa", "sensor"):
        skipped: dict[str, str] = {}
        if task == "caption":
            items: list[Any] = collect_files(_need(inputs, task), IMAGE_EXTS)
            read, key = bundle.preprocessor("image"), "caption"
            run = lambda ok: bundle.caption([x for _, x in ok], batch_size=batch_size, **gen)  # noqa: E731
            row = lambda it, r: {"input": str(it), "caption": r}  # noqa: E731
        elif task == "vqa":
            src = _need(inputs, task)
            if Path(src).suffix in (".json", ".jsonl") and Path(src).is_file():
                items = read_vqa_records(Path(src))
            else:
                if not question or not question.strip():
                    raise ValueError("vqa needs question=... (not blank; or input=<.json/.jsonl with image and "
                                     "question>)")
                items = [{"image": f, "question": question} for f in collect_files(src, IMAGE_EXTS)]
            read, key = bundle.preprocessor("image"), "answer"
            run = lambda ok: bundle.answer([x for _, x in ok], [it["question"] for it, _ in ok],  # noqa: E731
                                           batch_size=batch_size, **gen)
            row = lambda it, r: {"input": str(it["image"]), "question": it["question"], "answer": r}  # noqa: E731
        else:
            from zoo.pretrained import read_sensor_file

            items = collect_files(_need(inputs, task), SENSOR_EXTS)
            tok, opts = bundle.preprocessor("sensor"), dict(sensor_read or {})

            def read(path: Any) -> Any:
                from modalities.sensor_io import recording_problem

                rec = read_sensor_file(path, tok.cfg.channels, **opts)
                why = recording_problem(rec, tok.cfg.channels)  # a single row, a channel without one value
                if why:
                    raise ValueError(f"{path}: {why}")
                tok(rec)  # the checks the model's tokenizer makes (channels, rate, length)
                return rec

            key = "description"
            run = lambda ok: bundle.describe([x for _, x in ok], batch_size=batch_size, **gen)  # noqa: E731
            row = lambda it, r: {"input": str(it), "description": r}  # noqa: E731
        results: list[dict[str, Any]] = []
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            ok = _readable(chunk, read, skip_bad, skipped)
            answers = iter(run(ok) if ok else [])
            done = {id(it) for it, _ in ok}
            for it in chunk:
                path = str(it["image"] if isinstance(it, dict) else it)
                results.append(row(it, next(answers)) if id(it) in done else
                               {"input": path, **({"question": it["question"]} if isinstance(it, dict) else {}),
                                "error": skipped[path]})
        if skipped:
            listed = "\n  ".join(skipped.values())
            print(f"[mmzoo] skipped {len(skipped)} unreadable input(s) of {len(items)} (skip_bad=true); "
                  f"{len(items) - len(skipped)} {key}(s) made:\n  {listed}", file=sys.stderr)
        return results
    if task == "t2i":
        prompts = read_prompts(inputs, text)
        layouts = None
        if getattr(bundle, "renderer", None) is not None:  # the layout route: each record also lists the planned boxes
            from zoo.layout_generation import render_texts
            from zoo.task_specs import task_spec

            bundle._require_task(task_spec("text_to_image"))
            pixels, layouts = render_texts(bundle, prompts, batch_size)
            images = list(pixels)
        else:
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
            if layouts is not None:
                recs[-1]["layout"] = {"tone": layouts[i].tone, "objects": [{**o, "box": [round(float(v), 4) for v in o["box"]]}
                                                                           for o in layouts[i].objects]}
        return recs
    if task in BOX_TASKS:  # Florence-2: JSON (+ a PNG per image with the boxes drawn)
        return _predict_boxes(bundle, task, _need(inputs, task), text, batch_size, out, gen, regions, box, region)
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


def _is_florence2(bundle: Any) -> bool:
    return all(hasattr(bundle, a) for a in ("detect", "ground", "ocr"))


def _predict_boxes(bundle: Any, task: str, inputs: str, text: str | None, batch_size: int, out: str | None,
                   gen: dict[str, Any], regions: bool = False, box: Any = None,
                   region: str = "category") -> list[dict[str, Any]]:
    if not _is_florence2(bundle):
        raise NotImplementedError(f"task {task} needs a Florence-2 model; this one is {bundle!r}")
    import re

    from zoo.imported.florence2 import draw_boxes
    from zoo.imported.florence2_post import draw_quads

    check_task_args(task, text=text, regions=regions, box=box, region=region)
    files = collect_files(inputs, IMAGE_EXTS)
    paths = [str(f) for f in files]
    kw = {"batch_size": batch_size, **gen}
    draw = draw_boxes
    if task == "detect":  # with text=: open-vocabulary detection of that phrase
        results = [{"text": text, **r} if text else r for r in bundle.detect(paths, vocabulary=text or None, **kw)]
    elif task == "ground":
        results = [{"text": text, **r} for r in bundle.ground(paths, [text] * len(paths), **kw)]
    elif task == "ocr" and not regions:  # text only: no boxes to draw
        return [{"input": p, "text": t} for p, t in zip(paths, bundle.ocr(paths, **kw))]
    elif task == "ocr":
        results, draw = bundle.ocr(paths, regions=True, **kw), draw_quads
    elif region == "proposals":
        results = bundle.propose_regions(paths, **kw)
    else:
        ask = bundle.region_to_category if region == "category" else bundle.region_to_description
        results = [{"box": list(box), region: a, "bboxes": [list(box)], "labels": [re.sub(r"<loc_\d+>", "", a)]}
                   for a in ask(paths, box, **kw)]
    folder = (Path(out).with_suffix("") if out else Path(f"{task}_outputs")).parent / "boxes"
    folder.mkdir(parents=True, exist_ok=True)
    recs = []
    for f, res in zip(files, results):
        png = folder / f"{f.stem}.png"
        draw(f, res).save(png)
        if task == "region" and region != "proposals":  # the drawn box is the input box: keep the answer only
            res = {k: v for k, v in res.items() if k not in ("bboxes", "labels")}
        recs.append({"input": str(f), **res, "png": str(png)})
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
                     "rate": None, "guidance_scale": None, "seed": None, "output": None, "skip_bad": False,
                     "detail": None, "regions": False, "box": None, "region": "category"}, USAGE)
    if args["task"] not in TASKS:
        raise SystemExit(f"error: task must be one of {TASKS}, got {args['task']!r}")
    try:
        check_options(args["precision"], args["quantize"], args["device"])
        box = parse_box(args["box"])
        florence = {"detail": args["detail"], "regions": args["regions"], "box": box, "region": args["region"]}
        check_task_args(args["task"], text=args["text"], **florence)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
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
                          t2i=t2i, skip_bad=args["skip_bad"], **florence, **gen)
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
