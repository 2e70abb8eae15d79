"""mmzoo's model zoo: the unified seq2seq model, its registry, vocabulary, generation and I/O.

Imports are lazy so that ``import zoo`` stays cheap.
"""
from __future__ import annotations

from zoo.version import __version__

__all__ = ["create_model", "list_models", "model_config", "load", "list_pretrained", "register_pretrained",
           "Pretrained", "UnifiedSeq2Seq", "ModelConfig", "VocabLayout", "ModelFolderError", "UnsafeModelError"]


def __getattr__(name: str):
    if name in ("create_model", "list_models", "model_config"):
        from zoo import registry

        return getattr(registry, name)
    if name in ("load", "list_pretrained", "register_pretrained"):
        from zoo import hub

        return getattr(hub, name)
    if name == "Pretrained":
        from zoo.pretrained import Pretrained

        return Pretrained
    if name in ("ModelFolderError", "UnsafeModelError"):
        from zoo import loading

        return getattr(loading, name)
    if name == "UnifiedSeq2Seq":
        from zoo.model import UnifiedSeq2Seq

        return UnifiedSeq2Seq
    if name == "ModelConfig":
        from zoo.config import ModelConfig

        return ModelConfig
    if name == "VocabLayout":
        from zoo.vocab import VocabLayout

        return VocabLayout
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
