"""Visual grounding references: the RefCOCO-style reader, location-token targets, the Shapes refs files
and the auxiliary grounding target beside VQA."""
import json

import pytest
import torch

from tasks.data.grounding import box_to_loc_ids, grounding_prompt, read_grounding
from tasks.data.shapes import ShapesConfig
from tasks.data.shapes_vqa import ensure_shapes_vqa, refs_file
from tasks.data.coco import DataError
from tasks.data.validate import Problems
from zoo.vocab import VocabLayout

CFG = ShapesConfig(n_train=64, n_val=16, n_test=16)


@pytest.fixture(scope="module")
def vqa_root(tiny_shapes):
    return ensure_shapes_vqa(tiny_shapes, CFG)


def test_shapes_refs_name_every_object_and_box_it(vqa_root):
    scenes = json.loads((vqa_root / "scenes_val.json").read_text())
    refs = read_grounding(refs_file(vqa_root, "val"))
    assert len(refs) == sum(len(s["objects"]) for s in scenes)
    by_sentence = {}
    for r in refs:
        assert r.path.is_file()
        by_sentence.setdefault(r.path.name, []).append(r)
    first = scenes[0]["objects"][0]
    ref = next(r for rs in by_sentence.values() for r in rs
               if r.sentence == f"{first['size']} {first['colour']} {first['shape']}")
    x0, y0, x1, y1 = ref.box
    assert 0 <= x0 < first["x"] / 64 < x1 <= 1 and 0 <= y0 < first["y"] / 64 < y1 <= 1  # the box holds the centre
    assert x1 - x0 == pytest.approx(2 * first["r"] / 64, abs=1e-6) or x0 == 0 or x1 == 1


def test_box_to_location_tokens():
    layout = VocabLayout(text_size=10, image_code_size=4, loc_bins=11)
    start = layout.loc_start
    assert box_to_loc_ids((0.0, 0.5, 1.0, 0.24), layout) == [start, start + 5, start + 10, start + 2]
    assert all(layout.ranges()["loc_bins"][0] <= i < layout.size for i in box_to_loc_ids((0.3, 0.3, 0.9, 0.9), layout))
    with pytest.raises(ValueError, match="loc_bins=0"):
        box_to_loc_ids((0, 0, 1, 1), VocabLayout(text_size=10))


def _write(tmp_path, refs, images=None):
    images = images if images is not None else [{"id": 1, "file_name": "a.png", "width": 64, "height": 32}]
    path = tmp_path / "refs.json"
    path.write_text(json.dumps({"images": images, "refs": refs}))
    return path


def test_reader_normalises_boxes_and_names_bad_records(tmp_path):
    path = _write(tmp_path, [{"image_id": 1, "sentence": " red circle ", "bbox": [16, 8, 32, 16]}])
    (ref,) = read_grounding(path)
    assert ref.sentence == "red circle" and ref.box == (0.25, 0.25, 0.75, 0.75) and ref.path == tmp_path / "a.png"
    bad = [({"image_id": 7, "sentence": "x", "bbox": [0, 0, 1, 1]}, "unknown image_id 7"),
           ({"image_id": 1, "sentence": "  ", "bbox": [0, 0, 1, 1]}, "empty or missing 'sentence'"),
           ({"image_id": 1, "sentence": "x", "bbox": [60, 0, 10, 10]}, "outside the 64x32 image"),
           ({"image_id": 1, "sentence": "x", "bbox": "box"}, "'bbox' must be")]
    for record, message in bad:
        path = _write(tmp_path, [record])
        with pytest.raises(DataError, match=rf"refs\.json: refs\[0\].*{message}|{message}") as e:
            read_grounding(path)
        assert "refs.json" in str(e.value) and "refs[0]" in str(e.value)
    path.write_text("{not json")
    with pytest.raises(DataError, match="malformed JSON"):
        read_grounding(path)
    # skip_bad: the good record stays, the bad one is listed
    path = _write(tmp_path, [{"image_id": 1, "sentence": "x", "bbox": [0, 0, 8, 8]}, bad[0][0]])
    problems = Problems(skip_bad=True)
    assert len(read_grounding(path, problems=problems)) == 1 and len(problems) == 1


def test_vqa_batches_carry_one_grounding_target_per_image(vqa_root):
    import zoo
    from tasks.vqa import VQADataModule, VQATask

    dm = VQADataModule(str(vqa_root), generate=None, num_workers=0, batch_size=4, questions_per_image=2,
                       aux_grounding="refs_train.json", tokenizer_vocab_size=300,
                       splits={"train": {"questions": "vqa_questions_train.json",
                                         "annotations": "vqa_annotations_train.json"}})
    dm.prepare_data()
    tok = dm.load_tokenizer()
    torch.manual_seed(0)
    model = zoo.create_model("test-tiny", vocab={"text_size": tok.vocab_size, "image_code_size": 16, "loc_bins": 8})
    dm.bind(model.cfg, model.layout, tokenizer=tok)
    batch = next(iter(dm.train_dataloader()))
    counts = batch["image_counts"]
    assert int(counts.sum()) == len(batch["labels"]) and (counts == 3).all()  # 2 questions + 1 grounding each
    ends = counts.cumsum(0) - 1  # each image's last target is its grounding box
    lo, hi = model.layout.ranges()["loc_bins"]
    boxes = batch["labels"][ends]
    assert ((boxes[:, :4] >= lo) & (boxes[:, :4] < hi)).all() and (boxes[:, 4] == 2).all()  # 4 locations + EOS
    prompt = tok.decode((batch["prompt_ids"][ends[0]] - model.layout.text_start).clamp(min=0).tolist())
    assert prompt.startswith(grounding_prompt("")[:-1].strip())
    task = VQATask(model, tok)
    loss = task.loss(batch)
    assert torch.isfinite(loss) and loss.requires_grad
