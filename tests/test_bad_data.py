"""Every bad-data / bad-input case of issue 29 part 4: a clear error naming the file and the record (index, id
or line) before training starts, or a counted, named skip under ``skip_bad``; and the same for ``zoo-predict``.
Each test is one case of the table in docs/bad_data.md."""
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tasks.data.coco import DataError, read_coco_captions
from tasks.data.formats import read_jsonl
from tasks.data.validate import Problems
from tests.imagefiles import write_image

LATIN1 = "un café noir".encode("latin-1")  # é is 0xe9: not UTF-8


# ------------------------------------------------------------------------------------------------ fixtures
def _images(root: Path, n: int) -> list[Path]:
    return [write_image(root / "images" / f"{i}.png", "RGB", seed=i) for i in range(n)]


def _coco(path: Path, files: list[str], captions: list | None = None) -> Path:
    caps = captions if captions is not None else [f"picture {i}" for i in range(len(files))]
    data = {"images": [{"id": i, "file_name": f} for i, f in enumerate(files)],
            "annotations": [{"id": 100 + i, "image_id": i, "caption": c} for i, c in enumerate(caps)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _caption_dm(root: Path, **kw):
    from tasks.caption import CaptionDataModule

    args = dict(root=str(root), train_file="train.json", val_file="val.json", test_file=None, generate=None,
                tokenizer_vocab_size=300, batch_size=2, num_workers=0)
    return CaptionDataModule(**{**args, **kw})


@pytest.fixture
def data_root(tmp_path) -> Path:
    """``root/`` with 6 images and good train/val COCO files, and ``outside/`` with one image beside it."""
    root = tmp_path / "root"
    _images(root, 6)
    _coco(root / "train.json", [f"images/{i}.png" for i in range(4)])
    _coco(root / "val.json", ["images/4.png", "images/5.png"])
    write_image(tmp_path / "outside" / "secret.png", "RGB", seed=9)
    return root


# ------------------------------------------------------------------------------------------------ 1. paths
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_image_path_outside_the_data_root_is_refused(data_root, how):
    secret = data_root.parent / "outside" / "secret.png"
    name = {"dotdot": "../outside/secret.png", "absolute": str(secret), "symlink": "images/link.png"}[how]
    if how == "symlink":
        os.symlink(secret, data_root / "images" / "link.png")
    _coco(data_root / "train.json", ["images/0.png", name, "images/2.png", "images/3.png"])
    with pytest.raises(DataError) as e:
        _caption_dm(data_root).prepare_data()
    msg = str(e.value)
    assert "train.json" in msg and "image id=1" in msg and "outside the data root" in msg
    assert str(secret.resolve()) in msg and "data.allow_outside_root=true" in msg


def test_outside_root_allowed_explicitly_or_skipped_and_counted(data_root, caplog):
    _coco(data_root / "train.json", ["images/0.png", "../outside/secret.png", "images/2.png", "images/3.png"])
    dm = _caption_dm(data_root, allow_outside_root=True)
    dm.prepare_data()
    assert [r.image_id for r in dm._read("train")] == [0, 1, 2, 3]
    dm = _caption_dm(data_root, skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="tasks.data.validate"):
        dm.prepare_data()
    assert [r.image_id for r in dm._read("train")] == [0, 2, 3]
    assert "skipped 1 bad record(s)" in caplog.text and "image id=1" in caplog.text
    assert dm.split_info("train").skipped[0].startswith(f"{data_root / 'train.json'}: image id=1")


def test_vqa_jsonl_absolute_path_outside_root(data_root):
    from tasks.vqa import VQADataModule

    secret = data_root.parent / "outside" / "secret.png"
    rows = [{"image": "images/0.png", "question": "what?", "answers": ["red"], "question_id": 1},
            {"image": str(secret), "question": "what?", "answers": ["red"], "question_id": 2}]
    (data_root / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = VQADataModule(str(data_root), format="jsonl", splits={"train": {"file": "q.jsonl"}}, generate=None)
    with pytest.raises(DataError, match=r"q\.jsonl: train question_id=2 \(image_id=.*secret\.png\): path .* outside"):
        dm.prepare_data()


# ------------------------------------------------------------------------------------------------ 2. text files
def test_non_utf8_annotation_files_name_file_line_and_byte(tmp_path):
    coco = tmp_path / "captions.json"
    coco.write_bytes(b'{"images": [],\n "annotations": [{"caption": "' + LATIN1 + b'"}]}')
    with pytest.raises(DataError, match=r"captions\.json: not UTF-8 text: byte 0xe9 at line 2, column 37"):
        read_coco_captions(coco)
    jl = tmp_path / "m.jsonl"
    jl.write_bytes(b'{"image": "a.png", "captions": ["ok"]}\n{"image": "b.png", "captions": ["' + LATIN1 + b'"]}\n')
    with pytest.raises(DataError, match=r"m\.jsonl: not UTF-8 text: byte 0xe9 at line 2"):
        read_jsonl(jl)


def test_empty_dataset_names_the_file(data_root):
    _coco(data_root / "train.json", [])
    with pytest.raises(DataError, match=r"train\.json: the train split has no usable records: nothing to train on"):
        _caption_dm(data_root).prepare_data()


@pytest.mark.parametrize("caption, shown", [(42, r"a number \(42\)"), (["a", "b"], r"a list \(\['a', 'b'\]\)"),
                                            (None, "null"), (True, r"a boolean \(True\)")])
def test_caption_that_is_not_a_string(tmp_path, caption, shown):
    _images(tmp_path, 2)
    path = _coco(tmp_path / "c.json", ["images/0.png", "images/1.png"], ["fine", caption])
    with pytest.raises(DataError, match=rf"c\.json: annotations\[1\] \(id=101, image_id=1\) has caption {shown}, "
                                        "not a string"):
        read_coco_captions(path)
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"image": "images/0.png", "captions": ["fine"]}) + "\n"
                  + json.dumps({"image": "images/1.png", "captions": [caption] if caption is not None else None}))
    problems = Problems(skip_bad=True)
    assert len(read_jsonl(jl, problems=problems)) == 1
    assert problems.messages[0].startswith(f"{jl}:2 (images/1.png): ")
    assert ("not a string" in problems.messages[0]) or ("empty or missing" in problems.messages[0])


# ------------------------------------------------------------------------------------------------ sensor files
def _motion_folder(tmp_path: Path, bad: dict[int, np.ndarray] | None = None, n: int = 4) -> Path:
    from tasks.data.sensor_formats import write_csv, write_manifest

    folder = tmp_path / "motion"
    folder.mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n):
        values = (bad or {}).get(i, rng.normal(size=(6, 100)))
        write_csv(folder / f"r{i}.csv", values, ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"],
                  np.arange(values.shape[1]) / 50.0)
        rows.append({"id": f"r{i}", "file": f"r{i}.csv", "descriptions": ["the wearer walks"]})
    write_manifest(folder / "manifest_train.jsonl", rows)
    write_manifest(folder / "manifest_val.jsonl", rows[:2])
    return folder


def _sensor_dm(folder: Path, **kw):
    from tasks.sensor_to_text import SensorTextDataModule

    return SensorTextDataModule(str(folder), generate=None, test_file=None, num_workers=0, tokenizer_vocab_size=300,
                                batch_size=2, **kw)


def test_sensor_all_nan_channel(tmp_path):
    values = np.random.default_rng(1).normal(size=(6, 100))
    values[4] = np.nan  # gyro_y: nothing but NaN
    folder = _motion_folder(tmp_path, {2: values})
    with pytest.raises(DataError) as e:
        _sensor_dm(folder).prepare_data()
    msg = str(e.value)
    assert f"{folder / 'manifest_train.jsonl'}:3 (id=r2)" in msg and "r2.csv" in msg
    assert "channel(s) ['gyro_y'] hold no finite value" in msg


def test_sensor_single_row_skipped_and_counted(tmp_path, caplog):
    folder = _motion_folder(tmp_path, {1: np.ones((6, 1))})
    with pytest.raises(DataError, match=r"manifest_train\.jsonl:2 \(id=r1\): .*r1\.csv: only 1 sample row"):
        _sensor_dm(folder).prepare_data()
    dm = _sensor_dm(folder, skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="tasks.data.validate"):
        dm.prepare_data()
    assert [r.id for r in dm._read("train")] == ["r0", "r2", "r3"] and len(dm.recordings("train")) == 3
    assert "skipped 1 bad record(s)" in caplog.text and "manifest_train.jsonl:2 (id=r1)" in caplog.text


def test_sensor_non_utf8_csv_and_escaping_file(tmp_path):
    folder = _motion_folder(tmp_path)
    (folder / "r3.csv").write_bytes(b"timestamp,acc_x\n0.0," + LATIN1 + b"\n")
    with pytest.raises(DataError, match=r"manifest_train\.jsonl:4 \(id=r3\): .*r3\.csv: not UTF-8 text: byte 0xe9 "
                                        r"at line 2"):
        _sensor_dm(folder).prepare_data()
    (folder / "r3.csv").unlink()
    (tmp_path / "elsewhere.csv").write_text("x")
    rows = [json.loads(line) for line in (folder / "manifest_train.jsonl").read_text().splitlines()]
    rows[3]["file"] = "../elsewhere.csv"
    (folder / "manifest_train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"manifest_train\.jsonl:4 \(id=r3\): path '.*elsewhere\.csv' resolves to "
                                        r".* outside the data root"):
        _sensor_dm(folder).prepare_data()


# ------------------------------------------------------------------------------------------------ VQA questions
def _vqa_jsonl(root: Path, questions: list) -> Path:
    _images(root, 2)
    rows = [{"image": f"images/{i % 2}.png", "question": q, "answers": ["red"], "question_id": 10 + i}
            for i, q in enumerate(questions)]
    (root / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root / "q.jsonl"


def test_blank_and_non_string_vqa_questions(tmp_path):
    path = _vqa_jsonl(tmp_path, ["what colour?", "   ", 7])
    problems = Problems(skip_bad=True)
    recs = read_jsonl(path, kind="vqa", problems=problems)
    assert [r.question_id for r in recs] == [10]
    assert problems.messages == [f"{path}:2 (images/1.png): empty or missing question",
                                 f"{path}:3 (images/0.png): 'question' is a number (7), not a string"]


def test_over_long_vqa_question_warns_with_token_count(tmp_path, caplog):
    from tasks.vqa import VQADataModule
    from zoo.vocab import VocabLayout

    long_q = " ".join(["what colour is the square"] * 1000)  # 5,000 words
    _vqa_jsonl(tmp_path, ["what colour?", long_q])
    dm = VQADataModule(str(tmp_path), format="jsonl", splits={"train": {"file": "q.jsonl"}}, generate=None,
                       tokenizer_vocab_size=300, max_question_len=32, batch_size=1, num_workers=0)
    dm.prepare_data()
    dm.layout = VocabLayout(text_size=dm.load_tokenizer().vocab_size)
    n_tokens = len(dm.tokenizer.encode(long_q))
    with caplog.at_level(logging.WARNING, logger="tasks.data_module"):
        prompts = dm._questions(dm.read("train"))
    assert max(len(p) for p in prompts) == 32
    assert ("1 of 2 questions (data.max_question_len) exceed the limit of 32 tokens and are cut to it" in caplog.text
            and f"the longest, question_id=11 (image 1.png), has {n_tokens} tokens" in caplog.text and n_tokens > 4000)


# ------------------------------------------------------------------------------------------------ pre-flight
def _trainer(**kw):
    base = dict(max_steps=-1, max_epochs=1, limit_train_batches=None, limit_val_batches=None, fast_dev_run=False,
                world_size=1)
    return SimpleNamespace(**{**base, **kw})


def _cfg(**kw):
    return {"train": True, "test": False, **kw}


def test_empty_val_split_is_refused_unless_validation_is_off(data_root):
    from tasks.cli.preflight import RunConfigError, check_run

    _coco(data_root / "val.json", [])
    dm = _caption_dm(data_root)
    dm.prepare_data()
    with pytest.raises(RunConfigError, match=r"val\.json: the val split has no usable records: training would never "
                                             r"validate .*trainer\.limit_val_batches=0"):
        check_run(_cfg(), dm, _trainer())
    check_run(_cfg(), dm, _trainer(limit_val_batches=0))  # validation off explicitly: fine


def test_skip_bad_leaving_zero_batches_is_refused(data_root):
    from tasks.cli.preflight import RunConfigError, check_run

    (data_root / "images" / "1.png").write_text("not an image")
    (data_root / "images" / "2.png").unlink()
    dm = _caption_dm(data_root, skip_bad=True, batch_size=3)
    dm.prepare_data()  # 4 training records, 2 bad: 2 left < batch_size
    with pytest.raises(RunConfigError) as e:
        check_run(_cfg(), dm, _trainer())
    msg = str(e.value)
    assert msg.startswith(f"{data_root / 'train.json'}: 2 training records (2 bad record(s) skipped with "
                          "data.skip_bad=true, e.g. ")
    assert "images[2] (id=2) points at missing file" in msg and "make 0 batches of data.batch_size=3" in msg
    assert "the run would train 0 steps" in msg


@pytest.mark.parametrize("setting, match", [
    (dict(max_steps=0), "trainer.max_steps=0"), (dict(max_epochs=0), "trainer.max_epochs=0"),
    (dict(limit_train_batches=0), "trainer.limit_train_batches=0"),
    (dict(limit_train_batches=0.1), r"train\.json: trainer\.limit_train_batches=0\.1 of 2 training batches is 0"),
    (dict(world_size=4), r"train\.json: 4 training records make 0 batches of data\.batch_size=2 per device"),
])
def test_configurations_that_train_zero_steps(data_root, setting, match):
    from tasks.cli.preflight import RunConfigError, check_run

    dm = _caption_dm(data_root)
    dm.prepare_data()
    check_run(_cfg(), dm, _trainer())  # the good configuration passes
    with pytest.raises(RunConfigError, match=match):
        check_run(_cfg(), dm, _trainer(**setting))


def test_test_true_without_test_data(data_root):
    """No test split configured: the run trains and skips testing (it says so); an empty test file is an error."""
    from tasks.cli.preflight import RunConfigError, check_run

    dm = _caption_dm(data_root)
    dm.prepare_data()
    check_run(_cfg(test=True), dm, _trainer())
    _coco(data_root / "test.json", [])
    dm = _caption_dm(data_root, test_file="test.json")
    dm.prepare_data()
    with pytest.raises(RunConfigError, match=r"test\.json: the test split has no usable records"):
        check_run(_cfg(test=True), dm, _trainer())


def test_zoo_train_refuses_empty_val_before_training(data_root, tmp_path, capsys):
    """The real entry point: the error comes before the first step (no checkpoint, no metrics), as a message."""
    from tasks.cli.train import train
    from tests.conftest import compose

    _coco(data_root / "val.json", [])
    run = tmp_path / "run"
    cfg = compose(["experiment=caption_shapes", "model=test_tiny", "model.image_pretrain=null", "data.num_workers=0",
                   "data.batch_size=2", "data.tokenizer_vocab_size=300", f"data.root={data_root}", "data.generate=null",
                   "data.train_file=train.json", "data.val_file=val.json", "data.test_file=null", "test=false",
                   "logger={}"], run)
    with pytest.raises(DataError, match=r"val\.json: the val split has no usable records: training would never "
                                        "validate"):
        train(cfg)
    assert not (run / "checkpoints").exists() and not (run / "metrics.json").exists()


# ------------------------------------------------------------------------------------------------ 3. predict
@pytest.fixture(scope="module")
def caption_model(tmp_path_factory) -> Path:
    """A test-tiny model trained (config.json "tasks") for captioning only, with a sensor modality."""
    import zoo
    from modalities.text import TextTokenizer
    from zoo.pretrained import Pretrained

    tok = TextTokenizer.train(["a small red circle", "what colour is the square?"] * 20, vocab_size=300)
    torch.manual_seed(0)
    sensor = {"channels": ["acc_x", "acc_y", "acc_z"], "sample_rate": 50.0, "patch_len": 10, "patch_stride": 10,
              "max_len": 200, "mean": [0.0, 0.0, 9.8], "std": [1.0, 1.0, 1.0]}
    model = zoo.create_model("test-tiny", vocab={"text_size": tok.vocab_size}, modalities={"sensor": sensor})
    return Pretrained(model, tok, tasks={"caption": {"max_new_tokens": 4}}).save_pretrained(
        tmp_path_factory.mktemp("bad") / "caption-only")


def _lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_predict_folder_with_an_unreadable_file(caption_model, tmp_path, capsys):
    from zoo.predict import main

    folder = tmp_path / "imgs"
    for i in range(3):
        write_image(folder / f"{i}.png", "RGB", seed=i)
    (folder / "1.png").write_bytes((folder / "1.png").read_bytes()[:60])  # truncated
    with pytest.raises(SystemExit, match=rf"error: cannot read input .*{folder / '1.png'}.*skip_bad=true"):
        main([f"pretrained={caption_model}", "task=caption", f"input={folder}"])
    capsys.readouterr()
    main([f"pretrained={caption_model}", "task=caption", f"input={folder}", "skip_bad=true", "batch_size=2"])
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["input"] for r in rows] == [str(folder / f"{i}.png") for i in range(3)]
    assert "caption" in rows[0] and "caption" in rows[2] and "caption" not in rows[1]
    assert str(folder / "1.png") in rows[1]["error"]
    assert "skipped 1 unreadable input(s) of 3" in captured.err and str(folder / "1.png") in captured.err


@pytest.mark.parametrize("args, match", [
    (["precision=bf16", "quantize=int8"], "precision=bf16 and quantize=int8 do not combine"),
    (["quantize=int4"], "quantize must be none or int8"),
    (["device=cuda"], "device=cuda but torch sees no CUDA GPU on this machine"),
])
def test_predict_option_clashes_before_loading(tmp_path, args, match):
    from zoo.predict import main

    if "device=cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    missing = tmp_path / "no-such-model"  # loading it would fail differently: the options are checked first
    with pytest.raises(SystemExit, match=f"error: {match}"):
        main([f"pretrained={missing}", "task=caption", "input=x.png", *args])


def test_task_the_model_was_not_trained_for(caption_model):
    import zoo
    from zoo.pretrained import UntrainedTaskError

    bundle = zoo.load(caption_model)
    img = torch.zeros(3, 32, 32)
    with pytest.raises(UntrainedTaskError, match=r"not trained for vqa \(answer\(\) was called\); config\.json lists "
                                                 r"the tasks \['caption'\]: use caption\(\)"):
        bundle.answer(img, "what colour?")
    with pytest.raises(UntrainedTaskError, match=r"not trained for sensor_to_text"):
        bundle.describe(np.zeros((3, 50)))
    assert isinstance(bundle.caption(img), str)


def test_predict_blank_and_over_long_questions(caption_model, tmp_path):
    import zoo
    from zoo.predict import main

    bundle = zoo.load(caption_model)
    bundle.tasks = {"caption": {}, "vqa": {"max_new_tokens": 2}}
    img = torch.zeros(3, 32, 32)
    with pytest.raises(ValueError, match=r"question 1 \(for image Tensor\) is blank: '  '"):
        bundle.answer([img, img], ["what?", "  "])
    long_q = " ".join(["what colour is the square"] * 1000)
    n = len(bundle.tokenizer.encode(long_q))
    limit = bundle.model.cfg.max_positions
    with pytest.warns(UserWarning, match=rf"question 1 has {n} tokens, over this model's limit of {limit}"):
        bundle.answer([img, img], ["what?", long_q])
    write_image(tmp_path / "a.png", "RGB")
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": "a.png", "question": "ok?"}) + "\n"
                                      + json.dumps({"image": "a.png", "question": " "}))
    with pytest.raises(SystemExit, match=r"q\.jsonl: record 1 \(a\.png\) has a blank question"):
        main([f"pretrained={caption_model}", "task=vqa", f"input={tmp_path / 'q.jsonl'}"])


def test_predict_sensor_files_single_row_and_nan_channel(tmp_path, caption_model, capsys):
    import zoo
    from zoo.predict import predict

    bundle = zoo.load(caption_model)
    bundle.tasks = {"sensor_to_text": {"max_new_tokens": 3}}
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.normal(size=(3, 60)))
    np.save(tmp_path / "b.npy", np.ones((3, 1)))
    nan = rng.normal(size=(3, 60))
    nan[1] = np.nan
    np.save(tmp_path / "c.npy", nan)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'b.npy'}: only 1 sample row"):
        predict(bundle, "sensor", str(tmp_path))
    rows = predict(bundle, "sensor", str(tmp_path), skip_bad=True)
    assert "description" in rows[0] and [r.get("error", "")[:0] for r in rows[1:]] == ["", ""]
    assert "only 1 sample row" in rows[1]["error"] and "channel(s) ['acc_y'] hold no finite value" in rows[2]["error"]
    assert "skipped 2 unreadable input(s) of 3" in capsys.readouterr().err


def test_validation_fraction_of_zero_batches(data_root):
    from tasks.cli.preflight import RunConfigError, check_run

    dm = _caption_dm(data_root, eval_batch_size=1)
    dm.prepare_data()
    check_run(_cfg(), dm, _trainer(limit_val_batches=0.5))  # 1 of the 2 val batches
    with pytest.raises(RunConfigError, match=r"val\.json: trainer\.limit_val_batches=0\.1 of 2 val batches is 0 "
                                             r"batches: training would never validate"):
        check_run(_cfg(), dm, _trainer(limit_val_batches=0.1))


def test_non_utf8_grounding_file(tmp_path):
    from tasks.data.grounding import read_grounding

    path = tmp_path / "refs.json"
    path.write_bytes(b'{"images": [], "refs": [{"sentence": "' + LATIN1 + b'"}]}')
    with pytest.raises(DataError, match=r"refs\.json: not UTF-8 text: byte 0xe9 at line 1"):
        read_grounding(path)


def test_bf16_on_an_int8_model_from_python(caption_model):
    import zoo
    from zoo.compress import apply_quantize

    bundle = apply_quantize(zoo.load(caption_model), "int8")
    bundle.precision = "bf16"
    with pytest.raises(ValueError, match="precision='bf16' does not combine with an int8-quantized model"):
        bundle.caption(torch.zeros(3, 32, 32))
    bundle.precision = "fp32"
    assert isinstance(bundle.caption(torch.zeros(3, 32, 32)), str)


def test_sensor_recording_longer_than_max_len_fails_before_training(tmp_path):
    folder = _motion_folder(tmp_path, {3: np.random.default_rng(2).normal(size=(6, 900))})  # 18 s at 50 Hz
    with pytest.raises(DataError, match=r"manifest_train\.jsonl:4 \(id=r3\): .*r3\.csv: 900 samples \(18\.0 s\) at "
                                        r"50 Hz exceed max_len=640"):
        _sensor_dm(folder).prepare_data()
