"""An attribute probe that judges Shapes images: which colours, which shapes, how many objects.

A small CNN is trained on real Shapes images (``scenes_*.json`` give exact labels). It must read
held-out real images with ≥ 95 % all-attribute accuracy to serve as a judge of generated images;
:func:`ensure_probe` records that figure next to the cached weights. :func:`score_attributes` scores
generated images against the attributes of their prompts, and :func:`frechet_distance` compares image
sets in the probe's pooled feature space ("probe FD": NOT Inception FID, not comparable to it).

``python -m tasks.tools.probe data/shapes`` trains (or loads) the probe and prints its held-out accuracy.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.data.shapes import COLOURS, SHAPES
from tasks.data.shapes_images import (data_marker, dense_scene_loss, grid_to_sets, load_images, read_split,
                                      scene_grid_targets, scene_labels, split_dense_logits)

ATTRIBUTES = ("colour", "shape", "count")
PROBE_VERSION = 2  # part of the cache key: bumped when the probe's architecture or training changes
REQUIRED_ACCURACY = 0.95
#: probes trained by :func:`ensure_probe` on the default Shapes data, named by their cache key (data marker, version,
#: training settings): a first run copies the matching one instead of training it (minutes on a slow CPU)
SHIPPED_PROBES = Path(__file__).parent / "shipped"


class AttributeProbe(nn.Module):
    """Dense CNN judge: ``[B,3,64,64]`` in ``[0,1]`` → per-cell objectness, shape and colour logits.

    Trained like a one-stage detector on the scenes' object centres (one ``stride``-px cell per object),
    which teaches shape in a few epochs where image-level set labels took many. Image-level colour /
    shape sets and the count are read off the cells predicted to hold an object (:func:`grid_to_sets`).
    """

    def __init__(self, width: int = 16, image_size: int = 64):
        super().__init__()
        self.config = {"width": width, "image_size": image_size}
        w = width

        def conv(i: int, o: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

        # stride 8: an 8-px cell per output, finer than the smallest object (12 px), so centres never share one
        self.body = nn.Sequential(conv(3, w), conv(w, w, 2), conv(w, 2 * w), conv(2 * w, 2 * w, 2),
                                  conv(2 * w, 4 * w), conv(4 * w, 4 * w, 2), conv(4 * w, 4 * w))
        self.head = nn.Conv2d(4 * w, 1 + len(SHAPES) + len(COLOURS), 1)
        self.grid = image_size // 8

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        size = self.config["image_size"]
        if x.ndim != 4 or x.shape[1:] != (3, size, size):
            raise ValueError(f"the probe reads [B,3,{size},{size}] images, got {tuple(x.shape)}")
        return self.body(x * 2 - 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, 8·width]`` (mean and max over cells; the space of the probe Fréchet distance)."""
        h = self._body(x)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return split_dense_logits(self.head(self._body(x)))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
        """Predicted image labels (colour/shape multi-hot, count index) of images in ``[0,1]`` or ``uint8``."""
        outs = [grid_to_sets(**self(_as_float(chunk))) for chunk in x.split(batch_size)]
        return {k: torch.cat([o[k] for o in outs]) for k in ATTRIBUTES}


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


#: the dense loss against :func:`scene_grid_targets` (shared with the backbone's scene pretraining)
probe_loss = dense_scene_loss


def score_attributes(pred: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-attribute accuracy (a colour/shape set must match exactly) and the all-correct rate."""
    ok = {"colour": (pred["colour"] == target["colour"]).all(-1),
          "shape": (pred["shape"] == target["shape"]).all(-1),
          "count": pred["count"] == target["count"]}
    out = {f"{k}_acc": float(v.float().mean()) for k, v in ok.items()}
    out["all_acc"] = float((ok["colour"] & ok["shape"] & ok["count"]).float().mean())
    return out


@torch.no_grad()
def probe_features(probe: AttributeProbe, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
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


def train_probe(root: str | Path, epochs: int = 5, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                width: int = 16, max_train: int | None = None) -> tuple[AttributeProbe, dict[str, float]]:
    """Train on the train split; returns the probe (eval mode) and its accuracy on the held-out val split."""
    with torch.inference_mode(False), torch.enable_grad():  # callable from inside evaluation loops
        return _train_probe(root, epochs, batch_size, lr, seed, width, max_train)


def _train_probe(root: str | Path, epochs: int, batch_size: int, lr: float, seed: int, width: int,
                 max_train: int | None) -> tuple[AttributeProbe, dict[str, float]]:
    torch.manual_seed(seed)
    ids, paths, _ = read_split(root, "train")
    if max_train:
        ids, paths = ids[:max_train], paths[:max_train]
    images = load_images(paths)
    probe = AttributeProbe(width=width, image_size=images.shape[-1])
    targets = scene_grid_targets(root, "train", ids, probe.grid, images.shape[-1])
    batch_size = min(batch_size, len(images))
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    probe.train()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for idx in order[: len(order) // batch_size * batch_size].view(-1, batch_size):
            loss = probe_loss(probe(_as_float(images[idx])), {k: v[idx] for k, v in targets.items()})
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


def probe_name(root: str | Path, **train_kwargs: Any) -> str:
    """``probe-<key>``: the cache name of the probe trained on ``root`` (its data marker) with ``train_kwargs``."""
    key = {"data": data_marker(root), "version": PROBE_VERSION, **train_kwargs}
    return "probe-" + hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def ensure_probe(root: str | Path, **train_kwargs: Any) -> Path:
    """The folder of a probe trained on ``root`` with ``train_kwargs`` (trained now unless cached there)."""
    root = Path(root)
    folder = root / "probes" / probe_name(root, **train_kwargs)
    if (folder / "probe.json").is_file():
        return folder
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}")
    shipped = SHIPPED_PROBES / folder.name
    if (shipped / "probe.json").is_file():  # the probe of the default Shapes data ships with mmzoo
        import shutil

        shutil.copytree(shipped, tmp)
        print(f"[mmzoo] text-to-image probe: the one shipped for these data ({folder.name}) → {folder}")
    else:
        from tasks.runtime.resume import isolated_rng

        with isolated_rng():  # a cache miss leaves the RNG of the run that asked for the probe as it was
            probe, metrics = train_probe(root, **train_kwargs)
        save_probe(probe, tmp, metrics)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Train (or load) the Shapes attribute probe; print its held-out accuracy.")
    ap.add_argument("root", help="a Shapes data folder (captions_*.json, scenes_*.json, images/)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--vq", nargs="*", default=[], metavar="FOLDER",
                    help="VQ tokenizer folders: also print the probe's score of the val images after a round trip "
                         "through each (the most a generator on that tokenizer can reach)")
    args = ap.parse_args(argv)
    folder = ensure_probe(args.root, epochs=args.epochs)
    probe, acc = load_probe(folder)
    verdict = "OK as a judge" if acc["all_acc"] >= REQUIRED_ACCURACY else "TOO WEAK to judge (< 95 %)"
    print(f"probe {folder}: held-out real accuracy {json.dumps(acc)} → {verdict}")
    for vq in args.vq:
        print(f"VQ tokenizer {vq}: {json.dumps(vq_ceiling(probe, vq, args.root))}")


def vq_ceiling(probe: AttributeProbe, vq_folder: str | Path, root: str | Path, split: str = "val",
               batch_size: int = 100) -> dict[str, float]:
    """PSNR and probe scores of a split's real images after a round trip through a VQ tokenizer folder."""
    from modalities.image_codes import ImageCodeTokenizer
    from tasks.tools.vq import psnr

    tok = ImageCodeTokenizer.from_pretrained(vq_folder).eval()
    images, labels = split_data(root, split)
    x = images.float() / 255
    with torch.no_grad():
        rec = torch.cat([tok.decode(tok.encode(c)) for c in x.split(batch_size)])
    return {"psnr": float(psnr(rec, x).mean()), **score_attributes(probe.predict(rec), labels)}


if __name__ == "__main__":
    main()
