"""Task specs shared by training and inference: one file per task plus a :func:`register_task_spec` line.

``task_spec(name)`` returns a registered :class:`TaskSpec` (the built-in ones are registered on first use).
"""
from __future__ import annotations

import importlib

from zoo.task_specs.base import (DEFAULT_GENERATION, TEXT_TASK, TaskSpec, decode_text, encode_text,
                                 register_task_spec, registered_specs, text_batch, unified_text_ids)

__all__ = ["TaskSpec", "TEXT_TASK", "DEFAULT_GENERATION", "register_task_spec", "task_spec", "task_specs",
           "encode_text", "unified_text_ids", "text_batch", "decode_text"]


#: the built-in specs, in the order they are listed (model card, errors)
BUILTIN = ("caption", "vqa", "sensor_to_text", "text_to_image")


def _load_builtin() -> None:
    for name in BUILTIN:  # each module registers its spec when first imported
        importlib.import_module(f"zoo.task_specs.{name}")


def task_specs() -> dict[str, TaskSpec]:
    """Every registered spec: name → spec (the built-ins first, then the others in registration order)."""
    _load_builtin()
    specs = registered_specs()
    return {**{n: specs[n] for n in BUILTIN}, **specs}


def task_spec(name: str) -> TaskSpec:
    """The registered spec of task ``name``."""
    specs = task_specs()
    if name not in specs:
        raise KeyError(f"no task spec {name!r}; registered: {sorted(specs)}")
    return specs[name]
