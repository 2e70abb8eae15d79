"""``Pretrained``: a model bundled with all its modality tokenizers, saved to and loaded from a folder.

A saved model is a folder::

    config.json        ModelConfig fields (arch, vocab layout with ranges, modality configs with their
                       fitted statistics) + "mmzoo_version", "format" and "tasks" (task -> generation settings)
    model.safetensors  the weights (the only weight format loaded without an explicit opt-in)
    tokenizer.json     the text tokenizer
    image_codes/       text-to-image models only: the VQ image-code tokenizer, a diffusers ``VQModel`` folder
                       (config.json + diffusion_pytorch_model.safetensors), named by config.json's "image_codes"
    renderer/          layout-route text-to-image models only: the layout renderer (zoo/layout_generation.py),
                       named by config.json's "renderer"
    README.md          the model card

Loading (:mod:`zoo.loading`) never executes code from the folder and reads nothing outside it: ``config.json``
goes through an explicit schema, weights are safetensors (a pickle only with ``allow_pickle=True``, and then
only through ``torch.load(weights_only=True)``), no ``_target_``, and the architecture and image backbone
resolve only through registries.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from modalities.base import get_modality
from zoo.model_card import model_card
from zoo.task_specs import DEFAULT_GENERATION, TaskSpec, decode_text, task_spec, task_specs, text_batch  # noqa: F401
from zoo.task_specs.text_to_image import LAYOUT_PLAN, T2I_GENERATION  # noqa: F401
from zoo.loading import (CONFIG_FILE, META_KEYS, PICKLE_SUFFIXES, WEIGHTS_FILE, ModelFolderError,  # noqa: F401
                         UnsafeModelError, check_state, confined, load_image_codes, load_text_tokenizer,
                         model_config_from_dict, model_root, read_json_object, read_weights, refuse_targets)

CARD_FILE = "README.md"
FORMAT_VERSION = 1
IMAGE_CODES_DIR = "image_codes"


def _version() -> str:
    from zoo.version import __version__

    return __version__


def full_modality_config(name: str, mcfg: dict[str, Any]) -> dict[str, Any]:
    """A modality's config with every field filled in (defaults and fitted statistics written out)."""
    return get_modality(name).full_config(mcfg)


# ------------------------------------------------------------------------------------------------
# The bundle
# ------------------------------------------------------------------------------------------------
def read_sensor_file(path: str | Path, channels: Sequence[str], rate: float | None = None,
                     timestamp_column: str | None = "timestamp", time_unit: str = "s") -> Any:
    """A ``SensorRecording`` from a ``.csv``/``.tsv`` log (channel columns by name, plus a
    ``timestamp_column`` in ``time_unit`` or ISO date-times; ``None`` when it has none), an ``.npz``
    or an ``.npy`` ``[C, T]`` (see :mod:`modalities.sensor_io`). Never unpickles."""
    from modalities.sensor_io import read_recording

    return read_recording(path, channels, rate, timestamp_column=timestamp_column, time_unit=time_unit)


class UntrainedTaskError(ValueError):
    """A task method was called on a model that was not trained for that task."""


def _name(x: Any) -> str:
    return str(x) if isinstance(x, (str, Path)) else type(x).__name__


def _as_list(x: Any) -> tuple[list[Any], bool]:
    """``(items, single)``: wraps one input so every method is batched."""
    if isinstance(x, (list, tuple)):
        return list(x), False
    if torch.is_tensor(x) and x.ndim == 4:
        return list(x), False
    return [x], True


@dataclass
class Pretrained:
    """A model with all its modality tokenizers: the object ``zoo.load`` returns.

    ``caption``, ``answer``, ``generate_image`` and ``describe`` are batched: they take one input or a list
    and return one result or a list.
    """

    model: Any  # zoo.model.UnifiedSeq2Seq
    tokenizer: Any  # modalities.text.TextTokenizer
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str | None = None
    #: ``"fp32"`` or ``"bf16"`` (autocast: about 2x faster on CPUs with AVX512-BF16 and on GPUs; results can
    #: differ from fp32 in the last digits, so a caption may change)
    precision: str = "fp32"
    #: text-to-image models: the VQ image-code tokenizer (``modalities.image_codes.ImageCodeTokenizer``)
    image_tokenizer: Any = None
    #: layout-route text-to-image models: the renderer (``zoo.layout_renderer.LayoutRenderer``) and the longest
    #: layout the planner writes
    renderer: Any = None
    max_layout_len: int = 48
    _pre: dict[str, Any] = field(default_factory=dict, repr=False)

    # --- construction / I/O -------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path, allow_pickle: bool = False, device: str | torch.device | None = None,
                    source: str | None = None, confine_to: str | Path | None = None) -> "Pretrained":
        """Load a saved model folder through :mod:`zoo.loading` (see there for what is refused). Files are read
        only inside ``confine_to`` (default :func:`zoo.loading.model_root`: the folder itself, or for a Hub cache
        snapshot its repo's cache folder, whose ``blobs/`` the snapshot's files link to)."""
        from zoo.model import UnifiedSeq2Seq

        folder = Path(folder)
        cfg_path = folder / CONFIG_FILE
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a folder, so not an mmzoo model folder")
        root = Path(confine_to).resolve() if confine_to is not None else model_root(folder)
        confined(root, folder, "dir")
        if not cfg_path.exists() and not cfg_path.is_symlink():
            raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}, so not an mmzoo model folder "
                                    f"({sorted(p.name for p in folder.iterdir())})")
        raw = read_json_object(root, cfg_path)
        cfg = model_config_from_dict(raw, str(cfg_path))  # the schema: refuses before anything is built
        fmt = raw.get("format", FORMAT_VERSION)
        if fmt > FORMAT_VERSION:
            raise ModelFolderError(f"{cfg_path}: format {fmt} is newer than this mmzoo reads ({FORMAT_VERSION}); "
                                   "upgrade mmzoo")
        tasks = raw.get("tasks") or {}
        if isinstance(tasks, list):
            tasks = {t: {} for t in tasks}
        state, weights_file = read_weights(root, folder, WEIGHTS_FILE, allow_pickle)
        try:  # shapes first, on the meta device: a config cannot make loading allocate memory at will
            with torch.device("meta"):
                shapes = UnifiedSeq2Seq(cfg).state_dict()
        except Exception:  # noqa: BLE001 — a backbone that cannot be built on meta: the real build below decides
            shapes = None
        if shapes is not None:
            check_state(state, shapes, weights_file, str(cfg_path))
        try:
            model = UnifiedSeq2Seq(cfg)
        except (TypeError, ValueError, KeyError, RuntimeError) as e:
            raise ModelFolderError(f"{cfg_path}: cannot build its architecture ({type(e).__name__}: {e})") from None
        model.load_state_dict(check_state(state, model.state_dict(), weights_file, str(cfg_path)))
        tokenizer = load_text_tokenizer(root, folder)
        if tokenizer.vocab_size != model.layout.text_size:
            raise ModelFolderError(f"{folder / 'tokenizer.json'}: has {tokenizer.vocab_size} tokens but {cfg_path}'s "
                                   f"vocab.text_size is {model.layout.text_size}")
        image_tokenizer = None
        if raw.get("image_codes") is not None:
            image_tokenizer = load_image_codes(root, folder, raw["image_codes"], allow_pickle, str(cfg_path))
            try:
                image_tokenizer.check_layout(model.layout)
            except ValueError as e:
                raise ModelFolderError(f"{cfg_path}: {e}") from None
        renderer, max_layout_len = None, 48
        if raw.get("renderer") is not None:
            from zoo.layout_generation import load_renderer

            renderer, max_layout_len = load_renderer(root, folder, raw["renderer"], str(cfg_path))
        model.eval()
        bundle = cls(model=model, tokenizer=tokenizer, tasks=dict(tasks), source=source or str(folder),
                     image_tokenizer=image_tokenizer, renderer=renderer, max_layout_len=max_layout_len)
        return bundle.to(device) if device is not None else bundle

    def config_dict(self) -> dict[str, Any]:
        """What ``config.json`` holds: every field, the vocabulary ranges and full modality configs."""
        d = self.model.cfg.to_dict()
        d["vocab"] = self.layout.to_dict()
        d["modalities"] = {name: full_modality_config(name, m) for name, m in d["modalities"].items()}
        meta: dict[str, Any] = {"mmzoo_version": _version(), "format": FORMAT_VERSION, "tasks": self.tasks}
        if self.image_tokenizer is not None:
            tok = self.image_tokenizer
            meta["image_codes"] = {"folder": IMAGE_CODES_DIR, "format": "diffusers.VQModel",
                                   "num_codes": tok.num_codes, "grid": list(tok.grid), "image_size": tok.image_size}
        if self.renderer is not None:
            from zoo.layout_generation import renderer_entry

            meta["renderer"] = renderer_entry(self.renderer, self.max_layout_len)
        return {**d, **meta}

    def save_pretrained(self, folder: str | Path, card: dict[str, Any] | None = None) -> Path:
        """Write the model folder atomically (temp folder + rename); ``card`` fills the model card
        (``training_data``, ``metrics``, ``command``, ``intended_use``, ``limits``, ``base_model``, ``name``)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            config = self.config_dict()
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "mmzoo_version": _version()})
            self.tokenizer.save(tmp)
            if self.image_tokenizer is not None:
                self.image_tokenizer.save_pretrained(tmp / IMAGE_CODES_DIR)
            if self.renderer is not None:
                from zoo.layout_generation import RENDERER_DIR

                self.renderer.save_pretrained(tmp / RENDERER_DIR)
            card = {"num_parameters": self.model.num_parameters(), **(card or {})}
            (tmp / CARD_FILE).write_text(model_card(config, card), encoding="utf-8")
            if folder.exists():
                old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(folder, old)
                os.replace(tmp, folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    def push_to_hub(self, repo_id: str, *, card: dict[str, Any] | None = None, private: bool | None = None,
                    revision: str | None = None, commit_message: str | None = None, token: str | None = None) -> str:
        """Save to a temp folder and upload it to the Hugging Face Hub; returns the commit URL."""
        import tempfile

        from zoo.hub_io import upload_folder

        with tempfile.TemporaryDirectory() as d:
            folder = self.save_pretrained(Path(d) / "model", card={"load_as": f"hf-hub:{repo_id}", **(card or {})})
            return upload_folder(folder, repo_id, private=private, revision=revision,
                                 commit_message=commit_message, token=token)

    # --- helpers ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def layout(self):
        return self.model.layout

    def to(self, device: str | torch.device) -> "Pretrained":
        self.model.to(device)
        if self.image_tokenizer is not None:
            self.image_tokenizer.to(device)
        if self.renderer is not None:
            self.renderer.to(device)
        return self

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    def preprocessor(self, modality: str) -> Any:
        """The CPU preprocessing of a modality (built from the saved modality config)."""
        if modality not in self._pre:
            mcfg = self.model.cfg.modalities.get(modality)
            if mcfg is None:
                raise NotImplementedError(f"this model has no {modality!r} modality "
                                          f"(it has {['text', *self.model.cfg.modalities]})")
            self._pre[modality] = get_modality(modality).preprocessor(mcfg)
        return self._pre[modality]

    def _text_segment(self, texts: Sequence[str], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts → unified ids ``[B, L]`` and mask (True = real)."""
        ids, mask = text_batch(self.tokenizer.encode_batch(list(texts), max_len), self.layout)
        return ids.to(self.device), mask.to(self.device)

    def decode_text(self, tokens: torch.Tensor) -> list[str]:
        """Generated unified ids ``[B, T]`` → strings (cut at the first EOS, text range only)."""
        return decode_text(tokens, self.layout, self.tokenizer)

    def _gen_kwargs(self, spec: TaskSpec, overrides: dict[str, Any]) -> dict[str, Any]:
        """Generation settings: the task spec's defaults < the model's saved task entry < ``overrides``; plus the
        spec's processors for this model (VQA trained closed-set: the trie over its saved answers; cached)."""
        saved, key = self.tasks.get(spec.name), f"processors:{spec.name}"
        kw = spec.generation_settings(saved, overrides)
        if key not in self._pre:
            self._pre[key] = spec.processors(saved, self.tokenizer, self.layout)
        if self._pre[key]:
            kw["processors"] = self._pre[key]
        return kw

    def _run_text(self, spec: TaskSpec, items: list[Any], batch_size: int,
                  segments: Callable[[list[Any]], dict[str, Any]], overrides: dict[str, Any]) -> list[str]:
        """A text-writing task over ``items`` in batches; ``segments(chunk)`` builds a batch's encoder inputs."""
        gen = self._gen_kwargs(spec, overrides)
        self.model.eval()
        out: list[str] = []
        for i in range(0, len(items), batch_size):
            out += self._generate_text(spec, segments(items[i:i + batch_size]), gen)
        return out

    def _pixels(self, images: Sequence[Any]) -> torch.Tensor:
        pre = self.preprocessor("image")
        if images and all(torch.is_tensor(x) and x.ndim == 3 for x in images):
            return torch.stack(images).to(self.device)  # already preprocessed
        out = []
        for x in images:
            try:
                out.append(pre(x))
            except Exception as e:  # name the input that failed
                raise ValueError(f"cannot read image {x if isinstance(x, (str, Path)) else type(x).__name__}: {e}") from e
        return torch.stack(out).to(self.device)

    def allowed_tokens(self, spec: TaskSpec) -> torch.Tensor:
        """The ids a text task may generate: the spec's, plus the location tokens for a task trained to write
        them before its answer (VQA's relation chains, ``location_chain``; dropped when decoded)."""
        return spec.allowed_tokens_for(self.layout, self.tasks.get(spec.name))

    @torch.no_grad()
    def _generate_text(self, spec: TaskSpec, segments: dict[str, Any], gen: dict[str, Any]) -> list[str]:
        from zoo.generation import generate

        with self.autocast():
            tokens = generate(self.model, segments, allowed=self.allowed_tokens(spec), **gen)
        return self.decode_text(tokens)

    def autocast(self) -> Any:
        """The autocast context for :attr:`precision`."""
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.precision == "bf16" and any(type(m).__module__.startswith("torch.ao.nn.quantized")
                                            for m in self.model.modules()):
            raise ValueError("precision='bf16' does not combine with an int8-quantized model (its linear layers "
                             "compute in fp32): set precision='fp32'")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _require_task(self, spec: TaskSpec) -> None:
        """Refuse a task the model was not trained for, when its config lists the tasks it was trained for."""
        specs = task_specs()
        known = [t for t in self.tasks if t in specs]
        if known and spec.name not in self.tasks:
            uses = ", ".join(f"{specs[t].method}()" for t in known)
            raise UntrainedTaskError(f"this model was not trained for {spec.name} ({spec.method}() was called); "
                                     f"config.json lists the tasks {known}: use {uses}")

    def _warn_long(self, texts: Sequence[str], limit: int, what: str) -> None:
        """Warn about each text longer than ``limit`` tokens (it is cut): its index, token count and the limit."""
        for i, ids in enumerate(self.tokenizer.encode_batch(list(texts))):
            if len(ids) > limit:
                warnings.warn(f"{what} {i} has {len(ids)} tokens, over this model's limit of {limit} "
                              f"(max_positions); only its first {limit} tokens are read", stacklevel=3)

    # --- tasks --------------------------------------------------------------------------------
    def caption(self, images: Any, *, batch_size: int = 32, max_new_tokens: int | None = None,
                num_beams: int | None = None, prompt: str | None = None) -> str | list[str]:
        """Caption one image or a list (paths, bytes, PIL images or preprocessed ``[3,H,W]`` tensors); ``prompt``
        defaults to the caption spec's instruction."""
        spec = task_spec("caption")
        self._require_task(spec)
        prompt = spec.instruction() if prompt is None else prompt
        items, single = _as_list(images)
        out = self._run_text(spec, items, batch_size, lambda chunk: {
            "image": self._pixels(chunk), "text": self._text_segment([prompt] * len(chunk))},
            {"max_new_tokens": max_new_tokens, "num_beams": num_beams})
        return out[0] if single else out

    def answer(self, images: Any, questions: str | Sequence[str], *, batch_size: int = 32,
               max_new_tokens: int | None = None, num_beams: int | None = None) -> str | list[str]:
        """Answer questions about images (one question for all images, or one per image)."""
        items, single = _as_list(images)
        qs = [questions] * len(items) if isinstance(questions, str) else list(questions)
        if len(qs) != len(items):
            raise ValueError(f"got {len(items)} images but {len(qs)} questions")
        spec = task_spec("vqa")
        self._require_task(spec)
        blank = next((i for i, q in enumerate(qs) if not isinstance(q, str) or not q.strip()), None)
        if blank is not None:
            raise ValueError(f"question {blank} (for image {_name(items[blank])}) is blank: {qs[blank]!r}")
        max_len = self.model.cfg.max_positions
        self._warn_long([q.strip() for q in qs], max_len, "question")
        out = self._run_text(spec, list(zip(items, qs)), batch_size, lambda chunk: {
            "image": self._pixels([x for x, _ in chunk]), "text": self._text_segment([q.strip() for _, q in chunk],
                                                                                     max_len)},
            {"max_new_tokens": max_new_tokens, "num_beams": num_beams})
        return out[0] if single else out

    def describe(self, sensors: Any, *, batch_size: int = 32, max_new_tokens: int | None = None,
                 num_beams: int | None = None, prompt: str | None = None, rate: float | None = None,
                 timestamp_column: str | None = "timestamp", time_unit: str = "s") -> str | list[str]:
        """Describe sensor recordings: ``SensorRecording``s, arrays ``[C, T]`` (configured channel order and
        rate) or ``.csv`` / ``.tsv`` / ``.npz`` / ``.npy`` files (see :func:`read_sensor_file`; ``rate``,
        ``timestamp_column`` and ``time_unit`` say how files are sampled); ``prompt`` defaults to the spec's."""
        if "sensor" not in self.model.cfg.modalities:
            raise NotImplementedError("describe() needs a model with a 'sensor' modality; this one has "
                                      f"{['text', *self.model.cfg.modalities]} (train one with a sensor experiment)")
        spec = task_spec("sensor_to_text")
        self._require_task(spec)
        prompt = spec.instruction() if prompt is None else prompt
        from modalities.sensor import SensorRecording, pad_sensor_batch

        tok = self.preprocessor("sensor")
        items, single = _as_list(sensors)
        if single and getattr(sensors, "ndim", 0) == 3:  # a [B, C, T] array or tensor
            items, single = list(sensors), False

        def segments(chunk: list[Any]) -> dict[str, Any]:
            recs = []
            for x in chunk:
                if isinstance(x, (str, Path)):
                    x = read_sensor_file(x, tok.cfg.channels, rate, timestamp_column, time_unit)
                elif not isinstance(x, SensorRecording):
                    x = SensorRecording(values=x.cpu().numpy() if torch.is_tensor(x) else x)
                recs.append(tok(x))
            values, valid = pad_sensor_batch(recs)
            return {"sensor": (values.to(self.device), valid.to(self.device)),
                    "text": self._text_segment([prompt] * len(recs))}

        out = self._run_text(spec, items, batch_size, segments,
                             {"max_new_tokens": max_new_tokens, "num_beams": num_beams})
        return out[0] if single else out

    @torch.no_grad()
    def generate_image_codes(self, texts: str | Sequence[str], *, batch_size: int = 32,
                             guidance_scale: float | None = None, seed: int | None = None,
                             do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
                             top_p: float | None = None, use_cache: bool | None = None) -> torch.Tensor:
        """Raw VQ code ids ``[B, h*w]`` for captions: the instruction ``what is the complete image? caption: <text>``,
        classifier-free guidance against the empty caption, decoding constrained to the codebook's ids and to
        exactly ``h*w`` tokens, batched with the KV cache. One generator seeded with ``seed`` runs over the
        batches in order, so the codes equal those of the training task's evaluation with the same seed and
        batches (a sample depends on the seed and on the batch it was drawn in)."""
        vq = self.image_tokenizer
        if vq is None:
            raise NotImplementedError("generate_image() needs a text-to-image model with an image_codes VQ tokenizer "
                                      "(an 'image_codes' folder in config.json); this one has none (its modalities: "
                                      f"{['text', *self.model.cfg.modalities]}); export a text_to_image run")
        spec = task_spec("text_to_image")
        self._require_task(spec)
        items, _ = _as_list(texts)
        prompts = [spec.instruction(str(t)) for t in items]
        max_len = self.model.cfg.max_positions
        self._warn_long(prompts, max_len, "prompt")
        hp = spec.generation_settings(self.tasks.get(spec.name), dict(
            guidance_scale=guidance_scale, seed=seed, do_sample=do_sample, temperature=temperature, top_k=top_k,
            top_p=top_p, use_cache=use_cache))
        gen = torch.Generator(self.device).manual_seed(int(hp["seed"]))
        uncond = spec.uncond_inputs(self.tokenizer, self.layout, self.device, max_len)
        allowed = spec.allowed_tokens(self.layout, vq)
        out = []
        self.model.eval()
        for i in range(0, len(prompts), batch_size):
            cond = {"text": self._text_segment(prompts[i:i + batch_size], max_len)}
            with self.autocast():
                tokens = spec.sample(self.model, cond, vq, self.layout, hp, gen, uncond=uncond, allowed=allowed)
            out.append(vq.from_unified(tokens, self.layout))
        return torch.cat(out).cpu()

    @torch.no_grad()
    def generate_image(self, texts: str | Sequence[str], *, output_type: str = "pil", batch_size: int = 32,
                       **sampling: Any) -> Any:
        """Text-to-image: captions → image codes (:meth:`generate_image_codes`, same keyword arguments:
        ``guidance_scale``, ``seed``, ``temperature``, ``top_k``, ...) → pixels through the VQ decoder; for a
        layout-route model (a ``renderer``): :meth:`plan_layout`, then the renderer (sampling options ignored).

        Returns one image or a list of PIL images (``output_type="pil"``), or a float tensor ``[B,3,H,W]``
        in ``[0, 1]`` (``output_type="pt"``).
        """
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        items, single = _as_list(texts)
        if self.renderer is not None:  # the layout route: plan, then render (sampling options do not apply)
            from zoo.layout_generation import render_texts

            self._require_task(task_spec("text_to_image"))
            pixels = render_texts(self, [str(t) for t in items], batch_size)[0]
        else:
            codes = self.generate_image_codes(items, batch_size=batch_size, **sampling)
            vq = self.image_tokenizer
            dev = next(vq.parameters()).device
            pixels = torch.cat([vq.decode(c.to(dev)).float().cpu() for c in codes.split(batch_size)])
        if output_type == "pt":
            return pixels[0] if single else pixels
        from PIL import Image

        arr = pixels.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        images = [Image.fromarray(a) for a in arr]
        return images[0] if single else images

    @torch.no_grad()
    def plan_layout(self, texts: str | Sequence[str], *, batch_size: int = 32) -> Any:
        """Layout-route text-to-image, stage 1: each caption's scene plan, a ``zoo.layout_renderer.Layout`` (tone
        and objects, each ``{"box": (x0, y0, x1, y1) in [0, 1], "size", "colour", "shape"}``); one or a list."""
        if self.renderer is None:
            raise NotImplementedError("plan_layout() needs a layout-route text-to-image model (a 'renderer' folder "
                                      "in config.json); train one with task.decoder=layout")
        self._require_task(LAYOUT_PLAN)
        from zoo.layout_generation import plan_layouts

        items, single = _as_list(texts)
        plans = plan_layouts(self, [str(t) for t in items], batch_size)
        return plans[0] if single else plans

    @torch.no_grad()
    def generate_text_from(self, task: str, text_ids: Sequence[Sequence[int]], *, pixels: torch.Tensor | None = None,
                           sensor: tuple[torch.Tensor, torch.Tensor] | None = None, **overrides: Any) -> list[str]:
        """One batch of ``caption`` / ``vqa`` / ``sensor_to_text`` on already-preprocessed inputs (for servers whose
        CPU workers decode and tokenize): ``text_ids`` are the tokenizer's raw ids per row (the prompt or question),
        ``pixels`` ``[B,3,S,S]`` from :meth:`preprocessor`, ``sensor`` padded ``(values, valid)``. Generation
        settings resolve as in :meth:`caption`, so the results equal those of the task methods."""
        ids, mask = text_batch([list(r) for r in text_ids], self.layout)
        segs: dict[str, Any] = {"text": (ids.to(self.device), mask.to(self.device))}
        if pixels is not None:
            segs["image"] = pixels.to(self.device)
        if sensor is not None:
            segs["sensor"] = (sensor[0].to(self.device), sensor[1].to(self.device))
        self.model.eval()
        spec = task_spec(task)
        return self._generate_text(spec, segs, self._gen_kwargs(spec, overrides))

    def __repr__(self) -> str:
        return (f"Pretrained(arch={self.model.cfg.arch!r}, params={self.num_parameters() / 1e6:.2f}M, "
                f"modalities={['text', *self.model.cfg.modalities]}, tasks={list(self.tasks)}, source={self.source!r})")
