"""One model, several tasks: the OFA-style multi-task run (``experiment=multitask``).

:class:`MultitaskDataModule` puts several task datamodules behind one. It trains one shared BPE over
every task's texts, merges what each task needs from the model config (the sensor statistics, the
image-code range), and yields one batch of *every* task per training step (Lightning's
``CombinedLoader`` in ``max_size_cycle`` mode, so the distributed samplers of every task are
injected by Lightning). Each task's share of a step is its batch size; :class:`MultitaskTask` weighs
the task losses. Every parameter is used at every step, which keeps DDP/FSDP free of
unused-parameter special cases.

Validation and test run one loader per task; each task is scored with its own metrics
(``val/<task>/<metric>``) and compared with its single-task reference figure
(``val/<task>/vs_single``; ``val/score`` is the lowest of those ratios).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import torch

from modalities.text import TextTokenizer
from tasks.base import Seq2SeqTask
from tasks.data_module import TaskDataModule
from zoo.vocab import VocabLayout


def _plain(value: Any) -> Any:
    """A Hydra/OmegaConf node as plain Python containers (checkpoint- and weights_only-safe)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def merge_model_overrides(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Union of several datamodules' model-config needs; ``modalities`` and ``vocab`` merge per key and a
    conflicting value raises."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, Mapping) and key in ("modalities", "vocab"):
                dst = out.setdefault(key, {})
                for k, v in value.items():
                    if k in dst and dst[k] != v:
                        raise ValueError(f"tasks disagree on model {key}.{k}: {dst[k]!r} vs {v!r}")
                    dst[k] = v
            elif key in out and out[key] != value:
                raise ValueError(f"tasks disagree on model setting {key}: {out[key]!r} vs {value!r}")
            else:
                out[key] = value
    return out


class MultitaskDataModule(TaskDataModule):
    """Several task datamodules (``tasks: {task name: data config}``) with one shared text tokenizer."""

    def __init__(self, tasks: Mapping[str, Any], root: str, tokenizer_path: str | None = None,
                 tokenizer_vocab_size: int = 1024):
        super().__init__()
        from hydra.utils import instantiate

        if not tasks:
            raise ValueError("data.tasks is empty: give at least one task's data config")
        self.subs: dict[str, TaskDataModule] = {}
        for name, cfg in tasks.items():
            if cfg is None:
                continue
            self.subs[name] = instantiate(cfg) if hasattr(cfg, "get") and cfg.get("_target_") else cfg
        self.root = Path(root)
        self.tokenizer_path, self.vocab_size = tokenizer_path, tokenizer_vocab_size
        self.tokenizer: TextTokenizer | None = None

    @property
    def names(self) -> list[str]:
        return list(self.subs)

    # --- preparation --------------------------------------------------------------------------
    def training_texts(self) -> list[str]:
        return [t for sub in self.subs.values() for t in sub.training_texts()]

    def load_tokenizer(self) -> TextTokenizer:
        """A given file, or one BPE trained on every task's training texts, cached under ``root`` by a hash
        of those texts (new data → a new tokenizer, never a stale one)."""
        if self.tokenizer is None:
            from tasks.data.tokenizer import load_or_train_bpe

            if self.tokenizer_path:
                self.tokenizer = load_or_train_bpe(self.tokenizer_path, None, self.vocab_size)
            else:
                texts = self.training_texts()
                digest = hashlib.sha1("\n".join(texts).encode()).hexdigest()[:12]
                path = self.root / f"tokenizer-multitask-{digest}-bpe{self.vocab_size}.json"
                self.tokenizer = load_or_train_bpe(path, lambda: texts, self.vocab_size)
            for sub in self.subs.values():
                sub.tokenizer = self.tokenizer
        return self.tokenizer

    def prepare_data(self) -> None:
        self.load_tokenizer()  # first: the tasks then reuse it instead of training their own
        for sub in self.subs.values():
            sub.prepare_data()

    def model_overrides(self) -> dict[str, Any]:
        return merge_model_overrides([sub.model_overrides() for sub in self.subs.values()])

    def bind(self, model_cfg: Any, layout: VocabLayout, tokenizer: TextTokenizer | None = None) -> None:
        if tokenizer is not None:
            self.tokenizer = tokenizer
        for sub in self.subs.values():
            sub.bind(model_cfg, layout, tokenizer or self.load_tokenizer())

    def setup(self, stage: str | None = None) -> None:
        for sub in self.subs.values():
            sub.setup(stage)

    # --- loaders ------------------------------------------------------------------------------
    def train_dataloader(self) -> Any:
        from lightning.pytorch.utilities import CombinedLoader

        return CombinedLoader({n: sub.train_dataloader() for n, sub in self.subs.items()}, mode="max_size_cycle")

    def val_dataloader(self) -> list[Any]:
        return [sub.val_dataloader() for sub in self.subs.values()]

    def test_dataloader(self) -> list[Any]:
        return [sub.test_dataloader() for sub in self.subs.values()]


class MultitaskTask(Seq2SeqTask):
    """One shared model trained on several tasks at once; each task keeps its own loss, decoding and metrics.

    ``tasks`` maps a registered task name (``caption``, ``vqa``, ``text_to_image``, ``sensor_to_text``)
    to that task's settings (its ``configs/task`` entries); classes resolve through the task registry only.
    ``weights`` scale the task losses; ``reference`` holds each task's single-task figure for its
    monitored metric, against which ``<stage>/<task>/vs_single`` is reported.
    """

    name = "multitask"
    monitor_metric = "score"

    def __init__(self, model: Any, tokenizer: Any, tasks: Mapping[str, Any] | None = None,
                 weights: Mapping[str, float] | None = None, reference: Mapping[str, float] | None = None,
                 **kwargs: Any):
        tasks = {k: {s: v for s, v in (_plain(cfg) or {}).items() if not s.startswith("_")}
                 for k, cfg in (_plain(tasks) or {}).items() if cfg is not None}
        weights = {k: float(v) for k, v in (_plain(weights) or {}).items()}
        reference = {k: float(v) for k, v in (_plain(reference) or {}).items()}
        kwargs = {k: _plain(v) for k, v in kwargs.items()}  # plain types: checkpoints load with weights_only
        super().__init__(model, tokenizer, **kwargs)  # saves the (plain) arguments above as hparams
        if not tasks:
            raise ValueError("task.tasks is empty: give at least one task")
        unknown = set(weights) - set(tasks)
        if unknown:
            raise ValueError(f"task.weights names tasks that are not trained: {sorted(unknown)}")
        from tasks.registry import init_params, task_class_for

        subtasks: dict[str, Seq2SeqTask] = {}
        for name, settings in tasks.items():
            cls = task_class_for(name, settings)
            bad = set(settings) - init_params(cls)
            if bad:
                raise ValueError(f"task {name!r} has no setting(s) {sorted(bad)}")
            subtasks[name] = cls(model=model, tokenizer=tokenizer, **settings)
        # a plain dict, not submodules: the tasks share self.model, whose weights are saved once
        self.subtasks = subtasks
        # a task's own networks beside the shared model (text-to-image's layout renderer) train and save here
        self.task_modules = torch.nn.ModuleDict({n: torch.nn.ModuleDict(sub.own_modules())
                                                 for n, sub in subtasks.items() if sub.own_modules()})
        self.weights = {n: weights.get(n, 1.0) for n in subtasks}
        self.reference = reference

    # --- wiring -------------------------------------------------------------------------------
    def _attach(self) -> None:
        dm = self.datamodule
        for name, sub in self.subtasks.items():
            sub.trainer = self.trainer
            if isinstance(dm, MultitaskDataModule):
                if name not in dm.subs:
                    raise ValueError(f"task {name!r} has no data (data.tasks has {sorted(dm.subs)})")
                sub._datamodule = dm.subs[name]
            sub.to(self.device)  # the shared model is already there; this updates the task's device

    def setup(self, stage: str) -> None:
        self._attach()
        for sub in self.subtasks.values():
            sub.setup(stage)

    def extra_param_groups(self) -> list[dict[str, Any]]:
        return [g for sub in self.subtasks.values() for g in sub.extra_param_groups()]

    def _names(self) -> list[str]:
        dm = self.datamodule
        return list(dm.subs) if isinstance(dm, MultitaskDataModule) else list(self.subtasks)

    # --- training -----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        total: torch.Tensor | float = 0.0
        for name, sub_batch in batch.items():
            if sub_batch is None:
                continue
            loss = self.subtasks[name].loss(sub_batch)
            self.log(f"train/{name}/loss", loss, batch_size=len(sub_batch["labels"]))
            if self.model.cfg.ffn == "moe":  # each sub-batch is its own forward: add its load-balancing loss
                loss = self.add_moe_aux_loss(loss, len(sub_batch["labels"]))
            total = total + self.weights[name] * loss
        self.log("train/loss", total, prog_bar=True, batch_size=1, sync_dist=True)  # mean over ranks
        return total  # type: ignore[return-value]

    # --- evaluation ---------------------------------------------------------------------------
    def on_validation_start(self) -> None:
        self._attach()

    on_test_start = on_validation_start

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.subtasks[self._names()[dataloader_idx]]._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.subtasks[self._names()[dataloader_idx]]._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        for sub in self.subtasks.values():
            sub.on_validation_epoch_start()

    def on_test_epoch_start(self) -> None:
        for sub in self.subtasks.values():
            sub.on_test_epoch_start()

    def _eval_epoch_end(self, stage: str) -> None:
        ratios = []
        for name in self._names():
            sub = self.subtasks[name]
            metrics = sub.finish_eval(stage)
            if metrics is None:
                continue
            key = sub.monitor_metric
            if key in metrics and self.reference.get(name):
                metrics["vs_single"] = metrics[key] / self.reference[name]
                ratios.append(metrics["vs_single"])
            for k, v in metrics.items():
                self.log(f"{stage}/{name}/{k}", float(v), rank_zero_only=False, sync_dist=False)
                self.final_metrics[f"{stage}/{name}/{k}"] = float(v)
        if ratios:
            score = min(ratios)
            self.log(f"{stage}/score", score, prog_bar=True, rank_zero_only=False, sync_dist=False)
            self.final_metrics[f"{stage}/score"] = score

    def write_artifacts(self, folder: Path, stage: str, predictions_file: str = "predictions.json",
                        samples_file: str = "samples.png") -> None:
        """Each task's predictions and samples as ``predictions_<task>.json`` and ``samples_<task>.png``."""
        pstem, psuf = Path(predictions_file).stem, Path(predictions_file).suffix
        sstem, ssuf = Path(samples_file).stem, Path(samples_file).suffix
        for name, sub in self.subtasks.items():
            sub.write_artifacts(folder, stage, f"{pstem}_{name}{psuf}", f"{sstem}_{name}{ssuf}")

    def report(self) -> str:
        """One table of every task's monitored metric: val, test, single-task reference and ratio."""
        m = self.final_metrics
        lines = [f"{'task':16s} {'metric':14s} {'val':>9s} {'test':>9s} {'single':>9s} {'val/single':>10s}"]
        for name, sub in self.subtasks.items():
            key = sub.monitor_metric
            val, test = m.get(f"val/{name}/{key}"), m.get(f"test/{name}/{key}")
            ref = self.reference.get(name)

            def fmt(x: float | None) -> str:
                return f"{x:9.4f}" if x is not None else f"{'-':>9s}"

            ratio = f"{val / ref:10.1%}" if val is not None and ref else f"{'-':>10s}"
            lines.append(f"{name:16s} {key:14s} {fmt(val)} {fmt(test)} {fmt(ref)} {ratio}")
        return "\n".join(lines)

    # --- zoo-eval -----------------------------------------------------------------------------
    @classmethod
    def eval_settings(cls, settings: dict[str, Any], checkpoint: dict[str, Any], where: str) -> dict[str, Any]:
        """Per-task state saved beside the settings: VQA answer candidates and the VQ tokenizer folder."""
        from tasks.checkpoint import CheckpointMeta, vq_folder_for

        meta = CheckpointMeta.read(checkpoint, where)
        settings = {**settings, "tasks": {n: dict(s) for n, s in (settings.get("tasks") or {}).items()}}
        for n, m in (meta.subtasks or {}).items():
            if m.get("candidates") and n in settings["tasks"]:
                settings["tasks"][n]["candidates"] = m["candidates"]
        folder = vq_folder_for(checkpoint, where)
        settings["vq_tokenizer"] = str(folder) if folder is not None else None
        return settings

    @classmethod
    def eval_kwargs(cls, settings: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
        """Saved settings, with the command line's generation overrides passed on to every task accepting them."""
        from tasks.registry import init_params, task_class_for

        kwargs = {k: v for k, v in settings.items() if k in init_params(cls)}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        for sub, s in kwargs.get("tasks", {}).items():
            accepts = init_params(task_class_for(sub, s))
            s.update({k: v for k, v in overrides.items() if k in accepts})
        return kwargs

    @classmethod
    def eval_data_config(cls, settings: dict[str, Any], data_dir: str) -> Any:
        """Each trained task's default data config, with the VQ tokenizer the checkpoint names (never a new one)."""
        from omegaconf import OmegaConf

        from tasks.registry import task_class_for

        # each subtask's own eval data (text_to_image: with the checkpoint's VQ tokenizer)
        tasks = {name: task_class_for(name, sub).eval_data_config(settings, data_dir)
                 for name, sub in (settings.get("tasks") or {}).items()}
        return OmegaConf.create({"_target_": "tasks.multitask.MultitaskDataModule", "_recursive_": False,
                                 "root": f"{data_dir}/multitask", "tasks": tasks})

    # --- checkpoints --------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """Each task's own state under ``tasks`` (with its task name), as a single-task checkpoint holds it."""
        return {**super().checkpoint_state(),
                "tasks": {name: {"task": sub.name, **sub.checkpoint_state()} for name, sub in self.subtasks.items()}}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        per_task = state.get("tasks") or {}
        for name, sub in self.subtasks.items():
            if name in per_task:
                sub.load_checkpoint_state({k: v for k, v in per_task[name].items() if k != "task"})
