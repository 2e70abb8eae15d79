"""Key tables (data) of Florence-2's two published layouts → mmzoo's model.

- ``transformers``: transformers' native ``Florence2ForConditionalGeneration`` (the ``florence-community/*`` repos);
- ``microsoft``: Microsoft's original remote-code model (the ``microsoft/Florence-2-*`` repos), key names as in
  transformers' conversion script (``convert_florence2_original_pytorch_to_hf.py``): ``vision_tower.*`` with
  ``proj`` / ``fn.dw`` / ``fn.net`` names, ``image_projection`` stored ``[in, out]``, ``image_pos_embed``,
  ``language_model.model.*``, ``language_model.lm_head.weight``, plus ``language_model.final_logits_bias``.

Our side: the image tower is timm's DaViT under ``embedders.florence_image.tower`` (stem = stage 0's patch conv,
``stages.{s}.downsample`` the others; ``cpe1/cpe2`` the depth-wise convs, ``attn``, ``mlp``).
"""
from __future__ import annotations

from zoo.imported.bart_keys import bart_aliases, bart_table
from zoo.imported.keymap import Table

E = "embedders.florence_image."
T = E + "tower."
_WB = ("weight", "bias")


def _pairs(ours: str, theirs: str) -> list[tuple[str, str, str]]:
    return [(f"{ours}.{p}", f"{theirs}.{p}", "copy") for p in _WB]


# our block part -> (transformers' name, microsoft's name), per DaViT block kind
_BLOCK_PARTS = {
    "spatial_block": [("cpe1.proj", "conv1", "conv1.fn.dw"), ("norm1", "norm1", "window_attn.norm"),
                      ("attn.qkv", "window_attn.qkv", "window_attn.fn.qkv"),
                      ("attn.proj", "window_attn.proj", "window_attn.fn.proj"), ("cpe2.proj", "conv2", "conv2.fn.dw"),
                      ("norm2", "norm2", "ffn.norm"), ("mlp.fc1", "ffn.fc1", "ffn.fn.net.fc1"),
                      ("mlp.fc2", "ffn.fc2", "ffn.fn.net.fc2")],
    "channel_block": [("cpe1.proj", "conv1", "conv1.fn.dw"), ("norm1", "norm1", "channel_attn.norm"),
                      ("attn.qkv", "channel_attn.qkv", "channel_attn.fn.qkv"),
                      ("attn.proj", "channel_attn.proj", "channel_attn.fn.proj"), ("cpe2.proj", "conv2", "conv2.fn.dw"),
                      ("norm2", "norm2", "ffn.norm"), ("mlp.fc1", "ffn.fc1", "ffn.fn.net.fc1"),
                      ("mlp.fc2", "ffn.fc2", "ffn.fn.net.fc2")],
}


def _vision(layout: str) -> Table:
    ms = layout == "microsoft"
    vt = "vision_tower" if ms else "model.vision_tower"
    conv = "proj" if ms else "conv"
    blocks = []
    for kind, parts in _BLOCK_PARTS.items():
        for ours, native, original in parts:
            blocks += _pairs(f"{T}stages.{{s}}.blocks.{{b}}.{kind}.{ours}",
                             f"{vt}.blocks.{{s}}.{{b}}.{kind}.{original if ms else native}")
    proj = "" if ms else "model.multi_modal_projector."
    pos = "image_pos_embed" if ms else "image_position_embed"
    return {
        "global": [*_pairs(f"{T}stem.conv", f"{vt}.convs.0.{conv}"), *_pairs(f"{T}stem.norm", f"{vt}.convs.0.norm"),
                   (f"{E}row_embed.weight", f"{proj}{pos}.row_embeddings.weight", "copy"),
                   (f"{E}col_embed.weight", f"{proj}{pos}.column_embeddings.weight", "copy"),
                   (f"{E}temporal", f"{proj}visual_temporal_embed.pos_idx_to_embed", "copy"),
                   (f"{E}proj.weight", "image_projection" if ms else f"{proj}image_projection.weight",
                    "t" if ms else "copy"),
                   *_pairs(f"{E}norm", f"{proj}image_proj_norm")],
        "stage": [*_pairs(f"{T}stages.{{s}}.downsample.conv", f"{vt}.convs.{{s}}.{conv}"),
                  *_pairs(f"{T}stages.{{s}}.downsample.norm", f"{vt}.convs.{{s}}.norm")],
        "block": blocks,
    }


def florence2_table(layout: str) -> Table:
    """The full table of one layout (``transformers`` or ``microsoft``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown Florence-2 layout {layout!r}; known: {LAYOUTS}")
    lm_prefix = "language_model.model." if layout == "microsoft" else "model.language_model."
    text, vision = bart_table(lm_prefix), _vision(layout)
    table: Table = {"global": [*text["global"], *vision["global"]], "enc": text["enc"], "dec": text["dec"],
                    "stage": vision["stage"], "block": vision["block"]}
    if layout == "microsoft":
        table["global"].append(("final_logits_bias", "language_model.final_logits_bias", "vocab"))
    return table


def florence2_aliases(layout: str) -> list[tuple[str, str]]:
    if layout == "microsoft":
        return bart_aliases("language_model.model.", "language_model.lm_head.weight")
    return bart_aliases("model.language_model.", "lm_head.weight")


LAYOUTS = ("transformers", "microsoft")
