"""mmzoo training checkpoints: their metadata (:class:`CheckpointMeta`), the checkpoint file, the model bundle.

A ``.ckpt`` is a pickle: it is read only with ``torch.load(weights_only=True)`` (tensors and plain containers),
never unpickled further. Beside Lightning's entries it carries ``checkpoint["mmzoo"]`` (task, model config,
tokenizer and the task's own state, e.g. the path of a text-to-image run's VQ tokenizer folder) and the task's
weights under the ``model.`` prefix; fine-tuning runs add ``checkpoint["mmzoo_finetune"]`` (starting point, mode,
LoRA settings; LoRA is merged here). Both are written and read only through :class:`CheckpointMeta`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads lazily: `zoo-export --help` stays instant
    import torch

#: Task hyper-parameters that matter at inference and go into config.json's "tasks" entry.
TASK_SETTINGS = ("max_new_tokens", "num_beams", "length_penalty", "decoding",
                 # text-to-image sampling (zoo.task_specs.text_to_image.T2I_GENERATION)
                 "guidance_scale", "do_sample", "temperature", "top_k", "top_p", "use_cache", "seed")


META_KEY = "mmzoo"
FINETUNE_KEY = "mmzoo_finetune"
#: the entries of ``checkpoint["mmzoo"]`` that are not the task's own state
_CORE_KEYS = ("task", "model_config", "tokenizer")


@dataclass
class CheckpointMeta:
    """What an mmzoo checkpoint says about itself: enough to rebuild model, tokenizer and task without Hydra.

    ``task`` is the registered task name; ``model_config`` and ``tokenizer`` the unified model's config dict and
    text tokenizer JSON (``None`` for a tool that trains its own network, e.g. the VQ image tokenizer); ``state``
    the task's own entries (:meth:`tasks.base.Seq2SeqTask.checkpoint_state`: VQA's answer candidates, the VQ
    tokenizer folder, a layout renderer's config; a multi-task model's ``tasks``: one such dict per task);
    ``finetune`` what ``zoo-finetune`` started from (mode, LoRA settings). Stored as ``checkpoint["mmzoo"] =
    {"task", "model_config", "tokenizer", **state}`` and ``checkpoint["mmzoo_finetune"]``, as checkpoints always
    were, so older ones read unchanged.
    """

    task: str
    model_config: dict[str, Any] | None = None
    tokenizer: str | None = None
    state: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        clash = set(self.state) & set(_CORE_KEYS)
        if clash:
            raise ValueError(f"task {self.task!r}: checkpoint state may not use the reserved key(s) {sorted(clash)}")

    def write(self, checkpoint: dict[str, Any]) -> None:
        """Put this metadata into a Lightning checkpoint dict (``on_save_checkpoint``)."""
        core = {"task": self.task, "model_config": self.model_config, "tokenizer": self.tokenizer}
        checkpoint[META_KEY] = {**{k: v for k, v in core.items() if v is not None}, **self.state}
        if self.finetune is not None:
            checkpoint[FINETUNE_KEY] = dict(self.finetune)

    @classmethod
    def read(cls, checkpoint: dict[str, Any], where: str = "checkpoint") -> CheckpointMeta:
        """The metadata of a checkpoint dict; a clear error when it is not an mmzoo checkpoint."""
        raw = checkpoint.get(META_KEY) if isinstance(checkpoint, dict) else None
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: not an mmzoo checkpoint (no {META_KEY!r} entry with the model config)")
        finetune = checkpoint.get(FINETUNE_KEY)
        return cls(task=str(raw.get("task", "seq2seq")), model_config=raw.get("model_config"),
                   tokenizer=raw.get("tokenizer"), state={k: v for k, v in raw.items() if k not in _CORE_KEYS},
                   finetune=dict(finetune) if isinstance(finetune, dict) else None)

    @property
    def subtasks(self) -> dict[str, dict[str, Any]] | None:
        """A multi-task checkpoint's per-task state (``state["tasks"]``); ``None`` for a single task."""
        tasks = self.state.get("tasks")
        return tasks if isinstance(tasks, dict) else None

    def task_states(self) -> dict[str, dict[str, Any]]:
        """Every trained task's own state by task name (one entry unless multi-task)."""
        return self.subtasks if self.subtasks is not None else {self.task: self.state}


def read_checkpoint(path: str | Path, unsafe_pickle: bool = False) -> dict[str, Any]:
    """Load a training checkpoint with ``torch.load(weights_only=True)`` (tensors and plain containers only; mmzoo
    never unpickles further, so ``unsafe_pickle=True`` is refused)."""
    path = Path(path)
    if unsafe_pickle:
        raise ValueError(f"{path}: unsafe_pickle=true is no longer supported: mmzoo never unpickles beyond "
                         "torch.load(weights_only=True) (a pickle can run code); mmzoo's own checkpoints load that way")
    if not path.is_file():
        near = sorted(p.name for p in path.parent.glob("*.ckpt")) if path.parent.is_dir() else []
        raise FileNotFoundError(f"checkpoint {path} does not exist"
                                + (f"; {path.parent} holds {', '.join(near)}" if near else ""))
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: "
                         f"{str(e)[:300]}); mmzoo reads checkpoints only that way (a pickle can run code)") from None
    if not isinstance(ckpt, dict) or META_KEY not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not an mmzoo training checkpoint (no 'mmzoo' entry with the model config)")
    return ckpt


def _model_state(ckpt: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if not state:
        raise ValueError(f"{where}: the state dict has no 'model.' entries")
    return state


def vq_folder_for(ckpt: dict[str, Any], where: str, vq: str | Path | None = None) -> Path | None:
    """The VQ tokenizer folder a text-to-image (or multi-task) checkpoint was trained with (``vq`` overrides
    its path); ``None`` for checkpoints without text-to-image."""
    states = CheckpointMeta.read(ckpt, where).task_states()
    path = vq or next((s["vq_tokenizer"] for s in states.values() if s.get("vq_tokenizer")), None)
    if path is None:
        if any("vq_tokenizer" in s for s in states.values()):  # a task trained on VQ codes recorded no folder
            raise ValueError(f"{where}: a text_to_image checkpoint without a VQ tokenizer path; pass vq=<folder>")
        return None
    folder = Path(path)
    if not folder.is_dir() and not folder.is_absolute():  # relative to the run directory
        run = Path(where).resolve().parent
        folder = next((r / path for r in (run, run.parent, run.parent.parent) if (r / path).is_dir()), folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{where}: its VQ tokenizer folder {str(path)!r} does not exist here; pass "
                                "vq=<folder> (the data.vq_path / vq_tokenizers/<hash> folder it was trained with)")
    return folder


def image_tokenizer_for(ckpt: dict[str, Any], where: str, vq: str | Path | None = None) -> Any:
    """The VQ image-code tokenizer of :func:`vq_folder_for`, loaded; ``None`` for checkpoints without one."""
    from modalities.image_codes import ImageCodeTokenizer

    folder = vq_folder_for(ckpt, where, vq)
    return None if folder is None else ImageCodeTokenizer.from_pretrained(folder).eval()


def load_model_state(model: Any, state: dict[str, torch.Tensor], finetune: dict[str, Any],
                     adapter_out: str | Path | None = None) -> Any:
    """Load a checkpoint's model weights (a LoRA run's adapters merged, and saved to ``adapter_out`` when given);
    the model in eval mode."""
    if finetune.get("mode") == "lora":
        from tasks.adapters import apply_lora, merge_lora, save_adapter

        model = apply_lora(model, **finetune["lora"])
        model.load_state_dict(state, strict=True)
        if adapter_out is not None:
            save_adapter(model, adapter_out)
        model = merge_lora(model)
    else:
        model.load_state_dict(state, strict=True)
    return model.eval()


def bundle_from_checkpoint(ckpt: dict[str, Any], where: str = "checkpoint",
                           adapter_out: str | Path | None = None, vq: str | Path | None = None) -> Any:
    """Rebuild the :class:`zoo.pretrained.Pretrained` bundle of a training checkpoint (LoRA merged; the VQ
    image tokenizer attached for text-to-image, from ``vq`` or the path the checkpoint recorded)."""
    from modalities.text import TextTokenizer
    from zoo.model import UnifiedSeq2Seq
    from zoo.pretrained import Pretrained, model_config_from_dict

    meta = CheckpointMeta.read(ckpt, where)
    if meta.model_config is None or meta.tokenizer is None:
        raise ValueError(f"{where}: a {meta.task!r} checkpoint holds no unified model (no model config / tokenizer)")
    cfg = model_config_from_dict(dict(meta.model_config), f"{where}['mmzoo']['model_config']")
    ft = meta.finetune or {}
    model = load_model_state(UnifiedSeq2Seq(cfg), _model_state(ckpt, where), ft, adapter_out)
    if meta.task == "florence2":  # Florence-2's own bundle: its tokenizer, decoding defaults and provenance
        from tasks.florence2_bundle import florence2_bundle

        return florence2_bundle(model, meta.tokenizer, meta.state, where)
    tokenizer = TextTokenizer.from_str(meta.tokenizer)
    hp = ckpt.get("hyper_parameters") or {}
    tasks = dict(ft.get("tasks") or {})
    # one entry per trained task with its generation settings (a multi-task model's are per task) and state
    settings_of = (hp.get("tasks") or {}) if meta.subtasks is not None else {meta.task: hp}
    states = meta.task_states()
    for name, settings in settings_of.items():
        tasks[name] = {k: settings[k] for k in TASK_SETTINGS if k in settings}
        if (states.get(name) or {}).get("candidates"):  # closed-set VQA answers
            tasks[name]["candidates"] = list(states[name]["candidates"])
        if (states.get(name) or {}).get("location_chain"):  # VQA trained on relation chains
            tasks[name]["location_chain"] = True
    renderer, max_layout_len = renderer_for(ckpt, where)
    image_tokenizer = None if renderer is not None else image_tokenizer_for(ckpt, where, vq)
    if image_tokenizer is not None:
        image_tokenizer.check_layout(model.layout)
    return Pretrained(model=model, tokenizer=tokenizer, tasks=tasks, source=where, image_tokenizer=image_tokenizer,
                      renderer=renderer, max_layout_len=max_layout_len)


def renderer_for(ckpt: dict[str, Any], where: str) -> tuple[Any, int]:
    """The layout renderer of a ``task.decoder=layout`` checkpoint (config in ``checkpoint["mmzoo"]["renderer"]``,
    weights under ``renderer.``) and its planner's longest layout; ``(None, 48)`` for other checkpoints."""
    from zoo.layout_renderer import LayoutRenderer, LayoutRendererConfig

    meta = CheckpointMeta.read(ckpt, where)
    if meta.subtasks is None:
        state, prefix = meta.state, "renderer."
    else:  # a multi-task checkpoint: the state and modules of the task that has a renderer
        name = next((n for n, s in meta.subtasks.items() if s.get("renderer") is not None), None)
        state, prefix = meta.subtasks.get(name) or {}, f"task_modules.{name}.renderer."
    cfg = state.get("renderer")
    if cfg is None:
        return None, 48
    renderer = LayoutRenderer(LayoutRendererConfig.from_dict(dict(cfg), f"{where}: the renderer config"))
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    renderer.load_state_dict(state, strict=True)
    return renderer.eval(), int(state.get("max_layout_len", 48))
