"""``Seq2SeqTask``: the LightningModule every task builds on.

Teacher-forced cross-entropy with label smoothing, AdamW with linear warm-up and cosine decay, and
validation/test by generation with the KV cache. Subclasses say how a batch becomes encoder
segments, which tokens may be generated, how outputs are scored and how predictions are written.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tasks.runtime.distributed import hold_full_params
from zoo.generation import generate
from zoo.model import UnifiedSeq2Seq
from zoo.task_specs import DEFAULT_GENERATION, TEXT_TASK, TaskSpec
from zoo.vocab import EOS_ID, PAD_ID


def gather_objects(obj: Any) -> list[Any]:
    """All ranks' ``obj`` as a list (a one-element list when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def strip_after_eos(tokens: torch.Tensor) -> list[list[int]]:
    """Token rows → lists cut at the first EOS, without PAD."""
    rows = []
    for row in tokens.tolist():
        if EOS_ID in row:
            row = row[: row.index(EOS_ID)]
        rows.append([t for t in row if t != PAD_ID])
    return rows


def warmup_cosine(opt: torch.optim.Optimizer, total_steps: float | Callable[[], float], warmup_steps: int,
                  min_lr_ratio: float) -> dict[str, Any]:
    """Lightning optimizer config: linear warm-up, then cosine decay to ``min_lr_ratio`` (per step).

    ``total_steps`` may be a callable, read at every step (a time budget fixes the total during the run).
    """
    def total() -> int:
        return max(1, int(total_steps() if callable(total_steps) else total_steps))

    def schedule(step: int) -> float:
        n = total()
        warmup = min(warmup_steps, n // 2)
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, n - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Seq2SeqTask(L.LightningModule):
    """Base LightningModule: loss, optimisation, generation-based evaluation."""

    name = "seq2seq"
    #: what this task shares with inference (prompt, allowed tokens, output decoding; :mod:`zoo.task_specs`)
    spec: TaskSpec = TEXT_TASK

    def __init__(
        self,
        model: UnifiedSeq2Seq,
        tokenizer: Any,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 200,
        min_lr_ratio: float = 0.05,
        label_smoothing: float = 0.1,
        max_new_tokens: int = DEFAULT_GENERATION["max_new_tokens"],
        num_beams: int = DEFAULT_GENERATION["num_beams"],
        length_penalty: float = DEFAULT_GENERATION["length_penalty"],
        num_samples: int = 16,
        loss_average: str = "token",
    ):
        super().__init__()
        if loss_average not in ("token", "sequence"):
            raise ValueError(f"task.loss_average must be 'token' or 'sequence', got {loss_average!r}")
        betas = (float(betas[0]), float(betas[1]))  # plain types keep checkpoints loadable with weights_only
        self.save_hyperparameters(ignore=["model", "tokenizer"])
        self.model = model
        self.tokenizer = tokenizer
        self.layout = model.layout
        self._outputs: list[tuple[Any, Any]] = []
        self._samples: dict[str, Any] | None = None
        self.predictions: dict[str, dict[Any, Any]] = {}  # stage -> {record id: prediction}
        self.samples: dict[str, dict[str, Any]] = {}  # stage -> first batch inputs + predictions
        self.final_metrics: dict[str, float] = {}
        self.budget_steps: int | None = None  # set by the TimeBudget callback once it has timed the first steps
        self.finetune_info: dict[str, Any] | None = None  # zoo-finetune's starting point, saved with checkpoints
        self._allowed: torch.Tensor | None = None  # allowed_tokens(), built on first use

    @property
    def datamodule(self) -> Any:
        """The datamodule this task reads references from: the one set by a multi-task parent, else the
        trainer's (``None`` when not attached)."""
        dm = self.__dict__.get("_datamodule")
        if dm is not None:
            return dm
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

    @classmethod
    def eval_settings(cls, settings: dict[str, Any], checkpoint: dict[str, Any], where: str) -> dict[str, Any]:
        """zoo-eval: the constructor settings to rebuild this task from a training checkpoint."""
        return settings

    @classmethod
    def eval_data_config(cls, settings: dict[str, Any], data_dir: str) -> Any:
        """zoo-eval without ``data=``: the data config this task evaluates on by default (its registry entry's)."""
        from tasks.registry import default_data_config, get_task

        return default_data_config(get_task(cls.name).data_config)

    @classmethod
    def eval_kwargs(cls, settings: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
        """zoo-eval: the constructor arguments: the saved settings this task accepts, plus the command line's
        generation overrides (an unknown override is an error naming what the task accepts)."""
        from tasks.registry import init_params

        accepted = init_params(cls)
        kwargs = {k: v for k, v in settings.items() if k in accepted}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(kwargs) - accepted
        if unknown:
            raise ValueError(f"task {cls.name!r} has no setting(s) {sorted(unknown)}; it accepts {sorted(accepted)}")
        return kwargs

    # --- what subclasses define -------------------------------------------------------------
    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def allowed_tokens(self) -> torch.Tensor | None:
        """The vocabulary mask generation may emit: the spec's (for tasks that write text, the text range)."""
        if self._allowed is None:
            self._allowed = self.spec.allowed_tokens(self.layout)
        return self._allowed

    def decode_outputs(self, tokens: torch.Tensor) -> list[Any]:
        """Generated ids ``[B, T]`` → outputs through the spec (texts: up to EOS, text tokens only)."""
        return self.spec.decode(tokens, self.layout, self.tokenizer)

    def compute_metrics(self, stage: str, predictions: dict[Any, Any]) -> dict[str, float]:
        raise NotImplementedError

    def partial_eval(self, stage: str) -> bool:
        """Whether this ``stage`` pass runs only some of its batches on purpose (``trainer.fast_dev_run``,
        ``limit_val_batches`` / ``limit_test_batches`` below the whole split)."""
        trainer = self._trainer
        if trainer is None:
            return False
        if trainer.fast_dev_run:
            return True
        limit = getattr(trainer, f"limit_{stage}_batches", 1.0)
        # an int is a batch count (Lightning's convention), a float a fraction
        return limit is not None and (isinstance(limit, int) or float(limit) < 1.0)

    def scored_references(self, stage: str, references: dict[Any, Any], predictions: dict[Any, Any],
                          what: str = "records") -> dict[Any, Any]:
        """The references to score: all of them, or in a deliberately partial pass (:meth:`partial_eval`) those
        of the records that ran. A full pass that missed records is a bug: it raises naming a few."""
        missing = set(references) - set(predictions)
        if not missing:
            return references
        if self.partial_eval(stage):
            return {k: v for k, v in references.items() if k in predictions}
        raise RuntimeError(f"{len(missing)} {stage} {what} got no prediction (e.g. {sorted(missing)[:3]})")

    def format_predictions(self, predictions: dict[Any, Any]) -> list[dict[str, Any]]:
        return [{"id": k, "prediction": v} for k, v in predictions.items()]

    def write_samples(self, path: Path, stage: str) -> None:
        """Write a human-readable sample grid for ``stage`` (optional)."""

    def report(self) -> str | None:
        """A summary table printed after training / evaluation (a multi-task model's per-task figures); ``None``:
        none."""
        return None

    def sample_references(self, stage: str) -> list[str] | None:
        """One reference text per sample of ``stage`` (the first caption or description, the most common answer)
        to print under its prediction; ``None`` when the data has none."""
        s, dm = self.samples.get(stage), self.datamodule
        refs = dm.references(stage) if s and "ids" in s and dm is not None else None
        if refs is None:
            return None
        out = []
        for k in s["ids"]:
            k = k.item() if torch.is_tensor(k) else k
            ref = refs.get(k)
            if isinstance(ref, dict):  # VQA: {"answers": [...], ...}
                answers = [a for a in ref.get("answers") or [] if a]
                ref = max(set(answers), key=answers.count) if answers else ""
            elif isinstance(ref, (list, tuple)):
                ref = ref[0] if ref else ""
            out.append("" if ref is None else str(ref))
        return out

    # --- training -----------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        memory, mask = self.model.encode(self.model_inputs(batch))
        counts = batch.get("target_counts")
        if counts is not None:  # several targets per source: encode once, repeat the memory
            memory = memory.repeat_interleave(counts, dim=0)
            mask = mask.repeat_interleave(counts, dim=0)
        return self.target_loss(self.model.decode_hidden(batch["tgt_in"], memory, mask), batch["labels"])

    def target_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of decoder states ``[S,T,d]`` against ``labels [S,T]`` (PAD ignored). ``loss_average``
        ``token`` averages over every real token; ``sequence`` averages each target's tokens first, so every
        target weighs the same whatever its length."""
        return self.target_loss_logits(self.model.logits(hidden[labels != PAD_ID]), labels)

    def target_loss_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """:meth:`target_loss` from the logits ``[N,V]`` of the real target positions (``labels != PAD``)."""
        keep = labels != PAD_ID
        smoothing = self.hparams.label_smoothing
        weights = self.target_weights(labels)
        if weights is None:
            return F.cross_entropy(logits.float(), labels[keep], label_smoothing=smoothing)
        per_token = F.cross_entropy(logits.float(), labels[keep], label_smoothing=smoothing, reduction="none")
        return (per_token * weights).sum()

    def target_weights(self, labels: torch.Tensor) -> torch.Tensor | None:
        """The weight ``[N]`` of each real target token (``labels != PAD``) in the loss, summing to 1, from
        ``loss_average`` and :meth:`token_weights`; ``None`` when it is the plain mean over tokens."""
        keep = labels != PAD_ID
        extra = self.token_weights(labels)
        average = self.hparams.get("loss_average", "token")
        if average == "token" and extra is None:
            return None
        weights = keep.float() if extra is None else extra * keep
        if average == "sequence":  # each target's weights sum to 1 / #targets
            weights = weights / (weights.sum(1, keepdim=True).clamp(min=1e-12) * labels.shape[0])
        else:
            weights = weights / weights.sum()
        return weights[keep]

    def token_weights(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Relative loss weights ``[S,T]`` of the target tokens (``None``: all equal); tasks override it."""
        return None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        # sync_dist: the logged loss is the mean over ranks, i.e. what DDP/FSDP optimise
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]), sync_dist=True)
        if self.model.cfg.ffn == "moe":  # ffn=moe: add the load-balancing loss of this forward
            loss = self.add_moe_aux_loss(loss, len(batch["labels"]))
        return loss

    def add_moe_aux_loss(self, loss: torch.Tensor, batch_size: int) -> torch.Tensor:
        """``loss + moe_aux_weight * aux`` (Switch load balancing); logs the aux loss, expert utilisation
        and the dropped-token fraction as ``train/moe_*``."""
        aux = self.model.moe_aux_loss()
        if aux is None:
            return loss
        self.log("train/moe_aux_loss", aux.detach(), batch_size=batch_size)
        for k, v in self.model.moe_stats().items():
            self.log(f"train/{k}", v, batch_size=batch_size)
        return loss + self.model.cfg.moe_aux_weight * aux

    # --- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate_tokens(self, batch: dict[str, Any], **overrides: Any) -> torch.Tensor:
        kw = dict(max_new_tokens=self.hparams.max_new_tokens, num_beams=self.hparams.num_beams,
                  length_penalty=self.hparams.length_penalty, allowed=self.allowed_tokens())
        kw.update(overrides)
        return generate(self.model, self.model_inputs(batch), **kw)

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        preds = self.decode_outputs(self.generate_tokens(batch))
        self._outputs.extend(zip(batch["ids"], preds))
        if self._samples is None:
            n = self.hparams.num_samples
            self._samples = {k: (v[:n].detach().cpu() if torch.is_tensor(v) else v[:n]) for k, v in batch.items()}
            self._samples["predictions"] = preds[:n]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def finish_eval(self, stage: str) -> dict[str, float] | None:
        """Gather every rank's predictions, keep them in ``self.predictions[stage]`` and score them
        (``None`` during the sanity check)."""
        merged: dict[Any, Any] = {}
        for part in gather_objects(self._outputs):
            merged.update(part)  # keyed by record id: sampler padding duplicates collapse
        self._outputs = []
        if self._samples is not None:
            self.samples[stage] = self._samples
        self._samples = None
        if self.trainer.sanity_checking:
            return None
        self.predictions[stage] = merged
        return self.compute_metrics(stage, merged)

    def _eval_epoch_end(self, stage: str) -> None:
        for k, v in (self.finish_eval(stage) or {}).items():
            self.log(f"{stage}/{k}", float(v), prog_bar=k == self.monitor_metric, rank_zero_only=False, sync_dist=False)
            self.final_metrics[f"{stage}/{k}"] = float(v)

    def write_artifacts(self, folder: Path, stage: str, predictions_file: str = "predictions.json",
                        samples_file: str = "samples.png") -> None:
        """Write ``stage``'s predictions (official results format) and its sample grid into ``folder``."""
        from tasks.runtime.callbacks import write_task_artifacts

        write_task_artifacts(self, folder, stage, predictions_file, samples_file)

    monitor_metric = "loss"

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # FSDP2 (trainer=fsdp): full parameters during evaluation, so ranks may stop generating at different steps
    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
        hold_full_params(self.model, True)

    def on_validation_model_train(self) -> None:
        hold_full_params(self.model, False)
        super().on_validation_model_train()

    def on_test_model_eval(self) -> None:
        super().on_test_model_eval()
        hold_full_params(self.model, True)

    def on_test_model_train(self) -> None:
        hold_full_params(self.model, False)
        super().on_test_model_train()

    # --- optimisation -------------------------------------------------------------------------
    def configure_model(self) -> None:
        """``trainer=fsdp`` (ModelParallelStrategy): shard the model with FSDP2 over the data-parallel mesh.
        A no-op under every other strategy (no device mesh)."""
        if self.device_mesh is None:
            return
        from tasks.runtime.distributed import fully_shard_model

        mesh = self.device_mesh
        fully_shard_model(self.model, mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh)

    def own_modules(self) -> dict[str, torch.nn.Module]:
        """The task's own networks beside the shared model (trained and saved with it; e.g. a renderer)."""
        return {}

    def extra_param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups of the task's own networks beside the model (e.g. a renderer); same schedule."""
        return []

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            is_embedding = any(s in name for s in ("embed_tokens", "_pos", "type_embed"))
            (no_decay if p.ndim < 2 or is_embedding else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}, *self.extra_param_groups()],
            lr=self.hparams.lr, betas=tuple(self.hparams.betas),
            # fused: ~2x faster than the default per-parameter loop on CPU; not with fp16 loss scaling
            fused=self.trainer.precision != "16-mixed",
        )
        planned = self.trainer.estimated_stepping_batches
        # a TimeBudget callback sets budget_steps once it has timed the first steps
        return warmup_cosine(opt, lambda: self.budget_steps or planned, self.hparams.warmup_steps,
                             self.hparams.min_lr_ratio)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip directly (Lightning's AMP plugin refuses fused optimizers; bf16 needs no unscaling)."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm in (None, "norm"):
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)

    # --- checkpoints carry what is needed to rebuild the model without Hydra ------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """The task's own entries in the checkpoint's metadata beside the model config and tokenizer (plain
        types: checkpoints load with ``weights_only``), e.g. VQA's answer candidates. Subclasses extend it."""
        return {}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_state` saved (resuming, ``load_from_checkpoint``)."""

    def checkpoint_meta(self) -> Any:
        """This task's :class:`tasks.checkpoint.CheckpointMeta`."""
        from tasks.checkpoint import CheckpointMeta

        return CheckpointMeta(task=self.name, model_config=self.model.cfg.to_dict(), tokenizer=self.tokenizer.to_str(),
                              state=self.checkpoint_state(), finetune=self.finetune_info)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.checkpoint_meta().write(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from tasks.checkpoint import CheckpointMeta

        self.load_checkpoint_state(CheckpointMeta.read(checkpoint).state)
