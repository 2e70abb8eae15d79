"""Every dataset reader on data the tests write, with images in every PIL mode; WebDataset splitting."""
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from modalities.image import ImageConfig, ImagePreprocessor, load_image
from tasks.data.coco import read_coco_captions
from tasks.data.formats import read_imagefolder, read_jsonl, read_karpathy, read_vqa
from tasks.data.webdataset import TarShardStream, expand_shards
from tests.imagefiles import MODES, write_mode_images

PRE = ImagePreprocessor(ImageConfig(backbone="timm:test_resnet", image_size=32))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return write_mode_images(tmp_path_factory.mktemp("photos") / "images")


def _check_pixels(paths):
    for p in paths:
        x = PRE(p)
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all(), p


def test_every_image_mode_loads_as_rgb_with_exif_orientation(images):
    for p in images:
        img = load_image(p)
        assert img.mode == "RGB"
        assert img.size == ((40, 48) if p.name == "rotated.jpg" else (48, 40)), p.name  # EXIF 6 → rotated
    _check_pixels(images)


def test_coco_captions(images, tmp_path):
    root = images[0].parent.parent
    coco = {"images": [{"id": i, "file_name": f"images/{p.name}"} for i, p in enumerate(images)],
            "annotations": [{"id": 10 + i, "image_id": i, "caption": f"photo number {i}"} for i in range(len(images))]}
    (root / "captions.json").write_text(json.dumps(coco))
    recs = read_coco_captions(root / "captions.json")
    assert [r.captions for r in recs] == [[f"photo number {i}"] for i in range(len(images))]
    _check_pixels(r.path for r in recs)


def test_karpathy_split(images):
    root = images[0].parent.parent
    splits = ["train", "restval", "val", "test"] * 3
    data = {"dataset": "coco", "images": [
        {"filepath": "images", "filename": p.name, "imgid": i, "cocoid": 100 + i, "split": splits[i],
         "sentences": [{"raw": f"A photo {i}.", "tokens": ["a", "photo"]}, {"tokens": ["tokens", "only"]}]}
        for i, p in enumerate(images)]}
    (root / "dataset_coco.json").write_text(json.dumps(data))
    train = read_karpathy(root / "dataset_coco.json", root, "train")
    val = read_karpathy(root / "dataset_coco.json", root, "val")
    assert [r.image_id for r in train] == [100 + i for i in range(len(images)) if splits[i] in ("train", "restval")]
    assert [r.image_id for r in val] == [100 + i for i in range(len(images)) if splits[i] == "val"]
    assert train[0].captions == ["A photo 0.", "tokens only"]
    _check_pixels(r.path for r in train + val)


def _vqa_pair(root: Path, n: int, images_list: list | None, subtype: str = "val2014"):
    qs = {"data_subtype": subtype, "questions": [{"image_id": i, "question": f"what is {i}?", "question_id": 7 * i}
                                                for i in range(n)]}
    if images_list is not None:
        qs["images"] = images_list
    anns = {"annotations": [{"question_id": 7 * i, "image_id": i, "question_type": "what is", "answer_type": "other",
                             "multiple_choice_answer": "red",
                             "answers": [{"answer": "red" if j < 7 else "blue", "answer_id": j} for j in range(10)]}
                            for i in range(n)]}
    (root / "q.json").write_text(json.dumps(qs))
    (root / "a.json").write_text(json.dumps(anns))
    return root / "q.json", root / "a.json"


def test_vqav2_pair_with_official_image_names(images, tmp_path):
    sub = tmp_path / "val2014"
    sub.mkdir()
    for i, p in enumerate(images):  # the official COCO_<subtype>_<id:012d>.jpg layout, any mode inside
        (sub / f"COCO_val2014_{i:012d}.jpg").write_bytes(p.read_bytes())
    q, a = _vqa_pair(tmp_path, len(images), None)
    recs = read_vqa(q, a, tmp_path)
    assert len(recs) == len(images)
    assert recs[1].question_id == 7 and recs[1].answer == "red" and recs[1].answers.count("blue") == 3
    assert recs[1].annotation()["answer_type"] == "other"
    _check_pixels(r.path for r in recs)
    test_recs = read_vqa(q, None, tmp_path)  # test split: no annotations
    assert test_recs[0].answers == [] and test_recs[0].answer is None


def test_vqav2_pair_with_images_list(images, tmp_path):
    q, a = _vqa_pair(tmp_path, len(images), [{"id": i, "file_name": str(p)} for i, p in enumerate(images)])
    recs = read_vqa(q, a, "/")
    assert [r.path for r in recs] == images


def test_jsonl_manifests(images, tmp_path):
    cap = tmp_path / "captions.jsonl"
    cap.write_text("\n".join(json.dumps({"image": str(p), "captions": [f"a {p.stem}", "x"]}) for p in images))
    recs = read_jsonl(cap, "/", "caption")
    assert len(recs) == len(images) and recs[0].captions == ["a rgb", "x"]
    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text("\n".join(json.dumps({"image": p.name, "question": "what mode?", "answers": [p.stem] * 3})
                             for p in images) + "\n\n")
    recs = read_jsonl(vqa, images[0].parent, "vqa")
    assert [r.answer for r in recs] == [p.stem for p in images] and recs[0].question_id == 1
    _check_pixels(r.path for r in recs)


def test_hf_imagefolder(images):
    folder = images[0].parent
    (folder / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": p.name, "text": f"mode {MODES[p.name]}"}) for p in images))
    recs = read_imagefolder(folder, "caption")
    assert [r.captions[0] for r in recs] == [f"mode {m}" for m in MODES.values()]
    _check_pixels(r.path for r in recs)


# ----------------------------------------------------------------------------- WebDataset
def _write_shards(folder: Path, sizes: list[int], images: list[Path]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    n, shards = 0, []
    for s, size in enumerate(sizes):
        path = folder / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(size):
                img = images[n % len(images)]
                for name, data in ((f"{n:06d}{img.suffix}", img.read_bytes()),
                                   (f"{n:06d}.json", json.dumps({"caption": f"sample {n}"}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                n += 1
        shards.append(str(path))
    return shards


def _decode(sample):
    ext = next(k for k in sample if k in ("jpg", "png"))
    return {"key": sample["__key__"], "image": PRE(sample[ext]), "caption": json.loads(sample["json"])["caption"]}


def _keys(ds, workers):
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    return [s["key"] for s in loader]


@pytest.mark.parametrize("shuffle", [False, True])
def test_webdataset_two_workers_see_each_sample_once(images, tmp_path, shuffle):
    shards = _write_shards(tmp_path / "wds", [5, 3, 4], images)  # uneven shards, fewer than 4 consumers
    assert expand_shards(str(tmp_path / "wds" / "shard-{000..002}.tar")) == shards
    everything = [f"{i:06d}" for i in range(12)]
    for epoch in range(2):
        ds = TarShardStream(shards, transform=_decode, shuffle=shuffle, buffer=4)
        ds.set_epoch(epoch)
        keys = _keys(ds, workers=2)
        assert sorted(keys) == everything
    # DDP: 2 ranks × 2 workers; the ranks' shares are disjoint, cover everything and differ by ≤ 1
    per_rank = [_keys(TarShardStream(shards, transform=_decode, shuffle=shuffle, rank=r, world_size=2), 2)
                for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == everything
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1


def test_webdataset_decodes_samples(images, tmp_path):
    shards = _write_shards(tmp_path / "wds", [len(images)], images)
    items = list(TarShardStream(shards, transform=_decode))
    assert [it["caption"] for it in items] == [f"sample {i}" for i in range(len(images))]
    assert all(it["image"].shape == (3, 32, 32) for it in items)
