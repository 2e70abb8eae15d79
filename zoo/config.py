"""Model configuration: a plain dataclass, serialised to ``config.json`` (no code, no ``_target_``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from zoo.vocab import VocabLayout

MODALITY_TYPES = ("text", "image", "image_codes", "sensor")


@dataclass
class ModelConfig:
    """Architecture of the unified encoder-decoder."""

    arch: str = "custom"
    d_model: int = 256
    n_heads: int = 4
    enc_layers: int = 4
    dec_layers: int = 4
    ffn_dim: int = 1024
    dropout: float = 0.0
    attn_dropout: float = 0.0
    max_positions: int = 256
    norm_eps: float = 1e-5
    attn_impl: str = "auto"  # auto | sdpa | math  (auto: sdpa on CUDA, explicit math on CPU)
    grad_checkpointing: bool = False
    vocab: dict[str, Any] = field(default_factory=lambda: {"text_size": 0})
    modalities: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.attn_impl not in ("auto", "sdpa", "math"):
            raise ValueError(f"attn_impl must be auto|sdpa|math, got {self.attn_impl!r}")
        if isinstance(self.vocab, VocabLayout):
            self.vocab = self.vocab.to_dict()
        unknown = set(self.modalities) - set(MODALITY_TYPES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; known: {MODALITY_TYPES}")

    @property
    def layout(self) -> VocabLayout:
        return VocabLayout.from_dict(self.vocab)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(**d)
