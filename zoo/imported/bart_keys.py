"""Key tables (data) of BART's encoder-decoder in Hugging Face's layout → mmzoo's backbone.

``bart_table(prefix)``: the language model under ``prefix`` (``model.`` in ``BartForConditionalGeneration``,
``model.language_model.`` in transformers' Florence-2, ``language_model.model.`` in Microsoft's original one).
"""
from __future__ import annotations

from zoo.imported.keymap import Table

_LN = ("weight", "bias")


def _linear(ours: str, theirs: str) -> list[tuple[str, str, str]]:
    return [(f"{ours}.{p}", f"{theirs}.{p}", "copy") for p in _LN]


def _fused(ours: str, theirs: str, parts: tuple[str, ...]) -> list[tuple[str, list[str], str]]:
    return [(f"{ours}.{p}", [f"{theirs}.{x}_proj.{p}" for x in parts], "cat") for p in _LN]


def bart_table(prefix: str) -> Table:
    """The BART encoder-decoder (shared embedding, learned positions, embedding LayerNorms, post-norm layers)."""
    enc, dec = f"{prefix}encoder.layers.{{i}}", f"{prefix}decoder.layers.{{i}}"
    return {
        "global": [
            ("embed_tokens.weight", f"{prefix}shared.weight", "vocab"),
            ("enc_pos.weight", f"{prefix}encoder.embed_positions.weight", "copy"),
            ("dec_pos.weight", f"{prefix}decoder.embed_positions.weight", "copy"),
            *_linear("enc_embed_norm", f"{prefix}encoder.layernorm_embedding"),
            *_linear("dec_embed_norm", f"{prefix}decoder.layernorm_embedding"),
        ],
        "enc": [
            *_fused("encoder.{i}.attn.qkv", f"{enc}.self_attn", ("q", "k", "v")),
            *_linear("encoder.{i}.attn.out", f"{enc}.self_attn.out_proj"),
            *_linear("encoder.{i}.ln1", f"{enc}.self_attn_layer_norm"),
            *_linear("encoder.{i}.ffn.fc1", f"{enc}.fc1"),
            *_linear("encoder.{i}.ffn.fc2", f"{enc}.fc2"),
            *_linear("encoder.{i}.ln2", f"{enc}.final_layer_norm"),
        ],
        "dec": [
            *_fused("decoder.{i}.self_attn.qkv", f"{dec}.self_attn", ("q", "k", "v")),
            *_linear("decoder.{i}.self_attn.out", f"{dec}.self_attn.out_proj"),
            *_linear("decoder.{i}.ln1", f"{dec}.self_attn_layer_norm"),
            *_linear("decoder.{i}.cross_attn.q", f"{dec}.encoder_attn.q_proj"),
            *_fused("decoder.{i}.cross_attn.kv", f"{dec}.encoder_attn", ("k", "v")),
            *_linear("decoder.{i}.cross_attn.out", f"{dec}.encoder_attn.out_proj"),
            *_linear("decoder.{i}.ln2", f"{dec}.encoder_attn_layer_norm"),
            *_linear("decoder.{i}.ffn.fc1", f"{dec}.fc1"),
            *_linear("decoder.{i}.ffn.fc2", f"{dec}.fc2"),
            *_linear("decoder.{i}.ln3", f"{dec}.final_layer_norm"),
        ],
    }


def bart_aliases(prefix: str, lm_head: str) -> list[tuple[str, str]]:
    """Tied copies of the shared embedding that a checkpoint may also hold."""
    shared = f"{prefix}shared.weight"
    return [(f"{prefix}encoder.embed_tokens.weight", shared), (f"{prefix}decoder.embed_tokens.weight", shared),
            (lm_head, shared)]


#: ``BartForConditionalGeneration`` (plus its ``final_logits_bias`` buffer)
BART_TABLE: Table = {**bart_table("model."),
                     "global": [*bart_table("model.")["global"], ("final_logits_bias", "final_logits_bias", "vocab")]}
BART_ALIASES = bart_aliases("model.", "lm_head.weight")
