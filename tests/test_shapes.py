"""Tests for the embedded Shapes dataset generator (tasks/data/shapes.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.data.shapes import (COLOURS, SHAPES, SIZES, SPLITS, ShapesConfig, captions_for,
                               ensure_shapes, generate_scene, render_scene, write_shapes)

SMALL = ShapesConfig(seed=0, n_train=20, n_val=6, n_test=6)
NUMBER_WORDS = {"one": 1, "single": 1, "two": 2, "three": 3}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes") / "ds", SMALL)


def _load(root: Path, name: str):
    return json.loads((root / name).read_text(encoding="utf-8"))


def _pixels(root: Path, split: str) -> list[np.ndarray]:
    data = _load(root, f"captions_{split}.json")
    return [np.asarray(Image.open(root / img["file_name"])) for img in data["images"]]


def test_deterministic_same_seed(dataset, tmp_path):
    other = write_shapes(tmp_path / "again", SMALL)
    for split in SPLITS:
        for name in (f"captions_{split}.json", f"scenes_{split}.json"):
            assert (dataset / name).read_bytes() == (other / name).read_bytes()
        for a, b in zip(_pixels(dataset, split), _pixels(other, split), strict=True):
            assert np.array_equal(a, b)


def test_different_seed_differs(dataset, tmp_path):
    other = write_shapes(tmp_path / "seed1", ShapesConfig(seed=1, n_train=20, n_val=6, n_test=6))
    assert (dataset / "captions_train.json").read_bytes() != (other / "captions_train.json").read_bytes()
    assert any(not np.array_equal(a, b) for a, b in zip(_pixels(dataset, "train"), _pixels(other, "train")))


def test_image_independent_of_split_sizes(dataset, tmp_path):
    other = write_shapes(tmp_path / "bigger", ShapesConfig(seed=0, n_train=25, n_val=3, n_test=8))
    # Same index within a split -> same scene and pixels, whatever the split sizes.
    for split, n in (("train", 20), ("val", 3), ("test", 6)):
        a_sc, b_sc = _load(dataset, f"scenes_{split}.json"), _load(other, f"scenes_{split}.json")
        for i in range(n):
            assert {k: v for k, v in a_sc[i].items() if k != "image_id"} == \
                   {k: v for k, v in b_sc[i].items() if k != "image_id"}
        for a, b in list(zip(_pixels(dataset, split), _pixels(other, split)))[:n]:
            assert np.array_equal(a, b)


def test_coco_structure(dataset):
    seen_ids: set[int] = set()
    for split in SPLITS:
        data = _load(dataset, f"captions_{split}.json")
        assert set(data) >= {"info", "images", "annotations"}
        ids = {img["id"] for img in data["images"]}
        assert len(ids) == len(data["images"]) == SMALL.split_sizes()[split]
        assert not ids & seen_ids, "image ids must be unique across splits"
        seen_ids |= ids
        per_image = {i: 0 for i in ids}
        for ann in data["annotations"]:
            assert set(ann) >= {"id", "image_id", "caption"}
            assert ann["image_id"] in ids
            per_image[ann["image_id"]] += 1
        assert set(per_image.values()) == {5}
        for img in data["images"]:
            assert img["file_name"] == f"images/{split}/{img['id']:06d}.png"
            assert (img["width"], img["height"]) == (64, 64)
            with Image.open(dataset / img["file_name"]) as im:
                assert im.size == (64, 64) and im.mode == "RGB"
        scenes = _load(dataset, f"scenes_{split}.json")
        assert [s["image_id"] for s in scenes] == [img["id"] for img in data["images"]]
    ann_ids = [a["id"] for s in SPLITS for a in _load(dataset, f"captions_{s}.json")["annotations"]]
    assert len(ann_ids) == len(set(ann_ids))


def test_reader_accepts_it(dataset):
    from tasks.data.coco import read_coco_captions
    records = read_coco_captions(dataset / "captions_val.json")
    assert len(records) == SMALL.n_val and all(len(r.captions) == 5 for r in records)


def _captions_by_image(root: Path, split: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for ann in _load(root, f"captions_{split}.json")["annotations"]:
        out.setdefault(ann["image_id"], []).append(ann["caption"])
    return out


def test_captions_match_scene(dataset):
    for split in SPLITS:
        caps = _captions_by_image(dataset, split)
        for scene in _load(dataset, f"scenes_{split}.json"):
            n = len(scene["objects"])
            mentions_count = False
            for cap in caps[scene["image_id"]]:
                assert cap == cap.lower() and not cap.endswith(".")
                words = cap.replace(",", " ").split()
                assert len(words) <= 25, cap
                for obj in scene["objects"]:
                    assert f"{obj['colour']} {obj['shape']}" in cap, (cap, obj)
                counts = [NUMBER_WORDS[w] for w in words if w in NUMBER_WORDS]
                assert all(c == n for c in counts), (cap, n)
                mentions_count |= bool(counts)
            assert mentions_count, caps[scene["image_id"]]
            assert len(set(caps[scene["image_id"]])) >= 4  # different wordings


def test_scene_properties():
    for i in range(300):
        rng = np.random.default_rng([7, i])
        scene = generate_scene(rng)
        objs = scene["objects"]
        assert 1 <= len(objs) <= 3
        assert len({(o["colour"], o["shape"]) for o in objs}) == len(objs)
        for o in objs:
            assert o["shape"] in SHAPES and o["colour"] in COLOURS and o["size"] in SIZES
            lo, hi = SIZES[o["size"]]
            assert lo <= 2 * o["r"] <= hi
            assert o["x"] - o["r"] >= 0 and o["x"] + o["r"] <= 64
            assert o["y"] - o["r"] >= 0 and o["y"] + o["r"] <= 64
        for a_i, a in enumerate(objs):
            for b in objs[a_i + 1:]:  # bounding boxes do not overlap
                assert (abs(a["x"] - b["x"]) >= a["r"] + b["r"]
                        or abs(a["y"] - b["y"]) >= a["r"] + b["r"]), (a, b)


def test_captions_short_and_complete():
    for i in range(1000):
        rng = np.random.default_rng([11, i])
        scene = generate_scene(rng)
        for cap in captions_for(scene, rng, n=5):
            assert len(cap.split()) <= 25, cap
            assert all(f"{o['colour']} {o['shape']}" in cap for o in scene["objects"]), cap


def test_render_draws_objects_on_noisy_background():
    rng = np.random.default_rng(3)
    scene = generate_scene(rng)
    img = np.asarray(render_scene(scene, 64, rng)).astype(float)
    bg = np.array(scene["background"], dtype=float)
    corner = img[:3, :3].reshape(-1, 3)
    assert 1.0 < img[..., 0].std() and corner.std() < 15  # noisy but plain background
    for o in scene["objects"]:
        centre = img[int(o["y"]) - 1:int(o["y"]) + 2, int(o["x"]) - 1:int(o["x"]) + 2].reshape(-1, 3).mean(0)
        assert np.abs(centre - np.array(COLOURS[o["colour"]])).max() < 20
        assert np.abs(centre - bg).max() > 40
    assert len(captions_for(scene, np.random.default_rng(0), n=5)) == 5


def test_ensure_reuses_and_regenerates(tmp_path):
    root = tmp_path / "shapes"
    cfg = ShapesConfig(seed=0, n_train=4, n_val=2, n_test=2)
    assert ensure_shapes(root, cfg) == root.absolute()
    marker, caps = root / "shapes.json", root / "captions_train.json"
    before = (marker.stat().st_mtime_ns, caps.stat().st_mtime_ns)
    os.utime(caps, ns=(before[1] - 10**9, before[1] - 10**9))  # make a rewrite detectable
    before = (marker.stat().st_mtime_ns, caps.stat().st_mtime_ns)
    ensure_shapes(root, cfg)
    assert (marker.stat().st_mtime_ns, caps.stat().st_mtime_ns) == before
    # A different config regenerates in place of the old one.
    cfg2 = ShapesConfig(seed=0, n_train=3, n_val=2, n_test=2)
    ensure_shapes(root, cfg2)
    assert json.loads(marker.read_text())["config"]["n_train"] == 3
    assert len(_load(root, "captions_train.json")["images"]) == 3
    assert not list(tmp_path.glob("shapes.tmp-*")) and not (tmp_path / "shapes.lock").exists()


def test_ensure_refuses_foreign_directory(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        ensure_shapes(root, ShapesConfig(n_train=2, n_val=1, n_test=1))
    assert (root / "notes.txt").read_text() == "keep me"


def test_ensure_cleans_up_killed_generation(tmp_path):
    root = tmp_path / "ds"
    half = tmp_path / "ds.tmp-99999-deadbeef"  # what a killed generation leaves behind
    (half / "images").mkdir(parents=True)
    ensure_shapes(root, ShapesConfig(n_train=2, n_val=1, n_test=1))
    assert not half.exists() and (root / "shapes.json").is_file()


def test_ensure_concurrent_callers(tmp_path):
    import subprocess
    import sys
    root = tmp_path / "ds"
    code = ("import sys; from tasks.data.shapes import ensure_shapes, ShapesConfig; "
            "ensure_shapes(sys.argv[1], ShapesConfig(n_train=30, n_val=2, n_test=2))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root)]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(_load(root, "captions_train.json")["images"]) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_ensure_breaks_stale_lock(tmp_path):
    import socket
    root = tmp_path / "ds"
    (tmp_path / "ds.lock").write_text(f"{socket.gethostname()} 999999999\n")  # no such process
    ensure_shapes(root, ShapesConfig(n_train=2, n_val=1, n_test=1), timeout_s=10)
    assert (root / "shapes.json").is_file() and not (tmp_path / "ds.lock").exists()
