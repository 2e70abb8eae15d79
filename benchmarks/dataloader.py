"""dataloader: images/s the captioning datamodule delivers vs what the training step consumes.

Both are measured in this process on ``experiment=caption_shapes`` (Shapes, batch 16 images with
5 captions each, default workers): first the loader alone over N batches, then N training steps of
ofa-tiny on batches already in memory.

    python -m benchmarks.dataloader [--batches 40]
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F

from benchmarks.common import save, table


def main() -> None:
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    import zoo
    from tasks.runtime.resolvers import cpu_has_bf16, register_resolvers
    from tasks.cli.train import build_model
    from zoo.vocab import PAD_ID

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, default=40)
    args = ap.parse_args()
    register_resolvers()
    with initialize_config_module(config_module="configs", version_base="1.3"):
        # the captioning experiment: the default (multi-task) job's loader mixes four tasks' batches
        cfg = compose(config_name="train", overrides=["experiment=caption_shapes", "paths.output_dir=/tmp/mmzoo-bench"])
    dm = instantiate(cfg.data)
    dm.prepare_data()
    model = build_model(cfg.model, dm.load_tokenizer().vocab_size, dm.model_overrides())
    dm.bind(model.cfg, model.layout)
    dm.setup("fit")
    loader = dm.train_dataloader()

    it = iter(loader)
    next(it)  # start the workers
    t0 = time.perf_counter()
    batches = list(itertools.islice(it, args.batches))
    load_s = time.perf_counter() - t0
    images = sum(len(b["ids"]) for b in batches)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    bf16 = cpu_has_bf16()

    def step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            memory, mask = model.encode({"image": batch["image"], "text": (batch["prompt_ids"], batch["prompt_mask"])})
            counts = batch["target_counts"]
            memory, mask = memory.repeat_interleave(counts, 0), mask.repeat_interleave(counts, 0)
            hidden = model.decode_hidden(batch["tgt_in"], memory, mask)
            keep = batch["labels"] != PAD_ID
            loss = F.cross_entropy(model.logits(hidden[keep]).float(), batch["labels"][keep])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[:2]:
        step(b)
    t0 = time.perf_counter()
    for b in batches:
        step(b)
    train_s = time.perf_counter() - t0
    load_rate, train_rate = images / load_s, images / train_s
    rows = [["dataloader", dm.num_workers, load_rate], ["train step", "-", train_rate]]
    print(table(rows, ["what", "workers", "images/s"]))
    print(f"dataloader / consumption = {load_rate / train_rate:.1f}x")
    print(f"saved {save('dataloader', {'args': vars(args), 'workers': dm.num_workers, 'loader_images_per_s': load_rate, 'train_images_per_s': train_rate, 'ratio': load_rate / train_rate})}")


if __name__ == "__main__":
    main()
