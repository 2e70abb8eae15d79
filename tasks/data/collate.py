"""Batching for seq2seq samples: pads token segments, builds masks, keeps record ids.

A sample is a dict with any of:
  ``image``  float tensor ``[3,H,W]`` (preprocessed in the worker)
  ``sensor`` ``(values [C,T], valid [C,T])`` from the sensor tokenizer (padded over time to the batch's longest)
  ``prompt`` list[int] of unified ids (the instruction)
  ``target`` list[int] of unified ids, without BOS/EOS (absent at evaluation), or
  ``targets`` list of such lists: several targets for one source (encoded once, see ``target_counts``)
  ``id``     the source record's id
and task-specific extras which are collected into lists.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from zoo.vocab import BOS_ID, EOS_ID, PAD_ID


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
        if "image" in first:
            batch["image"] = torch.stack([s["image"] for s in samples])
        if "sensor" in first:  # (values [C,T], valid [C,T]) pairs of any length → padded; plain tensors stack
            if isinstance(first["sensor"], tuple):
                from modalities.sensor import pad_sensor_batch

                batch["sensor"] = pad_sensor_batch([s["sensor"] for s in samples])
            else:
                batch["sensor"] = torch.stack([s["sensor"] for s in samples])
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
            if key not in ("image", "sensor", "prompt", "target", "targets", "id"):
                batch[key] = [s[key] for s in samples]
        return batch
