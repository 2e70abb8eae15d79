"""The attribute probe: labels agree with the generator's captions, scoring, Fréchet distance, training."""
import re

import pytest
import torch
import torch.nn.functional as F

from tasks.data.shapes import COLOURS, SHAPES
from tasks.data.shapes_images import grid_to_sets, load_images, read_split, scene_grid_targets, scene_labels
from tasks.tools.probe import (AttributeProbe, ensure_probe, frechet_distance, load_probe, probe_loss,
                         score_attributes)


pytestmark = pytest.mark.usefixtures("one_thread")  # micro models (tests/conftest.py)


def test_labels_agree_with_the_generators_captions(tiny_shapes):
    ids, _, captions = read_split(tiny_shapes, "val")
    labels = scene_labels(tiny_shapes, "val", ids)
    for row, caps in enumerate(captions):
        for cap in caps:  # every caption names each object's colour and shape
            mentioned = re.findall(rf"({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})", cap)
            assert {c for c, _ in mentioned} == {c for i, c in enumerate(COLOURS) if labels["colour"][row, i]}
            assert {s for _, s in mentioned} == {s for i, s in enumerate(SHAPES) if labels["shape"][row, i]}
            assert len(mentioned) == int(labels["count"][row]) + 1


def test_score_attributes_on_labels():
    g = torch.Generator().manual_seed(0)
    target = {"colour": (torch.rand(10, 6, generator=g) < 0.3).float(),
              "shape": (torch.rand(10, 5, generator=g) < 0.3).float(),
              "count": torch.randint(3, (10,), generator=g)}
    assert score_attributes(target, target) == {"colour_acc": 1.0, "shape_acc": 1.0, "count_acc": 1.0, "all_acc": 1.0}
    pred = {k: v.clone() for k, v in target.items()}
    pred["colour"][0, 0] = 1 - pred["colour"][0, 0]  # one wrong colour in image 0
    pred["count"][1] = (pred["count"][1] + 1) % 3  # a wrong count in image 1
    pred["count"][0] = (pred["count"][0] + 1) % 3  # image 0 wrong twice: counted once in all_acc
    s = score_attributes(pred, target)
    assert s == pytest.approx({"colour_acc": 0.9, "shape_acc": 1.0, "count_acc": 0.8, "all_acc": 0.8})


def test_frechet_distance():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 8, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.zeros(8)
    shift[0] = 3.0
    assert frechet_distance(a, a + shift) == pytest.approx(9.0, rel=1e-6)
    assert frechet_distance(a, 2 * a) > frechet_distance(a, 1.1 * a) > 0
    with pytest.raises(ValueError):
        frechet_distance(a[:1], a)


def test_grid_targets_mark_each_object_centre(tiny_shapes):
    ids, _, _ = read_split(tiny_shapes, "val")
    t = scene_grid_targets(tiny_shapes, "val", ids, grid=8, image_size=64)
    labels = scene_labels(tiny_shapes, "val", ids)
    assert t["objectness"].shape == (len(ids), 8, 8) and t["shape"].dtype == torch.long
    assert torch.equal(t["objectness"].flatten(1).sum(1).long(), labels["count"] + 1)  # one cell per object
    assert torch.equal((t["shape"] >= 0).float(), t["objectness"])
    # perfect dense logits read back as exactly the image-level labels
    big = 20.0
    logits = {"objectness": t["objectness"] * 2 * big - big,
              "shape": F.one_hot(t["shape"].clamp(min=0), 5).permute(0, 3, 1, 2).float() * big,
              "colour": F.one_hot(t["colour"].clamp(min=0), 6).permute(0, 3, 1, 2).float() * big}
    sets = grid_to_sets(**logits)
    assert score_attributes(sets, labels)["all_acc"] == 1.0
    with pytest.raises(ValueError, match="two object centres"):
        scene_grid_targets(tiny_shapes, "val", ids, grid=2, image_size=64)


def test_probe_training_sanity_and_cache(tiny_shapes):
    torch.manual_seed(0)
    ids, paths, _ = read_split(tiny_shapes, "train")
    x = load_images(paths[:32]).float() / 255
    y = {k: v[:32] for k, v in scene_grid_targets(tiny_shapes, "train", ids, 8, 64).items()}
    probe = AttributeProbe(width=8)
    opt = torch.optim.Adam(probe.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = probe_loss(probe(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.6 * losses[0], losses
    with pytest.raises(ValueError, match="64,64"):
        probe(torch.rand(1, 3, 32, 32))
    assert probe.features(x[:3]).shape == (3, 8 * 8)
    # ensure_probe trains once, records its held-out accuracy and then loads from the cache
    folder = ensure_probe(tiny_shapes, epochs=1, width=8, batch_size=32)
    assert ensure_probe(tiny_shapes, epochs=1, width=8, batch_size=32) == folder
    loaded, acc = load_probe(folder)
    assert set(acc) == {"colour_acc", "shape_acc", "count_acc", "all_acc"} and 0 <= acc["all_acc"] <= 1
    pred = loaded.predict(x[:4])
    assert pred["colour"].shape == (4, 6) and pred["shape"].shape == (4, 5) and pred["count"].shape == (4,)


def test_a_shipped_probe_replaces_training(tiny_shapes, tmp_path, monkeypatch):
    import shutil

    from tasks.tools import probe as probe_module

    made = ensure_probe(tiny_shapes, epochs=1, width=8, batch_size=32)
    shipped = tmp_path / "shipped"
    shutil.copytree(made, shipped / made.name)
    shutil.rmtree(made)

    def no_training(*args, **kwargs):
        raise AssertionError("trained although a shipped probe matches")

    monkeypatch.setattr(probe_module, "SHIPPED_PROBES", shipped)
    monkeypatch.setattr(probe_module, "train_probe", no_training)
    assert ensure_probe(tiny_shapes, epochs=1, width=8, batch_size=32) == made
    assert (made / "probe.safetensors").read_bytes() == (shipped / made.name / "probe.safetensors").read_bytes()
    with pytest.raises(AssertionError, match="shipped probe"):  # other settings: nothing shipped, it would train
        ensure_probe(tiny_shapes, epochs=2, width=8, batch_size=32)


def test_the_shipped_probe_is_the_one_the_main_job_asks_for(tmp_path):
    """The main job judges its text-to-image samples with the probe of the default Shapes data: that probe's cache name
    must be the folder shipped (a change of the data, PROBE_VERSION or the settings fails here until it is replaced)."""
    import json

    from omegaconf import OmegaConf

    from tasks.data.shapes import ShapesConfig, _marker
    from tasks.tools.probe import SHIPPED_PROBES, probe_name
    from tests.conftest import compose

    (tmp_path / "shapes.json").write_text(json.dumps(_marker(ShapesConfig())))
    cfg = compose(["experiment=multitask"], tmp_path / "cfg")
    kwargs = OmegaConf.to_container(cfg.task.tasks.text_to_image.probe_train) or {}
    folder = SHIPPED_PROBES / probe_name(tmp_path, **kwargs)
    loaded, acc = load_probe(folder)
    assert acc["all_acc"] >= 0.95 and loaded.config["image_size"] == 64
