"""The unified vocabulary: one id space in contiguous ranges.

Layout (recorded in every saved config):
    specials | text BPE | image codes (VQ codebook) | location bins
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


@dataclass(frozen=True)
class VocabLayout:
    """Sizes of the id ranges of the unified vocabulary, in order."""

    text_size: int
    image_code_size: int = 0
    loc_bins: int = 0
    num_specials: int = len(SPECIAL_TOKENS)

    def __post_init__(self) -> None:
        for name in ("text_size", "image_code_size", "loc_bins"):
            if getattr(self, name) < 0:
                raise ValueError(f"VocabLayout.{name} must be >= 0, got {getattr(self, name)}")
        if self.num_specials != len(SPECIAL_TOKENS):
            raise ValueError(f"num_specials must be {len(SPECIAL_TOKENS)}")

    # --- range starts -------------------------------------------------------------------------
    @property
    def text_start(self) -> int:
        return self.num_specials

    @property
    def image_code_start(self) -> int:
        return self.text_start + self.text_size

    @property
    def loc_start(self) -> int:
        return self.image_code_start + self.image_code_size

    @property
    def size(self) -> int:
        return self.loc_start + self.loc_bins

    def ranges(self) -> dict[str, tuple[int, int]]:
        """Half-open ``[start, end)`` range of every segment."""
        return {
            "specials": (0, self.num_specials),
            "text": (self.text_start, self.image_code_start),
            "image_codes": (self.image_code_start, self.loc_start),
            "loc_bins": (self.loc_start, self.size),
        }

    # --- id mapping (vectorised) --------------------------------------------------------------
    def codes_to_unified(self, codes: torch.Tensor) -> torch.Tensor:
        return codes + self.image_code_start

    def unified_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        return ids - self.image_code_start

    def allowed_mask(self, *segments: str, eos: bool = True) -> torch.Tensor:
        """Boolean ``[size]`` mask that allows the named ranges (and EOS)."""
        mask = torch.zeros(self.size, dtype=torch.bool)
        ranges = self.ranges()
        for seg in segments:
            if seg not in ranges:
                raise KeyError(f"unknown vocabulary segment {seg!r}; known: {sorted(ranges)}")
            start, end = ranges[seg]
            mask[start:end] = True
        if eos:
            mask[EOS_ID] = True
        return mask

    def to_dict(self) -> dict:
        return {**asdict(self), "ranges": {k: list(v) for k, v in self.ranges().items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "VocabLayout":
        layout = cls(
            text_size=int(d["text_size"]),
            image_code_size=int(d.get("image_code_size", 0)),
            loc_bins=int(d.get("loc_bins", 0)),
            num_specials=int(d.get("num_specials", len(SPECIAL_TOKENS))),
        )
        recorded = d.get("ranges")
        if recorded is not None and {k: list(v) for k, v in layout.ranges().items()} != recorded:
            raise ValueError(f"vocabulary ranges in config {recorded} disagree with sizes {layout.ranges()}")
        return layout
