"""``--help`` for the Hydra commands (zoo-train, zoo-eval, zoo-finetune), answered before Hydra, torch or Lightning
are imported: a description, examples and the config groups, in a fraction of a second."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

HELP = {
    "zoo-train": """zoo-train: train, evaluate and save a model from a Hydra config (configs/train.yaml).

With no arguments it runs the main job (experiment=multitask: one ofa-tiny model for captioning, VQA,
text-to-image and sensor-to-text on the embedded Shapes and Motion data, about 26 min on a 2-core CPU).
Each run writes outputs/<task_name>/runs/<date>_<time>/ (checkpoints/, metrics.json, predictions.json,
samples.png, the composed config in .hydra/).

examples:
  zoo-train experiment=quickstart                     # every stage of a run in about a minute
  zoo-train                                           # the main job (experiment=multitask)
  zoo-train experiment=caption_shapes trainer.max_epochs=2 data.batch_size=32
  zoo-train experiment=caption_shapes debug=fdr       # one batch of everything (debug=overfit | limit)
  zoo-train experiment=caption_shapes logger=tensorboard   # csv | tensorboard | wandb | mlflow | many_loggers ...
  zoo-train experiment=caption_shapes ckpt_path=last  # resume the newest run of this experiment
  zoo-train trainer=ddp trainer.devices=2             # data parallel (trainer=gpu | fsdp | deepspeed)""",
    "zoo-eval": """zoo-eval: evaluate a training checkpoint or a saved model folder on a split (configs/eval.yaml).

Rebuilds the model and tokenizer from the checkpoint alone, generates over the split and writes
predictions.json (official results format), metrics.json and samples.png into outputs/eval/runs/<date>_<time>/.

examples:
  zoo-eval ckpt=outputs/caption_shapes/runs/<run>/checkpoints/best.ckpt
  zoo-eval ckpt=outputs/multitask/runs/<run>/checkpoints/best.ckpt split=test   # every task it was trained on
  zoo-eval ckpt=<...>.ckpt task.num_beams=4 trainer.limit_batches=2""",
    "zoo-finetune": """zoo-finetune: fine-tune a pretrained model on an experiment's data (configs/finetune.yaml = train.yaml +
pretrained + finetune.*). Weights and tokenizers come from `pretrained`; the run ends by exporting <run>/model
(and <run>/adapter for LoRA).

examples:
  zoo-finetune pretrained=exports/ofa-tiny-shapes experiment=caption_shapes finetune.mode=lora
  zoo-finetune pretrained=hf-hub:org/name experiment=caption_shapes model.image_pretrain=null data.generate=null \\
      data.root=my_data data.train_file=captions_train.json data.val_file=captions_val.json data.test_file=null
  finetune.mode=full | frozen_encoder | lora   (finetune.lora.r / alpha / dropout)""",
}

FOOTER = """
Hydra: key=value overrides, group=option picks a config file, +key=value adds a key, -m runs a sweep.
  --cfg job       print the composed config and exit      --hydra-help   Hydra's own options
More: README.md and docs/ (the docs site)."""


def config_groups(root: Path | None = None) -> dict[str, list[str]]:
    """The config groups under ``configs/`` and their options (file stems), without composing anything."""
    if root is None:
        import configs

        root = Path(configs.__file__).parent
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(root.iterdir())
            if d.is_dir() and any(d.glob("*.yaml")) and d.name != "hydra"}


def maybe_print_help(prog: str, argv: Sequence[str] | None = None) -> None:
    """Print ``prog``'s help and exit when the arguments ask for it (``-h`` / ``--help``)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not any(a in ("-h", "--help") for a in args):
        return
    lines = [HELP[prog], "", "config groups (group=option):"]
    lines += [f"  {g:11s} {', '.join(opts)}" for g, opts in config_groups().items()]
    print("\n".join(lines) + FOOTER)
    raise SystemExit(0)
