"""Model configuration: a plain dataclass, serialised to ``config.json`` (no code, no ``_target_``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from modalities.base import get_modality, legacy_type_index, list_modalities
from zoo.vocab import VocabLayout

ENC_POSITIONS = ("segment", "sequence")
FFN_KINDS = ("dense", "multiway", "moe")
ATTENTION_KINDS = ("standard", "lfa")
#: feed-forward activation → ``F.gelu``'s ``approximate``: exact (erf) GELU, as HF Bart, or the tanh approximation
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}


@dataclass
class ModelConfig:
    """Architecture of the unified encoder-decoder."""

    arch: str = "custom"
    d_model: int = 256
    n_heads: int = 4
    enc_layers: int = 4
    dec_layers: int = 4
    ffn_dim: int = 1024
    # FFN activation: gelu (exact; bf16 forward+backward 2.3x faster on the CPU than the tanh form) | gelu_tanh
    activation: str = "gelu"
    dropout: float = 0.0
    attn_dropout: float = 0.0
    max_positions: int = 256
    # [rows, cols]: factorised row + column embeddings added to the first rows*cols decoder positions, so
    # an image-code target (raster order) starts with its 2-D layout instead of learning it from 1-D positions
    dec_grid: list[int] | None = None
    norm_eps: float = 1e-5
    attn_impl: str = "auto"  # auto | sdpa | math  (auto: sdpa on CUDA, explicit math on CPU)
    grad_checkpointing: bool = False
    # backbone variants (zoo/variants.py): feed-forward dense | multiway (BEiT-3) | moe (Switch/GLaM)
    ffn: str = "dense"
    num_experts: int = 4  # moe
    moe_top_k: int = 1  # moe: 1 (Switch) or 2 (GShard/GLaM)
    moe_capacity_factor: float = 1.25  # moe: expert capacity = factor * top_k * tokens / experts (training)
    moe_aux_weight: float = 0.01  # moe: weight of the load-balancing loss (summed over MoE layers)
    attention: str = "standard"  # standard | lfa (Yuan 2.0 localized filtering before self-attention)
    lfa_kernel: int = 2  # lfa: taps of each depthwise convolution
    # layer form (BART / Florence-2 set these; the defaults are mmzoo's own pre-norm form)
    norm_first: bool = True  # pre-norm layers + final LayerNorms | post-norm layers (x = ln(x + f(x))), no final norm
    embed_norm: bool = False  # LayerNorm on the encoder's and the decoder's input embeddings
    embed_scale: bool = False  # token embeddings times sqrt(d_model)
    pos_offset: int = 0  # learned positions start at this row (BART: 2)
    enc_positions: str = "segment"  # segment: text segments count from 0 | sequence: over the whole encoder input
    type_embed: bool = True  # add a learned modality-type embedding to every segment
    logits_bias: bool = False  # a (buffer) bias on the tied output projection (BART's final_logits_bias)
    vocab: dict[str, Any] = field(default_factory=lambda: {"text_size": 0})
    modalities: dict[str, dict[str, Any]] = field(default_factory=dict)
    # modality -> row of the modality-type embedding (None: the rows of models saved before the modality registry,
    # text/image/image_codes/sensor = 0..3, then the model's other typed modalities); saved, so a modality
    # registered later never changes this model's shapes
    type_index: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.dec_grid is not None:
            self.dec_grid = [int(n) for n in self.dec_grid]
            if len(self.dec_grid) != 2 or min(self.dec_grid) < 1:
                raise ValueError(f"dec_grid must be [rows, cols] of positive ints, got {self.dec_grid}")
            if self.dec_grid[0] * self.dec_grid[1] > self.max_positions:
                raise ValueError(f"dec_grid {self.dec_grid} has more cells than max_positions={self.max_positions}")
        if self.attn_impl not in ("auto", "sdpa", "math"):
            raise ValueError(f"attn_impl must be auto|sdpa|math, got {self.attn_impl!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.ffn == "moe" and not 1 <= self.moe_top_k <= min(2, self.num_experts):
            raise ValueError(f"moe_top_k must be 1 or 2 (and <= num_experts={self.num_experts}), got {self.moe_top_k}")
        if self.ffn == "moe" and self.moe_capacity_factor <= 0:
            raise ValueError(f"moe_capacity_factor must be > 0, got {self.moe_capacity_factor}")
        if self.attention == "lfa" and self.lfa_kernel < 1:
            raise ValueError(f"lfa_kernel must be >= 1, got {self.lfa_kernel}")
        if self.enc_positions not in ENC_POSITIONS:
            raise ValueError(f"enc_positions must be one of {ENC_POSITIONS}, got {self.enc_positions!r}")
        if self.pos_offset < 0:
            raise ValueError(f"pos_offset must be >= 0, got {self.pos_offset}")
        if isinstance(self.vocab, VocabLayout):
            self.vocab = self.vocab.to_dict()
        self._check_modalities()

    def _check_modalities(self) -> None:
        """Every modality is a registered encoder input; untyped ones need ``type_embed=False``; fills
        :attr:`type_index` (legacy rows first, then the model's other typed modalities in order)."""
        known = [m for m in list_modalities() if get_modality(m).is_input]
        unknown = [m for m in self.modalities if m not in known]
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; known: {known}")
        untyped = [m for m in self.modalities if not get_modality(m).typed]
        if untyped and self.type_embed:
            raise ValueError(f"modalities {sorted(untyped)} have no type embedding; they need type_embed=False")
        index = dict(legacy_type_index()) if self.type_index is None else dict(self.type_index)
        if any(not isinstance(k, str) or not isinstance(v, int) or isinstance(v, bool) or v < 0
               for k, v in index.items()) or len(set(index.values())) != len(index) or "text" not in index:
            raise ValueError(f"type_index must map text and each typed modality to a distinct row >= 0, got {index}")
        for m in self.modalities:
            if m not in index and get_modality(m).typed:
                index[m] = max(index.values()) + 1
        self.type_index = index

    @property
    def num_types(self) -> int:
        """Rows of the modality-type embedding."""
        return max(self.type_index.values()) + 1

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
        # configs saved before ``activation`` existed were trained with the tanh approximation
        return cls(**{"activation": "gelu_tanh", **d})

    @property
    def gelu_approximate(self) -> str:
        """``F.gelu``'s ``approximate`` argument for :attr:`activation`."""
        return ACTIVATIONS[self.activation]
