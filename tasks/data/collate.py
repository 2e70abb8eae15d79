"""Batching for seq2seq samples: pads token segments, builds masks, keeps record ids.

A sample is a dict with any of:
  <modality> a registered encoder-input modality's preprocessed value (an image ``[3,H,W]``, a sensor
             ``(values [C,T], valid [C,T])``, ...), batched by that modality's ``collate``
  ``prompt`` list[int] of unified ids (the instruction)
  ``target`` list[int] of unified ids, without BOS/EOS (absent at evaluation), or
  ``targets`` list of such lists: several targets for one source (encoded once, see ``target_counts``)
  ``id``     the source record's id
and task-specific extras which are collected into lists.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from modalities.base import get_modality, list_modalities
from zoo.vocab import BOS_ID, EOS_ID, PAD_ID

SAMPLE_KEYS = ("prompt", "target", "targets", "id")


def pad_ids(seqs: Sequence[Sequence[int]], pad: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists → ``ids [B,L]`` and ``mask [B,L]`` (True = real)."""
    n = max(1, max((len(s) for s in seqs), default=1))
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return ids, ids != pad


class Seq2SeqCollator:
    """Picklable collate function (runs in DataLoader workers)."""

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        first = samples[0]
        inputs = [m for m in list_modalities() if m in first and get_modality(m).is_input]
        for name in inputs:
            batch[name] = get_modality(name).collate([s[name] for s in samples])
        if "prompt" in first:
            batch["prompt_ids"], batch["prompt_mask"] = pad_ids([s["prompt"] for s in samples])
        targets = None
        if "target" in first:
            targets = [s["target"] for s in samples]
        elif "targets" in first:
            targets = [t for s in samples for t in s["targets"]]
            batch["target_counts"] = torch.tensor([len(s["targets"]) for s in samples])
        if targets is not None:
            # decoder input: BOS + target ; labels: target + EOS (PAD is ignored by the loss)
            batch["tgt_in"], _ = pad_ids([[BOS_ID, *t] for t in targets])
            batch["labels"], _ = pad_ids([[*t, EOS_ID] for t in targets])
        batch["ids"] = [s["id"] for s in samples]
        for key in first:
            if key not in SAMPLE_KEYS and key not in inputs:
                batch[key] = [s[key] for s in samples]
        return batch
