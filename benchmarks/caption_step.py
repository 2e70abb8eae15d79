"""caption_step: an end-to-end captioning train step, mmzoo ofa-tiny vs HF VisionEncoderDecoderModel.

Both see the same 64×64 images (batch 32) and 24-token captions. HF: ViT encoder (patch 16 → 4×4
patches, hidden 256, 4 layers, 4 heads, MLP 1024) + BART decoder (d256, 4 layers, FFN 1024), as a user
runs it (fp32). Two mmzoo contenders, with their defaults (bf16 autocast on CPUs with native bf16, fused
AdamW):
- ``mmzoo``: ofa-tiny as shipped, a ResNet-10t stem at stride 16 → 4×4 tokens, 4+4 layers d256. The CNN
  is extra work HF's ViT does not do.
- ``mmzoo_patch16``: the same model with the ``patch:16`` image stem, a linear patch embedding like ViT's.
  Its dimensions are the same as HF's.
Contenders alternate in one process.

    python -m benchmarks.caption_step [--reps 7]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import measure_alternating, save, summarize, table
from benchmarks.train_step import autocast

TEXT_VOCAB, TGT_LEN, PROMPT_LEN = 1024, 24, 7


def build_hf():
    from transformers import BartConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    enc = ViTConfig(image_size=64, patch_size=16, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=1024, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    dec = BartConfig(vocab_size=TEXT_VOCAB + 4, d_model=256, decoder_layers=4, decoder_attention_heads=4,
                     decoder_ffn_dim=1024, encoder_layers=1, dropout=0.0, attention_dropout=0.0,
                     activation_dropout=0.0, is_decoder=True, add_cross_attention=True)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id = 1, 0
    return VisionEncoderDecoderModel(config=cfg)


def main() -> None:
    import zoo
    from tasks.runtime.resolvers import cpu_has_bf16

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    b = args.batch
    px = torch.randn(b, 3, 64, 64)
    prompt = torch.randint(4, TEXT_VOCAB, (b, PROMPT_LEN))
    prompt_mask = torch.ones_like(prompt, dtype=torch.bool)
    tgt = torch.randint(4, TEXT_VOCAB, (b, TGT_LEN + 1))
    tgt_in, labels = tgt[:, :-1], tgt[:, 1:]
    bf16 = cpu_has_bf16()

    vocab = {"text_size": TEXT_VOCAB, "image_code_size": 512, "loc_bins": 100}
    ours = zoo.create_model("ofa-tiny", vocab=vocab)
    patch = zoo.create_model("ofa-tiny", vocab=vocab, modalities={"image": {"backbone": "patch:16"}})
    hf = build_hf()
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def step_fn(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            with autocast(bf16):
                memory, mask = model.encode({"image": px, "text": (prompt, prompt_mask)})
                logits = model.logits(model.decode_hidden(tgt_in, memory, mask))
                loss = F.cross_entropy(logits.float().flatten(0, 1), labels.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def hf_step():
        out = hf(pixel_values=px, decoder_input_ids=tgt_in, use_cache=False)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), labels.reshape(-1))
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    times = measure_alternating({"hf_vision_encoder_decoder": hf_step, "mmzoo": step_fn(ours),
                                 "mmzoo_patch16": step_fn(patch)}, reps=args.reps)
    s = summarize(times, baseline="hf_vision_encoder_decoder")
    rows = [[k, v["median_s"] * 1e3, b / v["median_s"], v["speedup_vs_hf_vision_encoder_decoder"]] for k, v in s.items()]
    print(table(rows, ["contender", "ms/step", "images/s", "× HF"]))
    print(f"saved {save('caption_step', {'args': vars(args), 'mmzoo_bf16': bf16, 'results': s})}")


if __name__ == "__main__":
    main()
