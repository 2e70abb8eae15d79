"""``zoo-eval``: evaluate a checkpoint (or a saved model folder) on a dataset's val/test split.

The model, tokenizer and task are rebuilt from the checkpoint alone (``checkpoint["mmzoo"]``); the
training config is not needed. Generation is batched (Lightning's evaluation loop, with its progress
bar); the run directory gets ``predictions.json`` in the task's official results format (COCO
``[{"image_id", "caption"}]``, VQA ``[{"question_id", "answer"}]``), ``metrics.json`` and ``samples.png``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict



def load_for_eval(source: str, task_type: str | None = None, unsafe_pickle: bool = False
                  ) -> tuple[Any, Any, str, dict[str, Any]]:
    """``(model, tokenizer, task name, task settings)`` from a ``.ckpt`` or a model folder / hub id."""
    path = Path(source)
    if path.is_file() or path.suffix == ".ckpt":  # a missing .ckpt: read_checkpoint says what the folder holds
        from tasks.checkpoint import CheckpointMeta, bundle_from_checkpoint, read_checkpoint
        from tasks.registry import task_class_for

        ckpt = read_checkpoint(path, unsafe_pickle=unsafe_pickle)
        bundle = bundle_from_checkpoint(ckpt, str(path))
        meta = CheckpointMeta.read(ckpt, str(path))
        name = task_type or meta.task
        settings = dict(ckpt.get("hyper_parameters") or {})
        if meta.state.get("candidates"):
            settings["candidates"] = meta.state["candidates"]
        settings = task_class_for(name, settings).eval_settings(settings, ckpt, str(path))
        # the task's own networks beside the model (a layout renderer): loaded into the task by evaluate()
        own = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("model.")}
        if own:
            settings["own_state"] = own
        return bundle.model, bundle.tokenizer, name, settings
    import zoo

    bundle = zoo.load(source)
    names = list(bundle.tasks)
    if task_type is None:
        if len(names) != 1:
            raise ValueError(f"{source} holds tasks {names}; say which with task_type=<name>")
        task_type = names[0]
    return bundle.model, bundle.tokenizer, task_type, dict(bundle.tasks.get(task_type) or {})


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Run ``zoo-eval``; returns the metrics (also written to ``metrics.json``)."""
    import lightning as L
    from hydra.utils import instantiate

    from tasks.cli.train import report_metrics
    from tasks.registry import task_class_for
    from tasks.runtime.logs import tidy_logging

    tidy_logging()

    if cfg.split not in ("val", "test"):
        raise ValueError(f"split must be val or test, got {cfg.split!r}")
    out = Path(cfg.paths.output_dir)
    model, tokenizer, name, settings = load_for_eval(str(cfg.ckpt), cfg.get("task_type"), cfg.unsafe_pickle)
    own = settings.pop("own_state", None)
    task_cls = task_class_for(name, settings)
    overrides = OmegaConf.to_container(cfg.get("task") or OmegaConf.create({}), resolve=True)
    kwargs = task_cls.eval_kwargs(settings, overrides)
    task = task_cls(model=model, tokenizer=tokenizer, **kwargs)
    if own:  # the checkpoint's weights of the task's own networks (the model's are loaded already)
        unexpected = task.load_state_dict(own, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{cfg.ckpt}: weights this task has no place for: {unexpected[:5]}")

    if cfg.get("data") is None:
        with open_dict(cfg):
            cfg.data = task_cls.eval_data_config(settings, cfg.paths.data_dir)
    elif "decoder" in cfg.data and settings.get("decoder"):  # text-to-image data read by the checkpoint's route
        cfg.data.decoder = settings["decoder"]
    dm = instantiate(cfg.data)
    dm.bind(model.cfg, model.layout, tokenizer=tokenizer)  # the checkpoint's tokenizer, never retrained
    dm.prepare_data()
    t = cfg.trainer
    limit = t.get("limit_batches") or 1.0
    trainer = L.Trainer(accelerator=t.accelerator, devices=t.devices, precision=t.precision, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(out),
                        limit_val_batches=limit, limit_test_batches=limit)
    print(f"[mmzoo] run directory: {out}\n[mmzoo] evaluating {cfg.ckpt} ({name}) on the {cfg.split} split")
    if cfg.split == "val":
        trainer.validate(task, datamodule=dm, verbose=False)
    else:
        trainer.test(task, datamodule=dm, verbose=False)
    metrics = dict(task.final_metrics)
    if trainer.is_global_zero:
        task.write_artifacts(out, cfg.split)
        report_metrics(task, metrics, out, f"predictions and samples → {out}")
    return metrics


def main() -> None:
    from tasks.cli.entry import run_job, start_command

    start_command("zoo-eval")
    import hydra

    @hydra.main(version_base="1.3", config_path="pkg://configs", config_name="eval")
    def _main(cfg: DictConfig) -> None:  # defined here: Hydra names the job (and its log) after this file
        run_job(evaluate, cfg)

    _main()


if __name__ == "__main__":
    main()
