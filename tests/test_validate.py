"""Bad input is caught before training with an error naming the file and the record; skip_bad skips it."""
import json
import logging
from pathlib import Path

import pytest

from tasks.data.coco import DataError, read_coco_captions
from tasks.data.formats import read_jsonl, read_vqa
from tasks.data.validate import Problems, check_image, filter_records
from tests.imagefiles import write_image


def _coco(root: Path, n: int = 4, bad: dict | None = None) -> Path:
    """A COCO captions file over ``n`` good PNGs; ``bad`` patches images/annotations by index."""
    for i in range(n):
        write_image(root / "images" / f"{i}.png", "RGB", seed=i)
    data = {"images": [{"id": i, "file_name": f"images/{i}.png"} for i in range(n)],
            "annotations": [{"id": 100 + i, "image_id": i, "caption": f"picture {i}"} for i in range(n)]}
    for (part, idx), patch in (bad or {}).items():
        data[part][idx].update(patch)
    path = root / "captions.json"
    path.write_text(json.dumps(data))
    return path


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def test_missing_image(tmp_path):
    path = _coco(tmp_path, bad={("images", 2): {"file_name": "images/nope.png"}})
    with pytest.raises(DataError, match=r"captions\.json: images\[2\] \(id=2\) points at missing file .*nope\.png"):
        read_coco_captions(path)


def test_truncated_and_unreadable_images(tmp_path):
    path = _coco(tmp_path)
    _truncate(tmp_path / "images" / "1.png")
    (tmp_path / "images" / "3.png").write_text("not an image at all")
    assert "truncated" in check_image(tmp_path / "images" / "1.png")
    recs = read_coco_captions(path)
    with pytest.raises(DataError, match=r"captions\.json image id=1: unreadable or truncated image .*1\.png"):
        filter_records(recs, lambda r: r.path, lambda r: f"{path.name} image id={r.image_id}", Problems())
    problems = Problems(skip_bad=True)
    kept = filter_records(recs, lambda r: r.path, lambda r: f"id={r.image_id}", problems)
    assert [r.image_id for r in kept] == [0, 2]
    assert "not a readable image" in problems.messages[1] and "3.png" in problems.messages[1]


def test_empty_caption(tmp_path):
    path = _coco(tmp_path, bad={("annotations", 1): {"caption": "   "}})
    with pytest.raises(DataError, match=r"annotations\[1\] \(id=101, image_id=1\) has an empty caption"):
        read_coco_captions(path)


def test_malformed_json(tmp_path):
    path = _coco(tmp_path)
    path.write_text(path.read_text()[:-5])
    with pytest.raises(DataError, match=r"captions\.json: malformed JSON at line 1"):
        read_coco_captions(path)
    jl = tmp_path / "m.jsonl"
    jl.write_text('{"image": "images/0.png", "captions": ["ok"]}\n{"image": "images/1.png", "captions": [\n')
    with pytest.raises(DataError, match=r"m\.jsonl:2: malformed JSON"):
        read_jsonl(jl)
    problems = Problems(skip_bad=True)
    assert len(read_jsonl(jl, problems=problems)) == 1 and len(problems) == 1


def test_annotation_points_at_unknown_image(tmp_path):
    path = _coco(tmp_path, bad={("annotations", 3): {"image_id": 99}})
    with pytest.raises(DataError, match=r"annotations\[3\] \(id=103\) points at unknown image_id 99"):
        read_coco_captions(path)
    q = tmp_path / "q.json"
    q.write_text(json.dumps({"images": [{"id": 0, "file_name": "images/0.png"}],
                             "questions": [{"image_id": 5, "question": "what?", "question_id": 1}]}))
    with pytest.raises(DataError, match=r"q\.json: questions\[0\] \(question_id=1, image_id=5\) points at unknown"):
        read_vqa(q, None, tmp_path)


def test_vqa_empty_question_and_answer(tmp_path):
    q, a = tmp_path / "q.json", tmp_path / "a.json"
    q.write_text(json.dumps({"questions": [{"image_id": 0, "question": "", "question_id": 1}]}))
    with pytest.raises(DataError, match=r"questions\[0\] \(question_id=1, image_id=0\) has an empty question"):
        read_vqa(q, None, tmp_path, image_pattern="images/{image_id}.png")
    q.write_text(json.dumps({"questions": [{"image_id": 0, "question": "what?", "question_id": 1}]}))
    a.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": [{"answer": ""}]}]}))
    with pytest.raises(DataError, match=r"a\.json: annotations\[0\] \(question_id=1\) has an empty answer"):
        read_vqa(q, a, tmp_path, image_pattern="images/{image_id}.png")


def _caption_dm(root: Path, skip_bad: bool):
    from tasks.caption import CaptionDataModule

    return CaptionDataModule(root=str(root), train_file="captions.json", val_file="captions.json", test_file=None,
                             generate=None, skip_bad=skip_bad, tokenizer_vocab_size=300)


def test_caption_datamodule_fails_in_prepare_data_or_skips_and_logs(tmp_path, caplog):
    path = _coco(tmp_path, n=6, bad={("images", 4): {"file_name": "images/gone.png"},
                                     ("annotations", 0): {"caption": ""}})
    _truncate(tmp_path / "images" / "2.png")
    with pytest.raises(DataError, match=r"captions\.json"):
        _caption_dm(tmp_path, skip_bad=False).prepare_data()
    dm = _caption_dm(tmp_path, skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="tasks.data.validate"):
        dm.prepare_data()
    assert sorted(r.image_id for r in dm._read("train")) == [1, 3, 5]  # 0 had its only caption dropped
    text = caplog.text
    assert "skipped" in text and "gone.png" in text and "image id=2" in text


def test_vqa_datamodule_skip_bad(tmp_path, caplog):
    from tasks.vqa import VQADataModule

    for i in range(3):
        write_image(tmp_path / "images" / f"{i}.png", "RGB", seed=i)
    _truncate(tmp_path / "images" / "1.png")
    (tmp_path / "q.json").write_text(json.dumps({"images": [{"id": i, "file_name": f"images/{i}.png"} for i in range(3)],
                                                 "questions": [{"image_id": i, "question": "what colour?",
                                                                "question_id": i} for i in range(4)]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [{"question_id": i, "answers": ["red"] * 3}
                                                                 for i in range(4)]}))
    splits = {"train": {"questions": "q.json", "annotations": "a.json"}}
    with pytest.raises(DataError, match=r"questions\[3\] \(question_id=3, image_id=3\) points at unknown image_id 3"):
        VQADataModule(str(tmp_path), splits=splits, generate=None).prepare_data()
    dm = VQADataModule(str(tmp_path), splits=splits, generate=None, skip_bad=True, tokenizer_vocab_size=300)
    with caplog.at_level(logging.WARNING, logger="tasks.data.validate"):
        dm.prepare_data()
    assert [r.question_id for r in dm.read("train")] == [0, 2]
    assert "skipped 2 bad record(s)" in caplog.text and "question_id=1" in caplog.text
