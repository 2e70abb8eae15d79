"""Sensor-to-text: ``[sensor] what is the wearer doing?`` → a description of the activities.

Holds the activity parser and metrics, the sensor datamodule (JSONL manifest + CSV/NPZ/NPY
recordings; generates Motion on first use) and the Lightning task. Metrics: BLEU-4 and CIDEr-D
against the reference descriptions, activity-sequence accuracy (the predicted text parsed back into
an ordered list of activities must equal the ground truth exactly) and per-activity F1 (presence of
each activity in a recording).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from modalities.sensor import IMU_CHANNELS, SensorConfig, SensorRecording, SensorTokenizer
from modalities.sensor_io import recording_problem
from modalities.text import TextTokenizer
from tasks.base import Seq2SeqTask
from tasks.data.collate import Seq2SeqCollator
from tasks.data.motion import ACTIVITIES
from tasks.data.sensor_formats import ManifestRecord, read_manifest, read_recording
from tasks.data.coco import DataError
from tasks.data_module import FileSplitsMixin, SplitInfo, TextDataModule, empty_split_error
from zoo.atomic import atomic_file
from zoo.task_specs import task_spec
from zoo.vocab import VocabLayout

# ------------------------------------------------------------------------------------------------
# Activity parser and metrics
# ------------------------------------------------------------------------------------------------
# Ordered: at one position the first alternative wins ("walks up the stairs" is climbing, not walking).
_PATTERNS: tuple[tuple[str, str], ...] = (
    ("climbing stairs", r"(?:climb\w*|walk\w*\s+up|go(?:es|ing)?\s+up|ascend\w*)(?:\s+(?:a|the))?"
                        r"(?:\s+flight\s+of)?\s+stair\w*|stair\w*|climb\w*|ascend\w*"),
    ("walking", r"walk\w*|stroll\w*"),
    ("running", r"run\w*|ran|jog\w*|sprint\w*"),
    ("jumping", r"jump\w*|hop\w*"),
    ("sitting", r"sit\w*|sat|seat\w*"),
    ("standing", r"stand\w*|stood"),
    ("lying", r"lies|lying|lie\s+down|lay\w*|reclin\w*"),
)
_ACTIVITY_RE = re.compile("|".join(f"(?P<a{i}>\\b(?:{p})\\b)" for i, (_, p) in enumerate(_PATTERNS)), re.IGNORECASE)


def parse_activities(text: str) -> list[str]:
    """The ordered activities a description mentions (repeats in a row collapsed)."""
    out: list[str] = []
    for m in _ACTIVITY_RE.finditer(text):
        act = _PATTERNS[int(m.lastgroup[1:])][0]  # type: ignore[index]
        if not out or out[-1] != act:
            out.append(act)
    return out


def activity_scores(predictions: Mapping[Any, str], truth: Mapping[Any, Sequence[str]]) -> dict[str, float]:
    """``activity_acc`` (exact ordered match), ``activity_f1`` (macro) and ``f1_<activity>`` (presence)."""
    ids = list(truth)
    if not ids:
        return {}
    parsed = {k: parse_activities(predictions.get(k, "")) for k in ids}
    scores = {"activity_acc": float(np.mean([parsed[k] == list(truth[k]) for k in ids]))}
    names = sorted(set(ACTIVITIES) | {a for k in ids for a in truth[k]})
    pred = np.array([[a in parsed[k] for a in names] for k in ids])
    gold = np.array([[a in truth[k] for a in names] for k in ids])
    tp, fp, fn = (pred & gold).sum(0), (pred & ~gold).sum(0), (~pred & gold).sum(0)
    f1 = np.where(tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan)
    for a, v in zip(names, f1):
        if not np.isnan(v):
            scores[f"f1_{a.replace(' ', '_')}"] = float(v)
    scores["activity_f1"] = float(np.nanmean(f1))
    return scores


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
class SensorTrainSet(Dataset):
    """One item per recording with up to ``k`` of its descriptions (the recording is encoded once)."""

    def __init__(self, recordings: list[SensorRecording], ids: list[str], targets: list[list[list[int]]],
                 prompt: list[int], tokenizer: SensorTokenizer, k: int):
        self.recordings, self.ids, self.targets, self.prompt, self.tokenizer, self.k = recordings, ids, targets, prompt, tokenizer, k

    def __len__(self) -> int:
        return len(self.recordings)

    def __getitem__(self, i: int) -> dict[str, Any]:
        descs = self.targets[i]
        if len(descs) > self.k:
            descs = [descs[j] for j in torch.randperm(len(descs))[: self.k].tolist()]
        return {"sensor": self.tokenizer(self.recordings[i]), "prompt": self.prompt, "targets": descs, "id": self.ids[i]}


class SensorEvalSet(Dataset):
    """One item per recording (references are scored at epoch end)."""

    def __init__(self, recordings: list[SensorRecording], ids: list[str], prompt: list[int], tokenizer: SensorTokenizer):
        self.recordings, self.ids, self.prompt, self.tokenizer = recordings, ids, prompt, tokenizer

    def __len__(self) -> int:
        return len(self.recordings)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"sensor": self.tokenizer(self.recordings[i]), "prompt": self.prompt, "id": self.ids[i]}


class SensorTextDataModule(FileSplitsMixin, TextDataModule):
    """Sensor recordings listed in JSONL manifests (``manifest_{split}.jsonl``); Motion on first use.

    :meth:`prepare_data` makes the data, the text tokenizer and the per-channel statistics (fitted on
    the training recordings); :meth:`model_overrides` hands the fitted :class:`SensorConfig` to the
    model; :meth:`bind` takes the model's sensor config (a pretrained model's statistics rule) and
    vocabulary layout before the loaders are used.
    """

    def __init__(
        self,
        root: str,
        train_file: str = "manifest_train.jsonl",
        val_file: str = "manifest_val.jsonl",
        test_file: str | None = "manifest_test.jsonl",
        generate: str | None = "motion",
        motion: dict[str, Any] | None = None,
        channels: Sequence[str] | None = None,
        timestamp_column: str | None = "timestamp",
        time_unit: str = "s",
        sample_rate: float = 50.0,
        patch_len: int = 25,
        patch_stride: int = 25,
        max_seconds: float = 12.8,
        tokenizer_path: str | None = None,
        tokenizer_vocab_size: int = 512,
        batch_size: int = 32,
        descriptions_per_recording: int = 5,
        eval_batch_size: int = 128,
        num_workers: int = 1,
        max_target_len: int = 48,
        prompt: str = task_spec("sensor_to_text").prompt,
        val_limit: int | None = None,
        skip_bad: bool = False,
        allow_outside_root: bool = False,
    ):
        super().__init__()
        self.root = Path(root)
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.generate, self.motion_kwargs = generate, dict(motion or {})
        self.read_kwargs = {"timestamp_column": timestamp_column, "time_unit": time_unit}
        self.base_cfg = SensorConfig(channels=list(channels or IMU_CHANNELS), sample_rate=sample_rate,
                                     patch_len=patch_len, patch_stride=patch_stride,
                                     max_len=int(round(max_seconds * sample_rate)))
        self.tokenizer_path, self.vocab_size = tokenizer_path, tokenizer_vocab_size
        if descriptions_per_recording < 1:
            raise ValueError(f"descriptions_per_recording must be >= 1, got {descriptions_per_recording}")
        self.batch_size, self.eval_batch_size, self.k = batch_size, eval_batch_size, descriptions_per_recording
        self.num_workers, self.max_target_len, self.prompt_text, self.val_limit = num_workers, max_target_len, prompt, val_limit
        self.skip_bad, self.allow_outside_root = skip_bad, allow_outside_root
        self.split_infos: dict[str, SplitInfo] = {}
        self.records: dict[str, list[ManifestRecord]] = {}
        self._recs: dict[str, list[SensorRecording]] = {}
        self.sensor_cfg: SensorConfig | None = None  # fitted on train (prepare_data) or the model's (bind)
        self.sensor_tokenizer: SensorTokenizer | None = None
        self.tokenizer: TextTokenizer | None = None
        self.layout: VocabLayout | None = None
        self.collate = Seq2SeqCollator()

    # --- reading ------------------------------------------------------------------------------
    def _read(self, split: str) -> list[ManifestRecord]:
        """The split's manifest records whose recordings read and hold usable data (checked up front: a bad
        line or recording raises naming the manifest line and the file, or is skipped with ``skip_bad``)."""
        if split not in self.records:
            from tasks.data.validate import Problems, confine_roots, outside_roots

            if not self.files.get(split):
                raise ValueError(f"this dataset has no {split} split (data.{split}_file is null)")
            path = self.root / self.files[split]
            problems = Problems(self.skip_bad, str(path))
            records = read_manifest(path, problems=problems, allow_empty=True)
            if split != "train" and self.val_limit:
                records = records[: self.val_limit]
            roots = confine_roots(self.allow_outside_root, self.root)
            checker = SensorTokenizer(self.sensor_cfg or self.base_cfg)  # its checks: rate, timestamps, max_len
            channels = checker.cfg.channels
            kept, recordings = [], []
            for r in records:
                why = outside_roots(r.path, roots)
                rec = None
                if why is None:
                    try:
                        rec = read_recording(r.path, channels, r.rate, **self.read_kwargs)
                        why = recording_problem(rec, channels)
                        why = f"{r.path}: {why}" if why else None
                        if why is None:
                            checker.resampled(rec)  # what the loader workers do: fails here, not mid-epoch
                    except (OSError, ValueError) as e:  # SensorDataError is a ValueError; it names the file
                        why = str(e)
                if why is not None:
                    problems.report(f"{r.where} (id={r.id}): {why}")
                    continue
                kept.append(r)
                recordings.append(rec)
            problems.log()
            self.split_infos[split] = info = SplitInfo(str(path), len(kept), list(problems.messages))
            if split == "train" and not kept:
                raise DataError(f"{empty_split_error(info, split)}: nothing to train on")
            self.records[split], self._recs[split] = kept, recordings
        return self.records[split]

    def recordings(self, split: str) -> list[SensorRecording]:
        """The split's recordings read through the format readers (kept in memory: they are small)."""
        if split not in self._recs:
            self._read(split)
            if split not in self._recs:  # read again for new channels (bind)
                channels = (self.sensor_cfg or self.base_cfg).channels
                self._recs[split] = [read_recording(r.path, channels, r.rate, **self.read_kwargs)
                                     for r in self._read(split)]
        return self._recs[split]

    def ensure_data(self) -> None:
        """Generate the embedded dataset on first use (``generate``)."""
        if self.generate == "motion":
            from tasks.data.motion import MotionConfig, ensure_motion

            ensure_motion(self.root, MotionConfig(**self.motion_kwargs))
        elif self.generate:
            raise ValueError(f"unknown data generator {self.generate!r}; use 'motion' or null")

    def prepare_data(self) -> None:
        self.ensure_data()
        if self.sensor_tokenizer is None:  # training (zoo-eval binds first and reads only the split it scores)
            for split, name in self.files.items():
                if name:
                    self._read(split)  # validate every split's manifest and recordings now, before the long run
        self.load_tokenizer()
        if self.sensor_cfg is None:
            self.sensor_cfg = SensorTokenizer(self.base_cfg).fit(self.recordings("train"))

    def training_texts(self) -> list[str]:
        """The instruction and the training descriptions (what the BPE is trained on)."""
        self.ensure_data()
        return [self.prompt_text, *(d for r in self._read("train") for d in r.descriptions)]

    def model_overrides(self) -> dict[str, Any]:
        """The fitted sensor config, saved with the model as ``modalities.sensor``."""
        if self.sensor_cfg is None:
            raise RuntimeError("call prepare_data() before model_overrides()")
        return {"modalities": {"sensor": self.sensor_cfg.to_dict()}}

    def bind(self, model_cfg: Any, layout: VocabLayout, tokenizer: TextTokenizer | None = None) -> None:
        """Use the model's sensor config (channels, rate, statistics) and vocabulary layout."""
        mods = getattr(model_cfg, "modalities", {"sensor": model_cfg})
        cfg = mods.get("sensor")
        if cfg is None:
            raise ValueError("this model has no sensor modality; sensor-to-text needs one")
        cfg = SensorConfig(**cfg) if isinstance(cfg, dict) else cfg
        if not cfg.fitted:
            raise ValueError("the model's sensor config has no fitted mean/std")
        if self.sensor_cfg is not None and cfg.channels != self.sensor_cfg.channels:
            self._recs.clear()  # read the model's channels
        self.sensor_cfg = cfg
        self.sensor_tokenizer = SensorTokenizer(cfg)
        self.attach(layout, tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if self.sensor_tokenizer is None or self.layout is None:
            raise RuntimeError("SensorTextDataModule.bind(model_cfg, layout) must be called before setup()")
        self.load_tokenizer()
        self.prompt_ids = self.encode_text([self.prompt_text], self.max_target_len)[0]

    # --- ground truth -------------------------------------------------------------------------
    def references(self, stage: str) -> dict[str, list[str]]:
        return {r.id: r.descriptions for r in self._read(stage)}

    def activities(self, stage: str) -> dict[str, list[str]]:
        """Ground-truth activity sequences (the manifest's, else parsed from the first description)."""
        return {r.id: r.activities if r.activities is not None else parse_activities(r.descriptions[0])
                for r in self._read(stage)}

    # --- loaders ------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        recs = self._read("train")
        flat = iter(self.encode_text([d for r in recs for d in r.descriptions], self.max_target_len,
                                     "training descriptions (data.max_target_len)",
                                     [f"{r.where} (id={r.id})" for r in recs for _ in r.descriptions]))
        targets = [[next(flat) for _ in r.descriptions] for r in recs]
        ds = SensorTrainSet(self.recordings("train"), [r.id for r in recs], targets, self.prompt_ids,
                            self.sensor_tokenizer, self.k)
        return self._loader(ds, self.batch_size, shuffle=True)

    def _eval_loader(self, split: str) -> DataLoader:
        ds = SensorEvalSet(self.recordings(split), [r.id for r in self._read(split)], self.prompt_ids, self.sensor_tokenizer)
        return self._loader(ds, self.eval_batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


# ------------------------------------------------------------------------------------------------
# Task
# ------------------------------------------------------------------------------------------------
class SensorToTextTask(Seq2SeqTask):
    """Sensor recording + instruction → description; activity accuracy/F1, BLEU-4, CIDEr-D."""

    name = "sensor_to_text"
    spec = task_spec("sensor_to_text")
    monitor_metric = "activity_acc"

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"sensor": batch["sensor"], "text": (batch["prompt_ids"], batch["prompt_mask"])}

    def compute_metrics(self, stage: str, predictions: dict[Any, str]) -> dict[str, float]:
        from tasks.metrics import caption_scores

        dm = self.datamodule
        refs = self.scored_references(stage, dm.references(stage), predictions, "recordings")
        preds = {k: predictions[k] for k in refs}
        scores = caption_scores(preds, refs)
        return {"bleu4": scores["bleu4"], "cider": scores["cider"], **activity_scores(preds, dm.activities(stage))}

    def format_predictions(self, predictions: dict[Any, str]) -> list[dict[str, Any]]:
        return [{"id": k, "description": v, "activities": parse_activities(v)} for k, v in predictions.items()]

    def write_samples(self, path: Path, stage: str) -> None:
        s = self.samples.get(stage)
        if not s:
            return
        values, valid = s["sensor"]
        plot_recordings(values, valid, s["predictions"], path, references=self.sample_references(stage))


def plot_recordings(values: torch.Tensor, valid: torch.Tensor, texts: Sequence[str], path: str | Path,
                    cols: int = 2, size: tuple[int, int] = (360, 120),
                    references: Sequence[str] | None = None) -> Path:
    """A PIL grid: each recording's normalised channels as lines, its text below (and its reference, in green)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    colours = [(200, 30, 30), (30, 140, 30), (30, 60, 200), (230, 140, 0), (140, 40, 170), (0, 150, 160)]
    font = ImageFont.load_default()
    w, h = size
    text_h = (3 + (2 if references is not None else 0)) * 12 + 6
    n = len(texts)
    rows = max(1, -(-n // cols))
    canvas = Image.new("RGB", (cols * w, rows * (h + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(texts):
        x0, y0 = (i % cols) * w, (i // cols) * (h + text_h)
        v = values[i].float().clamp(-4, 4).numpy()
        t_len = int(valid[i].any(0).nonzero().max()) + 1 if valid[i].any() else 1
        xs = x0 + 4 + np.arange(t_len) * (w - 8) / max(1, t_len - 1)
        for c in range(v.shape[0]):
            ys = y0 + h / 2 - v[c, :t_len] * (h / 10)
            draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colours[c % len(colours)], width=1)
        draw.rectangle([x0 + 2, y0 + 2, x0 + w - 3, y0 + h - 3], outline=(180, 180, 180))
        lines = textwrap.wrap(str(text), w // 6)[:3]
        for j, line in enumerate(lines):
            draw.text((x0 + 4, y0 + h + 2 + j * 12), line, fill="black", font=font)
        if references is not None:
            for j, line in enumerate(textwrap.wrap(f"ref: {references[i]}", w // 6)[:2]):
                draw.text((x0 + 4, y0 + h + 2 + (len(lines) + j) * 12), line, fill=(0, 120, 0), font=font)
    with atomic_file(path, "wb") as f:
        canvas.save(f, format="PNG")
    return Path(path)
