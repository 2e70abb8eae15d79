"""Loading a model folder runs no code from it, reads nothing outside it and refuses every tampering clearly.

The corpus (tests/safety_corpus.py) tampers with real saved tiny models in 231 ways (84 of them Florence-2 folders
in its three layouts) and loads each through
``zoo.load(folder)``, ``zoo.load("hf-hub:...")`` (a local Hub cache, offline), ``zoo-predict``, ``zoo-eval ckpt=``
and ``zoo-finetune pretrained=``. ``pytest -s -k summary`` prints the counts.
"""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import zoo
from safety_corpus import ENTRY_POINTS, Summary, build_case, corpus, make_context, try_case
from zoo.loading import ModelFolderError, UnsafeModelError

CASES = corpus()
_OUTCOMES: dict[str, list] = {}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, one_thread):
    return make_context(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tampered_folder(case, ctx):
    """No marker file appears, and every entry point refuses with the expected error naming the file/key (or,
    for a harmless tampering, loads)."""
    folder = build_case(case, ctx)
    outcomes = [try_case(case, folder, entry, ctx) for entry in ENTRY_POINTS]
    _OUTCOMES[case.name] = outcomes
    bad = [f"{o.entry}: {o.status}: {o.detail}" for o in outcomes if o.status not in ("refused", "loaded")]
    assert not bad, "\n".join(bad)
    assert all(o.status == ("loaded" if case.error is None else "refused") for o in outcomes)


def test_florence_cases_cover_the_loader_and_their_payloads_are_live(ctx, tmp_path):
    """The Florence-2 cases reach every layout and every file kind; the remote-code files placed by the auto_map
    cases do create their marker when imported (so the corpus would see an import), and loading never imports them."""
    import runpy

    from safety_corpus import FLORENCE_BASES

    fl = [c for c in CASES if c.name.startswith("fl_")]
    assert {c.base for c in fl} == set(FLORENCE_BASES)
    for part in ("pickle", "target", "symlink", "st_", "tensor", "key_", "config", "auto_map", "tokenizer",
                 "generation", "processor"):
        assert any(part in c.name for c in fl), part
    case = next(c for c in CASES if c.name == "fl_ms_auto_map_remote_code")
    folder = ctx.root / "cases" / case.name
    folder = folder if folder.exists() else build_case(case, ctx)
    assert json.loads((folder / "config.json").read_text())["auto_map"]
    for m in ctx.markers.iterdir():
        m.unlink()
    m = zoo.load(folder)
    assert m.meta["layout"] == "microsoft" and not ctx.marker(case.name).exists()
    assert not any(k.startswith(("configuration_florence2", "modeling_florence2")) for k in sys.modules)
    runpy.run_path(str(folder / "modeling_florence2.py"))
    assert ctx.marker(case.name).exists()  # the payload is live: an import would have been seen
    ctx.marker(case.name).unlink()


def test_corpus_summary(ctx, capsys):
    """The closing figures: folders tried, code executions and raw errors over the whole corpus."""
    names = {c.name for c in CASES}
    assert len(CASES) >= 50
    for prefix in ("pickle_", "target_", "backbone_", "kwargs_", "symlink_", "st_", "tensor_", "config_", "tokenizer_",
                   "image_codes_", "vq_"):
        assert any(n.startswith(prefix) for n in names), prefix
    summary = Summary()
    for case in CASES:  # cases not run above (a -k selection) run here
        if case.name not in _OUTCOMES:
            folder = ctx.root / "cases" / case.name
            folder = folder if folder.exists() else build_case(case, ctx)
            _OUTCOMES[case.name] = [try_case(case, folder, entry, ctx) for entry in ENTRY_POINTS]
        summary.folders += 1
        for o in _OUTCOMES[case.name]:
            summary.add(o)
    with capsys.disabled():
        print(f"\n{summary}")
    assert summary.attempts == len(CASES) * len(ENTRY_POINTS)
    assert summary.counts.get("executed", 0) == 0 and summary.counts.get("raw", 0) == 0
    assert summary.counts.get("not_refused", 0) == 0 and not summary.bad


# --- what a safe load does and does not touch ------------------------------------------------------
_AUDIT: dict[str, list] = {"events": [], "on": []}


def _audit(event, args):
    if _AUDIT["on"] and event in ("open", "os.listdir", "os.scandir", "socket.connect", "socket.getaddrinfo",
                                  "urllib.Request", "subprocess.Popen", "os.system"):
        _AUDIT["events"].append((event, str(args[0]) if args else ""))


sys.addaudithook(_audit)


def _touched(fn):
    fn()  # warm: lazy imports read their own modules
    _AUDIT["events"].clear()
    _AUDIT["on"].append(1)
    try:
        fn()
    finally:
        _AUDIT["on"].clear()
    return list(_AUDIT["events"])


@pytest.mark.parametrize("base", ["caption", "t2i"])
def test_loading_reads_only_the_folder_and_makes_no_network_call(ctx, base):
    folder = getattr(ctx, base)
    events = _touched(lambda: zoo.load(folder))
    assert events and all(e == "open" for e, _ in events)
    root = str(folder.resolve())
    outside = [p for _, p in events if not p.startswith(root + "/")]
    assert not outside, outside
    expected = {"config.json", "model.safetensors", "tokenizer.json"}
    if base == "t2i":
        expected |= {"image_codes/config.json", "image_codes/diffusion_pytorch_model.safetensors"}
    assert {str(Path(p).relative_to(root)) for _, p in events} == expected


@pytest.mark.parametrize("base,files", [
    ("florence", {"config.json", "processor_config.json", "generation_config.json", "model.safetensors",
                  "tokenizer.json", "README.md"}),
    ("florence_ms", {"config.json", "preprocessor_config.json", "generation_config.json", "pytorch_model.bin",
                     "tokenizer.json", "README.md"}),
    ("florence_saved", {"config.json", "model.safetensors", "tokenizer.json"}),
])
def test_florence_loading_reads_only_the_folder_and_makes_no_network_call(ctx, base, files):
    """A Florence-2 folder of each layout: only its own allow-listed files are opened, nothing else, no network."""
    folder = ctx.base(base)
    events = _touched(lambda: zoo.load(folder))
    assert events and all(e == "open" for e, _ in events), events
    root = str(folder.resolve())
    assert all(p.startswith(root + "/") for _, p in events), events
    assert {str(Path(p).relative_to(root)) for _, p in events} == files


def _blob_cache(folder: Path, cache: Path, repo_id: str) -> Path:
    """A Hub cache the way huggingface_hub writes one: snapshot files are symlinks into the repo's blobs/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / ("d" * 40)
    for f in [p for p in folder.rglob("*") if p.is_file()]:
        rel = f.relative_to(folder)
        blob = repo / "blobs" / rel.as_posix().replace("/", "_")
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, blob)
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).symlink_to(Path("../" * (len(rel.parts) + 1)) / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("d" * 40)
    return snap


def test_hub_snapshot_links_into_blobs_load_but_links_out_of_the_repo_are_refused(ctx, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = _blob_cache(ctx.t2i, tmp_path / "hub", "acme/linked")
    ref = zoo.load(ctx.t2i)
    loaded = zoo.load("hf-hub:acme/linked")
    assert loaded.tokenizer.to_str() == ref.tokenizer.to_str()
    for a, b in zip(loaded.model.state_dict().values(), ref.model.state_dict().values()):
        assert torch.equal(a, b)
    root = str(snap.parent.parent.resolve())
    events = _touched(lambda: zoo.load("hf-hub:acme/linked"))
    assert all(p.startswith(root + "/") for e, p in events if e == "open")
    assert zoo.load(snap).tokenizer.to_str() == ref.tokenizer.to_str()  # the snapshot path itself, as a folder
    # a snapshot file linked to a copy outside the repo's cache folder is refused, naming it
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy2(ctx.t2i / "model.safetensors", outside)
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(outside)
    with pytest.raises(UnsafeModelError, match=r"snapshots/d+/model\.safetensors: points to .*outside the model"):
        zoo.load("hf-hub:acme/linked")


def test_half_precision_weights_are_upcast_exactly(ctx, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(ctx.caption, tmp_path / "half"))
    state = load_file(str(folder / "model.safetensors"))
    half = {k: v.half() if v.dtype == torch.float32 else v for k, v in state.items()}
    save_file(half, str(folder / "model.safetensors"))
    loaded = zoo.load(folder).model.state_dict()
    for k, v in half.items():
        assert loaded[k].dtype == state[k].dtype and torch.equal(loaded[k], v.to(state[k].dtype)), k


def test_training_refuses_backbone_kwargs_off_the_allow_list():
    """The allow-list holds at build time too, so a model is never trained with a config it could not load."""
    with pytest.raises(ValueError, match=r"backbone_kwargs\.checkpoint_path: not an architecture argument"):
        zoo.create_model("test-tiny", modalities={"image": {"backbone_kwargs": {"checkpoint_path": "/tmp/x.pth"}}})
    with pytest.raises(ValueError, match=r"backbone: 'timm:hf-hub:timm/resnet18' is not a registered timm"):
        zoo.create_model("test-tiny", modalities={"image": {"backbone": "timm:hf-hub:timm/resnet18"}})
    m = zoo.create_model("test-tiny", modalities={"image": {"backbone_kwargs": {"drop_path_rate": 0.1}}})
    assert m.embedders["image"].kind == "timm"


def test_open_clip_backbone_round_trips_without_weights_or_network(tmp_path):
    """An open_clip tower (a tiny config registered for the test) saves and loads the same; loading opens only the
    folder's files and makes no network call."""
    from open_clip import factory

    from modalities.text import TextTokenizer
    from zoo.pretrained import Pretrained

    name = "mmzoo-test-tiny-clip"
    factory._MODEL_CONFIGS[name] = {
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 1, "layers": 1}}
    try:
        tok = TextTokenizer.train(["a red circle", "a blue square"] * 10, vocab_size=280)
        torch.manual_seed(0)
        model = zoo.create_model("test-tiny", vocab={"text_size": tok.vocab_size, "image_code_size": 0, "loc_bins": 0},
                                 modalities={"image": {"backbone": f"open_clip:{name}", "image_size": 32}})
        folder = Pretrained(model.eval(), tok, tasks={"caption": {}}).save_pretrained(tmp_path / "clip")
        saved = json.loads((folder / "config.json").read_text())
        assert saved["modalities"]["image"]["backbone"] == f"open_clip:{name}"
        events = _touched(lambda: zoo.load(folder))
        assert all(e == "open" and p.startswith(str(folder.resolve()) + "/") for e, p in events), events
        loaded = zoo.load(folder).model
        x = {"image": torch.randn(1, 3, 32, 32), "text": (torch.full((1, 3), 5), torch.ones(1, 3, dtype=torch.bool))}
        with torch.no_grad():
            assert torch.equal(loaded(x, torch.full((1, 2), 5)), model(x, torch.full((1, 2), 5)))
    finally:
        factory._MODEL_CONFIGS.pop(name, None)


def test_exceptions_form_one_small_hierarchy():
    assert issubclass(UnsafeModelError, ModelFolderError) and issubclass(ModelFolderError, ValueError)
    assert zoo.UnsafeModelError is UnsafeModelError and zoo.ModelFolderError is ModelFolderError


def test_schema_covers_every_saved_field(ctx):
    """Every field a model saves has a schema entry (else a new field would make saved models unloadable)."""
    from dataclasses import fields

    from modalities.image import ImageConfig
    from modalities.sensor import SensorConfig
    from zoo.config import ModelConfig
    from zoo.loading import MODALITY_SCHEMAS, MODEL_SCHEMA, TASK_SCHEMA
    from zoo.pretrained import DEFAULT_GENERATION, T2I_GENERATION

    assert {f.name for f in fields(ModelConfig)} <= set(MODEL_SCHEMA)
    assert {f.name for f in fields(ImageConfig)} == set(MODALITY_SCHEMAS["image"])
    assert {f.name for f in fields(SensorConfig)} == set(MODALITY_SCHEMAS["sensor"])
    assert set(DEFAULT_GENERATION) | set(T2I_GENERATION) <= set(TASK_SCHEMA)
    from tasks.checkpoint import TASK_SETTINGS

    assert set(TASK_SETTINGS) | {"candidates"} <= set(TASK_SCHEMA)
    for folder in (ctx.caption, ctx.t2i):
        assert set(json.loads((folder / "config.json").read_text())) <= set(MODEL_SCHEMA)


def test_checkpoints_are_never_fully_unpickled(tmp_path):
    """zoo-eval / zoo-export read a .ckpt with weights_only=True only: a payload is refused, and the old
    unsafe_pickle opt-in is refused too."""
    from safety_corpus import ShellPayload
    from tasks.checkpoint import read_checkpoint

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"mmzoo": {}, "state_dict": {}, "callbacks": ShellPayload(marker)}, ckpt)
    with pytest.raises(ValueError, match=r"evil\.ckpt: cannot be read with torch\.load\(weights_only=True\)"):
        read_checkpoint(ckpt)
    with pytest.raises(ValueError, match=r"evil\.ckpt: unsafe_pickle=true is no longer supported"):
        read_checkpoint(ckpt, unsafe_pickle=True)
    assert not marker.exists()


def test_oversized_json_is_refused_before_it_is_read(ctx, tmp_path, monkeypatch):
    from zoo import loading

    folder = Path(shutil.copytree(ctx.caption, tmp_path / "big"))
    monkeypatch.setattr(loading, "MAX_JSON_BYTES", 1000)
    with pytest.raises(ModelFolderError, match=r"config\.json: \d+ bytes, more than the 1000"):
        zoo.load(folder)
