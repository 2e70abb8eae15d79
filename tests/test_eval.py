"""zoo-eval: rebuild from a checkpoint alone, write official-format results + metrics.json; a COCO-format
dataset of photo-like JPEG/PNG files in mixed modes fine-tunes a few steps and evaluates."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import compose
from tests.imagefiles import MODES, write_image

TINY = ["model=test_tiny", "data.num_workers=0", "data.batch_size=4", "data.eval_batch_size=64",
        "data.tokenizer_vocab_size=300", "task.max_new_tokens=6", "logger={}", "trainer.max_epochs=1",
        "trainer.max_steps=3", "trainer.limit_val_batches=1", "test=false", "task.warmup_steps=1"]
SHAPES = ["data.shapes.n_train=64", "data.shapes.n_val=16", "data.shapes.n_test=16"]


def compose_eval(overrides: list[str], out: Path):
    from hydra import compose as hcompose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from tasks.runtime.resolvers import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="configs", version_base="1.3"):
        return hcompose(config_name="eval", overrides=[f"paths.output_dir={out}", f"paths.log_dir={out}/logs",
                                                       *overrides])


@pytest.fixture(scope="module")
def vqa_ckpt(tiny_shapes, tmp_path_factory) -> Path:
    from tasks.cli.train import train

    out = tmp_path_factory.mktemp("vqa_run")
    train(compose(["experiment=vqa_shapes", *TINY, f"data.root={tiny_shapes}", *SHAPES], out))
    return out / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("decoding", ["trie", "allcand"])
def test_zoo_eval_vqa_writes_official_results(vqa_ckpt, tiny_shapes, tmp_path, decoding):
    from tasks.data.formats import read_vqa
    from tasks.data.shapes_vqa import vqa_files
    from tasks.cli.evaluate import evaluate

    cfg = compose_eval([f"ckpt={vqa_ckpt}", "data=shapes_vqa", f"data.root={tiny_shapes}", *SHAPES,
                        "data.num_workers=0", f"task.decoding={decoding}", "split=test"], tmp_path)
    metrics = evaluate(cfg)
    results = json.loads((tmp_path / "predictions.json").read_text())
    questions = read_vqa(*vqa_files(tiny_shapes, "test"), tiny_shapes)
    assert sorted(r["question_id"] for r in results) == sorted(q.question_id for q in questions)
    assert all(set(r) == {"question_id", "answer"} and isinstance(r["answer"], str) for r in results)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(metrics) and "test/vqa_acc" in saved and "test/vqa_acc_count" in saved
    answers = {q.answer for q in read_vqa(*vqa_files(tiny_shapes, "train"), tiny_shapes)}
    assert {r["answer"] for r in results} <= answers  # closed-set decoding: the checkpoint's candidates


def test_zoo_eval_cli(vqa_ckpt, tiny_shapes, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "tasks.cli.evaluate", f"ckpt={vqa_ckpt}", "data=shapes_vqa", f"data.root={tiny_shapes}",
            *SHAPES, "data.num_workers=0", "task.num_beams=2", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(args, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"run directory: {run_dir}" in done.stdout
    assert "val/vqa_acc" in json.loads((run_dir / "metrics.json").read_text())
    assert (run_dir / "samples.png").is_file()


def test_zoo_eval_errors(tmp_path):
    from tasks.cli.evaluate import evaluate

    with pytest.raises(FileNotFoundError):
        evaluate(compose_eval([f"ckpt={tmp_path}/missing.ckpt"], tmp_path))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.ckpt"):
        evaluate(compose_eval([f"ckpt={bad}"], tmp_path))


def _photo_coco(root: Path) -> None:
    """COCO captions over photo-like JPEG/PNG files in every mode (train and val share the images)."""
    images = []
    for i, (name, mode) in enumerate(MODES.items()):
        write_image(root / "photos" / name, mode, seed=i, exif_rotate=name == "rotated.jpg")
        images.append({"id": 100 + i, "file_name": f"photos/{name}", "width": 48, "height": 40})
    words = ["a blurry photo of a sunset", "soft colours in a picture", "an image with a bright spot"]
    anns = [{"id": 10 * im["id"] + j, "image_id": im["id"], "caption": words[(i + j) % 3]}
            for i, im in enumerate(images) for j in range(2)]
    for split in ("train", "val"):
        (root / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": anns}))


def test_coco_photos_in_mixed_modes_finetune_and_evaluate(tmp_path):
    from tasks.cli.evaluate import evaluate
    from tasks.cli.train import train

    data = tmp_path / "coco"
    _photo_coco(data)
    own = ["data.generate=null", f"data.root={data}", "data.test_file=null", "data.captions_per_image=2"]
    metrics = train(compose(["experiment=caption_shapes", *TINY, *own, "trainer.max_steps=4",
                             "model.image_pretrain=null"],  # own data: no Shapes scene labels to pretrain the stem on
                            tmp_path / "run"))
    assert metrics["train/loss"] > 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    metrics = evaluate(compose_eval([f"ckpt={ckpt}", "data=shapes_captions", *own, "data.num_workers=0"],
                                    tmp_path / "eval"))
    results = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert sorted(r["image_id"] for r in results) == [100 + i for i in range(len(MODES))]
    assert all(set(r) == {"image_id", "caption"} for r in results)
    assert "val/cider" in metrics


def test_zoo_eval_saved_model_folder(vqa_ckpt, tiny_shapes, tmp_path):
    from tasks.cli.evaluate import evaluate
    from tasks.cli.export import export

    folder = export(vqa_ckpt, tmp_path / "model")
    metrics = evaluate(compose_eval([f"ckpt={folder}", "data=shapes_vqa", f"data.root={tiny_shapes}", *SHAPES,
                                     "data.num_workers=0", "task.decoding=trie"], tmp_path / "eval"))
    assert "val/vqa_acc" in metrics
    assert all(set(r) == {"question_id", "answer"} for r in json.loads((tmp_path / "eval" / "predictions.json").read_text()))


def test_zoo_eval_text_to_image_checkpoint(t2i_export, tiny_shapes, tmp_path):
    """zoo-eval on a text-to-image checkpoint reads its data with the VQ tokenizer the checkpoint names, and
    writes every generated image when task.image_dir is set."""
    from tasks.cli.evaluate import evaluate, load_for_eval
    from tasks.text_to_image import TextToImageTask

    ckpt = t2i_export[0].parent / "run" / "checkpoints" / "last.ckpt"
    _, _, name, settings = load_for_eval(str(ckpt))
    assert name == "text_to_image" and Path(settings["vq_tokenizer"]) == t2i_export[0].parent / "vq"
    # no data= on the command line: the default Shapes data, with the checkpoint's tokenizer and no VQ training spec
    data = TextToImageTask.eval_data_config(settings, "/data")
    assert data.vq_path == settings["vq_tokenizer"] and "vq" not in data
    with pytest.raises(ValueError, match="names no VQ tokenizer"):
        TextToImageTask.eval_data_config({**settings, "vq_tokenizer": None}, "/data")
    images = tmp_path / "images"
    metrics = evaluate(compose_eval([f"ckpt={ckpt}", "data=shapes_t2i", f"data.root={tiny_shapes}", *SHAPES,
                                     f"data.vq_path={settings['vq_tokenizer']}", "data.num_workers=0",
                                     f"+task.image_dir={images}"], tmp_path))
    assert {"val/all_acc", "val/caption_gain", "val/vq_ceiling_all_acc"} <= set(metrics)
    assert len(list((images / "val").glob("*.png"))) == 16 and (tmp_path / "samples.png").is_file()
