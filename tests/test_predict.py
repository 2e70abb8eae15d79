"""zoo-predict and the bundle's task methods on tiny models, from the shell entry point and from Python."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from modalities.text import TextTokenizer
from zoo.predict import main
from zoo.pretrained import Pretrained

TEXTS = ["a small red circle", "the wearer walks then sits", "what colour is the square?"] * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A test-tiny model with image and sensor modalities."""
    tok = TextTokenizer.train(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    sensor = {"channels": ["acc_x", "acc_y", "acc_z"], "sample_rate": 50.0, "patch_len": 10, "patch_stride": 10,
              "max_len": 200, "mean": [0.0, 0.0, 9.8], "std": [1.0, 1.0, 1.0]}
    model = zoo.create_model("test-tiny", vocab={"text_size": tok.vocab_size, "image_code_size": 16, "loc_bins": 4},
                             modalities={"sensor": sensor})
    tasks = {"caption": {"max_new_tokens": 6}, "vqa": {"max_new_tokens": 4}, "sensor_to_text": {"max_new_tokens": 5}}
    return Pretrained(model, tok, tasks=tasks).save_pretrained(tmp_path_factory.mktemp("pred") / "tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_caption_folder_file_and_glob(model_dir, images, capsys, tmp_path):
    expected = zoo.load(model_dir).caption([str(images / f"{i}.png") for i in range(3)])
    main([f"pretrained={model_dir}", "task=caption", f"input={images}", "batch_size=2"])
    rows = _lines(capsys)
    assert [r["input"] for r in rows] == [str(images / f"{i}.png") for i in range(3)]
    assert [r["caption"] for r in rows] == expected and all(len(c.split()) <= 6 for c in expected)
    main([f"pretrained={model_dir}", "task=caption", f"input={images / '1.png'}"])
    assert _lines(capsys) == [rows[1]]
    out = tmp_path / "res" / "captions.json"
    main([f"pretrained={model_dir}", "task=caption", f"input={images}/[02].png", f"out={out}"])
    assert json.loads(out.read_text()) == [rows[0], rows[2]]
    main([f"pretrained={model_dir}", "task=caption", f"input={images}", "precision=bf16"])
    assert len(_lines(capsys)) == 3


def test_vqa_question_and_jsonl(model_dir, images, capsys, tmp_path):
    main([f"pretrained={model_dir}", "task=vqa", f"input={images}", "question=what colour is the square?"])
    rows = _lines(capsys)
    assert len(rows) == 3 and all(r["question"] == "what colour is the square?" and "answer" in r for r in rows)
    jsonl = images / "qs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": f"{i}.png", "question": q})
                               for i, q in [(0, "what colour is the square?"), (2, "how many circles?")]))
    main([f"pretrained={model_dir}", "task=vqa", f"input={jsonl}"])
    rows2 = _lines(capsys)
    assert [r["question"] for r in rows2] == ["what colour is the square?", "how many circles?"]
    assert rows2[0]["answer"] == rows[0]["answer"]
    with pytest.raises(SystemExit, match="needs question"):
        main([f"pretrained={model_dir}", "task=vqa", f"input={images}"])


def test_sensor_describe_files_and_arrays(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    recs = [rng.normal(size=(3, n)).astype(np.float32) for n in (120, 80)]
    np.save(tmp_path / "a.npy", recs[0])
    np.savez(tmp_path / "b.npz", values=recs[1], channels=np.array(["acc_x", "acc_y", "acc_z"]), rate=50.0)
    main([f"pretrained={model_dir}", "task=sensor", f"input={tmp_path}"])
    rows = _lines(capsys)
    bundle = zoo.load(model_dir)
    assert [r["description"] for r in rows] == bundle.describe(recs)  # files == arrays (one padded batch)
    assert bundle.describe(recs[1]) == rows[1]["description"]  # alone == in the padded batch


def test_unsupported_task_and_bad_input_errors(model_dir, images):
    with pytest.raises(SystemExit, match="image_codes"):
        main([f"pretrained={model_dir}", "task=t2i", "text=a red circle"])
    with pytest.raises(SystemExit, match="matches no file"):
        main([f"pretrained={model_dir}", "task=caption", f"input={images}/*.jpg"])
    with pytest.raises(SystemExit, match="task must be one of"):
        main([f"pretrained={model_dir}", "task=segment", f"input={images}"])
    with pytest.raises(SystemExit, match="missing pretrained"):
        main(["task=caption"])
    bad = images.parent / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="broken.png"):
        main([f"pretrained={model_dir}", "task=caption", f"input={bad}"])


def test_predict_imports_neither_lightning_nor_hydra(model_dir, images):
    code = ("import sys; from zoo.predict import main; "
            f"main(['pretrained={model_dir}', 'task=caption', 'input={images / '0.png'}']); "
            "bad = [m for m in ('lightning', 'hydra', 'tasks', 'peft') if m in sys.modules]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1])["input"].endswith("0.png")


def test_sensor_csv_files(model_dir, tmp_path, capsys):
    """CSV logs (any column order, timestamps in ms or none) read through modalities.sensor_io."""
    import tasks.data.sensor_formats as formats
    from modalities import sensor_io

    assert formats.read_csv is sensor_io.read_csv and formats.read_recording is sensor_io.read_recording
    rng = np.random.default_rng(1)
    values = rng.normal(size=(3, 150)).astype(np.float32)
    t_ms = np.arange(150) * 20.0  # 50 Hz in milliseconds
    with open(tmp_path / "walk.csv", "w") as f:  # shuffled columns and an extra one
        f.write("acc_z,extra,time_ms,acc_x,acc_y\n")
        for i in range(150):
            f.write(f"{values[2, i]:.6f},7,{t_ms[i]:.1f},{values[0, i]:.6f},{values[1, i]:.6f}\n")
    bundle = zoo.load(model_dir)
    expected = bundle.describe(np.round(values.astype(np.float64), 6))
    assert bundle.describe(str(tmp_path / "walk.csv"), timestamp_column="time_ms", time_unit="ms") == expected
    main([f"pretrained={model_dir}", "task=sensor", f"input={tmp_path / 'walk.csv'}", "timestamp_column=time_ms",
          "time_unit=ms"])
    assert _lines(capsys) == [{"input": str(tmp_path / "walk.csv"), "description": expected}]
    # no timestamp column: the rate given on the command line
    (tmp_path / "plain").mkdir()
    sensor_io.write_csv(tmp_path / "plain" / "a.csv", values, ["acc_x", "acc_y", "acc_z"], t_ms / 1000)
    with open(tmp_path / "plain" / "b.csv", "w") as f:
        f.write("acc_x,acc_y,acc_z\n" + "".join(f"{a:.4f},{b:.4f},{c:.4f}\n" for a, b, c in values.T))
    main([f"pretrained={model_dir}", "task=sensor", f"input={tmp_path / 'plain' / 'b.csv'}",
          "timestamp_column=null", "rate=50"])
    no_ts = _lines(capsys)[0]["description"]
    assert no_ts == bundle.describe(str(tmp_path / "plain" / "a.csv"))  # same 4-decimal values, same sampling
    with pytest.raises(SystemExit, match="no timestamp column 'timestamp'"):
        main([f"pretrained={model_dir}", "task=sensor", f"input={tmp_path / 'plain' / 'b.csv'}"])


# --- text-to-image ---------------------------------------------------------------------------------
def _task_codes(task, texts: list[str], batch_size: int) -> list[list[int]]:
    """Codes of the in-memory training task's evaluation path: its prompts, batches and seeded generator."""
    from tasks.data.collate import pad_ids
    from zoo.instructions import t2i_prompt

    off = task.layout.text_start
    prompts = [[t + off for t in ids] for ids in task.tokenizer.encode_batch([t2i_prompt(c) for c in texts], 64)]
    task._gen = None  # what on_validation_epoch_start does: the seed restarts
    out = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = pad_ids(prompts[i:i + batch_size])
        out += task.decode_outputs(task.generate_tokens({"prompt_ids": ids, "prompt_mask": mask}))
    return out


def test_t2i_export_layout_and_round_trip_codes(t2i_export):
    from conftest import T2I_CAPTIONS

    folder, task = t2i_export
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["image_codes"] == {"folder": "image_codes", "format": "diffusers.VQModel", "num_codes": 16,
                                  "grid": [8, 8], "image_size": 64}
    assert sorted(p.name for p in (folder / "image_codes").iterdir()) == ["config.json",
                                                                         "diffusion_pytorch_model.safetensors"]
    saved = cfg["tasks"]["text_to_image"]
    assert (saved["guidance_scale"], saved["top_k"], saved["seed"]) == (2.5, 6, 7)
    loaded = zoo.load(folder)
    sd, sd2 = task.image_tokenizer.state_dict(), loaded.image_tokenizer.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    # the saved sampling settings and seed reproduce the task's evaluation, batch for batch
    for bs in (3, 2):
        codes = loaded.generate_image_codes(T2I_CAPTIONS, batch_size=bs)
        assert codes.shape == (3, 64) and 0 <= int(codes.min()) and int(codes.max()) < 16  # exactly h*w codes
        assert codes.tolist() == _task_codes(task, T2I_CAPTIONS, bs)
    # overrides: another seed / unguided sampling change the codes; unguided == the task at guidance 1
    ref = loaded.generate_image_codes(T2I_CAPTIONS)
    assert not torch.equal(loaded.generate_image_codes(T2I_CAPTIONS, seed=8), ref)
    task.hparams.guidance_scale = 1.0
    try:
        assert loaded.generate_image_codes(T2I_CAPTIONS, guidance_scale=1.0).tolist() == \
            _task_codes(task, T2I_CAPTIONS, 3)
    finally:
        task.hparams.guidance_scale = 2.5
    # without the KV cache: the same codes
    assert torch.equal(loaded.generate_image_codes(T2I_CAPTIONS, use_cache=False), ref)


def test_generate_image_returns_pil_images(t2i_export):
    folder, task = t2i_export
    bundle = zoo.load(folder)
    images = bundle.generate_image(["a small red circle", "a yellow triangle"], seed=3)
    assert isinstance(images, list) and len(images) == 2
    assert all(isinstance(im, Image.Image) and im.size == (64, 64) and im.mode == "RGB" for im in images)
    one = bundle.generate_image("a small red circle", seed=3)  # one prompt in, one image out
    assert isinstance(one, Image.Image)
    assert np.array_equal(np.asarray(one), np.asarray(bundle.generate_image(["a small red circle"], seed=3)[0]))
    pixels = bundle.generate_image(["a small red circle"], seed=3, output_type="pt")
    codes = bundle.generate_image_codes(["a small red circle"], seed=3)
    assert torch.equal(pixels, task.image_tokenizer.decode(codes))  # the VQ decoder of the codes
    with pytest.raises(ValueError, match="output_type"):
        bundle.generate_image("x", output_type="np")


def test_zoo_predict_t2i_writes_pngs(t2i_export, tmp_path, capsys):
    folder, _ = t2i_export
    out = tmp_path / "gen"
    main([f"pretrained={folder}", "task=t2i", "input=a small red circle", f"output={out}"])
    rows = _lines(capsys)
    assert rows == [{"text": "a small red circle", "image": str(out / "0000.png")}]
    expected = zoo.load(folder).generate_image("a small red circle")
    assert np.array_equal(np.asarray(Image.open(out / "0000.png").convert("RGB")), np.asarray(expected))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle\n\na yellow triangle\na large blue square\n")
    main([f"pretrained={folder}", "task=t2i", f"input={prompts}", f"out={tmp_path / 'many'}", "batch_size=2",
          "guidance_scale=1.5", "seed=11"])
    rows = _lines(capsys)
    assert [r["text"] for r in rows] == ["a small red circle", "a yellow triangle", "a large blue square"]
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    again = zoo.load(folder).generate_image(["a small red circle", "a yellow triangle", "a large blue square"],
                                            batch_size=2, guidance_scale=1.5, seed=11)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "many" / "0002.png").convert("RGB")), np.asarray(again[2]))
    with pytest.raises(SystemExit, match="matches no file"):
        main([f"pretrained={folder}", "task=t2i", f"input={tmp_path / 'missing.txt'}"])
