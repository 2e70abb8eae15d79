"""The architecture table: name → a function returning the ``ModelConfig`` fields (``@register_model``).

A leaf module, so that the files defining architectures (``zoo.architectures``, ``zoo.imported.florence2_archs``,
a user's own) can register without importing :mod:`zoo.registry`, which loads them.
"""
from __future__ import annotations

from typing import Any, Callable

#: architecture name → function returning its ``ModelConfig`` fields
ARCHITECTURES: dict[str, Callable[[], dict[str, Any]]] = {}


def register_model(name: str) -> Callable[[Callable[[], dict[str, Any]]], Callable[[], dict[str, Any]]]:
    """Register a function returning the architecture's ``ModelConfig`` fields under ``name``."""

    def deco(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is already registered")
        ARCHITECTURES[name] = fn
        return fn

    return deco
