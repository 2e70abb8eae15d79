"""Built-in architectures: OFA's published sizes plus CPU-sized and micro test variants.

The text vocabulary size comes from the tokenizer at build time (``vocab={"text_size": ...}``).
"""
from __future__ import annotations

from typing import Any

from zoo.arch_registry import register_model

_VOCAB = {"text_size": 1024, "image_code_size": 512, "loc_bins": 100}


def _image(backbone: str, out_index: int, size: int) -> dict[str, Any]:
    return {"backbone": backbone, "out_index": out_index, "image_size": size}


@register_model("test-tiny")
def test_tiny() -> dict[str, Any]:
    """Micro model for unit tests."""
    return dict(d_model=32, n_heads=2, enc_layers=1, dec_layers=1, ffn_dim=64, max_positions=64,
                vocab={"text_size": 300, "image_code_size": 16, "loc_bins": 4},
                modalities={"image": _image("timm:test_resnet", 2, 32)})


@register_model("test-vit")
def test_vit() -> dict[str, Any]:
    """Micro model with a ViT image backbone (timm ``test_vit``)."""
    return dict(d_model=32, n_heads=2, enc_layers=1, dec_layers=1, ffn_dim=64, max_positions=64,
                vocab={"text_size": 300, "image_code_size": 16, "loc_bins": 4},
                modalities={"image": {**_image("timm:test_vit", -1, 160)}})


@register_model("ofa-tiny")
def ofa_tiny() -> dict[str, Any]:
    """OFA-tiny dimensions (d256, 4+4 layers) with a ResNet-10t image stem at 64 px (stride 16 → 4×4
    patches; stride 8 measured 1.9× slower per step on a 2-core CPU): trains on a laptop CPU."""
    return dict(d_model=256, n_heads=4, enc_layers=4, dec_layers=4, ffn_dim=1024, vocab=dict(_VOCAB),
                modalities={"image": _image("timm:resnet10t", 3, 64)})


def _ofa_published(d: int, heads: int, enc: int, dec: int, ffn: int, resnet: str, size: int) -> dict[str, Any]:
    """OFA's published sizes: BPE text of 50k, 8192 image codes, 1000 location bins, a ResNet stage-3 stem."""
    return dict(d_model=d, n_heads=heads, enc_layers=enc, dec_layers=dec, ffn_dim=ffn, max_positions=1024,
                vocab=dict(_VOCAB, text_size=50000, image_code_size=8192, loc_bins=1000),
                modalities={"image": _image(f"timm:{resnet}", 3, size)})


@register_model("ofa-medium")
def ofa_medium() -> dict[str, Any]:
    return _ofa_published(512, 8, 4, 4, 2048, "resnet50", 256)


@register_model("ofa-base")
def ofa_base() -> dict[str, Any]:
    return _ofa_published(768, 12, 6, 6, 3072, "resnet101", 384)


@register_model("ofa-large")
def ofa_large() -> dict[str, Any]:
    return _ofa_published(1024, 16, 12, 12, 4096, "resnet152", 480)


@register_model("ofa-huge")
def ofa_huge() -> dict[str, Any]:
    return _ofa_published(1280, 16, 24, 12, 5120, "resnet152", 480)
