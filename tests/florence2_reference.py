"""Tiny random Florence-2 checkpoints built with transformers (the reference), for tests and benchmarks.

``build_reference`` saves a ``Florence2ForConditionalGeneration`` with its processor (a small byte-level BPE with
BART's specials, the location tokens and ``<image>``; a CLIP image processor with ``image_seq_length``) into a
folder, as transformers writes the ``florence-community/*`` repos.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

TEXTS = ["What does the image describe?", "Describe in detail what is shown in the image.",
         "Describe with a paragraph what is shown in the image.", "Locate the objects with category name in the image.",
         "Locate the objects in the image, with their descriptions.", "Locate the phrases in the caption: a red cat",
         "What is the text in the image?", "a cat sitting on a mat next to a dog", "a person riding a bicycle"]


def grid(image_size: int) -> int:
    side = math.ceil(image_size / 4)
    for _ in range(3):
        side = (side - 1) // 2 + 1
    return side


def build_tokenizer(path: Path, vocab_size: int = 400) -> Any:
    """A byte-level BPE with ``<s> <pad> </s> <unk>`` at 0..3, ``<mask>``, Florence-2's extra tokens, ``<image>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from zoo.imported.florence2 import MS_EXTRA_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 20, trainer=trainer)
    tok.add_special_tokens(["<mask>"])
    tok.add_special_tokens(list(MS_EXTRA_TOKENS))
    tok.add_special_tokens(["<image>"])
    tok.save(str(path))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>", extra_special_tokens={"image_token": "<image>"})


def build_reference(folder: Path, *, image_size: int = 64, depths=(1, 1, 2, 1), dims=(16, 32, 48, 64),
                    heads=(2, 2, 4, 4), window: int = 3, d_model: int = 32, layers: int = 2, ffn: int = 64,
                    n_heads: int = 4, scale_embedding: bool = False, seed: int = 0, vocab_rows: int | None = None,
                    max_positions: int = 256, generation: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Save a random transformers Florence-2 (+ processor, generation config, MIT model card) into ``folder``."""
    import torch
    from transformers import (BartConfig, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor, GenerationConfig)

    from zoo.imported.florence2 import BANNED_GROUNDING

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder / "tokenizer.json")
    vocab = max(len(tokenizer), vocab_rows or 0)  # rows beyond the tokenizer: padding, as the published models
    text = BartConfig(vocab_size=vocab, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                      encoder_attention_heads=n_heads, decoder_attention_heads=n_heads, encoder_ffn_dim=ffn,
                      decoder_ffn_dim=ffn, max_position_embeddings=max_positions, scale_embedding=scale_embedding,
                      dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    vision = dict(depths=list(depths), embed_dim=list(dims), num_heads=list(heads), num_groups=list(heads),
                  window_size=window, projection_dim=d_model, max_position_embeddings=24, max_temporal_embeddings=12,
                  drop_path_rate=0.0)
    cfg = Florence2Config(text_config=text.to_dict(), vision_config=vision, image_token_id=tokenizer.image_token_id)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random LayerNorm affine and biases too, so that a wrong mapping shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.generation_config = GenerationConfig(**{"decoder_start_token_id": 2, "eos_token_id": 2, "pad_token_id": 1,
                                                  "bos_token_id": 0, "forced_eos_token_id": 2,
                                                  **(generation or {})})
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"height": image_size, "width": image_size}, do_center_crop=False,
                                         crop_size={"height": image_size, "width": image_size},
                                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                                         resample=3, image_seq_length=1 + grid(image_size) ** 2)
    post = {"pure_text": {}, "description_with_bboxes": {}, "description_with_polygons": {}, "polygons": {},
            "bboxes": {}, "description_with_bboxes_or_polygons": {},
            "ocr": {"pattern": r"(.+?)" + r"<loc_(\d+)>" * 8, "area_threshold": 0.0},
            "phrase_grounding": {"banned_grounding_tokens": sorted(BANNED_GROUNDING)}}
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer, post_processor_config=post)
    processor.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# tiny random Florence-2 (test)\n", encoding="utf-8")
    return model, processor


def microsoft_config(native: dict) -> dict:
    """A Microsoft-layout config.json (remote-code names) for the same sizes."""
    v, t = native["vision_config"], native["text_config"]
    return {"model_type": "florence2", "architectures": ["Florence2ForConditionalGeneration"],
            "auto_map": {"AutoConfig": "configuration_florence2.Florence2Config",
                         "AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration"},
            "vocab_size": t["vocab_size"], "projection_dim": v["projection_dim"],
            "text_config": {**t, "model_type": "florence2_language"},
            "vision_config": {"model_type": "davit", "dim_embed": v["embed_dim"], "depths": v["depths"],
                              "num_heads": v["num_heads"], "num_groups": v["num_groups"],
                              "window_size": v["window_size"], "projection_dim": v["projection_dim"],
                              "patch_size": v["patch_size"], "patch_stride": v["patch_stride"],
                              "patch_padding": v["patch_padding"], "patch_prenorm": v["patch_prenorm"],
                              "image_pos_embed": {"type": "learned_abs_2d",
                                                  "max_pos_embeddings": v["max_position_embeddings"]},
                              "visual_temporal_embedding": {"type": "COSINE",
                                                            "max_temporal_embeddings": v["max_temporal_embeddings"]},
                              "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"]}}


def write_microsoft(native_folder: Path, out: Path, model: Any) -> None:
    """The same weights in Microsoft's layout: our state dict through the table's inverse, as pytorch_model.bin;
    a tokenizer without the location tokens (the remote processor adds them); preprocessor_config.json."""
    import json

    import torch
    from tokenizers import Tokenizer

    from zoo.imported.florence2 import MS_EXTRA_TOKENS
    from zoo.imported.florence2_keys import florence2_table
    from zoo.imported.keymap import expand, invert

    out.mkdir(parents=True)
    cfg = model.model.cfg
    image = cfg.modalities["florence_image"]
    entries = expand(florence2_table("microsoft"), {"enc": cfg.enc_layers, "dec": cfg.dec_layers,
                                                    "depths": image["depths"]})
    ours = dict(model.model.state_dict())
    ours["final_logits_bias"] = torch.zeros(model.layout.size)
    theirs = invert(ours, entries)
    theirs["language_model.lm_head.weight"] = theirs["language_model.model.shared.weight"]  # tied copy
    torch.save(theirs, out / "pytorch_model.bin")
    native = json.loads((native_folder / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(microsoft_config(native)))
    proc = json.loads((native_folder / "processor_config.json").read_text())["image_processor"]
    (out / "preprocessor_config.json").write_text(json.dumps({**proc, "processor_class": "Florence2Processor"}))
    tok = json.loads((native_folder / "tokenizer.json").read_text())
    extra = set(MS_EXTRA_TOKENS) | {"<image>"}
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] not in extra]
    Tokenizer.from_str(json.dumps(tok)).save(str(out / "tokenizer.json"))
    (out / "generation_config.json").write_text((native_folder / "generation_config.json").read_text())
    (out / "README.md").write_text("---\nlicense: mit\n---\n")


def demo(out: Path) -> None:
    """Build a tiny random Florence-2 with transformers into a local Hub cache under ``out``, load it offline with
    ``zoo.load("hf-hub:...")`` and run caption / detect / ground on scikit-image's photos; writes ``boxes.png``."""
    import os

    from PIL import Image
    from skimage import data

    import zoo
    from zoo.hub import add_to_cache
    from zoo.imported.florence2 import draw_boxes

    os.environ["HF_HUB_CACHE"], os.environ["HF_HUB_OFFLINE"] = str(out / "cache"), "1"
    build_reference(out / "native", image_size=64)
    add_to_cache(out / "native", "florence-community/tiny-demo")
    m = zoo.load("hf-hub:florence-community/tiny-demo")
    print(m)
    photos = {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}
    images = [Image.fromarray(a) for a in photos.values()]
    for name, cap in zip(photos, m.caption(images, num_beams=3)):
        print(f"caption {name}: {cap!r}")
    found = m.detect(images, num_beams=3)
    for name, res in zip(photos, found):
        print(f"detect {name}: {res}")
    grounded = m.ground(images[1], "a cup of coffee", num_beams=3)
    print(f"ground coffee 'a cup of coffee': {grounded}")
    draw_boxes(images[1], found[1]).save(out / "boxes.png")
    print(f"wrote {out / 'boxes.png'}")


if __name__ == "__main__":
    import sys

    demo(Path(sys.argv[1] if len(sys.argv) > 1 else "florence2-demo"))
