"""Dense scene pretraining of the image backbone: spec checks, caching, and the weights reaching the model."""
import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from tasks.tools.backbone_pretrain import ensure_pretrained_backbone, resolve_spec

pytestmark = pytest.mark.usefixtures("one_thread")  # micro models (tests/conftest.py)

TINY_IMAGE = {"backbone": "timm:test_resnet", "out_index": 2, "image_size": 32}


def test_spec_errors(tiny_shapes):
    with pytest.raises(ValueError, match="needs 'root'"):
        resolve_spec({}, TINY_IMAGE)
    with pytest.raises(ValueError, match="unknown model.image_pretrain keys"):
        resolve_spec({"root": str(tiny_shapes), "epoch": 3}, TINY_IMAGE)
    with pytest.raises(ValueError, match="timm backbones only"):
        resolve_spec({"root": str(tiny_shapes)}, {**TINY_IMAGE, "backbone": "open_clip:ViT-B-32"})


def test_own_data_without_scene_labels_names_the_fix(tmp_path):
    spec = resolve_spec({"root": str(tmp_path)}, TINY_IMAGE)
    with pytest.raises(ValueError, match=r"scenes_train.json, scenes_val.json missing.*model.image_pretrain=null"):
        ensure_pretrained_backbone(spec, tmp_path / "cache")


def test_pretrain_caches_and_loads_into_the_model(tiny_shapes, tmp_path):
    from tasks.cli.train import build_model

    spec = resolve_spec({"root": str(tiny_shapes), "epochs": 2, "batch_size": 16}, TINY_IMAGE)
    path = ensure_pretrained_backbone(spec, tmp_path)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert set(meta["val"]) >= {"shape_acc", "colour_acc", "count_acc", "all_acc", "final_loss"}
    mtime = path.stat().st_mtime_ns
    assert ensure_pretrained_backbone(spec, tmp_path) == path and path.stat().st_mtime_ns == mtime  # cached
    other = resolve_spec({"root": str(tiny_shapes), "epochs": 1, "batch_size": 16}, TINY_IMAGE)
    assert ensure_pretrained_backbone(other, tmp_path) != path  # another spec, another file
    weights = load_file(str(path))

    # build_model (what zoo-train calls) hands the cached file to timm: the backbone starts from it
    cfg = OmegaConf.create({"name": "test-tiny", "overrides": {},
                            "image_pretrain": {"root": str(tiny_shapes), "epochs": 2, "batch_size": 16}})
    model = build_model(cfg, 300)
    backbone = model.embedders["image"].backbone.state_dict()
    default = ensure_pretrained_backbone(spec)  # build_model's cache: <root>/backbones
    assert default.parent == tiny_shapes / "backbones"
    expected = load_file(str(default))
    assert torch.equal(expected["conv1.0.weight"], weights["conv1.0.weight"])  # same spec, same seed: same weights
    for k, v in backbone.items():
        assert torch.equal(v, expected[k]), k
    fresh = build_model(OmegaConf.create({"name": "test-tiny", "overrides": {}}), 300)
    assert not torch.equal(fresh.embedders["image"].backbone.state_dict()["conv1.0.weight"], backbone["conv1.0.weight"])


def test_a_shipped_stem_replaces_pretraining(tiny_shapes, tmp_path, monkeypatch):
    from tasks.tools import backbone_pretrain

    spec = resolve_spec({"root": str(tiny_shapes), "epochs": 1, "batch_size": 16}, TINY_IMAGE)
    trained = ensure_pretrained_backbone(spec, tmp_path / "made")
    shipped = backbone_pretrain.ship_stem(trained, tmp_path / "stems")
    assert shipped.name == trained.name and "root" not in json.loads(shipped.with_suffix(".json").read_text())["spec"]
    assert all(v.dtype == torch.float16 for v in load_file(str(shipped)).values() if v.is_floating_point())

    def no_training(spec):
        raise AssertionError("pretrained although a shipped stem matches")

    monkeypatch.setattr(backbone_pretrain, "SHIPPED_STEMS", tmp_path / "stems")
    monkeypatch.setattr(backbone_pretrain, "pretrain_backbone", no_training)
    used = ensure_pretrained_backbone(spec, tmp_path / "cache")
    assert used == tmp_path / "cache" / trained.name
    original, copied = load_file(str(trained)), load_file(str(used))
    for k, v in original.items():
        expected = v.half().float() if v.is_floating_point() else v
        assert copied[k].dtype == v.dtype and torch.equal(copied[k], expected), k
    assert json.loads(used.with_suffix(".json").read_text())["shipped"] == trained.name
    other = resolve_spec({"root": str(tiny_shapes), "epochs": 2, "batch_size": 16}, TINY_IMAGE)
    with pytest.raises(AssertionError, match="shipped stem"):  # another spec: no shipped file, so it would train
        ensure_pretrained_backbone(other, tmp_path / "cache")


def test_the_shipped_stem_is_the_one_the_shapes_experiments_ask_for(tmp_path):
    """The main job, caption_shapes and vqa_shapes pretrain the same stem on the default Shapes data: its name (the
    digest of spec, data marker and VERSION) must be the file shipped; a change of those defaults fails here until
    the stem is regenerated (``python -m tasks.tools.backbone_pretrain ship ...``)."""
    import zoo
    from tasks.data.shapes import ShapesConfig, _marker
    from tasks.tools.backbone_pretrain import SHIPPED_STEMS, spec_digest
    from tests.conftest import compose

    (tmp_path / "shapes.json").write_text(json.dumps(_marker(ShapesConfig())))
    for experiment in ("multitask", "caption_shapes", "vqa_shapes"):
        cfg = compose([f"experiment={experiment}"], tmp_path / experiment)
        user = {k: v for k, v in OmegaConf.to_container(cfg.model.image_pretrain).items() if k != "freeze"}
        spec = resolve_spec({**user, "root": str(tmp_path)}, zoo.model_config(cfg.model.name).modalities["image"])
        name = f"{spec['backbone'].split(':', 1)[1]}-{spec_digest(spec)}.safetensors"
        assert (SHIPPED_STEMS / name).is_file(), (experiment, name)
    # od_shapes: Florence-2's DaViT tower on its own Shapes split sizes
    cfg = compose(["experiment=od_shapes"], tmp_path / "od_shapes")
    (tmp_path / "shapes.json").write_text(json.dumps(_marker(ShapesConfig(**cfg.data.shapes))))
    user = {k: v for k, v in OmegaConf.to_container(cfg.model.image_pretrain).items() if k not in ("freeze", "root")}
    image = {**zoo.model_config(cfg.model.name).modalities["florence_image"],
             **OmegaConf.to_container(cfg.model.overrides.modalities.florence_image)}
    spec = resolve_spec({**user, "root": str(tmp_path)}, image, "florence_image")
    assert (SHIPPED_STEMS / f"davit_base_fl-{spec_digest(spec)}.safetensors").is_file()


def test_freeze_keeps_the_pretrained_stem_fixed(tiny_shapes):
    from tasks.cli.train import build_model

    cfg = OmegaConf.create({"name": "test-tiny", "overrides": {},
                            "image_pretrain": {"root": str(tiny_shapes), "epochs": 2, "batch_size": 16, "freeze": True}})
    model = build_model(cfg, 300).train()
    backbone = model.embedders["image"].backbone
    assert not any(p.requires_grad for p in backbone.parameters())
    assert all(p.requires_grad for p in model.embedders["image"].proj.parameters())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    s = model.cfg.modalities["image"]["image_size"]
    ids = torch.randint(4, 100, (2, 3))
    model({"image": torch.randn(2, 3, s, s), "text": (ids, torch.ones_like(ids, dtype=torch.bool))}, ids).sum().backward()
    for k, v in backbone.state_dict().items():  # BatchNorm running statistics included
        assert torch.equal(v, before[k]), k


def test_ranks_started_together_pretrain_the_backbone_once(tiny_shapes, tmp_path):
    """torchrun/srun start every rank at once: build_model's pretraining runs under the prepare lock, so the
    first rank trains and caches, and the other loads its file."""
    import os
    import shutil
    import subprocess
    import sys

    root = tmp_path / "shapes"
    shutil.copytree(tiny_shapes, root, ignore=shutil.ignore_patterns("backbones"))
    code = ("from omegaconf import OmegaConf; from tasks.cli.train import build_model; "
            f"build_model(OmegaConf.create({{'name': 'test-tiny', 'overrides': {{}}, 'image_pretrain': "
            f"{{'root': {str(root)!r}, 'epochs': 2, 'batch_size': 16}}}}), 300)")
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "t", "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert sum("pretraining the image backbone" in log for log in logs) == 1, logs
    assert len(list((root / "backbones").glob("*.safetensors"))) == 1


def test_florence_tower_pretrains_and_loads_into_the_model(tiny_shapes, tmp_path):
    """Florence-2's DaViT tower (the ``florence_image`` modality) pretrains the same way: its sizes and ImageNet
    normalisation go into the spec, and build_model loads the features-only file into the full tower."""
    import zoo
    from modalities.florence_image import IMAGENET_MEAN
    from modalities.florence_image import load_tower_weights
    from tasks.cli.train import build_model

    image = zoo.model_config("test-florence2").modalities["florence_image"]
    spec = resolve_spec({"root": str(tiny_shapes), "epochs": 1, "batch_size": 16}, image, "florence_image")
    assert spec["backbone"] == "timm:davit_base_fl" and spec["out_index"] == 3 and spec["image_size"] == 64
    assert spec["mean"] == list(IMAGENET_MEAN) and spec["tower_kwargs"]["embed_dims"] == [16, 32, 48, 64]
    wider = resolve_spec({"root": str(tiny_shapes)}, {**image, "embed_dims": [16, 32, 48, 96]}, "florence_image")
    assert wider["tower_kwargs"]["embed_dims"] == [16, 32, 48, 96]

    cfg = OmegaConf.create({"name": "test-florence2", "overrides": {},
                            "image_pretrain": {"root": str(tiny_shapes), "epochs": 1, "batch_size": 16, "freeze": True}})
    model = build_model(cfg, 1300)
    weights = load_file(str(ensure_pretrained_backbone(spec)))  # build_model's cache file
    tower = model.embedders["florence_image"].tower
    state = tower.state_dict()
    assert len(weights) == len(state)  # every tower tensor comes from the file
    for k, v in weights.items():
        assert torch.equal(state[k.replace("stages_", "stages.")], v), k
    assert not any(p.requires_grad for p in tower.parameters())  # freeze: true
    fresh = build_model(OmegaConf.create({"name": "test-florence2", "overrides": {}}), 1300)
    assert not torch.equal(fresh.embedders["florence_image"].tower.state_dict()["stem.conv.weight"],
                           state["stem.conv.weight"])

    other = build_model(OmegaConf.create({"name": "test-florence2", "overrides": {
        "modalities": {"florence_image": {"embed_dims": [16, 32, 48, 96]}}}}), 1300)
    with pytest.raises(ValueError, match="does not fit the image tower"):
        load_tower_weights(other.embedders["florence_image"], ensure_pretrained_backbone(spec))
