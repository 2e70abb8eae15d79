"""Architecture registry, timm style: ``@register_model`` where an architecture is defined.

The table itself lives in :mod:`zoo.arch_registry` (which the architecture files import); this module looks
names up in it after loading the built-in architectures.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from zoo.arch_registry import ARCHITECTURES as _ARCHS
from zoo.arch_registry import register_model
from zoo.config import ModelConfig

__all__ = ["register_model", "list_models", "model_config", "create_model"]


def list_models(pattern: str = "*") -> list[str]:
    """Registered architecture names matching a glob pattern."""
    import fnmatch

    _load_builtin()
    return sorted(n for n in _ARCHS if fnmatch.fnmatch(n, pattern))


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The ``ModelConfig`` of a registered architecture with field overrides applied."""
    _load_builtin()
    arch = name.split(".", 1)[0]  # "ofa-tiny.shapes" → architecture "ofa-tiny"
    if arch not in _ARCHS:
        raise KeyError(f"unknown architecture {arch!r}; registered: {', '.join(sorted(_ARCHS))}")
    d = dict(_ARCHS[arch]())
    valid = {f.name for f in fields(ModelConfig)}
    bad = set(overrides) - valid
    if bad:
        raise ValueError(f"unknown override(s) {sorted(bad)} for {arch!r}; valid: {sorted(valid)}")
    modality_over = overrides.pop("modalities", None) or {}
    d.update(overrides)
    mods = {k: dict(v) for k, v in d.get("modalities", {}).items()}
    for m, over in modality_over.items():
        mods[m] = {**mods.get(m, {}), **dict(over)}
    d["modalities"] = mods
    d["arch"] = arch
    return ModelConfig(**d)


def create_model(name: str, **overrides: Any):
    """Build a registered architecture (randomly initialised)."""
    from zoo.model import UnifiedSeq2Seq

    return UnifiedSeq2Seq(model_config(name, **overrides))


def _load_builtin() -> None:
    from zoo import architectures  # noqa: F401  (registers the built-in sizes)
    from zoo.imported import florence2_archs  # noqa: F401  (Florence-2's sizes)
