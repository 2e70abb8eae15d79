"""Shapes VQA data (VQAv2 files, balanced families, answers true to the scenes) and the VQA task's
three decoding modes."""
import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from tasks.data.shapes import ShapesConfig
from tasks.data.shapes_vqa import FAMILIES, ensure_shapes_vqa, vqa_files
from tasks.data.formats import read_vqa

CFG = ShapesConfig(n_train=64, n_val=16, n_test=16)


@pytest.fixture(scope="module")
def vqa_root(tiny_shapes):
    return ensure_shapes_vqa(tiny_shapes, CFG)


def test_vqav2_files_balanced_and_true_to_the_scenes(vqa_root):
    for split in ("train", "val", "test"):
        q_path, a_path = vqa_files(vqa_root, split)
        qs, anns = json.loads(q_path.read_text()), json.loads(a_path.read_text())
        assert {"questions", "images", "data_subtype"} <= set(qs) and "annotations" in anns
        qids = [q["question_id"] for q in qs["questions"]]
        assert len(qids) == len(set(qids)) == len(anns["annotations"])
        per_family = Counter((a["question_type"], a["multiple_choice_answer"]) for a in anns["annotations"])
        for family, (atype, answers) in FAMILIES.items():
            counts = {per_family[(family, a)] for a in answers}
            assert len(counts) == 1, (split, family, per_family)  # exactly balanced
        assert all(len(a["answers"]) == 10 and a["answer_type"] == FAMILIES[a["question_type"]][0]
                   for a in anns["annotations"])
    scenes = {s["image_id"]: s for s in json.loads((vqa_root / "scenes_train.json").read_text())}
    recs = read_vqa(*vqa_files(vqa_root, "train"), vqa_root)
    assert all(r.path.is_file() for r in recs)
    for r in recs:
        objs = scenes[r.image_id]["objects"]
        if r.question_type == "count":
            assert r.answer == str(len(objs))
        elif r.question_type == "exist":
            colour, shape = r.question[len("is there a "):-1].split()
            assert (r.answer == "yes") == any(o["colour"] == colour and o["shape"] == shape for o in objs)
        elif r.question_type == "colour":
            shape = r.question[len("what colour is the "):-1]
            assert [o["colour"] for o in objs if o["shape"] == shape] == [r.answer]


def test_files_are_regenerated_only_when_needed(vqa_root):
    q_path, _ = vqa_files(vqa_root, "val")
    before = q_path.stat().st_mtime_ns
    ensure_shapes_vqa(vqa_root, CFG)
    assert q_path.stat().st_mtime_ns == before


@pytest.fixture(scope="module")
def setup(vqa_root):
    import zoo
    from tasks.vqa import VQADataModule, VQATask

    dm = VQADataModule(str(vqa_root), generate=None, tokenizer_vocab_size=300, num_workers=0, eval_batch_size=8,
                       splits={s: {"questions": f"vqa_questions_{s}.json", "annotations": f"vqa_annotations_{s}.json"}
                               for s in ("train", "val")})
    dm.prepare_data()
    tok = dm.load_tokenizer()
    torch.manual_seed(0)
    model = zoo.create_model("test-tiny", vocab={"text_size": tok.vocab_size, "image_code_size": 16, "loc_bins": 4}).eval()
    dm.bind(model.cfg, model.layout)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    cands = dm.answer_candidates()
    tasks = {d: VQATask(model, tok, decoding=d, candidates=cands, candidate_chunk=5, max_new_tokens=6).eval()
             for d in ("open", "trie", "allcand")}
    return dm, batch, cands, tasks


def test_candidates_are_the_training_answers(setup):
    dm, _, cands, _ = setup
    assert set(cands) == {r.answer for r in dm.read("train")}


def test_closed_set_decoding_returns_candidates(setup):
    _, batch, cands, tasks = setup
    for mode in ("trie", "allcand"):
        preds = tasks[mode].decode_outputs(tasks[mode].generate_tokens(batch))
        assert len(preds) == len(batch["ids"]) and set(preds) <= set(cands), (mode, preds)
    open_preds = tasks["open"].decode_outputs(tasks["open"].generate_tokens(batch))
    assert len(open_preds) == len(batch["ids"]) and all(isinstance(p, str) for p in open_preds)


def test_allcand_scores_match_one_candidate_at_a_time(setup):
    _, batch, cands, tasks = setup
    task = tasks["allcand"]
    scores = task.candidate_scores(batch)  # [B, C], candidates in chunks of 5
    assert scores.shape == (len(batch["ids"]), len(cands))
    model, c = task.model, task.candidate_tensors()
    inputs = task.model_inputs(batch)
    for j in (0, len(cands) - 1):
        b = len(batch["ids"])
        tgt_in, labels = c["tgt_in"][j:j + 1].repeat(b, 1), c["labels"][j:j + 1].repeat(b, 1)
        logp = F.log_softmax(model(inputs, tgt_in).float(), -1).gather(-1, labels[..., None]).squeeze(-1)
        expected = logp.masked_fill(labels == 0, 0).sum(-1)
        assert torch.allclose(scores[:, j], expected, atol=1e-4)
    best = task.decode_outputs(task.generate_tokens(batch))
    assert best == [cands[i] for i in scores.argmax(-1).tolist()]


def test_vqa_metrics_and_results_format(setup):
    dm, _, _, tasks = setup
    task = tasks["open"]

    class _Trainer:  # compute_metrics reads references from the datamodule
        datamodule, fast_dev_run, limit_val_batches = dm, False, 1.0

    task._trainer = _Trainer()
    refs = dm.references("val")
    preds = {qid: r["answers"][0] if i % 2 == 0 else "nonsense" for i, (qid, r) in enumerate(refs.items())}
    metrics = task.compute_metrics("val", preds)
    assert metrics["vqa_acc"] == pytest.approx(100 * sum(i % 2 == 0 for i in range(len(refs))) / len(refs))
    assert {f"vqa_acc_{f}" for f in FAMILIES} <= set(metrics)
    assert {"vqa_acc_type_yes_no", "vqa_acc_type_number", "vqa_acc_type_other"} <= set(metrics)
    out = task.format_predictions(preds)
    assert all(set(o) == {"question_id", "answer"} for o in out)
    task._trainer = None


def test_training_batches_group_questions_by_image_with_aux_caption(vqa_root, setup):
    from tasks.vqa import VQADataModule

    model_dm, _, _, tasks = setup
    dm = VQADataModule(str(vqa_root), generate=None, num_workers=0, batch_size=4, questions_per_image=2,
                       aux_captions="captions_train.json", tokenizer_path=None, tokenizer_vocab_size=300,
                       splits={"train": {"questions": "vqa_questions_train.json",
                                         "annotations": "vqa_annotations_train.json"}})
    dm.prepare_data()
    tok = dm.load_tokenizer()
    model = tasks["open"].model
    dm.bind(model.cfg, model.layout, tokenizer=model_dm.tokenizer)
    batch = next(iter(dm.train_dataloader()))
    counts = batch["image_counts"]
    assert batch["image"].shape[0] == 4 and (counts <= 3).all() and int(counts.sum()) == len(batch["labels"])
    ends = counts.cumsum(0) - 1  # each image's last target is its caption
    caps = tasks["open"].decode_outputs(batch["labels"][ends])
    assert all(any(s in c for s in ("circle", "square", "triangle", "diamond", "cross")) for c in caps), caps
    loss = tasks["open"].loss(batch)
    assert torch.isfinite(loss) and loss.requires_grad
    assert tok.vocab_size > 0


def test_sequence_loss_average_weighs_every_target_equally(setup):
    """loss_average=sequence: the mean over targets of each target's own token-mean loss, so a long
    auxiliary caption weighs as much as a one-word answer (token averaging lets it dominate)."""
    from tasks.vqa import VQAGroupCollator, VQATask

    _, _, _, tasks = setup
    model, tok = tasks["open"].model, tasks["open"].tokenizer
    off = model.layout.text_start
    enc = lambda text: [t + off for t in tok.encode(text)]
    s = model.cfg.modalities["image"]["image_size"]
    g = torch.Generator().manual_seed(0)
    items = [{"image": torch.randn(3, s, s, generator=g), "prompts": [enc("what shape is it?")], "targets": [enc("circle")],
              "qids": [1]},
             {"image": torch.randn(3, s, s, generator=g), "prompts": [enc("what colour is it?"), enc("describe")],
              "targets": [enc("red"), enc("a small red circle to the left of a large blue square")], "qids": [2, None]}]
    collate = VQAGroupCollator()
    token = VQATask(model, tok, label_smoothing=0.0).eval()
    seq = VQATask(model, tok, label_smoothing=0.0, loss_average="sequence").eval()
    with torch.no_grad():
        per_target = [token.loss(collate([{**it, "prompts": [p], "targets": [t], "qids": [q]}]))
                      for it in items for p, t, q in zip(it["prompts"], it["targets"], it["qids"])]
        torch.testing.assert_close(seq.loss(collate(items)), torch.stack(per_target).mean(), atol=1e-5, rtol=1e-5)
        lengths = torch.tensor([len(t) + 1 for it in items for t in it["targets"]], dtype=torch.float)
        weighted = (torch.stack(per_target) * lengths).sum() / lengths.sum()  # token averaging
        torch.testing.assert_close(token.loss(collate(items)), weighted, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="loss_average"):
        VQATask(model, tok, loss_average="batch")


def test_question_type_weights_draw_the_named_type_more_often(vqa_root, setup):
    from tasks.vqa import VQADataModule

    model_dm, _, _, tasks = setup
    model = tasks["open"].model
    splits = {"train": {"questions": "vqa_questions_train.json", "annotations": "vqa_annotations_train.json"}}

    def relation_share(weights):
        dm = VQADataModule(str(vqa_root), generate=None, num_workers=0, batch_size=4, questions_per_image=1,
                           question_type_weights=weights, splits=splits)
        dm.prepare_data()
        dm.bind(model.cfg, model.layout, tokenizer=model_dm.tokenizer)
        ds = dm.train_dataloader().dataset.dataset
        qtype = {r.question_id: r.question_type for r in dm.read("train")}
        torch.manual_seed(0)
        drawn = [qtype[q] for _ in range(20) for i in range(len(ds)) for q in ds[i]["qids"]]
        return sum(t == "relation" for t in drawn) / len(drawn)

    plain, weighted = relation_share(None), relation_share({"relation": 20})
    assert plain < 0.3 and weighted > 2 * plain, (plain, weighted)
    with pytest.raises(ValueError, match="no training question has"):
        dm = VQADataModule(str(vqa_root), generate=None, num_workers=0, questions_per_image=1,
                           question_type_weights={"relatoin": 2}, splits=splits)
        dm.prepare_data()
        dm.bind(model.cfg, model.layout, tokenizer=model_dm.tokenizer)
        dm.train_dataloader()
    with pytest.raises(ValueError, match="positive"):
        VQADataModule(str(vqa_root), generate=None, question_type_weights={"relation": 0})
    with pytest.raises(ValueError, match="positive numbers.*'relation': 'many'"):
        VQADataModule(str(vqa_root), generate=None, question_type_weights={"relation": "many"})
