"""Reading mmzoo training checkpoints: the checkpoint file, and the model bundle it describes.

A ``.ckpt`` is a pickle: it is read only with ``torch.load(weights_only=True)`` (tensors and plain containers),
never unpickled further. The checkpoint carries ``checkpoint["mmzoo"]`` (model config, tokenizer, task; text-to-image
runs also the path of their VQ tokenizer folder) and the task's weights under the ``model.`` prefix; fine-tuning
runs add ``checkpoint["mmzoo_finetune"]`` (starting point, mode, LoRA settings; LoRA is merged here).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads lazily: `zoo-export --help` stays instant
    import torch

#: Task hyper-parameters that matter at inference and go into config.json's "tasks" entry.
TASK_SETTINGS = ("max_new_tokens", "num_beams", "length_penalty", "decoding",
                 # text-to-image sampling (zoo.pretrained.T2I_GENERATION)
                 "guidance_scale", "do_sample", "temperature", "top_k", "top_p", "use_cache", "seed")


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
    if not isinstance(ckpt, dict) or "mmzoo" not in ckpt or "state_dict" not in ckpt:
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
    meta = ckpt["mmzoo"]
    path = vq or meta.get("vq_tokenizer") or (meta.get("tasks") or {}).get("text_to_image", {}).get("vq_tokenizer")
    if path is None:
        if meta.get("task") == "text_to_image":
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


def bundle_from_checkpoint(ckpt: dict[str, Any], where: str = "checkpoint",
                           adapter_out: str | Path | None = None, vq: str | Path | None = None) -> Any:
    """Rebuild the :class:`zoo.pretrained.Pretrained` bundle of a training checkpoint (LoRA merged; the VQ
    image tokenizer attached for text-to-image, from ``vq`` or the path the checkpoint recorded)."""
    from modalities.text import TextTokenizer
    from zoo.model import UnifiedSeq2Seq
    from zoo.pretrained import Pretrained, model_config_from_dict

    meta = ckpt["mmzoo"]
    cfg = model_config_from_dict(dict(meta["model_config"]), f"{where}['mmzoo']['model_config']")
    model = UnifiedSeq2Seq(cfg)
    state = _model_state(ckpt, where)
    ft = ckpt.get("mmzoo_finetune") or {}
    if ft.get("mode") == "lora":
        from tasks.adapters import apply_lora, merge_lora, save_adapter

        model = apply_lora(model, **ft["lora"])
        model.load_state_dict(state, strict=True)
        if adapter_out is not None:
            save_adapter(model, adapter_out)
        model = merge_lora(model)
    else:
        model.load_state_dict(state, strict=True)
    model.eval()
    tokenizer = TextTokenizer.from_str(meta["tokenizer"])
    hp = ckpt.get("hyper_parameters") or {}
    gen = {k: hp[k] for k in TASK_SETTINGS if k in hp}
    if meta.get("candidates"):  # closed-set VQA answers
        gen["candidates"] = list(meta["candidates"])
    tasks = dict(ft.get("tasks") or {})
    if meta.get("task") == "multitask":  # one entry per trained task, each with its own settings
        for name, settings in (hp.get("tasks") or {}).items():
            tasks[name] = {k: settings[k] for k in TASK_SETTINGS if k in settings}
            if (meta.get("tasks") or {}).get(name, {}).get("candidates"):
                tasks[name]["candidates"] = list(meta["tasks"][name]["candidates"])
    else:
        tasks[meta.get("task", "seq2seq")] = gen
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

    meta, prefix = ckpt["mmzoo"], "renderer."
    if meta.get("renderer") is None:  # a multi-task checkpoint: the text-to-image task's own entry and modules
        meta, prefix = (meta.get("tasks") or {}).get("text_to_image") or {}, "task_modules.text_to_image.renderer."
    cfg = meta.get("renderer")
    if cfg is None:
        return None, 48
    renderer = LayoutRenderer(LayoutRendererConfig.from_dict(dict(cfg), f"{where}: the renderer config"))
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    renderer.load_state_dict(state, strict=True)
    return renderer.eval(), int(meta.get("max_layout_len", 48))
