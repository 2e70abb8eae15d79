"""Fine-tuning Florence-2 with our Lightning task: the loss equals transformers', LoRA / frozen-encoder training
changes only what it should, the fine-tuned model round-trips, the converters refuse bad records, Florence-2's box
quantisation round-trips, and COCO mAP matches hand-computed values."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import zoo
from tasks.adapters import prepare_model
from tasks.data.coco import DataError
from tasks.data.florence2 import (od_target, read_caption_records, read_coco_instances, read_grounding_records,
                                  read_vqa_records, write_shapes_instances)
from tasks.detection_metrics import detection_map, grounding_accuracy
from tasks.florence2 import (Florence2DataModule, Florence2Task, boxes_of, collate_florence, expand_prompt,
                             new_florence2)
from zoo.imported.florence2 import dequantize_boxes, load_folder, quantize_boxes, swap01

sys.path.insert(0, str(Path(__file__).parent))
from florence2_reference import build_reference  # noqa: E402

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny random transformers Florence-2 saved as transformers writes it: ``(folder, model, processor)``."""
    folder = tmp_path_factory.mktemp("f2ref") / "native"
    model, processor = build_reference(folder, image_size=64, seed=3)
    return folder, model, processor


def _images(n: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(40 + 9 * i, 70, 3, generator=g) * 255).byte().numpy()) for i in range(n)]


# --- the loss ---------------------------------------------------------------------------------------------
def test_loss_equals_transformers(reference, one_thread):
    folder, ref, processor = reference
    m = load_folder(folder)
    prompts = ["<OD>", "<CAPTION>", "<CAPTION_TO_PHRASE_GROUNDING>a red cat"]
    targets = ["cat<loc_100><loc_200><loc_300><loc_400>dog<loc_5><loc_6><loc_700><loc_800>",
               "a cat sitting on a mat", "a red cat<loc_10><loc_20><loc_30><loc_40>"]
    inputs = processor(text=prompts, images=_images(3), return_tensors="pt", padding=True)
    # <s> target </s>: what a published (BART) tokenizer's post-processor writes; the tiny test tokenizer has none
    labels = processor.tokenizer([f"<s>{t}</s>" for t in targets], add_special_tokens=False, return_tensors="pt",
                                 padding=True).input_ids
    labels[labels == processor.tokenizer.pad_token_id] = -100
    with torch.no_grad():
        want = ref(**inputs, labels=labels).loss

    tok = m.tokenizer
    items = [{"pixels": px, "prompt": p, "target": t, "id": i} for i, (px, p, t) in enumerate(zip(
        inputs["pixel_values"], tok.encode_prompts([expand_prompt(p) for p in prompts]), tok.encode_prompts(targets)))]
    batch = collate_florence(items)
    # our labels are transformers' in unified ids (<s> target </s>, padding ignored)
    assert torch.equal(batch["labels"], torch.where(labels < 0, 0, labels.clone().apply_(swap01)))
    task = Florence2Task(m.model, tok, kind="detection")
    with torch.no_grad():
        got = task.loss(batch)
    print(f"florence2 loss: ours {got.item():.6f} transformers {want.item():.6f}")
    assert abs(got.item() - want.item()) <= 1e-5
    m.model.decoder[0].ffn.fc2.weight.data[0, :4] += 0.5  # a wrong weight shows
    with torch.no_grad():
        assert abs(task.loss(batch).item() - want.item()) > 1e-4


# --- training modes -----------------------------------------------------------------------------------------
def _datamodule(root: Path, kind: str, tokenizer, model) -> Florence2DataModule:
    files = {} if kind == "detection" else {"train_file": "captions_train.json", "val_file": "captions_val.json",
                                            "test_file": "captions_test.json"}
    dm = Florence2DataModule(root=str(root), kind=kind, generate=None, num_workers=0, batch_size=8, **files)
    if kind == "detection":
        write_shapes_instances(root)
    dm.prepare_data()
    dm.bind(model.cfg, model.layout, tokenizer)
    dm.setup("fit")
    return dm


def _train(task: Florence2Task, batch: dict, steps: int, lr: float) -> list[float]:
    params = [p for p in task.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = task.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["detection", "caption"])
def test_lora_finetune_loss_falls_only_adapters_change(tiny_shapes, kind, one_thread, tmp_path):
    # a random test-florence2 saved as a Florence-2 folder (the tiny transformers reference's embedding is too small
    # at BART's init, 0.02, for frozen output rows to fit anything)
    write_shapes_instances(tiny_shapes)
    tok = Florence2DataModule(root=str(tiny_shapes), generate=None, tokenizer_vocab_size=300).load_tokenizer()
    torch.manual_seed(0)
    folder = new_florence2("test-florence2", tok).save_pretrained(tmp_path / "start")
    m = zoo.load(str(folder))
    dm = _datamodule(tiny_shapes, kind, m.tokenizer, m.model)
    batch = next(iter(dm.train_dataloader()))
    if kind == "detection":  # od_shapes-style targets: shape names and location tokens
        text = m.tokenizer.decode_raw(batch["labels"].tolist())[0]
        assert "<loc_" in text and any(s in text for s in ("circle", "square", "triangle", "diamond", "cross"))
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    torch.manual_seed(0)
    model = prepare_model(m.model, "lora", {"r": 4, "alpha": 8})
    task = Florence2Task(model, m.tokenizer, kind=kind)
    losses = _train(task, batch, 12, 1e-2)
    assert losses[-1] < 0.9 * losses[0], losses
    base = task.plain_model()
    after = base.state_dict()
    lora = [k for k in after if "lora_" in k]
    assert lora and any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in lora if "lora_B" in k)
    for k, v in before.items():  # every base weight (peft's key: ...<name>.base_layer.weight) is unchanged
        key = k if k in after else k.rsplit(".", 1)[0] + ".base_layer." + k.rsplit(".", 1)[1]
        assert torch.equal(after[key], v), k

    # save → load round trip of the fine-tuned model: the checkpoint's export generates the same tokens
    from tasks.checkpoint import bundle_from_checkpoint

    ckpt = {"state_dict": {f"model.{k}": v for k, v in task.model.state_dict().items()}}
    task.finetune_info = {"mode": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0,
                                                     "target_modules": ["qkv", "q", "kv", "out", "fc1", "fc2"]},
                          "pretrained": str(folder), "generation": m.generation, "meta": m.meta}
    task.on_save_checkpoint(ckpt)
    out = bundle_from_checkpoint(ckpt, "mem.ckpt", adapter_out=tmp_path / "adapter").save_pretrained(tmp_path / "ft")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    loaded = zoo.load(str(out))
    assert loaded.meta["source"] == m.meta["source"] and loaded.generation == m.generation
    task.model.eval()
    with torch.no_grad():
        ours = task.generate_tokens(batch)
        again = loaded.generate_ids(list(batch["pixels"]), [expand_prompt(dm._read("train")[0].prompt)] * 8,
                                    num_beams=1, max_new_tokens=task.hparams.max_new_tokens)
    assert torch.equal(torch.where(again < 2, 1 - again, again), ours)
    assert loaded.generate(list(batch["pixels"][:2]), dm._read("train")[0].prompt, num_beams=1,
                           max_new_tokens=task.hparams.max_new_tokens) == task.decode_outputs(ours[:2])


def test_frozen_encoder_keeps_image_tower(reference, tiny_shapes, one_thread):
    folder, _, _ = reference
    m = load_folder(folder)
    dm = _datamodule(tiny_shapes, "detection", m.tokenizer, m.model)
    batch = next(iter(dm.train_dataloader()))
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    task = Florence2Task(prepare_model(m.model, "frozen_encoder"), m.tokenizer, kind="detection")
    losses = _train(task, batch, 6, 3e-3)
    assert losses[-1] < losses[0]
    after = task.model.state_dict()
    frozen = [k for k in before if k.startswith(("embedders.", "encoder.", "enc_embed_norm.", "enc_pos."))]
    assert any(k.startswith("embedders.florence_image.tower.") for k in frozen)
    assert all(torch.equal(after[k], before[k]) for k in frozen)
    assert not torch.equal(after["decoder.0.ffn.fc1.weight"], before["decoder.0.ffn.fc1.weight"])


def test_zoo_finetune_lora_from_a_folder(tiny_shapes, tmp_path):
    """``zoo-finetune pretrained=<folder> experiment=od_shapes finetune.mode=lora`` runs and exports a model and its
    adapters that zoo.load reads."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from tasks.cli.finetune import finetune
    from tasks.runtime.resolvers import register_resolvers

    write_shapes_instances(tiny_shapes)
    dm = Florence2DataModule(root=str(tiny_shapes), generate=None, tokenizer_vocab_size=300)
    torch.manual_seed(0)
    start = new_florence2("test-florence2", dm.load_tokenizer()).save_pretrained(tmp_path / "start")
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="configs", version_base="1.3"):
        cfg = compose(config_name="finetune", overrides=[
            f"pretrained={start}", "experiment=od_shapes", "finetune.mode=lora", f"paths.output_dir={tmp_path}/run",
            f"paths.log_dir={tmp_path}/logs", f"data.root={tiny_shapes}", "data.generate=null", "data.num_workers=0",
            "data.batch_size=8", "data.eval_batch_size=16", "trainer.max_steps=3", "trainer.max_epochs=1",
            "task.max_new_tokens=8", "logger={}", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
            "trainer.log_every_n_steps=1"])
    metrics = finetune(cfg)
    assert {"val/map_50", "test/map_50"} <= set(metrics) and metrics["train/steps"] == 3
    loaded = zoo.load(str(tmp_path / "run" / "model"))
    assert loaded.meta["source"] == "test-florence2 (random weights)"
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert isinstance(loaded.detect(str(tiny_shapes / "images/val/000065.png"), max_new_tokens=8), dict)


# --- converters -----------------------------------------------------------------------------------------
def _instances(tmp_path: Path, **change) -> Path:
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [32, 0, 32, 24]},
                            {"id": 8, "image_id": 1, "category_id": 4, "bbox": [0, 24, 16, 24]}],
            "categories": [{"id": 3, "name": "cat"}, {"id": 4, "name": "dog"}]}
    for key, value in change.items():
        data[key] = value
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_detection_records_and_target_text(tmp_path):
    (rec,) = read_coco_instances(_instances(tmp_path))
    # left to right: dog first; bin = floor(v / (side / 1000)) in float32 as transformers computes it, so x = 16 of
    # 64 px gives 249 (16 / 0.064f = 249.99998), y = 24 of 48 px gives 500; the far edges clamp to 999
    assert rec.prompt == "<OD>" and rec.targets == ("dog<loc_0><loc_500><loc_249><loc_999>"
                                                     "cat<loc_499><loc_0><loc_999><loc_500>",)
    assert rec.reference == {"boxes": [[0, 24, 16, 48], [32, 0, 64, 24]], "labels": ["dog", "cat"]}
    assert od_target([], [], 10, 10) == ""


@pytest.mark.parametrize("change, message", [
    ({"annotations": [{"id": 7, "image_id": 1, "category_id": 99, "bbox": [0, 0, 4, 4]}]},
     r"annotations\[0\] \(id=7, image_id=1\) has an unknown category_id"),
    ({"annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [40, 0, 30, 4]}]},
     r"annotations\[0\] \(id=7, image_id=1\): bbox \[40, 0, 30, 4\] is empty or outside the 64x48 image"),
    ({"annotations": [{"id": 7, "image_id": 2, "category_id": 3, "bbox": [0, 0, 4, 4]}]},
     r"annotations\[0\] \(id=7, image_id=2\) points at an unknown image_id"),
    ({"annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [0, 0, "4", 4]}]},
     r"annotations\[0\] \(id=7, image_id=1\): 'bbox' must be \[x, y, w, h\] numbers, got a list"),
    ({"images": [{"id": 1, "file_name": "a.png", "width": 0, "height": 48}]},
     r"images\[0\] \(id=1\) needs positive 'width' and 'height'"),
    ({"categories": [{"id": 3, "name": "<cat>"}, {"id": 4, "name": "dog"}]}, r"categories\[0\] .* contains '<'"),
    ({"categories": None}, r"not a COCO instances file"),
])
def test_detection_bad_records_are_named(tmp_path, change, message):
    path = _instances(tmp_path, **change)
    with pytest.raises(DataError, match=str(path).replace(".", r"\.") + ": " + message):
        read_coco_instances(path)


def test_other_converters_and_their_errors(tmp_path):
    Image.new("RGB", (100, 50)).save(tmp_path / "a.png")
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                "annotations": [{"id": 1, "image_id": 1, "caption": "a cat"},
                                                {"id": 2, "image_id": 1, "caption": "one cat"}]}))
    (rec,) = read_caption_records(caps)
    assert (rec.prompt, rec.targets) == ("<CAPTION>", ("a cat", "one cat"))
    caps.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                "annotations": [{"id": 5, "image_id": 1, "caption": "  "}]}))
    with pytest.raises(DataError, match=r"caps\.json: annotations\[0\] \(id=5, image_id=1\) has an empty caption"):
        read_caption_records(caps)

    refs = tmp_path / "refs.json"
    images = [{"id": 1, "file_name": "a.png", "width": 100, "height": 50}]
    refs.write_text(json.dumps({"images": images, "refs": [{"image_id": 1, "sentence": "the cat",
                                                           "bbox": [10, 5, 40, 20]}]}))
    (g,) = read_grounding_records(refs)
    assert g.prompt == "<CAPTION_TO_PHRASE_GROUNDING>the cat"
    assert g.targets == ("the cat<loc_100><loc_100><loc_500><loc_500>",)
    assert expand_prompt(g.prompt) == "Locate the phrases in the caption: the cat"
    refs.write_text(json.dumps({"images": images, "refs": [{"image_id": 1, "sentence": "x", "bbox": [90, 5, 40, 20]}]}))
    with pytest.raises(DataError, match=r"refs\.json: refs\[0\]: bbox .* outside the 100x50 image"):
        read_grounding_records(refs)

    q, a = tmp_path / "q.json", tmp_path / "a.json"
    q.write_text(json.dumps({"images": images, "questions": [{"question_id": 9, "image_id": 1,
                                                              "question": "what animal is it?"}]}))
    a.write_text(json.dumps({"annotations": [{"question_id": 9, "image_id": 1, "multiple_choice_answer": "cat",
                                              "answers": [{"answer": "cat"}] * 10}]}))
    (v,) = read_vqa_records(q, a, tmp_path)
    assert (v.prompt, v.targets, v.reference["answers"][0]) == ("what animal is it?", ("cat",), "cat")
    with pytest.raises(DataError, match=r"q\.json: question id=9 has no answer to train on"):
        read_vqa_records(q, None, tmp_path)


# --- boxes and the metric ---------------------------------------------------------------------------------
@pytest.mark.parametrize("side", [7, 64, 333, 640, 999, 1000, 1001, 1280, 4032])
def test_box_quantisation_round_trip(side):
    bins = [[b, b, 999 - b, b] for b in range(1000)]
    assert quantize_boxes(dequantize_boxes(bins, side, side, integer=False), side, side) == bins
    pixels = [[x + 0.3, x, min(x + 0.7, side), x] for x in range(side)]
    back = dequantize_boxes(quantize_boxes(pixels, side, side), side, side, integer=False)
    assert max(abs(a - b) for p, q in zip(pixels, back) for a, b in zip(p, q)) <= side / 2000 + 1e-3
    # the integer centres (Florence-2's post-processing) stay within one bin plus the truncation
    ints = dequantize_boxes(quantize_boxes(pixels, side, side), side, side)
    assert max(abs(a - b) for p, q in zip(pixels, ints) for a, b in zip(p, q)) <= side / 1000 + 1
    assert quantize_boxes([[-5, 0, side * 2, side]], side, side) == [[0, 0, 999, 999]]  # clamped


def test_quantisation_equals_transformers_post_processor():
    from transformers.models.florence2.processing_florence2 import Florence2PostProcessor

    post = Florence2PostProcessor.__new__(Florence2PostProcessor)
    post.quantize_bins = (1000, 1000)
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(200, 4, generator=g) * torch.tensor([640.0, 481.0, 640.0, 481.0])
    assert quantize_boxes(boxes.tolist(), 640, 481) == post.quantize(boxes, (640, 481)).tolist()
    for side in (48, 64, 333, 640):  # integer and half pixels: the bin edges, where float32 rounding decides
        grid = torch.arange(0, side + 0.5, 0.5).repeat_interleave(4).reshape(-1, 4)
        assert quantize_boxes(grid.tolist(), side, side) == post.quantize(grid, (side, side)).tolist()
    bins = post.quantize(boxes, (640, 481))
    assert dequantize_boxes(bins.tolist(), 640, 481) == post.dequantize(bins, (640, 481)).tolist()


def test_detection_map_against_hand_values():
    ref = {1: {"boxes": [[10, 10, 30, 30]], "labels": ["circle"]}}
    perfect = detection_map({1: {"boxes": [[10, 10, 30, 30]], "labels": ["circle"]}}, ref)
    assert perfect["map"] == pytest.approx(1.0) and perfect["map_50"] == pytest.approx(1.0)
    # IoU = 20*12.4 / 400 = 0.62: matches at 0.50, 0.55, 0.60 of the ten thresholds 0.50:0.95
    shifted = detection_map({1: {"boxes": [[10, 10, 30, 22.4]], "labels": ["circle"]}}, ref)
    assert shifted["map_50"] == pytest.approx(1.0) and shifted["map_75"] == pytest.approx(0.0)
    assert shifted["map"] == pytest.approx(0.3)
    assert detection_map({1: {"boxes": [[10, 10, 30, 30]], "labels": ["square"]}}, ref)["map_50"] == 0.0
    assert detection_map({}, ref)["map_50"] == 0.0
    # two images, two classes: one found, one missed -> AP 1 for circle, 0 for square
    refs = {1: ref[1], 2: {"boxes": [[0, 0, 10, 10]], "labels": ["square"]}}
    half = detection_map({1: {"boxes": [[10, 10, 30, 30]], "labels": ["circle"]}}, refs)
    assert half["map_50"] == pytest.approx(0.5)
    # a false positive ranked before the hit: precision 1/2 at recall 1 -> COCO's interpolated AP 0.5
    fp_first = detection_map({1: {"boxes": [[40, 40, 50, 50], [10, 10, 30, 30]], "labels": ["circle", "circle"]}},
                             ref)
    assert fp_first["map_50"] == pytest.approx(0.5, abs=0.01)
    # Florence-2's text → boxes at the bin centres → the metric (what validation does)
    found = boxes_of("circle<loc_156><loc_156><loc_468><loc_468>square<loc_0><loc_0><loc_9><loc_9>", (64, 64))
    assert found["labels"] == ["circle", "square"]
    assert found["boxes"][0] == pytest.approx([10.016, 10.016, 29.984, 29.984], abs=1e-4)
    assert detection_map({1: found}, ref)["map_50"] == pytest.approx(1.0)
    assert grounding_accuracy({1: [[0, 0, 0.5, 0.5]], 2: []}, {1: [0, 0, 0.5, 0.4], 2: [0, 0, 1, 1]}) == \
        {"acc50": 0.5, "miou": pytest.approx(0.4)}
