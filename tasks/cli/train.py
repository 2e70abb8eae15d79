"""``zoo-train``: the Hydra entry point. ``train(cfg)`` instantiates, fits, tests and returns metrics."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tasks.runtime.budget import RUN_START  # noqa: F401  (starts the run's clock: budget.total_minutes counts from here)


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path``: null, a file, or ``last`` (this run dir's last.ckpt, else the newest run's)."""
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        return None
    if ckpt != "last":
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt} does not exist")
        return str(ckpt)
    own = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if own.is_file():
        return str(own)
    runs = Path(cfg.paths.log_dir) / cfg.task_name / "runs"
    found = sorted(runs.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"ckpt_path=last: no checkpoints/last.ckpt in {own.parent.parent} or under {runs}")
    return str(found[-1])


def build_model(model_cfg: DictConfig, text_vocab_size: int, data_overrides: dict[str, Any] | None = None):
    """Create the configured architecture with the tokenizer's text vocabulary size.

    ``data_overrides`` come from the datamodule (e.g. a sensor modality config with statistics fitted
    on the training data) and are merged under the user's ``model.overrides``.
    """
    import zoo

    raw = model_cfg.get("overrides")
    overrides: dict[str, Any] = OmegaConf.to_container(raw, resolve=True) if raw else {}  # type: ignore[assignment]
    for key, value in (data_overrides or {}).items():
        if key == "modalities":
            mods = overrides.setdefault("modalities", {})
            for m, mcfg in value.items():
                mods[m] = {**mcfg, **mods.get(m, {})}
        else:
            overrides.setdefault(key, value)
    pretrain = model_cfg.get("image_pretrain")
    if pretrain:  # the image backbone starts from weights pretrained on dense scene labels (cached)
        from modalities.base import get_modality
        from tasks.runtime.distributed import prepare_lock
        from tasks.tools.backbone_pretrain import ensure_pretrained_backbone, resolve_spec

        arch_modalities = zoo.model_config(model_cfg.name).modalities
        image_key = next((m for m in arch_modalities if get_modality(m).pretrainable), None)
        if image_key is None:
            raise ValueError(f"model.image_pretrain: {model_cfg.name} has no modality whose backbone can be pretrained "
                             f"(its modalities: {sorted(arch_modalities)})")
        hook = get_modality(image_key).pretrainable
        image_over = (overrides.get("modalities") or {}).get(image_key) or {}
        image_cfg = {**arch_modalities.get(image_key, {}), **image_over}
        user_spec: dict[str, Any] = OmegaConf.to_container(pretrain, resolve=True)  # type: ignore[assignment]
        freeze = bool(user_spec.pop("freeze", False))
        spec = resolve_spec(user_spec, image_cfg, image_key)
        from tasks.runtime.resume import isolated_rng

        # torchrun/srun ranks: the first pretrains, the others load its cache; pretraining or reading the cache
        # leaves the RNG as it was, so the model's initialisation does not depend on whether the cache existed
        with prepare_lock(spec["root"]), isolated_rng():
            weights = ensure_pretrained_backbone(spec)
        if hook.config_for:  # the embedder loads the file when it is built
            overrides.setdefault("modalities", {})[image_key] = {**image_over, **hook.config_for(str(weights))}
    vocab = dict(zoo.model_config(model_cfg.name).vocab)
    vocab.update(overrides.pop("vocab", {}) or {})
    vocab["text_size"] = text_vocab_size
    vocab.pop("ranges", None)
    model = zoo.create_model(model_cfg.name, vocab=vocab, **overrides)
    if pretrain and hook.load:
        hook.load(model.embedders[image_key], str(weights))
    if pretrain and freeze:  # keep the pretrained stem fixed: weights and BatchNorm statistics
        from tasks.adapters import freeze_batchnorm_stats

        backbone = hook.module(model.embedders[image_key])
        backbone.requires_grad_(False)
        freeze_batchnorm_stats(backbone)
    return model


def save_final_last(trainer) -> None:
    """Write ``last.ckpt`` at the final step (a run that ends at a time budget or a step total off the checkpoint
    interval would otherwise keep an older one): the checkpoint then holds the weights that the final metrics
    describe, and resuming from it finds the run complete. Where the interval already saved this step, the write
    repeats it (atomically) rather than read Lightning's private bookkeeping."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath and trainer.global_step > 0:
            path = Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
            trainer.save_checkpoint(path, weights_only=False)  # optimizer too (resumable); every rank: FSDP gathers shards collectively
            return


def save_final_best(trainer) -> None:
    """Write the monitored checkpoint (``best.ckpt``) after the one validation of a run that never validated in its
    loop (a time budget, a step total off the validation interval): that validation scored the final weights, so
    they are the best the run has seen. Without it such a run would leave no ``best.ckpt`` for zoo-eval/zoo-export."""
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint) or not cb.monitor or cb.save_top_k == 0 or not cb.dirpath:
            continue
        score = trainer.callback_metrics.get(cb.monitor)
        if cb.best_model_path or score is None:
            continue
        path = cb.format_checkpoint_name({**trainer.callback_metrics, "epoch": torch.tensor(trainer.current_epoch),
                                          "step": torch.tensor(trainer.global_step)})
        trainer.save_checkpoint(path, weights_only=False)  # optimizer too; every rank: FSDP gathers shards collectively
        cb.best_model_path, cb.best_model_score, cb.best_k_models = path, score, {path: score}


def instantiate_loggers(logger_cfg: Any) -> list[Any]:
    """The configured experiment loggers (``logger=...``). MLflow 3 refuses its local file store unless asked:
    ``logger=mlflow`` writes one under the run directory (no server, no database), so it is allowed here."""
    import os

    from hydra.utils import instantiate

    for c in logger_cfg.values():
        if c is not None and "MLFlowLogger" in str(c.get("_target_", "")) and str(c.get("tracking_uri") or "").startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return [instantiate(c) for c in logger_cfg.values() if c is not None]


def command_line_keys() -> set[str]:
    """The config keys set on this run's command line (``key=value``, ``+key=value``), empty outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def has_test_split(dm: Any) -> bool:
    """Whether the datamodule has test data (``has_split("test")``; a multi-task one: every task's)."""
    if dm.subs:
        return all(has_test_split(d) for d in dm.subs.values())
    return bool(dm.has_split("test"))


def remove_orphans(cfg: DictConfig) -> None:
    """Rank 0, before anything is written: delete the temp files of atomic writes that a kill interrupted
    (a checkpoint's can be tens of MB) in the run directory and the checkpoint folders of its callbacks."""
    from lightning.pytorch.utilities import rank_zero_only

    from zoo.atomic import remove_orphan_temps

    if rank_zero_only.rank != 0:
        return
    out = Path(cfg.paths.output_dir)
    folders = {out, out / "checkpoints"}
    folders |= {Path(c.dirpath) for c in (cfg.get("callbacks") or {}).values() if c is not None and c.get("dirpath")}
    for folder in sorted(folders):
        for p in remove_orphan_temps(folder):
            print(f"[mmzoo] removed {p}, left by an interrupted write")


def report_metrics(task: Any, metrics: dict[str, float], out: Path, title: str) -> None:
    """Write ``out/metrics.json`` and print the task's summary table (multi-task), then every metric."""
    from zoo.atomic import atomic_write_text

    atomic_write_text(out / "metrics.json", json.dumps(dict(sorted(metrics.items())), indent=2))
    from tasks.base import Seq2SeqTask

    summary = task.report() if isinstance(task, Seq2SeqTask) else None  # a standalone tool has none
    if summary is not None:
        print(f"[mmzoo] summary:\n{summary}")
    print(f"[mmzoo] {title}:")
    for k, v in sorted(metrics.items()):
        print(f"  {k:28s} {v:.4f}")
    print(f"[mmzoo] run directory: {out}")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test the configured task; writes ``metrics.json`` into the run directory."""
    import lightning as L
    import torch
    from hydra.utils import instantiate

    from tasks.runtime.callbacks import AtomicCheckpointIO, Throughput
    from tasks.runtime.distributed import check_trainer, prepare_lock, single_job_relaunch
    from tasks.runtime.logs import tidy_logging
    from tasks.runtime.resume import ResumeState, isolated_rng

    tidy_logging()

    check_trainer(cfg.trainer)
    single_job_relaunch()  # Hydra multirun + ddp: re-launched ranks run this job, in this job's folder
    out = Path(cfg.paths.output_dir)
    remove_orphans(cfg)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)

    deadline = None
    budget = cfg.get("budget")
    if budget and budget.get("total_minutes"):  # one wall-clock budget for the whole run (tasks/runtime/budget.py)
        from tasks.runtime.budget import plan_run

        _, deadline = plan_run(budget, bf16="bf16" in str(cfg.trainer.get("precision")), cfg=cfg,
                               user_keys=command_line_keys())
    dm = instantiate(cfg.data)
    # torchrun/srun ranks: one prepares, the others read its cache; the RNG is left as it was (cache hit or miss)
    with prepare_lock(cfg.data.get("root") or cfg.paths.data_dir), isolated_rng():
        dm.prepare_data()
    finetune_info = None
    from hydra.utils import get_class

    standalone = getattr(get_class(cfg.task._target_), "standalone", False)
    if standalone:  # the task trains its own network (e.g. the VQ image tokenizer): no unified model
        task = model = instantiate(cfg.task)
    elif cfg.get("pretrained"):  # zoo-finetune: the pretrained model and tokenizers replace new ones
        from tasks.adapters import from_pretrained

        model, tokenizer, finetune_info = from_pretrained(cfg)
        dm.bind(model.cfg, model.layout, tokenizer)
    else:
        tokenizer = dm.load_tokenizer()
        data_overrides = dm.model_overrides()
        # a datamodule whose tokenizer holds the specials too (Florence-2's BART layout) says its text range
        text_size = dm.text_vocab_size(tokenizer) if hasattr(dm, "text_vocab_size") else tokenizer.vocab_size
        model = build_model(cfg.model, text_size, data_overrides)
        dm.bind(model.cfg, model.layout)
    if not standalone:
        if cfg.get("grad_checkpointing") is not None:
            model.cfg.grad_checkpointing = bool(cfg.grad_checkpointing)
        task = instantiate(cfg.task, model=model, tokenizer=tokenizer)
        task.finetune_info = finetune_info  # saved with every checkpoint (CheckpointMeta.finetune)

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if deadline is not None:
        from tasks.runtime.callbacks import TimeBudget

        for cb in callbacks:
            if isinstance(cb, TimeBudget):
                cb.deadline_s = deadline
    throughput = Throughput()
    callbacks += [throughput, ResumeState()]  # RNG states in checkpoints: a resumed run continues exactly
    loggers = instantiate_loggers(cfg.get("logger") or {})
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()])
    if trainer.is_global_zero:
        n_params = model.num_parameters()
        what = f"task {task.name}" if standalone else f"model {model.cfg.arch}"
        vocab = "" if standalone else f"vocab {model.layout.size}, "
        print(f"[mmzoo] run directory: {out}\n[mmzoo] {what}: {n_params / 1e6:.2f}M parameters, "
              f"{vocab}precision {trainer.precision}")

    from tasks.cli.preflight import check_run

    check_run(cfg, dm, trainer)  # 0 training steps, no validation or test data: refused before the run
    metrics: dict[str, float] = {}
    ckpt_path = resolve_ckpt_path(cfg)
    run_test = bool(cfg.get("test", True))
    if run_test and not has_test_split(dm):
        run_test = False
        if trainer.is_global_zero:
            print("[mmzoo] this data has no test split (e.g. data.test_file=null): the run validates but skips testing")
    if cfg.get("train", True):
        t0 = time.perf_counter()
        trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)  # tensors and plain data only
        metrics["train/fit_seconds"] = time.perf_counter() - t0
        save_final_last(trainer)
        metrics["train/samples_per_sec"] = throughput.samples_per_sec
        metrics["train/steps"] = float(trainer.global_step)
        if not standalone and not any(k.startswith("val/") for k in task.final_metrics):
            trainer.validate(task, datamodule=dm, verbose=False)  # the loop never validated (e.g. a time budget)
            save_final_best(trainer)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))})
    if run_test:
        ckpt = None
        if cfg.get("train", True):
            best = getattr(trainer.checkpoint_callback, "best_model_path", "")
            ckpt = best or None
        else:
            ckpt = ckpt_path
        # verbose=False: the figures are printed once, below (Lightning's table split a multitask run's over two)
        trainer.test(task, datamodule=dm, ckpt_path=ckpt, weights_only=True, verbose=False)
    metrics.update(task.final_metrics)
    if trainer.is_global_zero:
        report_metrics(task, metrics, out, "final metrics")
    return metrics


def main() -> None:
    from tasks.cli.entry import run_job, start_command

    start_command("zoo-train")
    import hydra

    @hydra.main(version_base="1.3", config_path="pkg://configs", config_name="train")
    def _main(cfg: DictConfig) -> float | None:  # defined here: Hydra names the job (and its log) after this file
        return run_job(train, cfg)

    _main()


if __name__ == "__main__":
    main()
