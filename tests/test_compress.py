"""Compression: dynamic int8 inference (Python API and zoo-predict quantize=int8) and distillation."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from modalities.text import TextTokenizer
from zoo.compress import apply_quantize, model_size_bytes, quantize_int8
from zoo.pretrained import Pretrained

TEXTS = ["a small red circle", "a blue square left of a green cross", "what colour is the square?"] * 20


@pytest.fixture(scope="module")
def bundle() -> Pretrained:
    tok = TextTokenizer.train(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = zoo.create_model("test-tiny", vocab={"text_size": tok.vocab_size, "image_code_size": 16, "loc_bins": 4})
    return Pretrained(model.eval(), tok, tasks={"caption": {"max_new_tokens": 6}})


def _inputs(model, b=4):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(model.layout.text_start, model.layout.image_code_start, (b, 6), generator=g)
    return {"image": torch.randn(b, 3, 32, 32, generator=g), "text": (ids, torch.ones(b, 6, dtype=torch.bool))}


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_int8_logits_close_to_fp32(bundle, ffn):
    model = bundle.model if ffn == "dense" else zoo.create_model(
        "test-tiny", vocab=bundle.model.layout.to_dict(), ffn="moe").eval()
    q = quantize_int8(model)
    assert q is not model and isinstance(model.encoder[0].attn.qkv, torch.nn.Linear)  # the original is untouched
    assert "quantized" in type(q.encoder[0].attn.qkv).__module__
    inputs, tgt = _inputs(model), torch.randint(4, 200, (4, 5))
    with torch.no_grad():
        ref, out = model(inputs, tgt), q(inputs, tgt)
    err = (out - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), err
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert model_size_bytes(q) < model_size_bytes(model)


def test_bundle_quantize_keeps_the_original_and_generates(bundle):
    q = apply_quantize(bundle, "none")
    assert q is bundle
    q = quantize_int8(bundle)
    assert q.model is not bundle.model and q.tokenizer is bundle.tokenizer
    images = [torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    assert len(q.caption(images)) == 2
    with pytest.raises(ValueError, match="quantize must be"):
        apply_quantize(bundle, "int4")


def test_zoo_predict_quantize_int8(bundle, tmp_path, capsys):
    from zoo.predict import main

    folder = bundle.save_pretrained(tmp_path / "tiny")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    main([f"pretrained={folder}", "task=caption", f"input={tmp_path / 'a.png'}", "quantize=int8"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(rows) == 1 and isinstance(rows[0]["caption"], str)


def test_distill_with_a_teacher_folder_runs_and_logs_kl(tiny_shapes, tmp_path):
    import csv

    from tasks.train import train
    from tasks.vqa import VQADataModule
    from tests.conftest import compose

    data = [f"data.root={tiny_shapes}", "data.shapes.n_train=64", "data.shapes.n_val=16", "data.shapes.n_test=16",
            "data.num_workers=0", "data.batch_size=4", "data.eval_batch_size=16", "data.tokenizer_vocab_size=300"]
    # a teacher: a 2+2-layer test-tiny on the same data tokenizer, saved as a model folder
    dm = VQADataModule(str(tiny_shapes), splits={"train": {"questions": "vqa_questions_train.json",
                                                            "annotations": "vqa_annotations_train.json"}},
                       shapes={"n_train": 64, "n_val": 16, "n_test": 16}, tokenizer_vocab_size=300,
                       aux_captions="captions_train.json")
    dm.prepare_data()
    tok = dm.load_tokenizer()
    torch.manual_seed(1)
    teacher = zoo.create_model("test-tiny", vocab={"text_size": tok.vocab_size, "image_code_size": 16, "loc_bins": 4},
                               enc_layers=2, dec_layers=2)
    folder = Pretrained(teacher.eval(), tok).save_pretrained(tmp_path / "teacher")
    cfg = compose(["experiment=distill", "model=test_tiny", *data, "task.max_new_tokens=4",
                   f"task.teacher={folder}", "trainer.limit_train_batches=2", "trainer.max_epochs=1",
                   "trainer.log_every_n_steps=1", "data.val_limit=8", "test=false",
                   "model.overrides.enc_layers=1", "model.overrides.dec_layers=1"], tmp_path / "run")
    metrics = train(cfg)
    assert "val/vqa_acc" in metrics
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    kl = [float(r["train/distill_kl"]) for r in rows if r.get("train/distill_kl")]
    assert len(kl) == 2 and all(k > 0 for k in kl)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert not any("teacher" in k for k in ckpt["state_dict"])  # the teacher stays out of the checkpoint


def test_distill_refuses_a_teacher_with_another_tokenizer(tiny_shapes, tmp_path):
    from tasks.distill import DistillVQATask

    tok = TextTokenizer.train(TEXTS, vocab_size=300)
    other = TextTokenizer.train([t.upper() + " extra words here" for t in TEXTS], vocab_size=300)
    vocab = {"text_size": tok.vocab_size, "image_code_size": 16, "loc_bins": 4}
    folder = Pretrained(zoo.create_model("test-tiny", vocab={**vocab, "text_size": other.vocab_size}), other) \
        .save_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match="teacher"):
        DistillVQATask(zoo.create_model("test-tiny", vocab=vocab), tok, teacher=str(folder))
