"""Backbone variants and compression on one short Shapes captioning + VQA run (issue 9's must-show).

Every contender trains ``experiment=vqa_shapes`` (VQA with one auxiliary caption target per image) with the
same seed and the same wall-clock budget (``tasks.runtime.callbacks.TimeBudget``); each run is its own ``zoo-train`` process.
Then, from each run's best checkpoint (by ``val/vqa_acc``):

* quality: the run's ``test/vqa_acc`` and, through the exported bundle, VQA accuracy on ``--vqa-limit``
  val questions and caption CIDEr-D on ``--caption-limit`` val images (greedy decoding);
* speed: training samples/s (decoder targets per second, ``train/samples_per_sec``);
* size: parameters and active parameters per token;
* int8: the dense model with dynamic int8 linears against fp32 (same inputs, alternating timed passes);
* distillation: a 2+2-layer student (``experiment=distill``) with the dense 4+4 model as teacher against the
  same student without a teacher, same seed and budget.

    python -m benchmarks.variants                       # 4 variants + 2 distill runs, 4 min each (~35 min)
    python -m benchmarks.variants --budget 10 --model test_tiny --data-root /tmp/shapes_tiny --tiny \
        --results /tmp/variants.json                    # a smoke test of the script itself

Results go to ``benchmarks/results/variants.json`` (``--results``) and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, Any]] = {
    "dense": {},
    "multiway": {"ffn": "multiway"},
    "moe": {"ffn": "moe", "num_experts": 4, "moe_top_k": 1},
    "lfa": {"attention": "lfa"},
}


def time_budget(seconds: int) -> list[str]:
    """Overrides that fit the training loop into ``seconds`` (tasks.runtime.callbacks.TimeBudget: the step total is set
    from the first timed steps and the cosine schedule completes inside it); validation runs once, after."""
    return ["+callbacks.time_budget._target_=tasks.runtime.callbacks.TimeBudget", f"+callbacks.time_budget.minutes={seconds / 60}",
            "trainer.max_epochs=-1", "trainer.max_steps=100000", "trainer.check_val_every_n_epoch=null",
            "trainer.val_check_interval=100000"]


def train_run(name: str, run_dir: Path, args: argparse.Namespace, experiment: str = "vqa_shapes",
              model_overrides: dict[str, Any] | None = None, extra: list[str] | None = None) -> dict[str, float]:
    """One ``zoo-train`` process; returns its ``metrics.json``."""
    metrics_file = run_dir / "metrics.json"
    if args.reuse and metrics_file.is_file():
        return json.loads(metrics_file.read_text())
    cmd = [sys.executable, "-m", "tasks.cli.train", f"experiment={experiment}", f"model={args.model}",
           f"seed={args.seed}", f"hydra.run.dir={run_dir}", *time_budget(args.budget), f"data.val_limit={args.val_limit}",
           f"data.root={args.data_root}",
           *(f"+model.overrides.{k}={v}" for k, v in (model_overrides or {}).items()), *(extra or []),
           *args.override]
    print(f"[variants] {name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    log = run_dir.parent / f"{name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    print(f"[variants] {name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(metrics_file.read_text())


def run_checkpoint(run_dir: Path) -> Path:
    """The run's best checkpoint, else its last (time-budgeted runs validate only after the loop)."""
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    return ckpt if ckpt.is_file() else run_dir / "checkpoints" / "last.ckpt"


def load_bundle(run_dir: Path) -> Any:
    from tasks.checkpoint import bundle_from_checkpoint, read_checkpoint

    ckpt = run_checkpoint(run_dir)
    return bundle_from_checkpoint(read_checkpoint(ckpt), str(ckpt))


class EvalSet:
    """Fixed val subsets: VQA questions (VQAv2 accuracy) and caption images (CIDEr-D)."""

    def __init__(self, root: Path, vqa_limit: int, caption_limit: int):
        from tasks.data.coco import read_coco_captions
        from tasks.vqa import VQADataModule

        dm = VQADataModule(str(root), splits={"val": {"questions": "vqa_questions_val.json",
                                                      "annotations": "vqa_annotations_val.json"}},
                           generate=None, check_files="none")
        self.vqa = dm.read("val")[:vqa_limit]
        self.captions = read_coco_captions(root / "captions_val.json", check_files=False)[:caption_limit]

    def score(self, bundle: Any, batch_size: int = 64) -> dict[str, float]:
        from tasks.metrics import caption_scores, vqa_scores

        answers = bundle.answer([str(r.path) for r in self.vqa], [r.question for r in self.vqa], batch_size=batch_size)
        vqa = vqa_scores({r.question_id: a for r, a in zip(self.vqa, answers)},
                         {r.question_id: r.annotation() for r in self.vqa})["overall"]
        caps = bundle.caption([str(r.path) for r in self.captions], batch_size=batch_size)
        cider = caption_scores({r.image_id: c for r, c in zip(self.captions, caps)},
                               {r.image_id: list(r.captions) for r in self.captions})["cider"]
        return {"vqa_acc": float(vqa), "cider": float(cider)}

    def timed(self, bundle: Any, batch_size: int = 64) -> float:
        t0 = time.perf_counter()
        self.score(bundle, batch_size)
        return time.perf_counter() - t0


def summary(name: str, metrics: dict[str, float], bundle: Any, evalset: EvalSet) -> dict[str, Any]:
    return {"name": name, "test/vqa_acc": metrics.get("test/vqa_acc"), **{f"eval/{k}": v for k, v in evalset.score(bundle).items()},
            "train/samples_per_sec": metrics.get("train/samples_per_sec"), "train/fit_seconds": metrics.get("train/fit_seconds"),
            "params": bundle.model.num_parameters(), "active_params": bundle.model.num_active_parameters(),
            **{k: v for k, v in metrics.items() if k.startswith("train/moe_") or k == "train/distill_kl"},
            "config": {k: getattr(bundle.model.cfg, k) for k in ("ffn", "attention", "num_experts", "moe_top_k",
                                                                 "enc_layers", "dec_layers")}}


def int8_comparison(bundle: Any, evalset: EvalSet, reps: int) -> dict[str, Any]:
    """fp32 vs dynamic int8 on the same eval set: metrics and alternating wall-clock timings."""
    import statistics

    from zoo.compress import model_size_bytes, quantize_int8

    q = quantize_int8(bundle)
    out: dict[str, Any] = {"fp32": evalset.score(bundle), "int8": evalset.score(q)}
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for _ in range(reps):
        for name, b in (("fp32", bundle), ("int8", q)):
            times[name].append(evalset.timed(b))
    out["seconds_median"] = {k: statistics.median(v) for k, v in times.items()}
    out["speedup"] = statistics.median([a / b for a, b in zip(times["fp32"], times["int8"])])
    out["delta"] = {k: out["int8"][k] - out["fp32"][k] for k in out["fp32"]}
    out["bytes"] = {"fp32": model_size_bytes(bundle.model), "int8": model_size_bytes(q.model)}
    return out


def markdown(results: dict[str, Any]) -> str:
    from benchmarks.common import table

    rows = [[r["name"], r["config"]["ffn"], r["config"]["attention"], r["test/vqa_acc"], r["eval/vqa_acc"],
             r["eval/cider"], r["train/samples_per_sec"], f"{r['params'] / 1e6:.2f}M", f"{r['active_params'] / 1e6:.2f}M"]
            for r in results["runs"]]
    text = [table(rows, ["run", "ffn", "attention", "test vqa_acc", "eval vqa_acc", "eval CIDEr", "train samples/s",
                         "params", "active params"])]
    q = results.get("int8")
    if q:
        text.append(table([["fp32", q["fp32"]["vqa_acc"], q["fp32"]["cider"], q["seconds_median"]["fp32"], 1.0],
                           ["int8", q["int8"]["vqa_acc"], q["int8"]["cider"], q["seconds_median"]["int8"], q["speedup"]]],
                          ["dense model", "eval vqa_acc", "eval CIDEr", "eval seconds", "speed-up"]))
    d = results.get("distill")
    if d:
        text.append(f"distillation gain (student with teacher − without): vqa_acc {d['gain']['vqa_acc']:+.2f}, "
                    f"CIDEr {d['gain']['cider']:+.3f}, test vqa_acc {d['gain']['test/vqa_acc']:+.2f}")
    return "\n\n".join(text)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=int, default=240, help="training seconds per run (tasks.runtime.callbacks.TimeBudget)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--model", default="ofa_tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=str(ROOT / "data" / "shapes"))
    p.add_argument("--val-limit", type=int, default=600, help="val questions scored during training")
    p.add_argument("--vqa-limit", type=int, default=1000, help="val questions in the bundle evaluation")
    p.add_argument("--caption-limit", type=int, default=250, help="val images in the caption evaluation")
    p.add_argument("--int8-reps", type=int, default=3)
    p.add_argument("--no-distill", action="store_true")
    p.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks" / "variants"), help="run directories")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "variants.json"))
    p.add_argument("--reuse", action="store_true", help="reuse finished runs found in --out")
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes: small Shapes, 1 int8 rep")
    p.add_argument("override", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args(argv)
    if args.tiny:
        args.override += ["data.shapes.n_train=64", "data.shapes.n_val=16", "data.shapes.n_test=16",
                          "data.batch_size=8", "data.num_workers=0", "data.tokenizer_vocab_size=300",
                          "task.max_new_tokens=6"]
        args.val_limit, args.vqa_limit, args.caption_limit, args.int8_reps = 16, 32, 16, 1
    out = Path(args.out)
    import torch

    from benchmarks.common import machine

    results: dict[str, Any] = {"machine": machine(), "budget_s": args.budget, "seed": args.seed, "model": args.model,
                               "threads": torch.get_num_threads(), "runs": []}
    evalset: EvalSet | None = None
    bundles: dict[str, Any] = {}
    for name in args.variants.split(","):
        metrics = train_run(name, out / name, args, model_overrides=VARIANTS[name])
        evalset = evalset or EvalSet(Path(args.data_root), args.vqa_limit, args.caption_limit)
        bundles[name] = load_bundle(out / name)
        results["runs"].append(summary(name, metrics, bundles[name], evalset))
        print(json.dumps(results["runs"][-1]), flush=True)
    assert evalset is not None
    if "dense" in bundles:
        results["int8"] = int8_comparison(bundles["dense"], evalset, args.int8_reps)
        print(json.dumps(results["int8"]), flush=True)
        if not args.no_distill:
            teacher = run_checkpoint(out / "dense")
            runs = {}
            for name, t in (("student_distilled", str(teacher)), ("student_alone", "null")):
                metrics = train_run(name, out / name, args, experiment="distill", extra=[f"task.teacher={t}"])
                runs[name] = summary(name, metrics, load_bundle(out / name), evalset)
                results["runs"].append(runs[name])
            a, b = runs["student_distilled"], runs["student_alone"]
            results["distill"] = {"teacher": "dense", "gain": {
                "vqa_acc": a["eval/vqa_acc"] - b["eval/vqa_acc"], "cider": a["eval/cider"] - b["eval/cider"],
                "test/vqa_acc": (a["test/vqa_acc"] or 0.0) - (b["test/vqa_acc"] or 0.0)}}
    results["table"] = markdown(results)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2))
    print(results["table"])
    print(f"[variants] results -> {args.results}")
    return results


if __name__ == "__main__":
    main()
