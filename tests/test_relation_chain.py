"""Relation questions trained as chains (``data.relation_chain``): both objects' locations, then the answer;
only the answer word is scored."""
import json
from pathlib import Path

import pytest
import torch

from tasks.data.grounding import GroundingRef
from tasks.data.relation_chain import centre_loc_ids, object_chain, relation_chain, relation_chains, relation_word
from tasks.data.shapes import ShapesConfig
from tasks.data.shapes_vqa import ensure_shapes_vqa
from zoo.vocab import EOS_ID, VocabLayout

LAYOUT = VocabLayout(text_size=300, image_code_size=16, loc_bins=100)
IMG = Path("img.png")


def _ref(sentence: str, cx: float, cy: float, r: float = 0.05) -> GroundingRef:
    return GroundingRef(IMG, sentence, (cx - r, cy - r, cx + r, cy + r))


def test_chain_is_both_centres_as_location_tokens():
    refs = [_ref("small red circle", 0.2, 0.5), _ref("large blue square", 0.7, 0.4)]
    chain = relation_chain("where is the red circle relative to the blue square?", "left", refs, LAYOUT)
    s = LAYOUT.loc_start
    assert chain == [s + 20, s + 50, s + 69, s + 40]  # round(0.2 * 99), round(0.5 * 99), ...
    # on a 4x4 grid each centre becomes its cell's centre: 0.2 → cell 0 → 0.125, 0.7 → cell 2 → 0.625
    grid = relation_chain("where is the red circle relative to the blue square?", "left", refs, LAYOUT, grid=4)
    assert grid == [s + 12, s + 62, s + 62, s + 37]
    assert centre_loc_ids(1.0, 0.0, LAYOUT, grid=4) == [s + 87, s + 12]


def test_chain_only_for_relation_questions_that_agree_with_the_answer():
    refs = [_ref("small red circle", 0.2, 0.5), _ref("large blue square", 0.7, 0.4)]
    assert relation_chain("what colour is the circle?", "red", refs, LAYOUT) is None
    assert relation_chain("where is the red circle relative to the blue square?", "right", refs, LAYOUT) is None
    assert relation_chain("where is the green circle relative to the blue square?", "left", refs, LAYOUT) is None
    # two red circles: the pair that agrees with the answer is used
    refs.append(_ref("large red circle", 0.9, 0.45))
    chain = relation_chain("where is the red circle relative to the blue square?", "right", refs, LAYOUT)
    assert chain is not None and chain[0] == LAYOUT.loc_start + round(0.9 * 99)
    assert relation_word(-0.3, 0.1) == "left" and relation_word(0.0, 0.2) == "below"


def test_object_chain_is_the_named_objects_centre():
    refs = [_ref("small red circle", 0.2, 0.5), _ref("large blue square", 0.7, 0.4), _ref("small blue cross", 0.9, 0.9)]
    s = LAYOUT.loc_start
    circle = [s + 12, s + 62]  # (0.2, 0.5) on the 4x4 grid → (0.125, 0.625)
    assert object_chain("what colour is the circle?", "red", refs, LAYOUT, grid=4) == circle
    assert object_chain("what shape is the red object?", "circle", refs, LAYOUT, grid=4) == circle
    assert object_chain("what size is the red circle?", "small", refs, LAYOUT, grid=4) == circle
    assert object_chain("is there a red circle?", "yes", refs, LAYOUT, grid=4) == circle
    assert object_chain("what size is the blue square?", "large", refs, LAYOUT) == [s + 69, s + 40]
    # no object by that name (an existence question answered no), or two (blue objects): a plain answer
    assert object_chain("is there a green circle?", "no", refs, LAYOUT) is None
    assert object_chain("what shape is the blue object?", "square", refs, LAYOUT) is None
    assert object_chain("how many objects are there?", "3", refs, LAYOUT) is None
    # relation questions keep their four-token chain; object chains only where asked for
    questions = [(IMG, "where is the red circle relative to the blue square?", "left"), (IMG, "is there a red circle?", "yes")]
    assert [len(c or []) for c in relation_chains(questions, refs, LAYOUT, 4)] == [4, 0]
    assert [len(c or []) for c in relation_chains(questions, refs, LAYOUT, 4, objects=["exist"])] == [4, 2]
    assert [len(c or []) for c in relation_chains(questions, refs, LAYOUT, 4, objects=["size"])] == [4, 0]
    with pytest.raises(ValueError, match=r"unknown question kinds \['colours'\]"):
        relation_chains(questions, refs, LAYOUT, 4, objects=["colours"])


@pytest.fixture(scope="module")
def chain_setup(tiny_shapes):
    import zoo
    from tasks.vqa import VQADataModule, VQATask

    root = ensure_shapes_vqa(tiny_shapes, ShapesConfig(n_train=64, n_val=16, n_test=16))
    splits = {s: {"questions": f"vqa_questions_{s}.json", "annotations": f"vqa_annotations_{s}.json"}
              for s in ("train", "val")}
    dm = VQADataModule(str(root), generate=None, tokenizer_vocab_size=300, num_workers=0, batch_size=4,
                       relation_chain="refs_train.json", splits=splits)
    dm.prepare_data()
    tok = dm.load_tokenizer()
    model = zoo.create_model("test-tiny", vocab={"text_size": tok.vocab_size, "image_code_size": 16,
                                                 "loc_bins": 100}).eval()
    dm.bind(model.cfg, model.layout)
    dm.setup("fit")
    return root, dm, model, tok, VQATask


def test_training_targets_write_the_chain_before_relation_answers(chain_setup):
    root, dm, model, _, _ = chain_setup
    layout = model.layout
    recs = dm.read("train")
    ds = dm.train_dataloader().dataset.dataset  # VQAImageGroups inside the seeded wrapper
    answers = dm.encode_text([r.answer for r in recs], dm.max_answer_len)
    scenes = {s["image_id"]: s["objects"] for s in json.loads((root / "scenes_train.json").read_text())}
    size = ShapesConfig().image_size
    n_rel = 0
    for r, target, answer in zip(recs, ds.targets, answers):
        if r.question_type != "relation":
            assert target == answer
            continue
        n_rel += 1
        assert target[4:] == answer and all(layout.loc_start <= t < layout.size for t in target[:4])
        ax, ay, bx, by = ((t - layout.loc_start) / (layout.loc_bins - 1) for t in target[:4])
        assert relation_word(ax - bx, ay - by) == r.answer
        # the first location is an object of the scene named by the question (its centre, within a bin or two)
        name = r.question.split(" relative")[0][len("where is the "):]
        centres = [(o["x"] / size, o["y"] / size) for o in scenes[r.image_id] if f"{o['colour']} {o['shape']}" == name]
        assert any(abs(ax - x) < 0.1 and abs(ay - y) < 0.1 for x, y in centres), (r.question, (ax, ay), centres)
    assert n_rel > 0


def test_a_chained_prediction_is_scored_by_its_final_word(chain_setup):
    _, dm, model, tok, VQATask = chain_setup
    task = VQATask(model, tok, max_new_tokens=8)

    class _Trainer:  # the task reads the chain setting and the references from the datamodule
        datamodule, fast_dev_run, limit_val_batches = dm, False, 1.0

    task._trainer = _Trainer()
    assert not task.allowed_tokens()[model.layout.loc_start:].any()
    task.setup("fit")
    assert task.location_chain and task.allowed_tokens()[model.layout.loc_start:].all()
    assert task.checkpoint_state()["location_chain"] is True
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(ckpt)
    # zoo-eval rebuilds a task that keeps writing the chain; so does a loaded model (zoo.load, zoo-export)
    assert VQATask.eval_settings({"decoding": "open"}, ckpt, "ckpt")["location_chain"] is True
    from tasks.checkpoint import bundle_from_checkpoint
    from zoo.task_specs import task_spec

    bundle = bundle_from_checkpoint(ckpt, "x.ckpt")
    assert bundle.tasks["vqa"]["location_chain"] is True
    assert bundle.allowed_tokens(task_spec("vqa"))[model.layout.loc_start:].all()
    bundle.tasks["vqa"].pop("location_chain")
    assert not bundle.allowed_tokens(task_spec("vqa"))[model.layout.loc_start:].any()
    assert VQATask(model, tok, location_chain=True).allowed_tokens()[model.layout.loc_start:].all()
    refs = dm.references("val")
    assert any(r["question_type"] == "relation" for r in refs.values())
    loc = model.layout.loc_start
    chain = [loc + 3, loc + 50, loc + 70, loc + 20]  # relation answers written after four location tokens
    rows = [[*(chain if r["question_type"] == "relation" else []), *dm.encode_text([r["answers"][0]], 8)[0], EOS_ID]
            for r in refs.values()]
    width = max(map(len, rows))
    tokens = torch.tensor([row + [EOS_ID] * (width - len(row)) for row in rows])
    preds = dict(zip(refs, task.decode_outputs(tokens)))
    assert list(preds.values()) == [r["answers"][0] for r in refs.values()]
    assert task.compute_metrics("val", preds)["vqa_acc_relation"] == pytest.approx(100.0)
    task._trainer = None


def test_a_chain_with_closed_set_decoding_is_refused(chain_setup):
    _, dm, model, tok, VQATask = chain_setup
    task = VQATask(model, tok, decoding="trie")

    class _Trainer:
        datamodule = dm

    task._trainer = _Trainer()
    with pytest.raises(ValueError, match="needs task.decoding=open, got 'trie'"):
        task.setup("fit")
    task._trainer = None


def test_object_chain_targets_write_the_named_objects_cell(chain_setup):
    root, dm, model, _, _ = chain_setup
    from tasks.vqa import VQADataModule

    with pytest.raises(ValueError, match="data.object_chain needs data.relation_chain"):
        VQADataModule(str(root), generate=None, object_chain=["size"])
    for bad in (True, "size", ["sizes"]):  # refused when the datamodule is made, before any work
        with pytest.raises(ValueError, match="data.object_chain must be a list of question kinds"):
            VQADataModule(str(root), generate=None, relation_chain="refs_train.json", object_chain=bad)
    obj = VQADataModule(str(root), generate=None, tokenizer_vocab_size=300, num_workers=0, batch_size=4,
                        relation_chain="refs_train.json", relation_chain_grid=4, splits=dm.splits,
                        object_chain=["colour", "shape", "size", "exist"])
    obj.prepare_data()
    obj.bind(model.cfg, model.layout)
    obj.setup("fit")
    layout, recs = model.layout, obj.read("train")
    targets = obj.train_dataloader().dataset.dataset.targets
    answers = obj.encode_text([r.answer for r in recs], obj.max_answer_len)
    scenes = {s["image_id"]: s["objects"] for s in json.loads((root / "scenes_train.json").read_text())}
    size = ShapesConfig().image_size
    chained = {t: 0 for t in ("colour", "shape", "size", "exist")}
    for r, target, answer in zip(recs, targets, answers):
        if r.question_type not in chained or (r.question_type == "exist" and r.answer == "no"):
            assert r.question_type == "relation" or target == answer, (r.question, target)
            continue
        assert target[2:] == answer and all(layout.loc_start <= t < layout.size for t in target[:2]), r.question
        chained[r.question_type] += 1
        x, y = ((t - layout.loc_start) / (layout.loc_bins - 1) for t in target[:2])
        objs = [o for o in scenes[r.image_id] if o["colour"] in r.question.split() or o["shape"] in r.question[:-1].split()]
        cells = {(int(o["x"] / size * 4), int(o["y"] / size * 4)) for o in objs
                 if r.question_type in ("colour", "shape") or f"{o['colour']} {o['shape']}" in r.question}
        assert (int(x * 4), int(y * 4)) in cells, (r.question, (x, y), cells)
    assert all(n > 0 for n in chained.values()), chained
