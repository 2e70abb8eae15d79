"""Fine-tuning from pretrained folders: LoRA save/load/merge equality, freezing, zoo-finetune and zoo-export."""
import copy
import json
from pathlib import Path

import pytest
import torch

import zoo
from modalities.text import TextTokenizer
from tasks.adapters import apply_lora, load_adapter, merge_lora, prepare_model, save_adapter
from zoo.generation import generate
from zoo.pretrained import Pretrained

TINY = ["data.num_workers=0", "data.batch_size=4", "data.eval_batch_size=16", "task.max_new_tokens=8",
        "data.shapes.n_train=64", "data.shapes.n_val=16", "data.shapes.n_test=16", "logger={}"]


def compose_finetune(overrides: list[str], tmp_path: Path):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from tasks.runtime.resolvers import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="configs", version_base="1.3"):
        return compose(config_name="finetune", overrides=[
            f"paths.output_dir={tmp_path}", f"paths.log_dir={tmp_path}/logs", *overrides])


def _inputs(model, b=2):
    g = torch.Generator().manual_seed(0)
    s = model.cfg.modalities["image"]["image_size"]
    ids = torch.randint(model.layout.text_start, model.layout.image_code_start, (b, 5), generator=g)
    return {"image": torch.randn(b, 3, s, s, generator=g), "text": (ids, torch.ones(b, 5, dtype=torch.bool))}


@pytest.fixture(scope="module")
def pretrained_dir(tiny_shapes, tmp_path_factory) -> Path:
    """A test-tiny captioner folder whose tokenizer knows the Shapes captions."""
    caps = json.loads((tiny_shapes / "captions_train.json").read_text())["annotations"]
    tok = TextTokenizer.train(["what does the image describe?", *(a["caption"] for a in caps)], vocab_size=300)
    torch.manual_seed(0)
    model = zoo.create_model("test-tiny", vocab={"text_size": tok.vocab_size, "image_code_size": 16, "loc_bins": 4})
    return Pretrained(model, tok, tasks={"caption": {"max_new_tokens": 8}}).save_pretrained(
        tmp_path_factory.mktemp("pre") / "tiny")


def test_lora_targets_backbone_linears_only_and_save_load_merge_equal(tmp_path):
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    base = zoo.create_model("test-vit").eval()  # its image backbone also has qkv / fc1 / fc2 layers
    inputs, tgt = _inputs(base), torch.randint(4, 200, (2, 6))
    with torch.no_grad():
        base_logits = base(inputs, tgt)
    peft_model = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    wrapped = sorted(n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer))
    assert len(wrapped) == 4 + 7  # encoder: qkv out fc1 fc2; decoder: qkv out q kv out fc1 fc2
    assert not any(".embedders." in n for n in wrapped)
    assert all(p.requires_grad == ("lora_" in n) for n, p in peft_model.named_parameters())
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:  # B starts at zero: make the adapters matter
                p.normal_(0, 0.2)
        lora_logits = peft_model(inputs, tgt)
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3)

    save_adapter(peft_model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(inputs, tgt), lora_logits)
        tokens = generate(peft_model, inputs, max_new_tokens=6)
    merged = merge_lora(peft_model)
    assert type(merged).__name__ == "UnifiedSeq2Seq" and not any(isinstance(m, LoraLayer) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs, tgt), lora_logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(generate(merged, inputs, max_new_tokens=6), tokens)


def test_frozen_encoder_trains_only_the_decoder():
    model = prepare_model(zoo.create_model("test-tiny"), "frozen_encoder")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("decoder.", "dec_", "embed_tokens")) for n in trainable)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    model.train()
    model(_inputs(model), torch.randint(4, 200, (2, 6)))  # frozen BatchNorm statistics do not move
    assert stats and all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    with pytest.raises(ValueError, match="finetune.mode"):
        prepare_model(zoo.create_model("test-tiny"), "half")


@pytest.mark.parametrize("mode", ["full", "frozen_encoder"])
def test_finetune_modes_fast_dev_run(mode, pretrained_dir, tiny_shapes, tmp_path):
    from tasks.cli.finetune import finetune

    cfg = compose_finetune([f"pretrained={pretrained_dir}", "experiment=caption_shapes", f"finetune.mode={mode}",
                            f"data.root={tiny_shapes}", *TINY, "trainer.fast_dev_run=true"], tmp_path)
    metrics = finetune(cfg)
    assert "test/cider" in metrics


def test_zoo_finetune_lora_exports_merged_model_matching_the_run(pretrained_dir, tiny_shapes, tmp_path):
    from tasks.checkpoint import read_checkpoint
    from tasks.cli.export import export
    from tasks.cli.finetune import finetune

    cfg = compose_finetune([f"pretrained={pretrained_dir}", "experiment=caption_shapes", "finetune.mode=lora",
                            "finetune.lora.r=4", f"data.root={tiny_shapes}", *TINY, "trainer.max_epochs=1",
                            "task.lr=1e-2", "task.warmup_steps=2"], tmp_path)
    assert cfg.task_name == "finetune"
    finetune(cfg)
    ckpt = read_checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    assert ckpt["mmzoo_finetune"]["mode"] == "lora" and ckpt["mmzoo_finetune"]["pretrained"] == str(pretrained_dir)
    tuned, start = zoo.load(tmp_path / "model"), zoo.load(pretrained_dir)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert "Fine-tuned from" in (tmp_path / "model" / "README.md").read_text()
    inputs, tgt = _inputs(start.model), torch.randint(4, 200, (2, 6))
    with torch.no_grad():
        tuned_logits = tuned.model(inputs, tgt)
        assert not torch.allclose(tuned_logits, start.model(inputs, tgt), atol=1e-4)
        # the saved adapters on the starting model give the exported (merged) model
        adapted = load_adapter(start.model, tmp_path / "adapter")
        torch.testing.assert_close(adapted(inputs, tgt), tuned_logits, atol=1e-4, rtol=1e-4)
    # the exported folder captions the test images exactly as the run's own test stage did
    images = {im["id"]: tiny_shapes / im["file_name"]
              for im in json.loads((tiny_shapes / "captions_test.json").read_text())["images"]}
    preds = json.loads((tmp_path / "predictions.json").read_text())
    assert tuned.caption([str(images[p["image_id"]]) for p in preds]) == [p["caption"] for p in preds]
    # zoo-export on the same checkpoint writes the same weights
    again = zoo.load(export(tmp_path / "checkpoints" / "best.ckpt", tmp_path / "again"))
    with torch.no_grad():
        assert torch.equal(again.model(inputs, tgt), tuned_logits)


def test_export_refuses_non_mmzoo_checkpoints(tmp_path):
    from tasks.checkpoint import read_checkpoint

    torch.save({"state_dict": {}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="not an mmzoo training checkpoint"):
        read_checkpoint(tmp_path / "x.ckpt")
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.ckpt")
