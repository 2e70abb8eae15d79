"""Shared by the examples: train a micro model for one experiment in seconds and export it to a model folder.

The micro model (``model=test_tiny``, a few dozen steps on a few dozen generated records) shows the whole path,
not useful predictions: pass the folder of a real run instead (``zoo-export ckpt=<run>/checkpoints/best.ckpt
out=<folder>``), e.g. the quick start's.
"""
from __future__ import annotations

from pathlib import Path

SMALL = ["model=test_tiny", "model.image_pretrain=null", "data.num_workers=0", "data.batch_size=4",
         "data.eval_batch_size=16", "data.tokenizer_vocab_size=300", "logger={}", "test=false",
         "trainer.max_epochs=-1", "trainer.max_steps=40", "task.lr=3e-3", "task.warmup_steps=5"]
SHAPES = ["data.shapes.n_train=64", "data.shapes.n_val=16", "data.shapes.n_test=16"]
PER_EXPERIMENT = {
    "caption_shapes": [*SMALL, *SHAPES, "task.max_new_tokens=12"],
    "vqa_shapes": [*SMALL, *SHAPES, "task.max_new_tokens=4"],
    "sensor_motion": [*SMALL, "data.motion.n_train=32", "data.motion.n_val=8", "data.motion.n_test=8",
                      "task.max_new_tokens=12"],
    # a 2-step micro VQ image tokenizer and a 1-epoch attribute probe
    "t2i_shapes": [*SMALL, *SHAPES, "trainer.max_steps=10", "data.vq.task.compact_distance=0.0",
                   "++model.overrides.max_positions=80", "data.max_prompt_len=48", "data.vq.max_steps=2",
                   "data.vq.task.vq.channels=[8,8,8,8]", "data.vq.task.vq.num_codes=16", "data.vq.data.batch_size=4",
                   "data.vq.task.autoencode_steps=1", "task.probe_train.epochs=1"],
}


def tiny_model(experiment: str, workdir: str | Path) -> Path:
    """Train ``experiment`` at micro size under ``workdir`` and export it; returns the model folder."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from tasks.cli.export import export
    from tasks.runtime.resolvers import register_resolvers
    from tasks.cli.train import train

    workdir = Path(workdir).absolute()
    overrides = [f"experiment={experiment}", f"paths.output_dir={workdir}/run", f"paths.log_dir={workdir}/logs",
                 f"data.root={workdir}/data", *PER_EXPERIMENT[experiment]]
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    print(f"[example] training a micro {experiment} model for a few seconds in {workdir} (pass a model folder instead)")
    train(cfg)
    return export(workdir / "run" / "checkpoints" / "best.ckpt", workdir / "model")
