"""Dense scene pretraining of the image backbone: mmzoo's offline stand-in for ImageNet weights.

OFA and its peers start from an ImageNet-pretrained ResNet. Nothing can be downloaded here, and a
backbone trained from scratch only through captions or answers learns shape identity very slowly
(Shapes VQA shape questions stayed at chance for 500 steps). A one-stage detector objective on the
scene annotations teaches it in about a minute: every object's centre cell on the backbone's stride-8
grid predicts objectness, shape and colour (:func:`tasks.data.shapes_images.scene_grid_targets`).

:func:`ensure_pretrained_backbone` trains the configured ``timm`` backbone that way once and caches
its weights as a safetensors file keyed by the spec and the data; :func:`tasks.cli.train.build_model` then
loads that file into the model (``model.image_pretrain`` in the experiment config) the way the image modality's
:class:`~modalities.base.PretrainableBackbone` says: ``image`` hands it to timm as the backbone's ``pretrained``
weights, ``florence_image`` loads it into the built DaViT tower. The unified model's config records nothing from it: saved models carry their own
weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from modalities.base import get_modality
from tasks.data.shapes import COLOURS, SHAPES
from tasks.data.shapes_images import data_marker, split_dense_logits

SPEC_KEYS = {"root", "backbone", "out_index", "image_size", "epochs", "batch_size", "lr", "seed", "max_train",
             "cell_stride"}
# cell_stride 8: at 64 px an 8-px cell per target, finer than the smallest Shapes object (12 px)
DEFAULTS: dict[str, Any] = {"epochs": 3, "batch_size": 64, "lr": 3e-3, "seed": 0, "max_train": None, "cell_stride": 8}
VERSION = 3  # part of the cache key: bumped when the objective or the head changes
#: stems this module pretrained on the default Shapes data (fp16, named like the cache files: same spec and data → same
#: name): a first run uses them instead of pretraining (161 s of a 25-min budget on a slow CPU). Regenerate with
#: ``python -m tasks.tools.backbone_pretrain ship <cache file>`` after a change of the objective, defaults or data.
SHIPPED_STEMS = Path(__file__).parent / "shipped"


class DenseSceneHead(nn.Module):
    """Per-cell objectness, shape and colour logits from one backbone stage, or from two (a light FPN).

    With two stages the coarser one (the stage the unified model reads) is upsampled to the finer
    stage's grid and added to it, so both learn where objects are and what they are.
    """

    def __init__(self, channels: list[int], scale: int = 1, width: int = 128):
        super().__init__()
        self.scale = scale
        self.inputs = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)  # fine first, then coarse
        self.out = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, 1 + len(SHAPES) + len(COLOURS), 1))

    def forward(self, *features: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.inputs[0](features[0])
        if len(features) == 2:
            h = h + F.interpolate(self.inputs[1](features[1]), scale_factor=self.scale, mode="nearest")
        return split_dense_logits(self.out(h))


def resolve_spec(spec: Mapping[str, Any], image_cfg: Mapping[str, Any], modality: str = "image") -> dict[str, Any]:
    """The full pretraining spec: the user's keys, the model's image backbone, and the defaults.

    ``image_cfg`` is the model's config of ``modality``, a registered modality whose backbone can be pretrained
    (:class:`modalities.base.PretrainableBackbone`: ``image``'s timm backbone, Florence-2's DaViT tower), which
    says what to train."""
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ValueError(f"unknown model.image_pretrain keys {sorted(unknown)}; valid: {sorted(SPEC_KEYS)}")
    if not spec.get("root"):
        raise ValueError("model.image_pretrain needs 'root': a Shapes data folder (scenes_*.json, captions_*.json)")
    hook = get_modality(modality).pretrainable
    if hook is None:
        raise ValueError(f"model.image_pretrain: modality {modality!r} has no backbone to pretrain")
    target = hook.target(dict(image_cfg))
    backbone = target["backbone"]
    if not backbone.startswith("timm:"):
        raise ValueError(f"model.image_pretrain trains timm backbones only, the image backbone is {backbone!r}")
    out = {**DEFAULTS, "backbone": backbone, "out_index": int(target["out_index"]),
           "image_size": int(target["image_size"]), **dict(spec),
           "mean": [float(m) for m in target["mean"]], "std": [float(m) for m in target["std"]]}
    if target.get("tower_kwargs"):  # part of the cache key: another tower size is another file
        out["tower_kwargs"] = target["tower_kwargs"]
    out["root"] = str(Path(out["root"]).resolve())
    return out


def check_scene_labels(root: str | Path) -> None:
    """Raise a clear error before any work when ``root`` has no Shapes scene labels to pretrain on."""
    missing = [f"scenes_{s}.json" for s in ("train", "val") if not (Path(root) / f"scenes_{s}.json").is_file()]
    if missing:
        raise ValueError(f"model.image_pretrain.root={root} has no Shapes scene labels ({', '.join(missing)} missing): "
                         "the stem is pretrained on them. For your own data set model.image_pretrain=null")


def spec_digest(spec: Mapping[str, Any]) -> str:
    keyed = {k: v for k, v in spec.items() if k != "root"}
    return hashlib.sha1(json.dumps({"spec": keyed, "data": data_marker(spec["root"]), "version": VERSION}, sort_keys=True,
                                   default=str).encode()).hexdigest()[:12]


def _autocast(device: torch.device):
    from contextlib import nullcontext

    from tasks.runtime.resolvers import cpu_has_bf16

    if device.type == "cuda" or cpu_has_bf16():
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def pretrain_backbone(spec: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train the spec's backbone on dense scene targets; returns its (features-only) weights and val metrics."""
    import timm

    from tasks.data.shapes_images import dense_scene_loss, grid_to_sets, load_images, read_split, scene_grid_targets, scene_labels
    from tasks.tools.probe import score_attributes

    root, size = spec["root"], int(spec["image_size"])
    torch.manual_seed(int(spec["seed"]))
    name, out_index = spec["backbone"].split(":", 1)[1], int(spec["out_index"])
    # targets live on a grid of cell_stride-px cells (in the model's pixels); the model's stage feeds the
    # head directly when its stride is that fine, else through the stage whose stride matches (FPN)
    tower_kwargs = dict(spec.get("tower_kwargs") or {})
    strides = timm.create_model(name, features_only=True, **tower_kwargs).feature_info.reduction()
    cell = int(spec["cell_stride"])
    if strides[out_index] <= cell:
        stages: tuple[int, ...] = (out_index,)
    else:
        finer = [i for i in range(out_index) if strides[i] == cell]
        if not finer:
            raise ValueError(f"{spec['backbone']} has no stage of stride {cell} (strides {strides}); "
                             "set model.image_pretrain.cell_stride")
        stages = (finer[0], out_index)
    net = timm.create_model(name, features_only=True, out_indices=stages, **tower_kwargs)
    reductions = net.feature_info.reduction()
    grid = size // reductions[0]
    if size % reductions[0] or grid < 2:
        raise ValueError(f"image size {size} does not tile into stride-{reductions[0]} cells")
    head = DenseSceneHead(net.feature_info.channels(), reductions[-1] // reductions[0])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device).train(), head.to(device).train()

    def load(split: str, limit: int | None = None) -> tuple[torch.Tensor, list[int], int]:
        ids, paths, _ = read_split(root, split)
        ids, paths = ids[:limit] if limit else ids, paths[:limit] if limit else paths
        images = load_images(paths)
        data_size = images.shape[-1]  # the scenes' pixel coordinates refer to this size
        if data_size != size:
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True).round().clamp(0, 255).byte()
        return images, ids, data_size

    images, ids, data_size = load("train", spec.get("max_train"))
    targets = scene_grid_targets(root, "train", ids, grid, data_size, strict=False)
    mean = torch.tensor(spec["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec["std"], device=device).view(1, 3, 1, 1)

    def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (x.to(device).float() / 255 - mean) / std  # the model's ImageConfig normalisation
        with _autocast(device):
            return {k: v.float() for k, v in head(*net(x.contiguous(memory_format=torch.channels_last))).items()}

    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=float(spec["lr"]), weight_decay=1e-4)
    bs = min(int(spec["batch_size"]), len(images))
    steps = int(spec["epochs"]) * max(1, len(images) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(spec["lr"]), total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(int(spec["seed"]))
    t0 = time.perf_counter()
    epochs = int(spec["epochs"])
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for idx in order[: len(order) // bs * bs].view(-1, bs):
            loss = dense_scene_loss(forward(images[idx]), {k: v[idx].to(device) for k, v in targets.items()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"[mmzoo] backbone pretraining epoch {epoch + 1}/{epochs}: loss {float(loss.detach()):.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = time.perf_counter() - t0
    net.eval(), head.eval()
    val_images, val_ids, _ = load("val")
    with torch.no_grad():
        preds = [grid_to_sets(**forward(c)) for c in val_images.split(256)]
    pred = {k: torch.cat([p[k] for p in preds]).cpu() for k in ("colour", "shape", "count")}
    metrics = score_attributes(pred, scene_labels(root, "val", val_ids))
    metrics.update(train_seconds=seconds, final_loss=float(loss.detach()))
    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, metrics


def ensure_pretrained_backbone(spec: Mapping[str, Any], cache_dir: str | Path | None = None) -> Path:
    """The weights file of a backbone pretrained per ``spec`` (:func:`resolve_spec`), trained now unless cached.

    The file is ``<cache_dir or root/backbones>/<name>-<hash>.safetensors`` (written atomically), with
    its held-out scene metrics in a ``.json`` beside it. A stem shipped in :data:`SHIPPED_STEMS` under that name
    is copied there instead of pretraining.
    """
    folder = Path(cache_dir) if cache_dir else Path(spec["root"]) / "backbones"
    name = spec["backbone"].split(":", 1)[1]
    path = folder / f"{name}-{spec_digest(spec)}.safetensors"
    if path.is_file():
        return path
    if (SHIPPED_STEMS / path.name).is_file():
        copy_shipped_stem(SHIPPED_STEMS / path.name, path)
        print(f"[mmzoo] image backbone: the stem shipped for these data and settings ({path.name}; pretrained by "
              f"this module on the default Shapes data) → {path}")
        return path
    check_scene_labels(spec["root"])
    print(f"[mmzoo] pretraining the image backbone {spec['backbone']} on dense scene labels "
          f"({spec['epochs']} epochs) → {path}")
    weights, metrics = pretrain_backbone(spec)
    print(f"[mmzoo] backbone pretraining: {metrics['train_seconds']:.0f} s, held-out scene reading "
          + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith("_acc")))
    _write_atomically(weights, {"spec": dict(spec), "val": metrics}, path)
    return path


def _write_atomically(weights: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp_w, tmp_m = path.parent / f".{path.name}.{tag}", path.parent / f".{path.stem}.json.{tag}"
    save_file(weights, str(tmp_w))
    tmp_m.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    os.replace(tmp_m, path.with_suffix(".json"))
    os.replace(tmp_w, path)  # last: its presence means complete


def copy_shipped_stem(shipped: Path, path: Path) -> None:
    """Write a shipped (fp16) stem as a cache file (fp32) at ``path``, with its metrics file."""
    from safetensors.torch import load_file

    weights = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(shipped)).items()}
    meta = json.loads(shipped.with_suffix(".json").read_text())
    _write_atomically(weights, {**meta, "shipped": shipped.name}, path)


def ship_stem(cache_file: str | Path, out_dir: str | Path = SHIPPED_STEMS) -> Path:
    """Copy a pretrained cache file (and its metrics) into ``out_dir`` in fp16, under the same name."""
    from safetensors.torch import load_file

    cache_file = Path(cache_file)
    weights = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(cache_file)).items()}
    meta = json.loads(cache_file.with_suffix(".json").read_text())
    meta["spec"] = {k: v for k, v in meta["spec"].items() if k != "root"}  # no path of the machine that made it
    out = Path(out_dir) / cache_file.name
    _write_atomically(weights, meta, out)
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "ship":
        sys.exit("usage: python -m tasks.tools.backbone_pretrain ship <backbones/<name>-<hash>.safetensors>")
    print(ship_stem(sys.argv[2]))
