"""Text-to-image: ``what is the complete image? caption: <text>`` → the H×W VQ code sequence.

The unified model writes image codes as vocabulary ids (the shared token embedding embeds them, so no
new embedder). Training drops captions at ``uncond_prob`` (the unconditional source is the empty
caption) for classifier-free guidance. Generation is constrained to the codebook's id range and to
exactly H×W tokens, samples with top-k and temperature, runs batched with the KV cache, and the VQ
decoder turns the codes into pixels. The attribute probe (:mod:`tasks.tools.probe`) scores the images
against their prompts; the probe Fréchet distance is NOT Inception FID.
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from modalities.image_codes import ImageCodeTokenizer
from modalities.text import TextTokenizer
from tasks.base import Seq2SeqTask
from tasks.caption import CaptionDataModule
from tasks.data.collate import pad_ids
from tasks.data.shapes_images import load_images, scene_labels
from zoo.atomic import atomic_file
from zoo.task_specs import task_spec
from zoo.task_specs.text_to_image import T2I_GENERATION as T2I, t2i_prompt
from zoo.vocab import BOS_ID, VocabLayout

log = logging.getLogger(__name__)


class T2ITrainSet(Dataset):
    """One item per image: a random one of its captions (or, at ``uncond_prob``, the empty caption) → codes."""

    def __init__(self, prompts: list[list[list[int]]], codes: torch.Tensor, ids: list[int],
                 uncond: list[int], uncond_prob: float):
        self.prompts, self.codes, self.ids, self.uncond, self.p = prompts, codes, ids, uncond, uncond_prob

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        caps = self.prompts[i]
        if self.p > 0 and float(torch.rand(())) < self.p:
            prompt = self.uncond
        else:
            prompt = caps[int(torch.randint(len(caps), ()))]
        return {"prompt": prompt, "target": self.codes[i].tolist(), "id": self.ids[i]}


class T2IEvalSet(Dataset):
    """One item per held-out image: its first caption as the prompt."""

    def __init__(self, prompts: list[list[int]], captions: list[str], ids: list[int]):
        self.prompts, self.captions, self.ids = prompts, captions, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"prompt": self.prompts[i], "caption": self.captions[i], "id": self.ids[i]}


def file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:12]


class T2IDataModule(CaptionDataModule):
    """Shapes captions → VQ code grids. Images are encoded to codes once per VQ checkpoint and cached.

    ``vq_path`` names a VQ tokenizer folder; when null, :func:`tasks.tools.vq.ensure_vq_tokenizer` trains one
    per the ``vq`` spec (cached under ``vq_cache_dir`` by the spec's hash).
    """

    def __init__(self, root: str, vq_path: str | None = None, vq: dict[str, Any] | None = None,
                 vq_cache_dir: str | None = None, uncond_prob: float = 0.1, max_prompt_len: int = 64,
                 encode_batch_size: int = 256, decoder: str = "codes", layout: Any = None, **kwargs: Any):
        kwargs = {k: (dict(v) if hasattr(v, "items") else v) for k, v in kwargs.items()}
        super().__init__(root, **kwargs)
        if decoder != "codes":  # data.layout: the layout route's settings (tasks/layout_t2i.py), unused here
            raise ValueError(f"T2IDataModule is the decoder=codes route, got decoder={decoder!r}")
        if not 0 <= uncond_prob < 1:
            raise ValueError(f"uncond_prob must be in [0, 1), got {uncond_prob}")
        if vq_path is None and vq is None:
            raise ValueError("give data.vq_path (a VQ tokenizer folder) or data.vq (how to train one)")
        self.vq_path, self.vq_spec = vq_path, vq
        self.vq_cache_dir = Path(vq_cache_dir) if vq_cache_dir else self.root / "vq_tokenizers"
        self.uncond_prob, self.max_prompt_len, self.encode_batch_size = uncond_prob, max_prompt_len, encode_batch_size
        self.image_tokenizer: ImageCodeTokenizer | None = None
        self.codes: dict[str, torch.Tensor] = {}

    # --- preparation --------------------------------------------------------------------------
    def prepare_data(self) -> None:
        super().prepare_data()
        self.load_image_tokenizer()
        for split, name in self.files.items():
            if name:
                self.split_codes(split)

    def load_image_tokenizer(self) -> ImageCodeTokenizer:
        if self.image_tokenizer is None:
            if self.vq_path:
                folder = Path(self.vq_path)
            else:
                from omegaconf import OmegaConf

                from tasks.tools.vq import ensure_vq_tokenizer

                spec = self.vq_spec
                spec = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else spec
                folder = ensure_vq_tokenizer(spec, self.vq_cache_dir)
            self.vq_path = str(folder)
            self.image_tokenizer = ImageCodeTokenizer.from_pretrained(folder)
        return self.image_tokenizer

    tokenizer_kind = "t2i-"

    def training_texts(self) -> list[str]:
        """The instruction and the training captions (the texts the model reads)."""
        self.ensure_data()
        return [t2i_prompt(""), *(c for r in self._read("train") for c in r.captions)]

    def split_codes(self, split: str) -> torch.Tensor:
        """Raw codes ``[N, h*w]`` of the split's images (row order of the split), cached on disk."""
        if split not in self.codes:
            from safetensors.torch import load_file, save

            tok = self.load_image_tokenizer()
            key = file_digest(Path(self.vq_path) / "diffusion_pytorch_model.safetensors")
            path = self.root / "codes" / f"{split}-vq{key}.safetensors"
            recs = self._read(split)
            ids = torch.tensor([int(r.image_id) for r in recs])
            cached = load_file(str(path)) if path.is_file() else None
            if cached is None or not torch.equal(cached["ids"], ids):
                images = load_images([r.path for r in recs])
                tok.eval()
                codes = torch.cat([tok.encode(c.float() / 255).flatten(1) for c in images.split(self.encode_batch_size)])
                with atomic_file(path, "wb") as f:  # concurrent writers each write their own temp file
                    f.write(save({"ids": ids, "codes": codes.to(torch.int16)}))
                cached = {"ids": ids, "codes": codes}
            self.codes[split] = cached["codes"].long()
        return self.codes[split]

    def model_overrides(self) -> dict[str, Any]:
        """The vocabulary reserves exactly the VQ codebook's ids."""
        return {"vocab": {"image_code_size": self.load_image_tokenizer().num_codes}}

    def bind(self, model_cfg: Any, layout: VocabLayout, tokenizer: TextTokenizer | None = None) -> None:
        tok = self.load_image_tokenizer()
        tok.check_layout(layout)
        need = tok.num_tokens + 1
        if model_cfg.max_positions < max(need, self.max_prompt_len):
            raise ValueError(f"the model's max_positions={model_cfg.max_positions} is too short for {tok.num_tokens} "
                             f"image codes + BOS and prompts of {self.max_prompt_len} tokens")
        grid = getattr(model_cfg, "dec_grid", None)
        if grid is not None and list(grid) != list(tok.grid):
            raise ValueError(f"the model's dec_grid={list(grid)} does not match the VQ tokenizer's {list(tok.grid)} code "
                             f"grid ({self.vq_path}); set model.overrides.dec_grid={list(tok.grid)} or null")
        self.attach(layout, tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if self.layout is None:
            raise RuntimeError("T2IDataModule.bind(model_cfg, layout) must be called before setup()")
        self.load_tokenizer()
        self.uncond_ids = self.encode_prompts([""])[0]

    def encode_prompts(self, captions: list[str], names: list[str] | None = None) -> list[list[int]]:
        """The unified-vocabulary instruction ids of each caption (with ``names``: over-long ones are reported)."""
        return self.encode_text([t2i_prompt(c) for c in captions], self.max_prompt_len,
                                "prompts (data.max_prompt_len)" if names else None, names)

    # --- data for the task's metrics ----------------------------------------------------------
    def eval_records(self, stage: str) -> list[Any]:
        return self._eval_records(stage)

    def real_images(self, stage: str) -> torch.Tensor:
        """``uint8 [N,3,H,W]`` real images of the evaluated records (order of :meth:`eval_records`)."""
        return load_images([r.path for r in self.eval_records(stage)])

    def real_codes(self, stage: str) -> torch.Tensor:
        """Raw VQ codes ``[N, h*w]`` of the evaluated real images (order of :meth:`eval_records`)."""
        return self.split_codes(stage)[: len(self.eval_records(stage))]

    def attribute_labels(self, stage: str) -> dict[str, torch.Tensor]:
        """Probe labels of the evaluated images (their captions name every object)."""
        return scene_labels(self.root, stage, [int(r.image_id) for r in self.eval_records(stage)])

    # --- loaders ------------------------------------------------------------------------------
    def train_dataloader(self):
        recs = self._read("train")
        flat = iter(self.encode_prompts([c for r in recs for c in r.captions],
                                        [f"{self.split_infos['train'].source}: image id={r.image_id}"
                                         for r in recs for _ in r.captions]))
        prompts = [[next(flat) for _ in r.captions] for r in recs]
        codes = self.layout.codes_to_unified(self.split_codes("train"))
        ds = T2ITrainSet(prompts, codes, [r.image_id for r in recs], self.uncond_ids, self.uncond_prob)
        return self._loader(ds, self.batch_size, shuffle=True)

    def eval_prompts(self, stage: str) -> list[list[int]]:
        """The prompt ids of the evaluated records: each one's first caption (order of :meth:`eval_records`)."""
        return self.encode_prompts([r.captions[0] for r in self.eval_records(stage)])

    def _eval_loader(self, stage: str):
        if not self.files.get(stage):
            raise ValueError(f"this dataset has no {stage} split")
        recs = self.eval_records(stage)
        return self._loader(T2IEvalSet(self.eval_prompts(stage), [r.captions[0] for r in recs],
                                       [r.image_id for r in recs]), self.eval_batch_size, shuffle=False)

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")


def onset_codes(codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bool ``[B, h*w]``: codes that differ from both their left and their upper neighbour in the ``h × w``
    grid (a missing neighbour counts as different). In raster order these are where new content starts
    (an object's first codes); the rest mostly continue what is already drawn."""
    h, w = grid
    if codes.ndim != 2 or codes.shape[1] != h * w:
        raise ValueError(f"expected codes [B, {h * w}] for a {h}×{w} grid, got {tuple(codes.shape)}")
    g = codes.view(-1, h, w)
    new_left = torch.ones_like(g, dtype=torch.bool)
    new_left[:, :, 1:] = g[:, :, 1:] != g[:, :, :-1]
    new_above = torch.ones_like(g, dtype=torch.bool)
    new_above[:, 1:] = g[:, 1:] != g[:, :-1]
    return (new_left & new_above).flatten(1)


class TextToImageTask(Seq2SeqTask):
    """Caption → VQ codes with classifier-free guidance; judged by the Shapes attribute probe."""

    name = "text_to_image"
    spec = task_spec("text_to_image")
    monitor_metric = "all_acc"

    def __init__(self, *args: Any, guidance_scale: float = T2I["guidance_scale"], do_sample: bool = T2I["do_sample"],
                 temperature: float = T2I["temperature"], top_k: int = T2I["top_k"], top_p: float = T2I["top_p"],
                 use_cache: bool = T2I["use_cache"], seed: int = T2I["seed"],
                 probe_path: str | None = None, probe_train: dict[str, Any] | None = None,
                 image_dir: str | None = None, onset_weight: float = 0.0,
                 attribute_words: dict[str, list[str]] | None = None, decoder: str = "codes", layout: Any = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        if decoder != "codes":  # task.layout: the layout route's settings (tasks/layout_t2i.py), unused here
            raise ValueError(f"TextToImageTask is the task.decoder=codes route, got decoder={decoder!r}; "
                             "the layout route is tasks.layout_t2i.LayoutTextToImageTask")
        if onset_weight < 0:
            raise ValueError(f"onset_weight must be >= 0, got {onset_weight}")
        for name, words in (attribute_words or {}).items():  # see word_gain
            single = all(isinstance(w, str) and re.fullmatch(r"\w+", w) for w in words)
            if not single or len(set(words)) < 2 or len(set(words)) != len(words):
                raise ValueError(f"attribute_words.{name} must list >= 2 distinct single words, got {words}")
        self.probe_path = probe_path
        self.vq_path: str | None = None  # the datamodule's VQ tokenizer folder, set in setup()
        object.__setattr__(self, "image_tokenizer", None)  # ImageCodeTokenizer, set in setup()
        self._probe: Any = None
        self._ceiling: dict[str, dict[str, float]] = {}
        self._gen: torch.Generator | None = None

    # --- zoo-eval ------------------------------------------------------------------------------
    @classmethod
    def eval_settings(cls, settings: dict[str, Any], checkpoint: dict[str, Any], where: str) -> dict[str, Any]:
        """The saved settings plus the VQ tokenizer folder the checkpoint was trained with."""
        from tasks.checkpoint import vq_folder_for

        folder = vq_folder_for(checkpoint, where)
        return {**settings, "vq_tokenizer": str(folder) if folder is not None else None}

    @classmethod
    def eval_data_config(cls, settings: dict[str, Any], data_dir: str) -> Any:
        """The default Shapes text-to-image data, read with the checkpoint's VQ tokenizer (never a new one)."""
        if not settings.get("vq_tokenizer"):
            raise ValueError("the checkpoint names no VQ tokenizer folder; give data=shapes_t2i data.vq_path=<folder>")
        data = super().eval_data_config(settings, data_dir)
        data.decoder = "codes"
        data.vq_path = settings["vq_tokenizer"]
        data.pop("vq", None)
        return data

    # --- wiring -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.datamodule
        if dm is not None and hasattr(dm, "load_image_tokenizer"):
            # a plain attribute, not a submodule: the VQ is frozen and lives in its own folder
            object.__setattr__(self, "image_tokenizer", dm.load_image_tokenizer().eval())
            self.vq_path = dm.vq_path
            if stage == "fit":
                self.probe()  # train (or load) the judge before the generator

    def probe(self) -> tuple[Any, dict[str, float]]:
        """The attribute probe and its held-out real accuracy (trained on the data root when not given)."""
        if self._probe is None:
            from tasks.tools.probe import ensure_probe, load_probe

            path = self.probe_path or ensure_probe(self.datamodule.root, **(self.hparams.probe_train or {}))
            self._probe = load_probe(path)
        return self._probe

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"text": (batch["prompt_ids"], batch["prompt_mask"])}

    def allowed_tokens(self) -> torch.Tensor:
        if self._allowed is None:
            self._allowed = self.spec.allowed_tokens(self.layout, self.image_tokenizer)
        return self._allowed

    def uncond_inputs(self) -> dict[str, Any]:
        """The unconditional source: the instruction with an empty caption (one row)."""
        return self.spec.uncond_inputs(self.tokenizer, self.layout, self.device)

    def token_weights(self, labels: torch.Tensor) -> torch.Tensor | None:
        """With ``onset_weight`` > 0 each onset code (:func:`onset_codes`) weighs ``1 + onset_weight`` in the loss.
        The caption decides mostly those codes, so their share of the gradient is what teaches the generator to
        read the text (11 min at 16×16: colour accuracy 2.5 % → 34.5 % at 5.0)."""
        weight = self.hparams.onset_weight
        if not weight:
            return None
        n = self.image_tokenizer.num_tokens
        if labels.shape[1] < n:
            raise ValueError(f"expected targets of {n} image codes (+ EOS), got {labels.shape[1]} tokens")
        weights = torch.ones(labels.shape, device=labels.device)
        weights[:, :n] += weight * onset_codes(labels[:, :n], self.image_tokenizer.grid)
        return weights

    # --- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate_tokens(self, batch: dict[str, Any], **overrides: Any) -> torch.Tensor:
        hp = {k: self.hparams[k] for k in self.spec.generation if k != "seed"}
        hp.update(overrides)
        if self._gen is None or self._gen.device != self.device:
            self._gen = torch.Generator(self.device).manual_seed(self.hparams.seed)
        return self.spec.sample(self.model, self.model_inputs(batch), self.image_tokenizer, self.layout, hp,
                                self._gen, uncond=self.uncond_inputs, allowed=self.allowed_tokens())

    def on_validation_epoch_start(self) -> None:
        self._gen = None  # the same seed every evaluation: comparable samples

    def on_test_epoch_start(self) -> None:
        self._gen = None

    def decode_outputs(self, tokens: torch.Tensor) -> list[list[int]]:
        return self.spec.decode(tokens, self.layout, self.image_tokenizer)

    def codes_to_images(self, codes: list[list[int]] | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Pixels ``[N,3,H,W]`` in ``[0,1]`` of code rows (VQ decoder)."""
        codes = torch.as_tensor(codes, dtype=torch.long, device=self.device)
        vq = self.image_tokenizer.to(self.device)
        return torch.cat([vq.decode(c).float().cpu() for c in codes.split(batch_size)])

    # --- metrics and outputs ------------------------------------------------------------------
    def compute_metrics(self, stage: str, predictions: dict[Any, list[int]]) -> dict[str, float]:
        from tasks.tools.probe import REQUIRED_ACCURACY, frechet_distance, probe_features, score_attributes

        dm = self.datamodule
        ids = [r.image_id for r in dm.eval_records(stage)]
        missing = [i for i in ids if i not in predictions]
        if missing and not self.partial_eval(stage):
            raise RuntimeError(f"{len(missing)} {stage} prompts got no image (e.g. {missing[:3]})")
        probe, real_acc = self.probe()
        probe = probe.to("cpu")
        if real_acc["all_acc"] < REQUIRED_ACCURACY:
            log.warning("the attribute probe reads only %.1f%% of held-out real images fully right (< 95%%): "
                        "its scores are not a trustworthy judge", 100 * real_acc["all_acc"])
        if missing:  # a deliberately partial pass (fast_dev_run, limit_*_batches): the attributes of what ran only
            keep = [n for n, i in enumerate(ids) if i in predictions]
            fake = self.codes_to_images([predictions[ids[n]] for n in keep])
            labels = {k: v[keep] for k, v in dm.attribute_labels(stage).items()}
            return score_attributes(probe.predict(fake), labels)
        fake = self.codes_to_images([predictions[i] for i in ids])
        metrics = score_attributes(probe.predict(fake), dm.attribute_labels(stage))
        real = dm.real_images(stage)
        if len(ids) >= 2:
            metrics["probe_fd"] = frechet_distance(probe_features(probe, fake), probe_features(probe, real))
        metrics["probe_real_all_acc"] = real_acc["all_acc"]
        metrics["vq_ceiling_all_acc"] = self.vq_ceiling(stage)["all_acc"]
        own = self.true_caption_nats(stage)  # shared by the gains below
        if len(ids) >= 2:
            metrics["caption_gain"] = self.caption_gain(stage, own=own)
        for name, words in (self.hparams.attribute_words or {}).items():
            metrics[f"{name}_gain"] = self.word_gain(stage, words, own=own)
        if self.hparams.image_dir and self.trainer.is_global_zero:
            self._save_images(Path(self.hparams.image_dir) / stage, ids, fake)
        return metrics

    def _eval_targets(self, stage: str) -> torch.Tensor:
        return self.layout.codes_to_unified(self.datamodule.real_codes(stage)).to(self.device)

    @torch.no_grad()
    def true_caption_nats(self, stage: str, batch_size: int = 64) -> torch.Tensor:
        """Each evaluated record's teacher-forced loss ``[N]`` (nats per code) of its real codes given its own
        prompt: the reference of :meth:`caption_gain` and :meth:`word_gain`."""
        return self._record_nats(self.datamodule.eval_prompts(stage), self._eval_targets(stage), batch_size)

    @torch.no_grad()
    def caption_gain(self, stage: str, batch_size: int = 64, own: torch.Tensor | None = None) -> float:
        """How much the caption helps the generator: the teacher-forced loss (nats per code) of the real codes
        when every record reads the next record's prompt, minus the loss with its own prompt. Near 0, the
        generator draws plausible images but ignores the text; the probe scores then stay at chance.
        ``own``: :meth:`true_caption_nats` when already computed."""
        prompts = self.datamodule.eval_prompts(stage)
        if len(prompts) < 2:
            raise ValueError(f"caption_gain needs at least 2 {stage} records, got {len(prompts)}")
        own = self.true_caption_nats(stage, batch_size) if own is None else own
        other = self._record_nats(prompts[1:] + prompts[:1], self._eval_targets(stage), batch_size)
        return float((other - own).mean())

    @torch.no_grad()
    def word_gain(self, stage: str, words: list[str], batch_size: int = 64, own: torch.Tensor | None = None
                  ) -> float:
        """How much the generator reads one attribute: the teacher-forced loss (nats per code) of the real codes
        when each of ``words`` in a record's caption is replaced by the next one (cyclically; e.g. circle →
        square, ..., cross → circle), minus the loss with the true caption, over the records that name one of
        them. Near 0, the generator ignores that attribute whatever the other words do. ``own``:
        :meth:`true_caption_nats` when already computed."""
        dm = self.datamodule
        captions = [r.captions[0] for r in dm.eval_records(stage)]
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b")
        swapped = [pattern.sub(lambda m: words[(words.index(m.group(1)) + 1) % len(words)], c) for c in captions]
        keep = [i for i, (a, b) in enumerate(zip(captions, swapped)) if a != b]
        if not keep:
            raise ValueError(f"no {stage} caption names any of {words}")
        own = self.true_caption_nats(stage, batch_size) if own is None else own
        other = self._record_nats(dm.encode_prompts([swapped[i] for i in keep]), self._eval_targets(stage)[keep],
                                  batch_size)
        return float((other - own[keep]).mean())

    def _record_nats(self, prompts: list[list[int]], targets: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Each record's mean cross-entropy ``[N]`` (nats per code) of ``targets [N, h*w]`` given ``prompts``,
        teacher-forced."""
        out = []
        for start in range(0, len(prompts), batch_size):
            ids, mask = pad_ids(prompts[start: start + batch_size])
            tgt = targets[start: start + batch_size]
            tgt_in = torch.cat([torch.full_like(tgt[:, :1], BOS_ID), tgt[:, :-1]], 1)
            memory, memory_mask = self.model.encode({"text": (ids.to(self.device), mask.to(self.device))})
            logits = self.model.logits(self.model.decode_hidden(tgt_in, memory, memory_mask))
            out.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), tgt, reduction="none")
                       .mean(1).cpu())
        return torch.cat(out)

    def vq_ceiling(self, stage: str) -> dict[str, float]:
        """The probe's scores of the real images after a VQ round trip: what a perfect generator could reach
        with this tokenizer (computed once per stage; the tokenizer does not train with the generator)."""
        from tasks.tools.probe import score_attributes

        if stage not in self._ceiling:
            dm = self.datamodule
            probe = self.probe()[0].to("cpu")
            rec = self.codes_to_images(dm.real_codes(stage))
            self._ceiling[stage] = score_attributes(probe.predict(rec), dm.attribute_labels(stage))
        return self._ceiling[stage]

    @staticmethod
    def _save_images(folder: Path, ids: list[Any], images: torch.Tensor) -> None:
        from PIL import Image

        folder.mkdir(parents=True, exist_ok=True)
        arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i, a in zip(ids, arr):
            Image.fromarray(a).save(folder / f"{i}.png")

    def format_predictions(self, predictions: dict[Any, list[int]]) -> list[dict[str, Any]]:
        return [{"image_id": k, "codes": v} for k, v in predictions.items()]

    def write_samples(self, path: Path, stage: str) -> None:
        """Generated images with their prompts."""
        from tasks.visualize import save_grid

        s = self.samples.get(stage)
        if not s:
            return
        save_grid(list(self.codes_to_images(s["predictions"])), list(s["caption"]), path)

    def checkpoint_state(self) -> dict[str, Any]:
        """The VQ tokenizer folder the codes come from (``zoo-export`` copies it into the model folder)."""
        return {**super().checkpoint_state(), "vq_tokenizer": self.vq_path}
