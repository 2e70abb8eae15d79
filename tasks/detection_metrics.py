"""Box metrics: COCO mAP (torchmetrics' ``MeanAveragePrecision`` on the pycocotools backend) and grounding
accuracy (IoU ≥ 0.5).

Florence-2 writes boxes without confidences: every predicted box scores 1.0, so the ranking within an image is the
order the boxes were generated in (pycocotools sorts scores stably).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch


def _tensor(boxes: Sequence[Sequence[float]]) -> torch.Tensor:
    return torch.tensor([[float(v) for v in b] for b in boxes], dtype=torch.float32).reshape(-1, 4)


def detection_map(predictions: Mapping[Any, Mapping[str, Sequence[Any]]],
                  references: Mapping[Any, Mapping[str, Sequence[Any]]]) -> dict[str, float]:
    """COCO box mAP over the images of ``references``.

    Both map an image id to ``{"boxes": [[x0, y0, x1, y1], ...], "labels": [str, ...]}`` in pixels (an image
    missing from ``predictions`` predicted nothing). Returns ``map`` (IoU 0.50:0.95), ``map_50``, ``map_75``
    and ``mar_100``; ``-1`` where the references hold no box (COCO's convention)."""
    from torchmetrics.detection import MeanAveragePrecision

    names: dict[str, int] = {}

    def ids(labels: Sequence[Any]) -> torch.Tensor:
        return torch.tensor([names.setdefault(str(x), len(names)) for x in labels], dtype=torch.long)

    preds, target = [], []
    for k, ref in references.items():
        target.append({"boxes": _tensor(ref["boxes"]), "labels": ids(ref["labels"])})
        p = predictions.get(k) or {"boxes": [], "labels": []}
        if len(p["boxes"]) != len(p["labels"]):
            raise ValueError(f"image {k!r}: {len(p['boxes'])} predicted boxes but {len(p['labels'])} labels")
        preds.append({"boxes": _tensor(p["boxes"]), "labels": ids(p["labels"]),
                      "scores": torch.ones(len(p["boxes"]), dtype=torch.float32)})
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    metric.update(preds, target)
    out = metric.compute()
    return {k: float(out[k]) for k in ("map", "map_50", "map_75", "mar_100")}


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x0, y0, x1, y1]`` boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_accuracy(predictions: Mapping[Any, Sequence[Sequence[float]]],
                       references: Mapping[Any, Sequence[float]], threshold: float = 0.5) -> dict[str, float]:
    """RefCOCO accuracy: the share of references whose first predicted box has IoU ≥ ``threshold`` with the
    reference box (no box: a miss), and the mean IoU of the first boxes."""
    hits, ious = 0, []
    for k, ref in references.items():
        boxes = predictions.get(k) or []
        iou = box_iou(boxes[0], ref) if boxes else 0.0
        ious.append(iou)
        hits += iou >= threshold
    n = max(1, len(references))
    return {"acc50": hits / n, "miou": sum(ious) / n}
