"""The zoo: registry, save/load round trips, Hub-cache loading offline, error messages, safe loading."""
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

import zoo
from modalities.text import TextTokenizer
from zoo.generation import generate
from zoo.hub import HubLoadError, add_to_cache
from zoo.pretrained import Pretrained, UnsafeModelError

TEXTS = ["a small red circle", "a large blue square to the left of a green cross",
         "a yellow triangle above a purple diamond on a dark background"] * 20


@pytest.fixture(scope="module")
def bundle() -> Pretrained:
    tok = TextTokenizer.train(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = zoo.create_model("test-tiny", vocab={"text_size": tok.vocab_size, "image_code_size": 16, "loc_bins": 4})
    return Pretrained(model.eval(), tok, tasks={"caption": {"max_new_tokens": 8, "num_beams": 1}})


@pytest.fixture(scope="module")
def saved(bundle, tmp_path_factory) -> Path:
    return bundle.save_pretrained(tmp_path_factory.mktemp("zoo") / "tiny", card={"metrics": {"val/cider": 1.5}})


def _inputs(model, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    name = "image" if "image" in model.cfg.modalities else "florence_image"
    s = model.cfg.modalities[name]["image_size"]
    ids = torch.randint(model.layout.text_start, model.layout.image_code_start, (b, 5), generator=g)
    return {name: torch.randn(b, 3, s, s, generator=g), "text": (ids, torch.ones(b, 5, dtype=torch.bool))}


def _hf_cache(root: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> None:
    """Lay out a Hugging Face cache by hand: models--org--name/snapshots/<commit>/... + refs/<branch>."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


# --- registry --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", zoo.list_models("test-*"))
def test_registry_create_forward(name):
    torch.manual_seed(0)
    model = zoo.create_model(name).eval()
    inputs = _inputs(model)
    logits = model(inputs, torch.full((2, 3), 1))
    assert logits.shape == (2, 3, model.layout.size) and torch.isfinite(logits).all()
    out = generate(model, inputs, max_new_tokens=4)
    assert out.shape[0] == 2 and out.shape[1] <= 4


def test_parameter_counts_of_every_size_on_meta():
    counts = {}
    for name in zoo.list_models():
        with torch.device("meta"):  # no memory for the huge sizes
            counts[name] = zoo.create_model(name).num_parameters()
    sizes = [counts[n] for n in ("ofa-tiny", "ofa-medium", "ofa-base", "ofa-large", "ofa-huge")]
    assert all(counts.values()) and sizes == sorted(sizes) and sizes[-1] > 8e8


def test_list_pretrained_and_unknown_sources():
    assert "ofa-tiny.shapes" in zoo.list_pretrained() and zoo.list_pretrained("nope*") == []
    with pytest.raises(ValueError, match="is an architecture"):
        zoo.load("ofa-tiny")
    with pytest.raises(ValueError, match="unknown model source"):
        zoo.load("not-a-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zoo.load("./no/such/folder")


# --- save / load ---------------------------------------------------------------------------------
def test_folder_layout_and_config(saved, bundle):
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["arch"] == "test-tiny" and cfg["mmzoo_version"] == zoo.__version__
    assert cfg["vocab"]["ranges"]["text"] == [4, 4 + bundle.tokenizer.vocab_size]
    assert cfg["modalities"]["image"]["mean"] == [0.5, 0.5, 0.5]  # full modality config, defaults written out
    assert cfg["tasks"] == {"caption": {"max_new_tokens": 8, "num_beams": 1}}
    card = (saved / "README.md").read_text()
    for section in ("## Training data", "## Metrics", "## Intended use", "## Limits", "## Reproduce", "val/cider"):
        assert section in card
    assert not list(saved.parent.glob(".tiny.*"))  # no temp folders left behind


def test_save_load_same_logits_and_tokens(saved, bundle):
    loaded = zoo.load(saved)
    assert loaded.tasks == bundle.tasks and loaded.tokenizer.to_str() == bundle.tokenizer.to_str()
    inputs, tgt = _inputs(bundle.model), torch.randint(4, 200, (2, 6))
    with torch.no_grad():
        assert torch.equal(bundle.model(inputs, tgt), loaded.model(inputs, tgt))
    for beams in (1, 3):
        a = generate(bundle.model, inputs, max_new_tokens=8, num_beams=beams)
        assert torch.equal(a, generate(loaded.model, inputs, max_new_tokens=8, num_beams=beams))
    px = list(inputs["image"])
    assert loaded.caption(px) == bundle.caption(px) and isinstance(loaded.caption(px[0]), str)


def test_dec_grid_model_round_trips(bundle, tmp_path):
    """A model with grid position embeddings saves them and loads them back (config and weights)."""
    torch.manual_seed(1)
    model = zoo.create_model("test-tiny", vocab=bundle.model.cfg.vocab, dec_grid=[4, 4]).eval()
    folder = Pretrained(model, bundle.tokenizer, tasks={}).save_pretrained(tmp_path / "grid")
    loaded = zoo.load(folder).model
    assert loaded.cfg.dec_grid == [4, 4]
    torch.testing.assert_close(loaded.dec_row.weight, model.dec_row.weight, rtol=0, atol=0)
    inputs, tgt = _inputs(model), torch.randint(4, 200, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(inputs, tgt), loaded(inputs, tgt))


def test_save_over_existing_folder_is_atomic_replace(bundle, tmp_path):
    folder = tmp_path / "m"
    bundle.save_pretrained(folder)
    (folder / "stale.txt").write_text("old")
    bundle.save_pretrained(folder)
    assert not (folder / "stale.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_missing_modalities_raise_clear_errors(bundle):
    with pytest.raises(NotImplementedError, match="image_codes"):
        bundle.generate_image("a red circle")
    with pytest.raises(NotImplementedError, match="sensor"):
        bundle.describe([[0.0]])


# --- Hugging Face Hub cache, offline ---------------------------------------------------------------
@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_load_from_hf_cache_by_repo_id_and_revision(saved, bundle, hf_cache, tmp_path):
    _hf_cache(hf_cache, "acme/tiny-captioner", saved, "a" * 40)
    # a second revision with different weights, reachable by commit hash and by branch name
    other = Pretrained(zoo.create_model("test-tiny", vocab=bundle.model.cfg.vocab), bundle.tokenizer,
                       tasks={"caption": {}}).save_pretrained(tmp_path / "v2")
    _hf_cache(hf_cache, "acme/tiny-captioner", other, "b" * 40, refs=("v2",))
    inputs, tgt = _inputs(bundle.model), torch.randint(4, 200, (2, 6))
    main = zoo.load("hf-hub:acme/tiny-captioner")
    with torch.no_grad():
        ref = bundle.model(inputs, tgt)
        assert torch.equal(main.model(inputs, tgt), ref)
        for source in ("hf-hub:acme/tiny-captioner@" + "b" * 40, "hf-hub:acme/tiny-captioner@v2"):
            v2 = zoo.load(source)
            assert not torch.equal(v2.model(inputs, tgt), ref)
        assert torch.equal(zoo.load("hf-hub:acme/tiny-captioner", revision="a" * 40).model(inputs, tgt), ref)
    assert main.source == "hf-hub:acme/tiny-captioner"


def test_missing_repo_and_revision_errors_name_repo_revision_and_fix(saved, hf_cache):
    with pytest.raises(HubLoadError) as e:
        zoo.load("hf-hub:acme/does-not-exist")
    msg = str(e.value)
    assert "'acme/does-not-exist'" in msg and "revision 'main'" in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download acme/does-not-exist" in msg and str(hf_cache) in msg and "local model folder" in msg
    _hf_cache(hf_cache, "acme/tiny-captioner", saved, "c" * 40)
    with pytest.raises(HubLoadError, match="revision 'nope'"):
        zoo.load("hf-hub:acme/tiny-captioner@nope")


def test_registered_tag_not_in_cache_names_its_repo(hf_cache):
    with pytest.raises(HubLoadError, match=r"'ofa-tiny\.shapes' lives in Hub repo 'mmzoo/ofa-tiny-shapes'.*To fix"):
        zoo.load("ofa-tiny.shapes")


def test_registered_tag_loads_from_cache(saved, hf_cache, bundle):
    from zoo.hub import _PRETRAINED, register_pretrained

    register_pretrained("test-tiny.demo", "acme/tiny-demo")
    try:
        commit = add_to_cache(saved, "acme/tiny-demo")
        assert (hf_cache / "models--acme--tiny-demo" / "refs" / "main").read_text() == commit
        assert zoo.load("test-tiny.demo").tokenizer.to_str() == bundle.tokenizer.to_str()
    finally:
        _PRETRAINED.pop("test-tiny.demo")


def test_push_to_hub_builds_the_upload(bundle, monkeypatch):
    from huggingface_hub import HfApi

    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", (repo_id, kw)))

    def upload(self, **kw):
        calls["upload"] = kw
        calls["files"] = sorted(p.name for p in Path(kw["folder_path"]).iterdir())
        return "https://hub/commit/1"

    monkeypatch.setattr(HfApi, "upload_folder", upload)
    assert bundle.push_to_hub("acme/pushed", private=True) == "https://hub/commit/1"
    assert calls["create"] == ("acme/pushed", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls["upload"]["repo_id"] == "acme/pushed"
    assert calls["files"] == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]


# --- safe loading ---------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious(folder: Path, saved: Path) -> None:
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_bytes((saved / name).read_bytes())


def test_pickle_payload_is_refused(saved, tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    _malicious(folder, saved)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(marker)}))
    with pytest.raises(UnsafeModelError, match=r"pytorch_model\.bin.*refusing to load a pickle"):
        zoo.load(folder)
    assert not marker.exists()


def test_target_in_config_is_refused(saved, tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    _malicious(folder, saved)
    (folder / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["modalities"]["image"]["backbone_kwargs"] = {"act_layer": {"_target_": "os.system", "command": f"touch {marker}"}}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsafeModelError, match=r"modalities\.image\.backbone_kwargs\.act_layer\._target_.*os\.system"):
        zoo.load(folder)
    assert not marker.exists()


@pytest.mark.parametrize("edit, match", [
    ({"arch": "evil-arch"}, "not registered"),
    ({"modalities": {"image": {"backbone": "timm:test_resnet", "out_index": 2, "image_size": 32,
                               "backbone_kwargs": {"pretrained_cfg_overlay": {"file": "/tmp/x.pth"}}}}}, "refused"),
])
def test_unregistered_arch_and_outside_files_are_refused(saved, tmp_path, edit, match):
    folder = tmp_path / "evil"
    _malicious(folder, saved)
    (folder / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    cfg = {**json.loads((folder / "config.json").read_text()), **edit}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsafeModelError, match=match):
        zoo.load(folder)


def test_pickle_weights_load_only_with_explicit_opt_in(saved, bundle, tmp_path):
    folder = tmp_path / "legacy"
    _malicious(folder, saved)
    torch.save(bundle.model.state_dict(), folder / "model.pt")
    with pytest.raises(UnsafeModelError, match="allow_pickle=True"):
        zoo.load(folder)
    loaded = zoo.load(folder, allow_pickle=True)
    inputs, tgt = _inputs(bundle.model), torch.randint(4, 200, (2, 6))
    with torch.no_grad():
        assert torch.equal(loaded.model(inputs, tgt), bundle.model(inputs, tgt))


def test_bad_folders_name_the_file(saved, tmp_path):
    folder = tmp_path / "bad"
    _malicious(folder, saved)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        zoo.load(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: invalid JSON"):
        zoo.load(folder)


# --- text-to-image folders: the VQ image-code tokenizer in image_codes/ --------------------------------
def _t2i_copy(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def test_t2i_loads_from_hf_cache_with_its_vq(t2i_export, hf_cache):
    from conftest import T2I_CAPTIONS

    folder, _ = t2i_export
    commit = add_to_cache(folder, "acme/tiny-t2i")
    add_to_cache(folder, "acme/tiny-t2i", revision="v1")
    snap = hf_cache / "models--acme--tiny-t2i" / "snapshots" / commit
    assert (snap / "image_codes" / "diffusion_pytorch_model.safetensors").is_file()
    ref = zoo.load(folder).generate_image_codes(T2I_CAPTIONS)
    for source in ("hf-hub:acme/tiny-t2i", "hf-hub:acme/tiny-t2i@v1", f"hf-hub:acme/tiny-t2i@{commit}"):
        loaded = zoo.load(source)
        assert loaded.image_tokenizer is not None and torch.equal(loaded.generate_image_codes(T2I_CAPTIONS), ref)


def test_t2i_push_to_hub_uploads_image_codes(t2i_export, monkeypatch):
    from huggingface_hub import HfApi

    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)

    def upload(self, **kw):
        calls["patterns"] = kw["allow_patterns"]
        calls["files"] = sorted(p.relative_to(kw["folder_path"]).as_posix()
                                for p in Path(kw["folder_path"]).rglob("*") if p.is_file())
        return "https://hub/commit/2"

    monkeypatch.setattr(HfApi, "upload_folder", upload)
    zoo.load(t2i_export[0]).push_to_hub("acme/t2i")
    import fnmatch

    assert "image_codes/diffusion_pytorch_model.safetensors" in calls["files"]
    assert all(any(fnmatch.fnmatch(f, p) for p in calls["patterns"]) for f in calls["files"])  # all uploaded


def test_t2i_vq_pickle_refused_unless_opted_in(t2i_export, tmp_path):
    from conftest import T2I_CAPTIONS

    folder = _t2i_copy(t2i_export[0], tmp_path / "legacy")
    vq = folder / "image_codes"
    marker = tmp_path / "pwned"
    (vq / "diffusion_pytorch_model.safetensors").unlink()
    (vq / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(marker)}))
    with pytest.raises(UnsafeModelError, match=r"image_codes/diffusion_pytorch_model\.bin.*refusing to load a pickle"):
        zoo.load(folder)
    assert not marker.exists()
    # a trusted legacy .bin loads with the explicit opt-in (diffusers reads it with weights_only=True)
    torch.save(t2i_export[1].image_tokenizer.vq.state_dict(), vq / "diffusion_pytorch_model.bin")
    loaded = zoo.load(folder, allow_pickle=True)
    assert torch.equal(loaded.generate_image_codes(T2I_CAPTIONS), zoo.load(t2i_export[0]).generate_image_codes(T2I_CAPTIONS))


@pytest.mark.parametrize("where", ["folder", "vq_config"])
def test_t2i_escaping_folder_and_target_in_vq_config_are_refused(t2i_export, tmp_path, where):
    folder = _t2i_copy(t2i_export[0], tmp_path / "evil")
    marker = tmp_path / "pwned"
    if where == "folder":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["image_codes"]["folder"] = "../outside"
        (folder / "config.json").write_text(json.dumps(cfg))
        match = "image_codes.folder must name a subfolder"
    else:
        path = folder / "image_codes" / "config.json"
        cfg = json.loads(path.read_text())
        cfg["act_fn"] = {"_target_": "os.system", "command": f"touch {marker}"}
        path.write_text(json.dumps(cfg))
        match = r"act_fn\._target_.*os\.system"
    with pytest.raises(UnsafeModelError, match=match):
        zoo.load(folder)
    assert not marker.exists()
    (folder / "image_codes" / "config.json").unlink()
    if where == "vq_config":
        with pytest.raises(FileNotFoundError, match="re-export"):
            zoo.load(folder)
