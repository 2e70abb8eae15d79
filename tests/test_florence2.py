"""Florence-2 in mmzoo's modules against transformers' implementation (the reference, test-only).

Tiny random ``Florence2ForConditionalGeneration`` models are saved as transformers writes them into a local Hub cache
(``HF_HUB_OFFLINE=1``), plus the same weights in Microsoft's original layout; mmzoo loads both through its key tables
and must give the same logits (≤ 1e-4 max abs, fp32) and the same greedy and beam-3 tokens for every task prompt.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo.config import ModelConfig
from zoo.hub import add_to_cache
from zoo.imported.bart_keys import BART_ALIASES, BART_TABLE
from zoo.imported.florence2 import Florence2, load_folder, parse_boxes, recognise, swap01
from zoo.imported.florence2_keys import florence2_aliases, florence2_table
from zoo.imported.keymap import KeyMapError, convert, expand
from zoo.model import UnifiedSeq2Seq
from zoo.pretrained import UnsafeModelError

sys.path.insert(0, str(Path(__file__).parent))
from florence2_reference import build_reference, grid  # noqa: E402
from florence2_reference import write_microsoft as _write_microsoft  # noqa: E402

transformers = pytest.importorskip("transformers")

TOL = 1e-4
#: two reference configs: image size, depths, widths, heads, window, text size, embedding scaling
CONFIGS = {
    "a": dict(image_size=64, depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), heads=(2, 2, 4, 4), window=3, d_model=32,
              layers=2, n_heads=4, ffn=64, scale_embedding=False, seed=0),
    "b": dict(image_size=96, depths=(1, 2, 1, 2), dims=(8, 16, 24, 32), heads=(1, 2, 2, 4), window=2, d_model=48,
              layers=3, n_heads=6, ffn=96, scale_embedding=True, seed=1),
}
PROMPTS = ["<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OD>", "<DENSE_REGION_CAPTION>",
           "<REGION_PROPOSAL>", "<OCR>", "<OCR_WITH_REGION>", "<CAPTION_TO_PHRASE_GROUNDING>a red cat",
           "<OPEN_VOCABULARY_DETECTION>cat", "<REGION_TO_CATEGORY><loc_10><loc_20><loc_300><loc_400>",
           "<REGION_TO_DESCRIPTION><loc_100><loc_200><loc_500><loc_600>"]
DECODING = {"greedy": dict(num_beams=1, max_new_tokens=12, min_new_tokens=6),
            "beam3": dict(num_beams=3, max_new_tokens=12),
            "beam3-ngram-early": dict(num_beams=3, max_new_tokens=12, no_repeat_ngram_size=3, early_stopping=True)}


def _images(n: int = 3) -> list[Image.Image]:
    """Images of different sizes and modes (RGB, L, RGBA, P)."""
    rng = np.random.default_rng(0)
    out = []
    for i, mode in enumerate(["RGB", "L", "RGBA", "P"][:n]):
        arr = (rng.random((40 + 17 * i, 90 - 11 * i, 3)) * 255).astype("uint8")
        out.append(Image.fromarray(arr).convert(mode))
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A local Hub cache with each config in transformers' layout (florence-community/tiny-*) and Microsoft's
    (microsoft/tiny-*); yields {name: (reference model, processor)}."""
    root = tmp_path_factory.mktemp("florence2")
    cache = root / "cache"
    refs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        for name, kw in CONFIGS.items():
            folder = root / f"native-{name}"
            refs[name] = build_reference(folder, **kw)
            add_to_cache(folder, f"florence-community/tiny-{name}")
            ours = load_folder(folder)
            _write_microsoft(folder, root / f"ms-{name}", ours)
            add_to_cache(root / f"ms-{name}", f"microsoft/tiny-{name}")
        yield refs


def _ref_inputs(processor, prompts, images):
    return processor(text=prompts, images=images, return_tensors="pt", padding=True)


def _our_logits(m: Florence2, inputs, prompts, dec: torch.Tensor) -> torch.Tensor:
    ids, mask = m._prompt_segment([m._expand_prompt(p) for p in prompts])
    with torch.no_grad():
        out = m.model({"florence_image": inputs["pixel_values"], "text": (ids, mask)}, dec.clone().apply_(swap01))
    v = out.shape[-1]
    perm = torch.arange(v)
    perm[0], perm[1] = 1, 0
    return out[..., perm]  # back to the published vocabulary's order


# --- the backbone against BART ------------------------------------------------------------------
@pytest.mark.parametrize("scale", [False, True])
def test_backbone_equals_bart(scale):
    cfg = transformers.BartConfig(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=40, scale_embedding=scale)
    torch.manual_seed(0)
    ref = transformers.BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        ref.final_logits_bias.normal_()
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    ours = UnifiedSeq2Seq(ModelConfig(d_model=32, n_heads=4, enc_layers=2, dec_layers=2, ffn_dim=64, max_positions=40,
                                      norm_first=False, embed_norm=True, embed_scale=scale, pos_offset=2,
                                      enc_positions="sequence", type_embed=False, logits_bias=True,
                                      activation="gelu", vocab={"text_size": 95})).eval()
    ours.load_state_dict(convert(ref.state_dict(), expand(BART_TABLE, {"enc": 2, "dec": 2}), BART_ALIASES))
    ids = torch.randint(4, 99, (3, 10))
    ids[:, 0], ids[:, -1] = 0, 2
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 7:], ids[1, 7:] = False, 1
    dec = torch.randint(4, 99, (3, 6))
    dec[:, 0] = 2
    perm = torch.arange(99)
    perm[0], perm[1] = 1, 0
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask.long(), decoder_input_ids=dec).logits
        got = ours({"text": (perm[ids], mask)}, perm[dec])[..., perm]
        assert (want - got)[mask.any(1)].abs().max() <= TOL
        ours.decoder[1].ffn.fc2.weight[0, 0] += 0.5  # a wrong weight shows
        assert (want - ours({"text": (perm[ids], mask)}, perm[dec])[..., perm]).abs().max() > 1e-3


# --- key tables ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["transformers", "microsoft"])
def test_key_tables_complete_and_strict(hub, tmp_path, layout):
    ref, _ = hub["a"]
    cfg = CONFIGS["a"]
    entries = expand(florence2_table(layout), {"enc": cfg["layers"], "dec": cfg["layers"], "depths": cfg["depths"]})
    names = [n for _, ns, _ in entries for n in ns]
    assert len(names) == len(set(names))  # no tensor mapped twice
    ours_keys = {k for k, _, _ in entries}
    model_keys = set(load_folder_native("a", hub).model.state_dict())
    assert ours_keys == model_keys | ({"final_logits_bias"} if layout == "microsoft" else set())
    if layout == "transformers":
        theirs = ref.state_dict()
        assert set(names) | {a for a, _ in florence2_aliases(layout)} == set(theirs)
        state = dict(theirs)
    else:
        state = torch.load(_ms_folder(hub, "a") / "pytorch_model.bin", weights_only=True)
        assert set(names) | {"language_model.lm_head.weight"} == set(state)
    table, aliases = expand(florence2_table(layout), {"enc": 2, "dec": 2, "depths": cfg["depths"]}), \
        florence2_aliases(layout)
    dropped = dict(state)
    key = names[7]
    del dropped[key]
    with pytest.raises(KeyMapError, match=key.replace(".", r"\.")):
        convert(dropped, table, aliases)
    extra = {**state, "vision_tower.extra.weight": torch.zeros(1)}
    with pytest.raises(KeyMapError, match=r"vision_tower\.extra\.weight"):
        convert(extra, table, aliases)


_LOADED: dict = {}


def load_folder_native(name, hub) -> Florence2:
    if name not in _LOADED:
        _LOADED[name] = zoo.load(f"hf-hub:florence-community/tiny-{name}")
    return _LOADED[name]


def _ms_folder(hub, name) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(f"microsoft/tiny-{name}", local_files_only=True,
                                  cache_dir=os.environ["HF_HUB_CACHE"]))


# --- equivalence ---------------------------------------------------------------------------------
@pytest.fixture()
def cache_env(hub, monkeypatch, tmp_path_factory):
    root = tmp_path_factory.getbasetemp()
    caches = sorted(root.glob("florence2*/cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(caches[0]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("layout", ["florence-community", "microsoft"])
def test_logits_equal_transformers(cache_env, name, layout):
    ref, processor = cache_env[name]
    m = zoo.load(f"hf-hub:{layout}/tiny-{name}")
    assert isinstance(m, Florence2) and m.meta["layout"] == ("microsoft" if layout == "microsoft" else "transformers")
    assert m.meta["license"] == "mit" and len(m.meta["revision"]) == 40
    prompts = ["<CAPTION>", "<OD>", "<CAPTION_TO_PHRASE_GROUNDING>a red cat"]
    inputs = _ref_inputs(processor, prompts, _images())
    g = torch.Generator().manual_seed(0)
    dec = torch.randint(4, 300, (3, 9), generator=g)
    dec[:, 0] = 2
    with torch.no_grad():
        want = ref(**inputs, decoder_input_ids=dec).logits
    got = _our_logits(m, inputs, prompts, dec)
    diff = (want - got).abs().max().item()
    print(f"florence2 {layout} config {name}: max |logit diff| = {diff:.3g}")
    assert diff <= TOL


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("decoding", list(DECODING))
def test_tokens_equal_transformers(cache_env, name, decoding):
    """Greedy and beam-3 tokens (and the raw text) equal transformers' for every task prompt, batch of 3 images."""
    ref, processor = cache_env[name]
    m = zoo.load(f"hf-hub:florence-community/tiny-{name}")
    images = _images()
    kw = DECODING[decoding]
    prompts = PROMPTS if name == "a" and decoding != "beam3-ngram-early" else PROMPTS[::3]
    agree = 0
    for prompt in prompts:
        inputs = _ref_inputs(processor, [prompt] * 3, images)
        with torch.no_grad():
            want = ref.generate(**inputs, **kw)
        pixels = list(inputs["pixel_values"])
        got = m.generate_ids(pixels, [prompt] * 3, **kw)
        assert torch.equal(want, got), (prompt, want, got)
        agree += 1
        texts = [t.replace("<s>", "").replace("</s>", "").replace("<pad>", "")
                 for t in processor.batch_decode(want, skip_special_tokens=False)]
        assert m.generate(pixels, prompt, **kw) == texts
    print(f"florence2 config {name} {decoding}: tokens identical for {agree}/{len(prompts)} prompts x 3 images")


def test_generation_encodes_large_images_in_chunks(cache_env, monkeypatch):
    """CPU generation encodes rows of large images a few at a time (zoo.model.GENERATION_CHUNK_PIXELS): the same
    memory as one batched encode, and the same tokens as transformers."""
    import zoo.model

    ref, processor = cache_env["a"]
    m = zoo.load("hf-hub:florence-community/tiny-a")
    prompts = ["<OD>", "<CAPTION_TO_PHRASE_GROUNDING>a red square", "<CAPTION>"]  # prompts of different lengths
    inputs = _ref_inputs(processor, prompts, _images())
    with torch.no_grad():
        want = ref.generate(**inputs, num_beams=3, max_new_tokens=12)
        ids, mask = m._prompt_segment([m._expand_prompt(p) for p in prompts])
        segments = {"florence_image": inputs["pixel_values"], "text": (ids, mask)}
        whole = m.model.encode(segments)
        calls = []
        encode = m.model.encode
        monkeypatch.setattr(m.model, "encode", lambda x: calls.append(_rows_of(x)) or encode(x))
        chunked = m.model.encode_for_generation(segments, max_pixels=2 * inputs["pixel_values"][0, 0].numel())
        assert calls == [2, 1]
        torch.testing.assert_close(chunked[0], whole[0], atol=1e-5, rtol=0)
        assert torch.equal(chunked[1], whole[1])
        calls.clear()
        monkeypatch.setattr(zoo.model, "GENERATION_CHUNK_PIXELS", 1)  # one row a chunk
        got = m.generate_ids(list(inputs["pixel_values"]), prompts, num_beams=3, max_new_tokens=12)
    assert calls == [1, 1, 1]
    assert torch.equal(want, got)


def _rows_of(segments: dict) -> int:
    return int(segments["florence_image"].shape[0])


def test_microsoft_layout_tokens(cache_env):
    ref, processor = cache_env["a"]
    m = zoo.load("hf-hub:microsoft/tiny-a")
    # the location tokens the remote processor adds got the published ids
    native = load_folder_native("a", cache_env)
    for t in ("<loc_0>", "<loc_999>", "<od>", "<and>"):
        assert m.tokenizer.token_id(t) == native.tokenizer.token_id(t) is not None
    inputs = _ref_inputs(processor, ["<OD>"] * 3, _images())
    for kw in DECODING.values():
        with torch.no_grad():
            want = ref.generate(**inputs, **kw)
        assert torch.equal(want, m.generate_ids(list(inputs["pixel_values"]), ["<OD>"] * 3, **kw))


def test_preprocessing_equals_pil_processor(cache_env):
    """Our CPU preprocessing equals transformers' PIL image processor (bicubic, ImageNet mean/std) and is close to
    its default torchvision one (another bicubic kernel when upsampling)."""
    _, processor = cache_env["a"]
    m = load_folder_native("a", cache_env)
    images = _images(4)
    settings = {k: v for k, v in processor.image_processor.to_dict().items()
                if k in ("size", "do_center_crop", "crop_size", "image_mean", "image_std", "resample")}
    pil = transformers.CLIPImageProcessorPil(**settings)(images, return_tensors="pt")["pixel_values"]
    got, sizes = m._images(images)
    assert sizes == [im.size for im in images]
    assert got.shape == pil.shape and (got - pil).abs().max() < 1e-5
    tv = processor(text=["<OCR>"] * 4, images=images, return_tensors="pt")["pixel_values"]
    assert (got - tv).abs().mean() < 0.01


# --- round trip, post-processing, safety ---------------------------------------------------------
def test_save_load_round_trip(cache_env, tmp_path):
    m = load_folder_native("b", cache_env)
    out = m.save_pretrained(tmp_path / "ours")
    assert recognise(out) == "mmzoo"
    card = (out / "README.md").read_text()
    assert "florence-community/tiny-b" in card and "license: mit" in card and m.meta["revision"] in card
    m2 = zoo.load(str(out))
    assert isinstance(m2, Florence2) and m2.generation == m.generation
    for k, v in m.model.state_dict().items():
        assert torch.equal(v, m2.model.state_dict()[k]), k
    images = _images()
    assert m2.generate(images, "<OD>", num_beams=3) == m.generate(images, "<OD>", num_beams=3)


def test_task_helpers_post_process_like_processor(cache_env):
    _, processor = cache_env["a"]
    text = "</s><s>cat<loc_100><loc_200><loc_300><loc_400>dog<loc_0><loc_0><loc_999><loc_999><loc_5><loc_6><loc_7>" \
           "<loc_8></s>"
    for task in ("<OD>", "<CAPTION_TO_PHRASE_GROUNDING>"):
        want = processor.post_process_generation(text, task=task, image_size=(640, 481))[task]
        got = parse_boxes(text, 640, 481)
        assert got == {"bboxes": want["bboxes"], "labels": want["labels"]}
    # hand-computed: bin centres scaled by size / 1000, truncated
    assert parse_boxes("cat<loc_100><loc_200><loc_300><loc_400>", 640, 480)["bboxes"] == [[64, 96, 192, 192]]
    m = load_folder_native("a", cache_env)
    images = _images()
    raw = m.generate(images, "<OD>", num_beams=3)
    assert m.detect(images, num_beams=3) == [parse_boxes(t, *im.size) for t, im in zip(raw, images)]
    assert isinstance(m.caption(images[0]), str)
    assert len(m.ground(images, "a red cat")) == 3


def test_unsafe_and_mismatched_checkpoints(cache_env, tmp_path):
    src = _ms_folder(cache_env, "a")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        if f.name != "pytorch_model.bin":
            (bad / f.name).write_bytes(f.read_bytes())

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, bad / "pytorch_model.bin")
    with pytest.raises(UnsafeModelError, match="weights_only"):
        load_folder(bad)
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state.pop("language_model.model.encoder.layers.1.fc2.bias")
    torch.save(state, bad / "pytorch_model.bin")
    with pytest.raises(KeyMapError, match=r"encoder\.layers\.1\.fc2\.bias"):
        load_folder(bad)


def test_registered_architectures_and_names():
    assert {"florence2-base", "florence2-large", "test-florence2"} <= set(zoo.list_models())
    assert {"florence2-base.ms", "florence2-base.ms-ft", "florence2-large.ms", "florence2-base.community"} <= \
        set(zoo.list_pretrained("florence2-*"))
    from zoo.hub import pretrained_entry

    assert pretrained_entry("florence2-large.ms-ft").repo_id == "microsoft/Florence-2-large-ft"
    with torch.device("meta"):
        base = zoo.create_model("florence2-base").num_parameters()
        large = zoo.create_model("florence2-large").num_parameters()
    assert 0.2e9 < base < 0.3e9 and 0.7e9 < large < 0.85e9
    m = zoo.create_model("test-florence2").eval()
    s = m.cfg.modalities["florence_image"]["image_size"]
    x, mask = m.embedders["florence_image"](torch.randn(2, 3, s, s))
    assert x.shape == (2, 1 + grid(s) ** 2, m.cfg.d_model) and mask.all()


def test_real_photos_caption_detect_ground_png(cache_env, tmp_path):
    """The task helpers on scikit-image's sample photos (random weights: the output is the pipeline, not quality)."""
    skimage_data = pytest.importorskip("skimage.data")
    from zoo.imported.florence2 import draw_boxes

    photos = [Image.fromarray(skimage_data.astronaut()), Image.fromarray(skimage_data.coffee()),
              Image.fromarray(skimage_data.camera())]  # RGB 512x512, RGB 600x400, grayscale 512x512
    m = zoo.load("hf-hub:florence-community/tiny-a")
    captions = m.caption(photos, num_beams=3)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    found = m.detect(photos, num_beams=3)
    grounded = m.ground(photos[1], "a cup of coffee", num_beams=3)
    for res, photo in zip(found, photos):
        assert set(res) == {"bboxes", "labels"} and len(res["bboxes"]) == len(res["labels"])
        assert all(0 <= v <= max(photo.size) for box in res["bboxes"] for v in box)
    png = tmp_path / "boxes.png"
    draw_boxes(photos[1], {"bboxes": [[10, 20, 300, 200], *grounded["bboxes"]],
                           "labels": ["cup", *grounded["labels"]]}).save(png)
    drawn = np.asarray(Image.open(png).convert("RGB"))
    assert drawn.shape == (400, 600, 3) and (drawn[20, 10:300] == [255, 0, 0]).all()  # the first box, in red


def test_preprocessor_in_dataloader_workers():
    """The CPU preprocessing pickles (DataLoader workers) and gives [3, S, S] for any image mode."""
    import pickle

    from modalities.florence_image import FlorenceImageConfig, FlorenceImagePreprocessor

    pre = pickle.loads(pickle.dumps(FlorenceImagePreprocessor(FlorenceImageConfig(image_size=48))))
    out = torch.stack([pre(im) for im in _images(4)])
    assert out.shape == (4, 3, 48, 48) and out.dtype == torch.float32
    gray = pre(Image.new("L", (30, 20), 128))
    assert torch.allclose(gray[:, 0, 0], (128 / 255 - torch.tensor(pre.cfg.mean)) / torch.tensor(pre.cfg.std))


def test_zoo_predict_detect_and_ground(cache_env, tmp_path):
    """``zoo-predict task=detect|ground`` writes JSON boxes and a PNG per image with the boxes drawn."""
    from zoo.predict import main as predict_main

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, im in enumerate(_images(2)):
        im.convert("RGB").save(photos / f"p{i}.png")
    out = tmp_path / "res" / "boxes.json"
    predict_main(["pretrained=hf-hub:florence-community/tiny-a", "task=detect", f"input={photos}", f"out={out}",
                  "num_beams=3"])
    recs = json.loads(out.read_text())
    assert [Path(r["input"]).name for r in recs] == ["p0.png", "p1.png"]
    m = load_folder_native("a", cache_env)
    assert [{"bboxes": r["bboxes"], "labels": r["labels"]} for r in recs] == \
        m.detect([r["input"] for r in recs], num_beams=3)
    assert all(Image.open(r["png"]).size == Image.open(r["input"]).size for r in recs)
    predict_main(["pretrained=hf-hub:florence-community/tiny-a", "task=ground", f"input={photos / 'p0.png'}",
                  "text=a red cat", f"out={tmp_path / 'g.json'}"])
    assert json.loads((tmp_path / "g.json").read_text())[0]["text"] == "a red cat"
    predict_main(["pretrained=hf-hub:florence-community/tiny-a", "task=caption", f"input={photos}",
                  f"out={tmp_path / 'c.json'}"])
    caps = json.loads((tmp_path / "c.json").read_text())
    assert [c["caption"] for c in caps] == m.caption([str(photos / "p0.png"), str(photos / "p1.png")])


# --- OCR and region tasks (zoo/imported/florence2_post.py) -----------------------------------------
def test_ocr_and_region_helpers_equal_transformers(cache_env, monkeypatch):
    """``m.ocr`` / ``m.region_to_category`` / ``m.region_to_description`` / ``m.propose_regions`` give what
    transformers gives: its prompt (the pixel box quantised by its post-processor), its generated tokens, its
    ``post_process_generation`` (on the text without ``<pad>``, which ``generate`` removes)."""
    ref, processor = cache_env["a"]
    m = load_folder_native("a", cache_env)
    images = _images()  # 90x40, 79x57, 68x74: the same pixel box falls in other bins on each
    sizes = [im.size for im in images]
    kw = dict(num_beams=3, max_new_tokens=12, min_new_tokens=4)

    def theirs(prompts: list[str], task: str) -> list:
        inputs = _ref_inputs(processor, prompts, images)
        with torch.no_grad():
            ids = ref.generate(**inputs, **kw)
        texts = [t.replace("<pad>", "") for t in processor.batch_decode(ids, skip_special_tokens=False)]
        return [processor.post_process_generation(t, task=task, image_size=s)[task] for t, s in zip(texts, sizes)]

    def loc(box, size):
        return "".join(f"<loc_{b}>" for b in processor.post_processor.quantize(torch.tensor([box]), size)[0].tolist())

    assert m.ocr(images, **kw) == theirs(["<OCR>"] * 3, "<OCR>")
    assert m.ocr(images, regions=True, **kw) == theirs(["<OCR_WITH_REGION>"] * 3, "<OCR_WITH_REGION>")
    assert m.propose_regions(images, **kw) == theirs(["<REGION_PROPOSAL>"] * 3, "<REGION_PROPOSAL>")
    box = [5, 3.5, 60, 39]
    for task, method in (("<REGION_TO_CATEGORY>", m.region_to_category),
                         ("<REGION_TO_DESCRIPTION>", m.region_to_description)):
        want = theirs([task + loc(box, s) for s in sizes], task)
        assert method(images, box, **kw) == want
        assert method(images[1], box, **kw) == want[1]  # one image → one answer
    per_image = [[0, 0, 90, 40], [10, 20, 30, 40], [67, 73, 68, 74]]  # the whole image, inside, the far corner
    want = theirs([f"<REGION_TO_CATEGORY>{loc(b, s)}" for b, s in zip(per_image, sizes)], "<REGION_TO_CATEGORY>")
    assert m.region_to_category(images, per_image, **kw) == want
    seen = []  # the prompts our helper writes: the box as the processor quantises it, for each image's size
    generate = m.generate
    monkeypatch.setattr(m, "generate", lambda ims, prompts, **k: seen.append(prompts) or generate(ims, prompts, **k))
    m.region_to_description(images, [2, 2.5, 8, 8])
    assert seen == [[f"<REGION_TO_DESCRIPTION>{loc([2, 2.5, 8, 8], s)}" for s in sizes]]
    assert len(set(seen[0])) == 3  # other bins on each image
    with pytest.raises(ValueError, match="3 image"):
        m.region_to_category(images, per_image[:2])
    with pytest.raises(ValueError, match="x0 > x1"):
        m.region_to_description(images[0], [9, 0, 1, 5])


def _predict_folder(cache_env, tmp_path):
    """A local Florence-2 folder (the transformers-saved snapshot) and a folder of two PNG photos."""
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download("florence-community/tiny-a", local_files_only=True,
                                    cache_dir=os.environ["HF_HUB_CACHE"]))
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, im in enumerate(_images(2)):
        im.convert("RGB").save(photos / f"p{i}.png")
    return folder, photos


def test_zoo_predict_ocr_region_caption(cache_env, tmp_path, monkeypatch):
    """``zoo-predict task=ocr|region|caption`` on a local Florence-2 folder: JSON written, a PNG per image with the
    boxes (quads for OCR regions) drawn."""
    from zoo.predict import main as predict_main

    folder, photos = _predict_folder(cache_env, tmp_path)
    m = load_folder_native("a", cache_env)
    files = [str(photos / "p0.png"), str(photos / "p1.png")]
    run = lambda *args: predict_main([f"pretrained={folder}", f"input={photos}", "num_beams=3", *args])  # noqa: E731

    run("task=detect", "text=a red cat", f"out={tmp_path / 'ov.json'}")  # open-vocabulary detection
    recs = json.loads((tmp_path / "ov.json").read_text())
    assert [{"bboxes": r["bboxes"], "labels": r["labels"]} for r in recs] == \
        m.detect(files, vocabulary="a red cat", num_beams=3) and recs[0]["text"] == "a red cat"
    run("task=ocr", f"out={tmp_path / 'ocr.json'}")
    assert [r["text"] for r in json.loads((tmp_path / "ocr.json").read_text())] == m.ocr(files, num_beams=3)
    run("task=caption", "detail=paragraph", f"out={tmp_path / 'c.json'}")
    assert [r["caption"] for r in json.loads((tmp_path / "c.json").read_text())] == \
        m.caption(files, detail="paragraph", num_beams=3)
    run("task=region", "region=proposals", f"out={tmp_path / 'rp' / 'r.json'}")
    recs = json.loads((tmp_path / "rp" / "r.json").read_text())
    assert [{"bboxes": r["bboxes"], "labels": r["labels"]} for r in recs] == m.propose_regions(files, num_beams=3)

    run("task=region", "box=10,5,60,30", "region=description", f"out={tmp_path / 'rd' / 'r.json'}")
    recs = json.loads((tmp_path / "rd" / "r.json").read_text())
    assert [r["description"] for r in recs] == m.region_to_description(files, [10, 5, 60, 30], num_beams=3)
    assert all(r["box"] == [10, 5, 60, 30] for r in recs)
    drawn = np.asarray(Image.open(recs[0]["png"]).convert("RGB"))
    assert drawn.shape == (40, 90, 3) and (drawn[5, 10:60] == [255, 0, 0]).all()  # the input box, in red

    # OCR regions: a fixed model answer (a random tiny model rarely writes 8 location tokens in a row)
    quad = "".join(f"<loc_{b}>" for b in (100, 100, 900, 100, 900, 900, 100, 900))
    monkeypatch.setattr(Florence2, "generate", lambda self, ims, prompt, **kw: [f"</s>HELLO{quad}</s>"] * len(ims))
    run("task=ocr", "regions=true", f"out={tmp_path / 'oq' / 'o.json'}")
    recs = json.loads((tmp_path / "oq" / "o.json").read_text())
    assert recs[0]["quad_boxes"] == [[9, 4, 81, 4, 81, 36, 9, 36]] and recs[0]["labels"] == ["HELLO"]  # 90x40
    drawn = np.asarray(Image.open(recs[0]["png"]).convert("RGB"))
    source = np.asarray(Image.open(files[0]).convert("RGB"))
    assert (drawn[4, 12:78] == [255, 0, 0]).all() and (drawn[20, 9] == [255, 0, 0]).all()  # top and left edges
    assert (drawn[20:30, 20:70] == source[20:30, 20:70]).all()  # inside untouched


def test_zoo_predict_refuses_bad_task_arguments_before_loading(tmp_path, capsys):
    """A bad task name or a missing / misplaced task argument stops the run with an error naming the fix, before
    the model loads (the pretrained name here does not exist)."""
    from zoo.predict import main as predict_main

    base = ["pretrained=/nonexistent/model", f"input={tmp_path}"]
    for args, message in ((["task=segment"], "task must be one of"),
                          (["task=ground"], "ground needs text="),
                          (["task=ground", "text=  "], "ground needs text="),
                          (["task=region"], "needs box=x0,y0,x1,y1"),
                          (["task=region", "box=1,2,3"], "4 finite numbers"),
                          (["task=region", "box=a,b,c,d"], "box must be x0,y0,x1,y1"),
                          (["task=region", "box=9,0,1,5"], "x0 > x1"),
                          (["task=region", "region=shape", "box=1,2,3,4"], "region must be one of"),
                          (["task=region", "region=proposals", "box=1,2,3,4"], "finds the regions itself"),
                          (["task=detect", "box=1,2,3,4"], "box= is for task=region"),
                          (["task=detect", "regions=true"], "regions=true is for task=ocr"),
                          (["task=caption", "detail=long"], "caption detail is one of"),
                          (["task=ocr", "detail=short"], "task=caption only")):
        with pytest.raises(SystemExit, match=message):
            predict_main([*base, *args])
