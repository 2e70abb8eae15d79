"""Scale-out on CPU with 2 processes (gloo): ``trainer=ddp`` and ``trainer=fsdp`` against one process.

One global batch per epoch (8 training images: one process at batch 8, two ranks at batch 4 each) so
the sampler order cannot differ between the runs, dropout off, fp32, and targets cut to one length so
that DDP's mean of per-rank token means equals the single process's token mean. Tolerance: every
per-step training loss within 1e-4 relative of the single-process run (measured: ~2e-7).
Validation and test use 5 records (odd): DistributedSampler pads rank 1 with a duplicate.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import compose

RTOL = 1e-4
N_EVAL = 5  # odd: the distributed sampler pads
RUN = ["experiment=caption_shapes", "model=test_tiny", "model.image_pretrain=null", "data.num_workers=0", "data.eval_batch_size=16",
       "data.tokenizer_vocab_size=300", "task.max_new_tokens=8", "data.shapes.n_train=8",
       f"data.shapes.n_val={N_EVAL}", f"data.shapes.n_test={N_EVAL}",
       "data.max_target_len=6",  # every caption is longer: equal token counts on every rank
       "+model.overrides.modalities.image.backbone_kwargs={norm_layer:groupnorm1}",  # no BatchNorm batch statistics
       "trainer.precision=32-true", "trainer.max_epochs=4", "trainer.log_every_n_steps=1",
       "task.warmup_steps=2", "task.lr=3e-3"]
TWO_RANKS = ["data.batch_size=4", "trainer.devices=2", "trainer.accelerator=cpu"]


def _zoo_train() -> list[str]:
    exe = shutil.which("zoo-train", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "tasks.cli.train"]


def _losses(run: Path) -> list[float]:
    rows = csv.DictReader(open(run / "csv" / "metrics.csv"))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def _predictions(run: Path) -> dict:
    return {p["image_id"]: p["caption"] for p in json.loads((run / "predictions.json").read_text())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The ddp and fsdp runs (``zoo-train`` subprocesses, started together) and the single-process run."""
    from tasks.data.shapes import ShapesConfig, ensure_shapes
    from tasks.cli.train import train

    base = tmp_path_factory.mktemp("dist")
    data = base / "shapes"
    ensure_shapes(data, ShapesConfig(n_train=8, n_val=N_EVAL, n_test=N_EVAL))
    common = [*RUN, f"data.root={data}"]
    single = base / "single"
    # MMZOO_CPU_PACKED=0: FSDP's sharded weights decode through F.linear, so the single-process and DDP runs
    # do too; the runs then differ only in what the strategies do (zoo/cpu_linears.py)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMZOO_CPU_PACKED", "0")
        train(compose([*common, "data.batch_size=8"], single))  # also caches the BPE for the others

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MMZOO_CPU_PACKED": "0"}
    procs = {}
    for name in ("ddp", "fsdp"):
        cwd = base / f"{name}_cwd"  # a stray output folder relative to the working dir would show here
        cwd.mkdir()
        # no hydra.run.dir: the default clock-stamped run dir must be the same on both ranks
        args = [*_zoo_train(), *common, *TWO_RANKS, f"trainer={name}", f"paths.log_dir={base}/{name}_logs"]
        procs[name] = (subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True), cwd)
    out = {"single": single, "base": base, "data": data}
    for name, (proc, cwd) in procs.items():
        log, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, f"{name} failed:\n{log[-4000:]}"
        found = sorted((base / f"{name}_logs").glob("caption_shapes/runs/*"))
        out[name], out[f"{name}_log"], out[f"{name}_cwd"] = found, log, cwd
    return out


def test_ddp_makes_one_run_directory_with_rank_zero_writes(runs):
    found = runs["ddp"]
    assert len(found) == 1, f"expected one run directory, got {found}"
    run = found[0]
    assert not list(runs["ddp_cwd"].iterdir()), "something was written relative to the working directory"
    names = {p.name for p in run.iterdir()}
    assert {".hydra", "checkpoints", "csv", "metrics.json", "predictions.json", "samples.png"} <= names
    # beside rank 0's files, Hydra's per-process job log of rank 1 only
    assert names - {".hydra", "checkpoints", "csv", "metrics.json", "predictions.json", "samples.png",
                    "train.log", "train_ddp_process_1.log"} == set()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    log = runs["ddp_log"]
    assert log.count("[mmzoo] final metrics:") == 1  # rank 1 prints and writes nothing of its own
    assert log.count(f"[mmzoo] run directory: {run}") == 2
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_loss_curve_matches_single_process(runs, strategy):
    single, dist = _losses(runs["single"]), _losses(runs[strategy][0])
    assert len(single) == len(dist) == 4
    assert single[-1] < single[0] - 0.1  # the curve moves, so matching it means something
    assert dist == pytest.approx(single, rel=RTOL), (single, dist)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_eval_reduced_across_ranks_without_duplicates(runs, strategy):
    run = runs[strategy][0]
    preds = json.loads((run / "predictions.json").read_text())  # the test split, gathered over ranks
    ids = [p["image_id"] for p in preds]
    references = json.loads((runs["data"] / "captions_test.json").read_text())
    assert len(ids) == len(set(ids)) == N_EVAL
    assert set(ids) == {im["id"] for im in references["images"]}
    assert _predictions(run) == _predictions(runs["single"])
    metrics = json.loads((run / "metrics.json").read_text())
    single = json.loads((runs["single"] / "metrics.json").read_text())
    keys = [k for k in single if k.startswith(("val/", "test/"))]
    assert {"val/cider", "val/rouge_l", "test/cider", "test/bleu4"} <= set(keys)
    assert {k: metrics[k] for k in keys} == pytest.approx({k: single[k] for k in keys}, rel=1e-6, abs=1e-9)


def test_fsdp_checkpoint_loads_in_one_process(runs, tmp_path):
    from hydra import compose as hcompose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from tasks.cli.evaluate import evaluate

    run = runs["fsdp"][0]
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    ddp = torch.load(runs["ddp"][0] / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"].keys() == ddp["state_dict"].keys()  # full, unsharded tensors under the usual names
    for k, v in ckpt["state_dict"].items():
        assert type(v) is torch.Tensor and v.shape == ddp["state_dict"][k].shape, k
        torch.testing.assert_close(v, ddp["state_dict"][k], rtol=1e-4, atol=1e-5)

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="configs", version_base="1.3"):
        cfg = hcompose(config_name="eval", overrides=[
            f"paths.output_dir={tmp_path}", f"paths.log_dir={tmp_path}/logs", f"ckpt={run}/checkpoints/best.ckpt",
            "split=test", "data=shapes_captions", f"data.root={runs['data']}", "data.num_workers=0",
            "data.max_target_len=6", "data.shapes.n_train=8",  # max_target_len also cuts the prompt
            f"data.shapes.n_val={N_EVAL}", f"data.shapes.n_test={N_EVAL}", "trainer.precision=32-true"])
    metrics = evaluate(cfg)
    assert _predictions(tmp_path) == _predictions(run)  # same outputs as the 2-rank FSDP test pass
    fsdp_metrics = json.loads((run / "metrics.json").read_text())
    assert {k: v for k, v in metrics.items() if k.startswith("test/")} == pytest.approx(
        {k: v for k, v in fsdp_metrics.items() if k.startswith("test/")}, rel=1e-6, abs=1e-9)


def test_trainer_configs_compose(tmp_path):
    """Backends follow the accelerator; FSDP shards over every process; DeepSpeed refuses the CPU early."""
    from tasks.cli.train import train

    ddp = compose(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], tmp_path)
    assert ddp.trainer.strategy.process_group_backend == "gloo"
    fsdp = compose(["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_nodes=3"], tmp_path)
    assert fsdp.trainer.strategy.data_parallel_size == 6 and fsdp.trainer.strategy.tensor_parallel_size == 1
    assert compose(["trainer=ddp", "trainer.accelerator=gpu"], tmp_path).trainer.strategy.process_group_backend == "nccl"
    ds = compose(["trainer=deepspeed", "trainer.strategy.stage=3"], tmp_path)
    assert ds.trainer.strategy.stage == 3
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA GPUs"):
            train(ds)


def test_bf16_accumulation_and_grad_checkpointing_from_hydra(tmp_path, monkeypatch):
    import tasks.cli.train as T

    built = []
    orig = T.build_model
    monkeypatch.setattr(T, "build_model", lambda *a, **k: built.append(orig(*a, **k)) or built[-1])
    data = tmp_path / "shapes"
    cfg = compose([*RUN, f"data.root={data}", "data.batch_size=2", "trainer.precision=bf16-mixed",
                   "trainer.accumulate_grad_batches=2", "grad_checkpointing=true", "trainer.max_epochs=1",
                   "test=false", "logger={}"], tmp_path)
    metrics = T.train(cfg)
    assert built[0].cfg.grad_checkpointing is True
    assert metrics["train/loss"] > 0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2  # 4 batches of 2, 2 per optimizer step
    assert ckpt["mmzoo"]["model_config"]["grad_checkpointing"] is True


def test_launcher_ranks_share_one_run_dir(monkeypatch):
    """torchrun/srun ranks resolve the config independently: the run dir must not depend on the clock."""
    from tasks.runtime.resolvers import rank_suffix, rank_zero_subdir, run_stamp

    for var in ("MMZOO_RUN_ID", "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "TORCHELASTIC_RUN_ID", "RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    assert run_stamp() == "torchrun-job7"
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_STEP_ID", "2")
    assert run_stamp() == "slurm-123.2"
    monkeypatch.setenv("RANK", "3")
    assert rank_zero_subdir(".hydra") is None and rank_suffix() == "_rank3"
    monkeypatch.setenv("RANK", "0")
    assert rank_zero_subdir(".hydra") == ".hydra" and rank_suffix() == ""
