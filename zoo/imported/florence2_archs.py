"""Florence-2's architectures in the registry, and the pretrained names of the published weights.

The sizes are those of the published configs (text: BART base / large layer form; image: timm's DaViT towers at
768 px). The vocabulary is transformers' layout (51,328 rows: BART's 50,265 + Florence-2's 1,024 task and location
tokens + ``<image>``, padded to a multiple of 64); loading a checkpoint takes its own size from its config.json.
"""
from __future__ import annotations

from typing import Any

from zoo.arch_registry import register_model

#: BART's layer form as Florence-2 uses it (zoo/config.py options)
BART_FORM: dict[str, Any] = dict(norm_first=False, embed_norm=True, embed_scale=False, pos_offset=2,
                                 enc_positions="sequence", type_embed=False, activation="gelu")
_VOCAB = {"text_size": 51328 - 4}

#: ``arch.tag`` → Hub repo (MIT licence); ``ms`` = Microsoft's original layout, ``community`` = transformers' layout
FLORENCE2_PRETRAINED = {
    "florence2-base.ms": "microsoft/Florence-2-base",
    "florence2-base.ms-ft": "microsoft/Florence-2-base-ft",
    "florence2-large.ms": "microsoft/Florence-2-large",
    "florence2-large.ms-ft": "microsoft/Florence-2-large-ft",
    "florence2-base.community": "florence-community/Florence-2-base",
    "florence2-base.community-ft": "florence-community/Florence-2-base-ft",
    "florence2-large.community": "florence-community/Florence-2-large",
    "florence2-large.community-ft": "florence-community/Florence-2-large-ft",
}


@register_model("florence2-base")
def florence2_base() -> dict[str, Any]:
    """Florence-2-base (0.23B): BART-base text (d768, 6+6 layers) + DaViT-base (``davit_base_fl``) at 768 px."""
    return dict(d_model=768, n_heads=12, enc_layers=6, dec_layers=6, ffn_dim=3072, max_positions=1024, **BART_FORM,
                vocab=dict(_VOCAB), modalities={"florence_image": {"tower": "davit_base_fl", "image_size": 768}})


@register_model("florence2-large")
def florence2_large() -> dict[str, Any]:
    """Florence-2-large (0.77B): BART-large text (d1024, 12+12 layers) + DaViT-huge (``davit_huge_fl``) at 768 px."""
    return dict(d_model=1024, n_heads=16, enc_layers=12, dec_layers=12, ffn_dim=4096, max_positions=1024,
                **BART_FORM, vocab=dict(_VOCAB),
                modalities={"florence_image": {"tower": "davit_huge_fl", "image_size": 768}})


def _small_davit(dims: list[int], heads: list[int], window: int, size: int) -> dict[str, Any]:
    """A CPU-sized 4-stage DaViT image tokenizer (depths 1, 1, 2, 1) of the given widths, heads, window and size."""
    return {"tower": "davit_base_fl", "depths": [1, 1, 2, 1], "embed_dims": dims, "num_heads": heads,
            "window_size": window, "image_size": size, "max_pos_embeddings": 24, "max_temporal_embeddings": 12}


@register_model("test-florence2")
def test_florence2() -> dict[str, Any]:
    """Micro Florence-2 for tests: d32, 2+2 layers, a 4-stage DaViT of widths 16..64 at 64 px (5 image tokens)."""
    return dict(d_model=32, n_heads=4, enc_layers=2, dec_layers=2, ffn_dim=64, max_positions=256, **BART_FORM,
                vocab={"text_size": 1300},
                modalities={"florence_image": _small_davit([16, 32, 48, 64], [2, 2, 4, 4], window=3, size=64)})


@register_model("florence2-small")
def florence2_small() -> dict[str, Any]:
    """CPU-sized Florence-2 for training from scratch (2.8M parameters): d128, 3+3 layers, a 4-stage DaViT of widths
    32..128 at 128 px (17 image tokens). Pre-norm layers (the published sizes are BART's post-norm): from random
    weights the post-norm form washed the image out of the encoder and had not learned to read it after 500 Shapes
    steps, the pre-norm one reached val mAP@0.5 0.09 by step 874 (docs/guides/florence2.md). ``experiment=od_shapes``
    reads it at 256 px (65 image tokens) with its DaViT pretrained on the scenes' dense labels."""
    form = {**BART_FORM, "norm_first": True, "embed_norm": False}
    return dict(d_model=128, n_heads=4, enc_layers=3, dec_layers=3, ffn_dim=512, max_positions=256, **form,
                vocab={"text_size": 1300},
                modalities={"florence_image": _small_davit([32, 64, 96, 128], [2, 4, 4, 4], window=4, size=128)})
