"""An attribute probe that judges Shapes images: which colours, which shapes, how many objects.

A small CNN is trained on real Shapes images (``scenes_*.json`` give exact labels). It must read
held-out real images with ≥ 95 % all-attribute accuracy to serve as a judge of generated images;
:func:`ensure_probe` records that figure next to the cached weights. :func:`score_attributes` scores
generated images against the attributes of their prompts, and :func:`frechet_distance` compares image
sets in the probe's 256-d feature space ("probe FD": NOT Inception FID, not comparable to it).

``python -m tasks.probe data/shapes`` trains (or loads) the probe and prints its held-out accuracy.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tasks.data.shapes import COLOURS, SHAPES
from tasks.data.shapes_images import MAX_COUNT, load_images, read_split, scene_labels

ATTRIBUTES = ("colour", "shape", "count")
REQUIRED_ACCURACY = 0.95


class AttributeProbe(nn.Module):
    """CNN: ``[B,3,64,64]`` in ``[0,1]`` → multi-hot colour and shape logits and count logits."""

    def __init__(self, width: int = 16, feature_dim: int = 256, image_size: int = 64):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "image_size": image_size}
        w = width

        def block(i: int, o: int) -> nn.Sequential:
            # GroupNorm: the same function in training and evaluation (no running statistics to drift)
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.GroupNorm(4, o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, stride=2, padding=1, bias=False), nn.GroupNorm(4, o), nn.ReLU())

        self.body = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w), block(4 * w, 4 * w))
        # per-pixel colour detectors, max-pooled over the image: "is this colour anywhere?"
        self.colour_path = nn.Sequential(nn.Conv2d(3, 2 * w, 1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 1), nn.ReLU())
        side = image_size // 16
        # flattened map (where things are: counts) + global max (whether a shape is anywhere) + colours
        self.fc = nn.Sequential(nn.Linear(4 * w * (side * side + 1) + 2 * w, feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({"colour": nn.Linear(feature_dim, len(COLOURS)),
                                    "shape": nn.Linear(feature_dim, len(SHAPES)),
                                    "count": nn.Linear(feature_dim, MAX_COUNT)})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, feature_dim]`` (the space of the probe Fréchet distance)."""
        size = self.config["image_size"]
        if x.ndim != 4 or x.shape[1:] != (3, size, size):
            raise ValueError(f"the probe reads [B,3,{size},{size}] images, got {tuple(x.shape)}")
        x = x * 2 - 1
        h = self.body(x)  # [B, 4w, side, side]
        colours = self.colour_path(F.avg_pool2d(x, 2)).amax((2, 3))  # at half resolution: 4x cheaper
        return self.fc(torch.cat([h.flatten(1), h.amax((2, 3)), colours], 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Predicted labels (colour/shape multi-hot, count index) of images in ``[0,1]`` or ``uint8``."""
        outs: dict[str, list[torch.Tensor]] = {k: [] for k in ATTRIBUTES}
        for chunk in x.split(batch_size):
            logits = self(_as_float(chunk))
            outs["colour"].append((logits["colour"] > 0).float())
            outs["shape"].append((logits["shape"] > 0).float())
            outs["count"].append(logits["count"].argmax(-1))
        return {k: torch.cat(v) for k, v in outs.items()}


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def probe_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    return (F.binary_cross_entropy_with_logits(logits["colour"], labels["colour"])
            + F.binary_cross_entropy_with_logits(logits["shape"], labels["shape"])
            + F.cross_entropy(logits["count"], labels["count"]))


def score_attributes(pred: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-attribute accuracy (a colour/shape set must match exactly) and the all-correct rate."""
    ok = {"colour": (pred["colour"] == target["colour"]).all(-1),
          "shape": (pred["shape"] == target["shape"]).all(-1),
          "count": pred["count"] == target["count"]}
    out = {f"{k}_acc": float(v.float().mean()) for k, v in ok.items()}
    out["all_acc"] = float((ok["colour"] & ok["shape"] & ok["count"]).float().mean())
    return out


@torch.no_grad()
def probe_features(probe: AttributeProbe, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([probe.features(_as_float(c)) for c in images.split(batch_size)]).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a [N,d]`` and ``b [M,d]``.

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``; the trace of the matrix square root is the
    sum of the square roots of the eigenvalues of ``S_a S_b`` (real and ≥ 0 up to rounding).
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples per set")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eig = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0)
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * eig.sqrt().sum())


# --- training and caching ---------------------------------------------------------------------
def split_data(root: str | Path, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Real images ``uint8 [N,3,H,W]`` of a Shapes split and their scene labels."""
    ids, paths, _ = read_split(root, split)
    return load_images(paths), scene_labels(root, split, ids)


def train_probe(root: str | Path, epochs: int = 8, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                width: int = 16, max_train: int | None = None) -> tuple[AttributeProbe, dict[str, float]]:
    """Train on the train split; returns the probe (eval mode) and its accuracy on the held-out val split."""
    with torch.inference_mode(False), torch.enable_grad():  # callable from inside evaluation loops
        return _train_probe(root, epochs, batch_size, lr, seed, width, max_train)


def _train_probe(root: str | Path, epochs: int, batch_size: int, lr: float, seed: int, width: int,
                 max_train: int | None) -> tuple[AttributeProbe, dict[str, float]]:
    torch.manual_seed(seed)
    images, labels = split_data(root, "train")
    if max_train:
        images, labels = images[:max_train], {k: v[:max_train] for k, v in labels.items()}
    probe = AttributeProbe(width=width, image_size=images.shape[-1])
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    probe.train()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for idx in order[: len(order) // batch_size * batch_size].view(-1, batch_size):
            x = _as_float(images[idx])
            x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5, x, x.flip(-1))  # mirror: labels keep
            loss = probe_loss(probe(x), {k: v[idx] for k, v in labels.items()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    probe.eval()
    val_images, val_labels = split_data(root, "val")
    return probe, score_attributes(probe.predict(val_images), val_labels)


def save_probe(probe: AttributeProbe, folder: str | Path, metrics: dict[str, float]) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(folder / "probe.safetensors"))
    (folder / "probe.json").write_text(json.dumps({"config": probe.config, "val_accuracy": metrics}, indent=1))
    return folder


def load_probe(folder: str | Path) -> tuple[AttributeProbe, dict[str, float]]:
    """Load a saved probe (safetensors + json only) and its recorded held-out accuracy."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path, weights = folder / "probe.json", folder / "probe.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder} is not a probe folder (needs probe.json and probe.safetensors)")
    meta = json.loads(meta_path.read_text())
    probe = AttributeProbe(**meta["config"])
    probe.load_state_dict(load_file(str(weights)))
    return probe.eval(), meta["val_accuracy"]


def ensure_probe(root: str | Path, **train_kwargs: Any) -> Path:
    """The folder of a probe trained on ``root`` with ``train_kwargs`` (trained now unless cached there)."""
    root = Path(root)
    marker = json.loads((root / "shapes.json").read_text()) if (root / "shapes.json").is_file() else {}
    key = hashlib.sha1(json.dumps({"data": marker, **train_kwargs}, sort_keys=True).encode()).hexdigest()[:12]
    folder = root / "probes" / f"probe-{key}"
    if (folder / "probe.json").is_file():
        return folder
    probe, metrics = train_probe(root, **train_kwargs)
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}")
    save_probe(probe, tmp, metrics)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Train (or load) the Shapes attribute probe; print its held-out accuracy.")
    ap.add_argument("root", help="a Shapes data folder (captions_*.json, scenes_*.json, images/)")
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    folder = ensure_probe(args.root, epochs=args.epochs)
    _, acc = load_probe(folder)
    verdict = "OK as a judge" if acc["all_acc"] >= REQUIRED_ACCURACY else "TOO WEAK to judge (< 95 %)"
    print(f"probe {folder}: held-out real accuracy {json.dumps(acc)} → {verdict}")


if __name__ == "__main__":
    main()
