"""Every experiment composes and runs (fast_dev_run); real short training; resume after SIGKILL."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import EXPERIMENTS, compose

FLORENCE2_EXPERIMENTS = ("od_shapes", "florence2_caption_shapes")
TINY = ["model=test_tiny", "data.num_workers=0", "data.batch_size=4", "data.eval_batch_size=16",
        "data.tokenizer_vocab_size=300", "task.max_new_tokens=8"]


def _data(root: Path) -> list[str]:
    return [f"data.root={root}", "data.shapes.n_train=64", "data.shapes.n_val=16", "data.shapes.n_test=16"]


def _experiment_data(experiment: str, shapes_root: Path, tmp_path: Path) -> list[str]:
    """Small-data overrides for one experiment (Shapes by default)."""
    if experiment == "sensor_motion":
        return [f"data.root={tmp_path}/motion", "data.motion.n_train=32", "data.motion.n_val=8", "data.motion.n_test=8"]
    if experiment.startswith("vq_shapes"):  # a narrow VQModel (as many blocks as the experiment's); no text
        blocks = "[8,8,8]" if experiment == "vq_shapes16" else "[8,8,8,8]"
        # distance 0: a 1-step micro VQ has no codes 0.15 apart, but the compacted save still runs
        return _data(shapes_root) + [f"task.vq.channels={blocks}", "task.vq.num_codes=16", "task.compact_distance=0.0",
                                     "task.autoencode_steps=0"]
    if experiment.startswith("t2i_shapes"):  # a 2-step VQ tokenizer (cached under the data root), a 1-epoch probe
        big = experiment == "t2i_shapes16"  # 256 codes
        # compacted at distance 0: the micro VQ has no codes the configured distance apart
        return _data(shapes_root) + ["data.vq.task.compact_distance=0.0",
                                     f"++model.overrides.max_positions={272 if big else 80}", "data.max_prompt_len=48",
                                     "data.vq.max_steps=2", f"data.vq.task.vq.channels={'[8,8,8]' if big else '[8,8,8,8]'}",
                                     "data.vq.task.vq.num_codes=16", "data.vq.data.batch_size=4", "data.vq.task.autoencode_steps=1",
                                     "task.probe_train.epochs=1"] + \
            ([] if big else ["data.layout.max_layout_len=64", "task.layout.max_layout_len=64"])  # the layout route
    if experiment == "multitask":
        return multitask_overrides(shapes_root, tmp_path)
    return _data(shapes_root)


def multitask_overrides(shapes_root: Path, tmp_path: Path) -> list[str]:
    """Tiny-model, tiny-data overrides for experiment=multitask (per task under data.tasks/task.tasks)."""
    out = ["model=test_tiny", "+model.overrides.max_positions=80", "data.tokenizer_vocab_size=300",
           f"data.root={tmp_path}/multitask", "task.tasks.text_to_image.probe_train.epochs=1"]
    for t in ("caption", "vqa", "text_to_image", "sensor_to_text"):
        out += [f"data.tasks.{t}.num_workers=0", f"data.tasks.{t}.batch_size=4", f"data.tasks.{t}.eval_batch_size=16"]
    for t in ("caption", "vqa", "sensor_to_text"):
        out.append(f"task.tasks.{t}.max_new_tokens=8")
    for t in ("caption", "vqa", "text_to_image"):
        out += [f"data.tasks.{t}.root={shapes_root}", f"data.tasks.{t}.shapes.n_train=64",
                f"data.tasks.{t}.shapes.n_val=16", f"data.tasks.{t}.shapes.n_test=16"]
    vq = "data.tasks.text_to_image.vq"
    out += ["data.tasks.text_to_image.max_prompt_len=48", "data.tasks.text_to_image.layout.max_layout_len=64",
            "task.tasks.text_to_image.layout.max_layout_len=64", f"{vq}.max_steps=2", f"{vq}.task.vq.channels=[8,8,8,8]",
            f"{vq}.task.vq.num_codes=16", f"{vq}.data.batch_size=4", f"{vq}.task.autoencode_steps=1"]
    out += [f"data.tasks.sensor_to_text.root={tmp_path}/motion", "data.tasks.sensor_to_text.motion.n_train=32",
            "data.tasks.sensor_to_text.motion.n_val=8", "data.tasks.sensor_to_text.motion.n_test=8"]
    return out


def _tiny(experiment: str) -> list[str]:
    """TINY, less the entries an experiment's configs lack."""
    if experiment == "multitask":
        return []
    if experiment.startswith("vq_shapes"):  # the VQ tokenizer task: no text tokenizer, no generation
        return [o for o in TINY if not o.startswith(("data.tokenizer_vocab_size", "task.max_new_tokens"))]
    if experiment in FLORENCE2_EXPERIMENTS:  # Florence-2's task needs a Florence-2 architecture
        return ["model=test_florence2" if o == "model=test_tiny" else o for o in TINY]
    return TINY


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_fast_dev_run(experiment, tiny_shapes, tmp_path):
    from tasks.cli.train import train

    cfg = compose([f"experiment={experiment}", *_tiny(experiment), *_experiment_data(experiment, tiny_shapes, tmp_path),
                   "trainer.fast_dev_run=true",
                   "logger={}"], tmp_path)
    metrics = train(cfg)
    assert (tmp_path / "metrics.json").is_file()
    assert any(k.startswith("test/") for k in metrics)
    if experiment.startswith("vq_shapes"):  # the trained tokenizer is saved as a diffusers folder
        from modalities.image_codes import ImageCodeTokenizer

        saved = ImageCodeTokenizer.from_pretrained(tmp_path / "vq_tokenizer")
        if experiment == "vq_shapes16":  # compacted: only used codes, and the saved codebook's own PSNR
            assert saved.num_codes == metrics["export/num_codes"] <= 16 and metrics["export/val_psnr"] > 0


def test_short_training_loss_drops_and_writes_artifacts(tiny_shapes, tmp_path):
    from tasks.cli.train import train

    cfg = compose(["experiment=caption_shapes", *TINY, *_data(tiny_shapes), "trainer.max_epochs=6",
                   "model.image_pretrain=null",  # the whole model learns: the loss must fall by 40 %
                   "trainer.log_every_n_steps=1", "task.warmup_steps=5", "task.lr=3e-3"], tmp_path)
    metrics = train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    assert {"val/cider", "val/bleu4", "test/cider", "train/loss"} <= set(saved)
    preds = json.loads((tmp_path / "predictions.json").read_text())
    assert len(preds) == 16 and set(preds[0]) == {"image_id", "caption"}
    assert (tmp_path / "samples.png").stat().st_size > 1000
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "checkpoints" / "best.ckpt").is_file()


def test_resume_after_sigkill(tiny_shapes, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "tasks.cli.train", "experiment=caption_shapes", *TINY, *_data(tiny_shapes),
            f"hydra.run.dir={run_dir}", f"paths.log_dir={tmp_path}/logs", "trainer.max_steps=60",
            "trainer.max_epochs=-1", "callbacks.mid_epoch_checkpoint.every_n_train_steps=4", "test=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if last.is_file():
            step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
            if step >= 8:
                break
        time.sleep(0.2)
    assert proc.poll() is None, "training finished before it could be killed; make the run longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]  # still loadable
    assert 8 <= killed_at < 60
    done = subprocess.run(args + ["ckpt_path=last"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == 60
    assert "Restoring states from the checkpoint" in done.stdout + done.stderr


def test_last_checkpoint_holds_the_final_step(tiny_shapes, tmp_path):
    """A run that stops off its checkpoint interval, with no validation in the loop (as under a time budget),
    still leaves last.ckpt at its final step: the weights its final metrics describe."""
    import torch

    from tasks.cli.train import train

    cfg = compose(["experiment=caption_shapes", *TINY, *_data(tiny_shapes), "trainer.max_steps=7",
                   "trainer.max_epochs=-1", "trainer.check_val_every_n_epoch=null",
                   "trainer.val_check_interval=100000", "callbacks.mid_epoch_checkpoint.every_n_train_steps=5"],
                  tmp_path)
    metrics = train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert metrics["train/steps"] == 7 and ckpt["global_step"] == 7
    # the one validation after the loop scored these weights: they are best.ckpt, which zoo-eval reads
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert best["global_step"] == 7
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(best["state_dict"][key], value), key
    from tasks.cli.evaluate import load_for_eval

    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt does not exist; .*holds best\.ckpt, last\.ckpt"):
        load_for_eval(str(tmp_path / "checkpoints" / "missing.ckpt"), None, False)
