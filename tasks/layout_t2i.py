"""Text-to-image by "plan, then render" (``task.decoder=layout``; LayoutGPT / GLIGEN style).

Stage 1, the layout planner, is the unified model itself: ``what is the layout of the image? caption: <text>`` →
the scene layout as text with location tokens (:mod:`zoo.layout_plan`), trained on the boxes the Shapes scenes
carry. Stage 2, the renderer (:mod:`zoo.layout_renderer`), is a learned conv decoder conditioned on a layout map,
trained with a pixel loss on the real images and their true layouts. Both train in the same steps (one loss
each, summed). Evaluation plans every prompt greedily, renders the plans and lets the attribute probe judge the
images; the planner's own accuracy against the true scenes is reported beside (``layout_*``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from tasks.base import Seq2SeqTask, strip_after_eos
from tasks.caption import CaptionDataModule
from tasks.data.shapes_images import load_images, scene_labels
from tasks.layout_metrics import layout_scores
from zoo.generation import generate
from zoo.layout_plan import layout_pieces, layout_prompt, parse_layout, quantize_box
from zoo.layout_renderer import Layout, LayoutRenderer, LayoutRendererConfig
from zoo.task_specs.text_to_image import LAYOUT_PLAN

log = logging.getLogger(__name__)


def scene_layout(scene: dict[str, Any], image_size: int) -> Layout:
    """The true layout of a Shapes scene (boxes in ``[0, 1]``, objects left to right as the scene lists them)."""
    objs = [{"box": tuple(min(max(v / image_size, 0.0), 1.0) for v in
                          (o["x"] - o["r"], o["y"] - o["r"], o["x"] + o["r"], o["y"] + o["r"])),
             "shape": o["shape"], "colour": o["colour"], "size": o["size"]} for o in scene["objects"]]
    return Layout(scene.get("tone", "light"), objs)


def mention_order(lay: Layout, caption: str) -> list[int]:
    """The indices of the layout's objects in the order the caption first names them ("<colour> <shape>"; objects
    it does not name keep their place after the named ones). The planner then writes the objects as it reads them,
    a monotonic copy, instead of having to sort them left to right."""
    text = caption.lower()
    pos = [text.find(f"{o['colour']} {o['shape']}") for o in lay.objects]
    return sorted(range(len(pos)), key=lambda i: (pos[i] < 0, pos[i], i))


class LayoutTrainSet(Dataset):
    """Item ``i``: a random caption of scene ``i`` → the layout ids for that caption, plus ``per_item`` random (image, layout) pairs
    of the renderer's images."""

    def __init__(self, prompts: list[list[list[int]]], targets: list[list[list[int]]], ids: list[Any],
                 images: torch.Tensor, layouts: list[Layout], per_item: int = 1):
        self.prompts, self.targets, self.ids, self.images, self.layouts = prompts, targets, ids, images, layouts
        self.per_item = per_item

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        c = int(torch.randint(len(self.prompts[i]), ()))
        js = torch.randint(len(self.images), (self.per_item,))
        return {"prompt": self.prompts[i][c], "target": self.targets[i][c], "id": self.ids[i],
                "render_image": self.images[js], "render_layout": [self.layouts[j] for j in js.tolist()]}


class LayoutEvalSet(Dataset):
    def __init__(self, prompts: list[list[int]], captions: list[str], ids: list[Any]):
        self.prompts, self.captions, self.ids = prompts, captions, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"prompt": self.prompts[i], "caption": self.captions[i], "id": self.ids[i]}


#: ``data.layout``: training images the renderer learns from and how many it sees per planner example (its batch is
#: that many times the planner's), the longest layout target (tokens), and a
#: composition split (``holdout_pairs``, ``eval_holdout``; see :class:`LayoutT2IDataModule`)
DATA_DEFAULTS: dict[str, Any] = {"renderer_images": 8000, "renderer_per_item": 2, "max_layout_len": 48,
                                 "holdout_pairs": None, "eval_holdout": False}


class LayoutT2IDataModule(CaptionDataModule):
    """Captions → scene layouts (from ``scenes_{split}.json``), and real images with their layouts for the
    renderer (the first ``renderer_images`` training scenes).

    ``data.layout`` (:data:`DATA_DEFAULTS`): ``holdout_pairs`` (e.g. ``["red triangle"]``, colour then shape) removes every training scene holding one of
    those pairs; with ``eval_holdout`` the val/test prompts are only scenes that hold one (a composition split).
    The code route's keys of the shared data config (``vq``, ``vq_path``, ``vq_cache_dir``, ``uncond_prob``,
    ``encode_batch_size``) are accepted and unused."""

    tokenizer_kind = "layout-"

    def __init__(self, root: str, layout: dict[str, Any] | None = None, max_prompt_len: int = 64,
                 decoder: str = "layout", vq: Any = None, vq_path: Any = None, vq_cache_dir: Any = None, uncond_prob: float = 0.0,
                 encode_batch_size: int = 256, **kwargs: Any):
        kwargs = {k: (dict(v) if hasattr(v, "items") else v) for k, v in kwargs.items()}
        super().__init__(root, **kwargs)
        if decoder != "layout":
            raise ValueError(f"LayoutT2IDataModule is the decoder=layout route, got decoder={decoder!r}")
        opts = {**DATA_DEFAULTS, **dict(layout or {})}
        unknown = sorted(set(opts) - set(DATA_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown data.layout key(s) {unknown}; known: {sorted(DATA_DEFAULTS)}")
        if int(opts["renderer_images"]) < 1:
            raise ValueError(f"data.layout.renderer_images must be >= 1, got {opts['renderer_images']}")
        self.renderer_images, self.max_layout_len = int(opts["renderer_images"]), int(opts["max_layout_len"])
        self.renderer_per_item = int(opts["renderer_per_item"])
        if self.renderer_per_item < 1:
            raise ValueError(f"data.layout.renderer_per_item must be >= 1, got {self.renderer_per_item}")
        self.max_prompt_len = max_prompt_len
        pairs = []
        for p in opts["holdout_pairs"] or []:
            words = str(p).split()
            if len(words) != 2:
                raise ValueError(f"data.layout.holdout_pairs entries are '<colour> <shape>', got {p!r}")
            pairs.append((words[0], words[1]))
        if opts["eval_holdout"] and not pairs:
            raise ValueError("data.layout.eval_holdout=true needs data.layout.holdout_pairs")
        self.holdout, self.eval_holdout = set(pairs), bool(opts["eval_holdout"])
        self._scenes: dict[str, dict[int, dict[str, Any]]] = {}
        self._image_size: int | None = None

    # --- scenes -------------------------------------------------------------------------------
    def scenes(self, split: str) -> dict[int, dict[str, Any]]:
        if split not in self._scenes:
            path = self.root / f"scenes_{split}.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the layout route trains on scene boxes (scenes_<split>.json, as "
                                        "Shapes writes them); this data has none: use task.decoder=codes")
            self._scenes[split] = {int(s["image_id"]): s for s in json.loads(path.read_text(encoding="utf-8"))}
        return self._scenes[split]

    def image_size(self) -> int:
        if self._image_size is None:
            from tasks.data.shapes_images import read_split

            info = json.loads((self.root / "shapes.json").read_text()) if (self.root / "shapes.json").is_file() else {}
            self._image_size = int((info.get("config") or {}).get("image_size", 0)) or \
                int(load_images(read_split(self.root, "train")[1][:1]).shape[-1])
        return self._image_size

    def layout_of(self, split: str, image_id: Any) -> Layout:
        scene = self.scenes(split).get(int(image_id))
        if scene is None:
            raise KeyError(f"{self.root / f'scenes_{split}.json'} has no scene for image id {image_id}")
        return scene_layout(scene, self.image_size())

    def _has_holdout(self, split: str, image_id: Any) -> bool:
        return any((o["colour"], o["shape"]) in self.holdout for o in self.scenes(split)[int(image_id)]["objects"])

    def _read(self, split: str) -> list[Any]:
        fresh = split not in self.records
        recs = super()._read(split)
        if fresh and self.holdout:
            if split == "train":
                recs = [r for r in recs if not self._has_holdout(split, r.image_id)]
            elif self.eval_holdout:
                recs = [r for r in recs if self._has_holdout(split, r.image_id)]
            if not recs:
                raise ValueError(f"data.holdout_pairs leave no {split} scenes")
            self.records[split] = recs
        return recs

    # --- vocabulary and tokenizer -------------------------------------------------------------
    def training_texts(self) -> list[str]:
        self.ensure_data()
        texts = [layout_prompt(""), "light dark small large"]
        for r in self._read("train"):
            texts += r.captions
        return texts

    def model_overrides(self) -> dict[str, Any]:
        """No image codes in the vocabulary: the layout route writes text and location tokens only."""
        return {"vocab": {"image_code_size": 0}}

    def bind(self, model_cfg: Any, layout: Any, tokenizer: Any = None) -> None:
        if layout.loc_bins < 2:
            raise ValueError(f"the layout route writes boxes as location tokens; the model has loc_bins={layout.loc_bins}")
        if model_cfg.max_positions < max(self.max_layout_len + 1, self.max_prompt_len):
            raise ValueError(f"the model's max_positions={model_cfg.max_positions} is too short for layouts of "
                             f"{self.max_layout_len} tokens and prompts of {self.max_prompt_len}")
        self.attach(layout, tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if self.layout is None:
            raise RuntimeError("LayoutT2IDataModule.bind(model_cfg, layout) must be called before setup()")
        self.load_tokenizer()

    def encode_prompts(self, captions: list[str], names: list[str] | None = None) -> list[list[int]]:
        return self.encode_text([layout_prompt(c) for c in captions], self.max_prompt_len,
                                "prompts (data.max_prompt_len)" if names else None, names)

    def renderer_words(self) -> dict[str, list[str]]:
        """The attribute words of the training scenes (the renderer's vocabulary), in first-seen order of the
        Shapes constants when those cover them."""
        from tasks.data.shapes import COLOURS, SHAPES, SIZES

        seen: dict[str, set[str]] = {"shapes": set(), "colours": set(), "sizes": set(), "tones": set()}
        for s in self.scenes("train").values():
            seen["tones"].add(s.get("tone", "light"))
            for o in s["objects"]:
                seen["shapes"].add(o["shape"]), seen["colours"].add(o["colour"]), seen["sizes"].add(o["size"])
        order = {"shapes": list(SHAPES), "colours": list(COLOURS), "sizes": list(SIZES), "tones": ["light", "dark"]}
        return {k: [w for w in order[k] if w in v] + sorted(v - set(order[k])) for k, v in seen.items()}

    # --- loaders ------------------------------------------------------------------------------
    def train_dataloader(self):
        recs = self._read("train")
        source = self.split_infos["train"].source
        flat = iter(self.encode_prompts([c for r in recs for c in r.captions],
                                        [f"{source}: image id={r.image_id}" for r in recs for _ in r.captions]))
        prompts = [[next(flat) for _ in r.captions] for r in recs]
        targets, cache = [], {}
        lays = [self.layout_of("train", r.image_id) for r in recs]
        for r, lay in zip(recs, lays):
            tone, pieces = layout_pieces(lay, self.layout, self.tokenizer, cache)
            targets.append([tone + [t for i in mention_order(lay, c) for t in pieces[i]] for c in r.captions])
            longest = max(len(t) for t in targets[-1]) + 1
            if longest > self.max_layout_len:
                raise ValueError(f"{source}: image id={r.image_id}: its layout takes {longest} tokens, more than "
                                 f"data.layout.max_layout_len={self.max_layout_len}")
        n = min(self.renderer_images, len(recs))
        images = load_images([r.path for r in recs[:n]])
        bins = self.layout.loc_bins
        layouts = [Layout(lay.tone, [{**o, "box": quantize_box(o["box"], bins)} for o in lay.objects])
                   for lay in lays[:n]]
        ds = LayoutTrainSet(prompts, targets, [r.image_id for r in recs], images, layouts, self.renderer_per_item)
        return self._loader(ds, self.batch_size, shuffle=True)

    def eval_records(self, stage: str) -> list[Any]:
        return self._eval_records(stage)

    def eval_prompts(self, stage: str) -> list[list[int]]:
        return self.encode_prompts([r.captions[0] for r in self.eval_records(stage)])

    def real_images(self, stage: str) -> torch.Tensor:
        return load_images([r.path for r in self.eval_records(stage)])

    def attribute_labels(self, stage: str) -> dict[str, torch.Tensor]:
        return scene_labels(self.root, stage, [int(r.image_id) for r in self.eval_records(stage)])

    def true_layouts(self, stage: str) -> list[Layout]:
        return [self.layout_of(stage, r.image_id) for r in self.eval_records(stage)]

    def _eval_loader(self, stage: str):
        if not self.files.get(stage):
            raise ValueError(f"this dataset has no {stage} split")
        recs = self.eval_records(stage)
        return self._loader(LayoutEvalSet(self.eval_prompts(stage), [r.captions[0] for r in recs],
                                          [r.image_id for r in recs]), self.eval_batch_size, shuffle=False)

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")


#: ``task.layout``: ``renderer`` (:class:`zoo.layout_renderer.LayoutRendererConfig` fields; the attribute words
#: default to the Shapes words, and data naming others is refused before training), its learning rate (the model's schedule), the weight of its pixel loss, and
#: the longest layout the planner writes (tokens), and the planner's loss weight on location tokens against words
#: (the words are what must be read from the caption; the boxes are mostly free choices of high entropy)
LAYOUT_DEFAULTS: dict[str, Any] = {"renderer": None, "renderer_lr": 3e-3, "renderer_weight": 1.0, "max_layout_len": 48,
                                   "loc_weight": 0.2}


class LayoutTextToImageTask(Seq2SeqTask):
    """Caption → layout (the unified model) → image (the learned renderer); judged by the attribute probe.

    The code route's sampling
    keys of the shared task config are accepted and unused (the planner decodes greedily). ``layout`` holds this
    route's own settings (:data:`LAYOUT_DEFAULTS`)."""

    name = "text_to_image"
    spec = LAYOUT_PLAN  # text with location tokens (allowed_tokens); decode_outputs parses the plan
    monitor_metric = "all_acc"

    def __init__(self, *args: Any, decoder: str = "layout", layout: dict[str, Any] | None = None,
                 probe_path: str | None = None, probe_train: dict[str, Any] | None = None,
                 image_dir: str | None = None, guidance_scale: float = 1.0, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, use_cache: bool = True, seed: int = 0,
                 onset_weight: float = 0.0, attribute_words: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if decoder != "layout":
            raise ValueError(f"LayoutTextToImageTask is task.decoder=layout, got {decoder!r}")
        opts = dict(layout or {})
        unknown = sorted(set(opts) - set(LAYOUT_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown task.layout key(s) {unknown}; known: {sorted(LAYOUT_DEFAULTS)}")
        self.opts = {**LAYOUT_DEFAULTS, **opts}
        self.renderer = LayoutRenderer(LayoutRendererConfig(**dict(self.opts["renderer"] or {})))
        self._probe: Any = None

    @classmethod
    def eval_data_config(cls, settings: dict[str, Any], data_dir: str) -> Any:
        """zoo-eval: the default Shapes text-to-image data, read by the layout route."""
        data = super().eval_data_config(settings, data_dir)
        data.decoder = "layout"
        data.pop("vq", None)
        return data

    # --- wiring -------------------------------------------------------------------------------
    def check_words(self, words: dict[str, list[str]], image_size: int) -> None:
        """Refuse data whose scenes name attribute words (or an image size) the renderer was not built for."""
        cfg = self.renderer.cfg
        for key, seen in words.items():
            extra = sorted(set(seen) - set(getattr(cfg, key)))
            if extra:
                raise ValueError(f"the training scenes name {key} {extra} that the renderer does not know "
                                 f"({getattr(cfg, key)}); set task.layout.renderer.{key}=[...] to all of them")
        if image_size != cfg.image_size:
            raise ValueError(f"the images are {image_size} px but task.layout.renderer.image_size={cfg.image_size}")

    def setup(self, stage: str) -> None:
        dm = self.datamodule
        if dm is not None and hasattr(dm, "renderer_words"):
            if stage == "fit":
                self.check_words(dm.renderer_words(), dm.image_size())
                self.probe()

    def probe(self) -> tuple[Any, dict[str, float]]:
        if self._probe is None:
            from tasks.tools.probe import ensure_probe, load_probe

            path = self.hparams.probe_path or ensure_probe(self.datamodule.root, **(self.hparams.probe_train or {}))
            self._probe = load_probe(path)
        return self._probe

    def own_modules(self) -> dict[str, torch.nn.Module]:
        return {"renderer": self.renderer}

    def extra_param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.renderer.parameters()), "lr": self.opts["renderer_lr"], "weight_decay": 0.0}]

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"text": (batch["prompt_ids"], batch["prompt_mask"])}

    # --- training -----------------------------------------------------------------------------
    def token_weights(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Location tokens weigh ``task.layout.loc_weight`` in the planner's loss, words and EOS 1."""
        w = float(self.opts["loc_weight"])
        if w == 1.0:
            return None
        is_loc = (labels >= self.layout.loc_start) & (labels < self.layout.size)
        return torch.where(is_loc, torch.full_like(labels, w, dtype=torch.float), torch.ones_like(labels, dtype=torch.float))

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        plan = super().loss(batch)
        t = self.renderer.encode([lay for item in batch["render_layout"] for lay in item])
        render = self.renderer.loss(torch.cat(batch["render_image"]), **t)
        if self._trainer is not None and self.trainer.lightning_module is self:  # not as a multi-task part
            n = len(batch["labels"])
            self.log("train/plan_loss", plan.detach(), batch_size=n)
            self.log("train/render_loss", render.detach(), batch_size=n)
        return plan + self.opts["renderer_weight"] * render

    # --- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate_tokens(self, batch: dict[str, Any], **overrides: Any) -> torch.Tensor:
        return generate(self.model, self.model_inputs(batch), max_new_tokens=self.opts["max_layout_len"],
                        allowed=self.allowed_tokens(), **overrides)

    def decode_outputs(self, tokens: torch.Tensor) -> list[dict[str, Any]]:
        out = []
        for row in strip_after_eos(tokens):
            lay, dropped = parse_layout(row, self.layout, self.tokenizer, self.renderer.cfg)
            out.append({"tone": lay.tone, "objects": lay.objects, "dropped": dropped})
        return out

    @staticmethod
    def as_layouts(preds: list[dict[str, Any]]) -> list[Layout]:
        return [Layout(p["tone"], p["objects"]) for p in preds]

    # --- metrics and outputs ------------------------------------------------------------------
    def compute_metrics(self, stage: str, predictions: dict[Any, dict[str, Any]]) -> dict[str, float]:
        from tasks.tools.probe import REQUIRED_ACCURACY, frechet_distance, probe_features, score_attributes

        dm = self.datamodule
        ids = [r.image_id for r in dm.eval_records(stage)]
        missing = [i for i in ids if i not in predictions]
        if missing:
            raise RuntimeError(f"{len(missing)} {stage} prompts got no layout (e.g. {missing[:3]})")
        preds = [predictions[i] for i in ids]
        fake = self.renderer.render(self.as_layouts(preds))
        probe, real_acc = self.probe()
        probe = probe.to("cpu")
        if real_acc["all_acc"] < REQUIRED_ACCURACY:
            log.warning("the attribute probe reads only %.1f%% of held-out real images fully right (< 95%%)",
                        100 * real_acc["all_acc"])
        metrics = score_attributes(probe.predict(fake), dm.attribute_labels(stage))
        if len(ids) >= 2:
            metrics["probe_fd"] = frechet_distance(probe_features(probe, fake),
                                                   probe_features(probe, dm.real_images(stage)))
        metrics["probe_real_all_acc"] = real_acc["all_acc"]
        truth = dm.true_layouts(stage)
        metrics.update(layout_scores(self.as_layouts(preds), truth, dm.image_size()))
        metrics["layout_dropped"] = sum(p["dropped"] for p in preds) / max(1, len(preds))
        # the renderer alone: the true layouts rendered (what a perfect planner would reach)
        bins = self.layout.loc_bins
        exact = [Layout(t.tone, [{**o, "box": quantize_box(o["box"], bins)} for o in t.objects]) for t in truth]
        metrics["renderer_all_acc"] = score_attributes(probe.predict(self.renderer.render(exact)),
                                                       dm.attribute_labels(stage))["all_acc"]
        if self.hparams.image_dir and self.trainer.is_global_zero:
            from tasks.text_to_image import TextToImageTask

            TextToImageTask._save_images(Path(self.hparams.image_dir) / stage, ids, fake)
        return metrics

    def format_predictions(self, predictions: dict[Any, dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"image_id": k, "layout": {"tone": v["tone"], "objects": v["objects"]}} for k, v in predictions.items()]

    def write_samples(self, path: Path, stage: str) -> None:
        """Each generated image with its planned boxes beside it and its prompt under both."""
        from tasks.layout_metrics import save_layout_grid

        s = self.samples.get(stage)
        if not s:
            return
        layouts = self.as_layouts(list(s["predictions"]))
        save_layout_grid(self.renderer.render(layouts), layouts, list(s["caption"]), path)

    def checkpoint_state(self) -> dict[str, Any]:
        """The renderer's config (its weights are in the state dict) and the planner's longest layout."""
        from dataclasses import asdict

        return {**super().checkpoint_state(), "renderer": asdict(self.renderer.cfg),
                "max_layout_len": int(self.opts["max_layout_len"])}

