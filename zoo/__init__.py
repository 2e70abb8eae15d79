"""mmzoo's model zoo: the unified seq2seq model, its registry, vocabulary, generation and I/O.

Imports are lazy so that ``import zoo`` stays cheap: each public name is read from its module on first use (PEP 562).
"""
from __future__ import annotations

import importlib
from typing import Any

from zoo.version import __version__

_HOME = {  # public name → the module that defines it
    "create_model": "zoo.registry", "list_models": "zoo.registry", "model_config": "zoo.registry",
    "load": "zoo.hub", "list_pretrained": "zoo.hub", "register_pretrained": "zoo.hub",
    "Pretrained": "zoo.pretrained", "UnifiedSeq2Seq": "zoo.model", "ModelConfig": "zoo.config",
    "VocabLayout": "zoo.vocab", "ModelFolderError": "zoo.loading", "UnsafeModelError": "zoo.loading",
}
__all__ = list(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'zoo' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
