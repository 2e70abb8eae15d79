"""Knowledge distillation: a (smaller) student learns from a teacher's temperature-softened outputs.

``zoo-train experiment=distill task.teacher=<model folder | hf-hub:org/name | arch.tag | run/.../best.ckpt>``
trains the configured student (``experiment=distill``: a 2+2-layer ofa-tiny on Shapes VQA with auxiliary
captions) with

    loss = (1 - alpha) * CE(student, labels) + alpha * T² * KL(softmax(teacher / T) || softmax(student / T))

over the real target positions (Hinton et al.). CE is the task's own loss (``Seq2SeqTask.target_loss``: label
smoothing, ``task.loss_average``, the task's token weights) and the KL term is averaged over the tokens the same
way. ``task.teacher=null`` trains the same student without a teacher, the baseline distillation is judged against.
Teacher and student must share the vocabulary and text tokenizer (the data's tokenizer; point
``data.tokenizer_path`` at the teacher's folder if they differ). The teacher is frozen, kept out of the checkpoint
and of the optimiser.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tasks.caption import CaptionTask
from tasks.vqa import VQATask
from zoo.vocab import PAD_ID


def load_teacher(source: str) -> Any:
    """A :class:`zoo.pretrained.Pretrained` teacher from a model folder / Hub id / tag, or a ``.ckpt``."""
    if str(source).endswith(".ckpt"):
        from tasks.checkpoint import bundle_from_checkpoint, read_checkpoint

        return bundle_from_checkpoint(read_checkpoint(source), str(source))
    from zoo.hub import load

    return load(source)


def encode_for_targets(task: Any, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder memory repeated to one row per target (VQA groups, several captions per image)."""
    counts = batch.get("image_counts")
    if counts is not None:
        return model.encode(task.model_inputs(batch), repeats={"image": counts})
    memory, mask = model.encode(task.model_inputs(batch))
    counts = batch.get("target_counts")
    if counts is not None:
        memory, mask = memory.repeat_interleave(counts, dim=0), mask.repeat_interleave(counts, dim=0)
    return memory, mask


class DistillMixin:
    """Adds a frozen teacher's soft targets to a task's cross-entropy (put it first in the bases)."""

    def __init__(self, *args: Any, teacher: str | None = None, alpha: float = 0.5, temperature: float = 2.0,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"task.alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"task.temperature must be > 0, got {temperature}")
        self.alpha, self.temperature, self.teacher_source = float(alpha), float(temperature), teacher
        self._teacher: list[Any] = []  # a list: not a submodule, so not saved, moved by Lightning or optimised
        if teacher:
            bundle = load_teacher(teacher)
            if bundle.model.layout != self.layout:
                raise ValueError(f"teacher {teacher} has vocabulary {bundle.model.layout.ranges()}, the student "
                                 f"{self.layout.ranges()}: they must match")
            if bundle.tokenizer.to_str() != self.tokenizer.to_str():
                raise ValueError(f"teacher {teacher} has a different text tokenizer from the data's; set "
                                 f"data.tokenizer_path to the teacher's tokenizer.json")
            teacher_model = bundle.model.eval().requires_grad_(False)
            self._teacher.append(teacher_model)
            print(f"[mmzoo] distilling from {teacher}: {teacher_model.num_parameters() / 1e6:.2f}M-parameter teacher "
                  f"(alpha={self.alpha}, T={self.temperature})")

    @property
    def teacher(self) -> Any:
        return self._teacher[0] if self._teacher else None

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)
        super().on_fit_start()

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.teacher is None or self.alpha == 0.0:
            return super().loss(batch)
        labels = batch["labels"]
        keep = labels != PAD_ID
        memory, mask = encode_for_targets(self, self.model, batch)
        logits = self.model.logits(self.model.decode_hidden(batch["tgt_in"], memory, mask)[keep]).float()  # [N,V]
        with torch.no_grad():
            t_memory, t_mask = encode_for_targets(self, self.teacher, batch)
            t_logits = self.teacher.logits(self.teacher.decode_hidden(batch["tgt_in"], t_memory, t_mask)[keep]).float()
        ce = self.target_loss_logits(logits, labels)  # the task's own loss: averaging, smoothing, token weights
        t = self.temperature
        kl = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(t_logits / t, -1), log_target=True,
                      reduction="none").sum(-1) * (t * t)  # [N]: per target token
        weights = self.target_weights(labels)  # averaged over the tokens as the cross-entropy is
        kl = kl.mean() if weights is None else (kl * weights).sum()
        n = len(labels)
        self.log("train/ce", ce.detach(), batch_size=n)
        self.log("train/distill_kl", kl.detach(), batch_size=n)
        return (1.0 - self.alpha) * ce + self.alpha * kl


class DistillVQATask(DistillMixin, VQATask):
    """VQA (with the optional auxiliary captions) distilled from a teacher."""


class DistillCaptionTask(DistillMixin, CaptionTask):
    """Captioning distilled from a teacher (``task=caption task._target_=tasks.distill.DistillCaptionTask``)."""

