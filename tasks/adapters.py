"""Fine-tuning a pretrained model: LoRA adapters (peft), freezing, and the model ``zoo-finetune`` starts from.

``tasks.cli.train.train`` calls :func:`from_pretrained` when ``cfg.pretrained`` is set; :mod:`tasks.checkpoint`
merges the LoRA adapters of a fine-tuned checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:  # torch and Lightning load lazily: `zoo-finetune --help` stays instant
    from torch import nn

FINETUNE_MODES = ("full", "frozen_encoder", "lora")
#: The backbone's linear layers: fused self-attention QKV, cross-attention Q and KV, outputs, FFN.
LORA_TARGETS = ("qkv", "q", "kv", "out", "fc1", "fc2")
LORA_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": list(LORA_TARGETS)}


# ------------------------------------------------------------------------------------------------
# LoRA (peft) and freezing
# ------------------------------------------------------------------------------------------------
def lora_target_regex(targets: Sequence[str] = LORA_TARGETS) -> str:
    """A regex (peft full-matches module names) selecting ``targets`` only inside encoder/decoder layers,
    so same-named layers of an image backbone (e.g. a ViT's ``qkv``) are left alone."""
    return rf"(encoder|decoder)\.\d+\.(.*\.)?({'|'.join(targets)})"


def lora_config(r: int = 8, alpha: int = 16, dropout: float = 0.0,
                target_modules: Sequence[str] = LORA_TARGETS) -> Any:
    """A ``peft.LoraConfig`` for the backbone's linear layers."""
    from peft import LoraConfig

    bad = set(target_modules) - set(LORA_TARGETS)
    if bad:
        raise ValueError(f"finetune.lora.target_modules {sorted(bad)} are not backbone linear layers {LORA_TARGETS}")
    return LoraConfig(r=int(r), lora_alpha=int(alpha), lora_dropout=float(dropout), bias="none",
                      target_modules=lora_target_regex(list(target_modules)))


def apply_lora(model: nn.Module, **lora: Any) -> Any:
    """Wrap ``model`` in a ``peft.PeftModel`` with LoRA adapters (only adapters train). The wrapper forwards
    attribute access (``encode``, ``decode_hidden``, ``cfg``, ...) to the model."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(**{**LORA_DEFAULTS, **lora}))


def save_adapter(peft_model: Any, folder: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors``."""
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def load_adapter(model: nn.Module, folder: str | Path, trainable: bool = False) -> Any:
    """Attach saved LoRA adapters (safetensors only) to a base model → ``PeftModel``."""
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors (only safetensors adapters are loaded)")
    return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable, use_safetensors=True)


def merge_lora(peft_model: Any) -> nn.Module:
    """Fold the adapters into the base weights and return the plain model."""
    return peft_model.merge_and_unload()


def freeze_encoder(model: nn.Module) -> None:
    """Freeze modality embedders, encoder layers, encoder positions/norms and type embeddings (the tied
    token embedding stays trainable: the decoder uses it)."""
    for name, p in model.named_parameters():
        if name.startswith(("embedders.", "encoder.", "enc_norm.", "enc_embed_norm.", "enc_pos.", "type_embed.")):
            p.requires_grad_(False)


def _stay_eval(module: nn.Module, args: Any) -> None:
    module.training = False


def freeze_batchnorm_stats(module: nn.Module) -> int:
    """Keep the BatchNorm layers of a frozen part in eval mode (their running statistics are weights too:
    training would change them, and LoRA adapters would then not describe the whole change)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    n = 0
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.register_forward_pre_hook(_stay_eval)
            n += 1
    return n


def prepare_model(model: nn.Module, mode: str = "full", lora: dict[str, Any] | None = None) -> nn.Module:
    """Apply a fine-tuning mode: ``full`` | ``frozen_encoder`` | ``lora`` (frozen parts keep their
    BatchNorm statistics)."""
    if mode not in FINETUNE_MODES:
        raise ValueError(f"finetune.mode must be one of {FINETUNE_MODES}, got {mode!r}")
    model.train()
    if mode == "frozen_encoder":
        freeze_encoder(model)
        freeze_batchnorm_stats(model.embedders)
    elif mode == "lora":
        freeze_batchnorm_stats(model)
        model = apply_lora(model, **(lora or {}))
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ------------------------------------------------------------------------------------------------
# The hook used by tasks.cli.train.train (cfg.pretrained)
# ------------------------------------------------------------------------------------------------
def finetune_settings(cfg: DictConfig) -> dict[str, Any]:
    raw = cfg.get("finetune") or {}
    ft = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else dict(raw)
    lora = {**LORA_DEFAULTS, **(ft.get("lora") or {})}
    return {"mode": ft.get("mode", "full"), "lora": lora, "allow_pickle": bool(ft.get("allow_pickle", False))}


def from_pretrained(cfg: DictConfig) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load ``cfg.pretrained`` and prepare it for ``cfg.finetune.mode`` → ``(model, tokenizer, info)``; ``info``
    (starting point, mode, LoRA settings, the model's task settings) goes into every checkpoint as
    ``checkpoint["mmzoo_finetune"]`` (the task's ``finetune_info``), so ``zoo-export`` can rebuild LoRA checkpoints
    and write the model card."""
    from zoo.hub import load

    ft = finetune_settings(cfg)
    bundle = load(str(cfg.pretrained), allow_pickle=ft["allow_pickle"])
    model = prepare_model(bundle.model, ft["mode"], ft["lora"])
    trainable, total = count_trainable(model)
    print(f"[mmzoo] fine-tuning {bundle.source} ({bundle.model.cfg.arch}) mode={ft['mode']}: "
          f"{trainable / 1e6:.3f}M of {total / 1e6:.2f}M parameters trainable")
    info = {"pretrained": str(cfg.pretrained), "mode": ft["mode"], "tasks": bundle.tasks}
    for key in ("generation", "meta"):  # imported checkpoints (Florence-2): decoding defaults and provenance
        if isinstance(getattr(bundle, key, None), dict):
            info[key] = dict(getattr(bundle, key))
    if ft["mode"] == "lora":
        info["lora"] = ft["lora"]
    return model, bundle.tokenizer, info
