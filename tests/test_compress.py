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

    from tasks.cli.train import train
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


def _distill_batch(layout):
    """Two images with 2 and 1 target captions of different lengths (PAD-padded), as the caption collate makes."""
    g = torch.Generator().manual_seed(3)
    lo = layout.text_start
    lengths = [6, 2, 4]
    labels = torch.zeros(3, 6, dtype=torch.long)  # PAD_ID = 0
    for i, n in enumerate(lengths):
        labels[i, :n - 1] = torch.randint(lo, lo + 200, (n - 1,), generator=g)
        labels[i, n - 1] = 2  # EOS
    tgt_in = torch.cat([torch.full((3, 1), 1), labels[:, :-1]], 1)  # BOS + shifted
    prompt = torch.randint(lo, lo + 200, (2, 5), generator=g)
    return {"image": torch.randn(2, 3, 32, 32, generator=g), "prompt_ids": prompt,
            "prompt_mask": torch.ones(2, 5, dtype=torch.bool), "tgt_in": tgt_in, "labels": labels,
            "target_counts": torch.tensor([2, 1])}


class _FirstTokenHeavy:
    """Token weights: a target's first token weighs 3, the rest 1 (a task with its own loss weighting)."""

    def token_weights(self, labels):
        w = torch.ones_like(labels, dtype=torch.float)
        w[:, 0] = 3.0
        return w


@pytest.mark.parametrize("setting", ["sequence", "token_weights"])
def test_distill_cross_entropy_is_the_tasks_own_loss(tmp_path, setting):
    """With a teacher identical to the student the KL term is 0, so the distillation loss is (1 - alpha) times the
    plain task's loss, with the task's ``loss_average`` and token weights (the old code used a token-mean CE)."""
    from tasks.caption import CaptionTask
    from tasks.distill import DistillCaptionTask

    tok = TextTokenizer.train(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = zoo.create_model("test-tiny", vocab={"text_size": tok.vocab_size, "image_code_size": 16, "loc_bins": 4})
    folder = Pretrained(model.eval(), tok).save_pretrained(tmp_path / "same")
    kw = {"loss_average": "sequence"} if setting == "sequence" else {}
    plain_cls = CaptionTask if setting == "sequence" else type("Heavy", (_FirstTokenHeavy, CaptionTask), {})
    distill_cls = DistillCaptionTask if setting == "sequence" else \
        type("HeavyDistill", (_FirstTokenHeavy, DistillCaptionTask), {})
    plain = plain_cls(model, tok, **kw).eval()
    student = distill_cls(model, tok, teacher=str(folder), alpha=0.25, **kw).eval()
    batch = _distill_batch(model.layout)
    with torch.no_grad():
        want = plain.loss(batch)
        token_mean = CaptionTask(model, tok).eval().loss(batch)
        got = student.loss(batch)
    assert abs(want.item() - token_mean.item()) > 1e-3  # the setting does change the loss here
    torch.testing.assert_close(got, 0.75 * want, rtol=1e-5, atol=1e-6)


def test_distill_kl_is_averaged_like_the_loss(tmp_path):
    """The KL term follows the task's token weights: with weight only on each target's first token it is the mean
    over targets of T² · KL(teacher || student) at that token."""
    import torch.nn.functional as F

    from tasks.distill import DistillCaptionTask

    class FirstTokenOnly(DistillCaptionTask):
        def token_weights(self, labels):
            w = torch.zeros_like(labels, dtype=torch.float)
            w[:, 0] = 1.0
            return w

    tok = TextTokenizer.train(TEXTS, vocab_size=300)
    vocab = {"text_size": tok.vocab_size, "image_code_size": 16, "loc_bins": 4}
    torch.manual_seed(1)
    teacher = zoo.create_model("test-tiny", vocab=vocab).eval()
    folder = Pretrained(teacher, tok).save_pretrained(tmp_path / "teacher")
    torch.manual_seed(2)
    student_model = zoo.create_model("test-tiny", vocab=vocab)
    task = FirstTokenOnly(student_model, tok, teacher=str(folder), alpha=1.0, temperature=2.0).eval()
    batch = _distill_batch(student_model.layout)

    def first_logits(m):
        memory, mask = m.encode(task.model_inputs(batch))
        counts = batch["target_counts"]
        hidden = m.decode_hidden(batch["tgt_in"], memory.repeat_interleave(counts, 0), mask.repeat_interleave(counts, 0))
        return m.logits(hidden[:, 0]).float() / 2.0

    with torch.no_grad():
        got = task.loss(batch)
        s, t = F.log_softmax(first_logits(student_model), -1), F.log_softmax(first_logits(teacher), -1)
    want = (t.exp() * (t - s)).sum(-1).mean() * 4.0
    assert want > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
