"""Training the VQ image tokenizer (``experiment=vq_shapes``) and caching trained tokenizers.

Loss: pixel MSE + the VQ codebook/commitment terms. With ``autoencode_steps`` the first steps train a
plain autoencoder (no quantisation); the codebook then starts on encoder outputs of the next batch, and
codes unused for ``restart_every`` steps are restarted on random encoder outputs of the current batch
(keeps the codebook alive). Without the warm-up, a 4-block (8×8-code) encoder starts with near-constant
latents, every code lands on the same point and training stalls at the mean image. Evaluation
reports PSNR (per image, averaged), codebook perplexity and dead codes (codes no val image uses).
With ``compact_distance`` the saved tokenizer keeps only codes that far apart
(:meth:`ImageCodeTokenizer.compacted`): equal content then gets equal codes despite pixel noise.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from modalities.image_codes import ImageCodeTokenizer, VQConfig
from tasks.base import warmup_cosine
from tasks.data.shapes_images import load_images, read_split
from tasks.data_module import TaskDataModule
from tasks.runtime.resume import ResumableLoader, eval_generator, run_seed


class ImageTensorSet(Dataset):
    """Items ``{"image": float [3,H,W] in [0,1], "id"}`` from a ``uint8`` image tensor."""

    def __init__(self, images: torch.Tensor, ids: list[int]):
        self.images, self.ids = images, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i].float() / 255, "id": self.ids[i]}


def collate_images(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"image": [B,3,H,W], "ids": [...]}``."""
    return {"image": torch.stack([s["image"] for s in samples]), "ids": [s["id"] for s in samples]}


class ShapesImageDataModule(TaskDataModule):
    """Images only (no captions) of a Shapes-layout dataset; generates Shapes on first use."""

    def __init__(self, root: str, generate: str | None = "shapes", shapes: dict[str, Any] | None = None,
                 batch_size: int = 32, eval_batch_size: int = 128, num_workers: int = 0, val_limit: int | None = None):
        super().__init__()
        self.root = Path(root)
        self.generate, self.shapes_kwargs = generate, dict(shapes or {})
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.val_limit = val_limit
        self.data: dict[str, tuple[list[int], torch.Tensor]] = {}

    def prepare_data(self) -> None:
        if self.generate == "shapes":
            from tasks.data.shapes import ShapesConfig, ensure_shapes

            ensure_shapes(self.root, ShapesConfig(**self.shapes_kwargs))
        elif self.generate:
            raise ValueError(f"unknown data generator {self.generate!r}; use 'shapes' or null")

    def split(self, split: str) -> tuple[list[int], torch.Tensor]:
        if split not in self.data:
            ids, paths, _ = read_split(self.root, split)
            if split != "train" and self.val_limit:
                ids, paths = ids[: self.val_limit], paths[: self.val_limit]
            self.data[split] = (ids, load_images(paths))
        return self.data[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ids, images = self.split(split)
        kwargs = dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0, collate_fn=collate_images)
        if shuffle:  # resumes exactly (tasks.runtime.resume)
            return ResumableLoader(ImageTensorSet(images, ids), self.batch_size, seed=run_seed(),
                                   drop_last=len(ids) >= self.batch_size, **kwargs)
        return DataLoader(ImageTensorSet(images, ids), batch_size=self.eval_batch_size, shuffle=False,
                          generator=eval_generator(self.num_workers), **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


def psnr(rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of ``[B,3,H,W]`` images in ``[0,1]`` → ``[B]``."""
    mse = ((rec.clamp(0, 1) - target) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


class VQTask(L.LightningModule):
    """Trains an :class:`ImageCodeTokenizer` (a diffusers ``VQModel``) on images."""

    name = "vq"
    standalone = True  # trains its own network: tasks.cli.train builds no unified model for it
    monitor_metric = "psnr"

    def __init__(self, vq: dict[str, Any] | None = None, lr: float = 2e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 100, min_lr_ratio: float = 0.05, restart_every: int = 50,
                 num_samples: int = 16, save_dir: str | None = None, compact_distance: float | None = None,
                 compact_images: int = 2000, autoencode_steps: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.vq_config = VQConfig(**(vq or {}))
        self.tokenizer = ImageCodeTokenizer.from_config(self.vq_config)
        self.register_buffer("steps_unused", torch.zeros(self.vq_config.num_codes, dtype=torch.long))
        self.register_buffer("codebook_initialised", torch.zeros((), dtype=torch.bool))
        self._eval: dict[str, Any] = {}
        self.predictions: dict[str, dict[Any, float]] = {}
        self.samples: dict[str, torch.Tensor] = {}
        self.final_metrics: dict[str, float] = {}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(reconstruction, vq loss, codes [B,h,w], latents)`` of pixels in ``[0,1]``."""
        h = self.tokenizer.encode_latents(pixels)
        z_q, vq_loss, codes = self.tokenizer.quantize(h)
        return self.tokenizer.decode_latents(z_q), vq_loss, codes, h

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        if self.global_step < self.hparams.autoencode_steps:  # warm-up: a plain autoencoder, no codebook yet
            rec_loss = F.mse_loss(self.tokenizer.decode_latents(self.tokenizer.encode_latents(x)), x)
            self.log("train/rec_loss", rec_loss, prog_bar=True, batch_size=len(x))
            return rec_loss
        if not bool(self.codebook_initialised):
            self._init_codebook(x)
        rec, vq_loss, codes, h = self(x)
        rec_loss = F.mse_loss(rec, x)
        loss = rec_loss + vq_loss
        n = len(x)
        self.log_dict({"train/loss": loss, "train/rec_loss": rec_loss, "train/vq_loss": vq_loss}, prog_bar=True,
                      batch_size=n)
        self._restart_dead_codes(codes, h)
        return loss

    @torch.no_grad()
    def _init_codebook(self, pixels: torch.Tensor) -> None:
        """Data-dependent init: every code starts on a random encoder output of the first quantised batch
        (diffusers initialises codes near 0, far from the latents, which stalls early training)."""
        h = self.tokenizer.encode_latents(pixels).float()
        flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # [B*h*w, c]
        pick = torch.randint(len(flat), (self.vq_config.num_codes,), device=flat.device)
        self.tokenizer.vq.quantize.embedding.weight.data.copy_(flat[pick])
        self.codebook_initialised.fill_(True)

    @torch.no_grad()
    def _restart_dead_codes(self, codes: torch.Tensor, latents: torch.Tensor) -> None:
        """Codes unused for ``restart_every`` steps move onto random latents of this batch."""
        used = torch.bincount(codes.flatten(), minlength=self.vq_config.num_codes) > 0
        self.steps_unused = torch.where(used, torch.zeros_like(self.steps_unused), self.steps_unused + 1)
        every = self.hparams.restart_every
        if not every:
            return
        dead = (self.steps_unused >= every).nonzero().squeeze(1)
        if len(dead):
            flat = latents.detach().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # [B*h*w, c]
            pick = torch.randint(len(flat), (len(dead),), device=flat.device)
            weight = self.tokenizer.vq.quantize.embedding.weight
            weight.data[dead] = flat[pick].to(weight.dtype)
            self.steps_unused[dead] = 0
            self.log("train/restarted_codes", float(len(dead)), batch_size=1)

    # --- evaluation ---------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Any]) -> None:
        x = batch["image"]
        rec, _, codes, _ = self(x)
        e = self._eval
        e.setdefault("psnr", []).append(psnr(rec, x).cpu())
        e.setdefault("ids", []).extend(batch["ids"])
        counts = torch.bincount(codes.flatten(), minlength=self.vq_config.num_codes).cpu()
        e["counts"] = e.get("counts", 0) + counts
        if "sample" not in e:
            n = self.hparams.num_samples
            e["sample"] = torch.stack([x[:n].cpu(), rec[:n].clamp(0, 1).cpu()], 1).flatten(0, 1)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def _eval_end(self, stage: str) -> None:
        e, self._eval = self._eval, {}
        if not e or self.trainer.sanity_checking:
            return
        values = torch.cat(e["psnr"])
        counts = e["counts"].double()
        p = counts / counts.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        metrics = {"psnr": float(values.mean()), "perplexity": float(entropy.exp()),
                   "dead_codes": float((counts == 0).sum()), "usage": float((counts > 0).float().mean())}
        for k, v in metrics.items():
            self.log(f"{stage}/{k}", v, prog_bar=k == "psnr")
            self.final_metrics[f"{stage}/{k}"] = v
        self.predictions[stage] = {i: float(v) for i, v in zip(e["ids"], values.tolist())}
        self.samples[stage] = e["sample"]

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def format_predictions(self, predictions: dict[Any, float]) -> list[dict[str, Any]]:
        return [{"image_id": k, "psnr": v} for k, v in predictions.items()]

    def write_samples(self, path: Path, stage: str) -> None:
        """Grid of originals next to their reconstructions."""
        from tasks.visualize import save_grid

        s = self.samples.get(stage)
        if s is None:
            return
        save_grid(list(s), ["original" if i % 2 == 0 else "reconstruction" for i in range(len(s))], path,
                  cols=8, cell=96, text_lines=1)

    def export_tokenizer(self, dm: ShapesImageDataModule) -> ImageCodeTokenizer:
        """The tokenizer to save: compacted (``compact_distance``) on the code usage of ``dm``'s training images
        (at most ``compact_images`` of them), else the trained one."""
        if self.hparams.compact_distance is None:
            return self.tokenizer
        tok = self.tokenizer.eval()
        images = dm.split("train")[1][: self.hparams.compact_images]
        small = tok.compacted(tok.code_usage(images), self.hparams.compact_distance)
        print(f"[mmzoo] VQ codebook compacted: {tok.num_codes} → {small.num_codes} codes "
              f"(min distance {self.hparams.compact_distance})")
        self.final_metrics["export/num_codes"] = float(small.num_codes)
        return small

    def on_fit_end(self) -> None:
        if not (self.hparams.save_dir and self.trainer.is_global_zero):
            return
        dm = self.trainer.datamodule
        tok = self.export_tokenizer(dm)
        if tok is not self.tokenizer:  # the saved (compacted) tokenizer's own val PSNR; val/psnr is the full codebook's
            val = dm.split("val")[1].to(tok.vq.device)
            with torch.no_grad():
                rec = torch.cat([tok.decode(tok.encode(c.float() / 255)) for c in val.split(256)])
            self.final_metrics["export/val_psnr"] = float(psnr(rec, val.float() / 255).mean())
        tok.save_pretrained(self.hparams.save_dir)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from tasks.checkpoint import CheckpointMeta

        CheckpointMeta(task=self.name, state={"vq_config": self.vq_config.to_dict()}).write(checkpoint)

    # --- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        total = self.trainer.estimated_stepping_batches
        if self.hparams.autoencode_steps >= total:
            raise ValueError(f"task.autoencode_steps={self.hparams.autoencode_steps} leaves none of the {total} training "
                             f"steps for the codebook; use fewer warm-up steps (0 turns the warm-up off)")
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return warmup_cosine(opt, total, self.hparams.warmup_steps,
                             self.hparams.min_lr_ratio)


# --- a trained tokenizer on demand ------------------------------------------------------------
def vq_spec_digest(spec: Mapping[str, Any]) -> str:
    """Hash of a tokenizer training spec (architecture, optimisation, data, steps)."""
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def ensure_vq_tokenizer(spec: Mapping[str, Any], cache_dir: str | Path) -> Path:
    """The folder of a VQ tokenizer trained per ``spec``, trained now unless already cached.

    ``spec = {"task": VQTask kwargs, "data": ShapesImageDataModule kwargs, "max_steps": int,
    "seed": int, "precision": Lightning precision}``; the folder is ``cache_dir/vq-<hash of spec>`` and appears atomically.
    """
    spec = json.loads(json.dumps(dict(spec), default=str))  # plain, resolved
    unknown = set(spec) - {"task", "data", "max_steps", "seed", "precision"}
    if unknown:
        raise ValueError(f"unknown VQ tokenizer spec keys {sorted(unknown)}")
    folder = Path(cache_dir) / f"vq-{vq_spec_digest(spec)}"
    if (folder / "config.json").is_file():
        return folder
    task_kw = {k: v for k, v in spec.get("task", {}).items() if not k.startswith("_")}
    data_kw = {k: v for k, v in spec.get("data", {}).items() if not k.startswith("_")}
    print(f"[mmzoo] training the VQ image tokenizer for {spec.get('max_steps')} steps → {folder}")
    L.seed_everything(int(spec.get("seed", 0)))
    dm = ShapesImageDataModule(**data_kw)
    task = VQTask(**{**task_kw, "save_dir": None})
    trainer = L.Trainer(accelerator="auto", devices=1, max_steps=int(spec.get("max_steps", 1000)), max_epochs=-1,
                        precision=spec.get("precision") or "32-true",
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0,
                        enable_progress_bar=False)
    trainer.fit(task, datamodule=dm)
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}")
    task.export_tokenizer(dm).save_pretrained(tmp)
    (tmp / "mmzoo_vq_spec.json").write_text(json.dumps(spec, indent=1, sort_keys=True))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
