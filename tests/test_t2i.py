"""Text-to-image generation: image-code constraints, exact length, CFG, KV cache, caption dropping."""
import pytest
import torch

import zoo
from modalities.image_codes import ImageCodeTokenizer, VQConfig
from zoo.generation import greedy_search
from tasks.data.collate import pad_ids
from zoo.guidance import guided_sample
from zoo.vocab import BOS_ID
from tests.conftest import T2I_CAPTIONS


pytestmark = pytest.mark.usefixtures("one_thread")  # micro models (tests/conftest.py)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = zoo.create_model("test-tiny", max_positions=80).eval()
    with torch.no_grad():  # spread the logits so that greedy choices are not ties
        model.embed_tokens.weight.normal_(0, 1.0)
    tok = ImageCodeTokenizer.from_config(VQConfig(channels=[8, 8, 8, 8], num_codes=12, latent_channels=4,
                                                  norm_num_groups=4)).eval()
    layout = model.layout
    b = 3
    ids = torch.randint(layout.text_start, layout.image_code_start, (b, 7))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, 5:] = False
    cond = {"text": (ids, mask)}
    u = torch.randint(layout.text_start, layout.image_code_start, (1, 4))
    uncond = {"text": (u, torch.ones_like(u, dtype=torch.bool))}
    return model, tok, layout, cond, uncond


def test_constrained_generation_emits_exactly_hw_image_codes(setup):
    model, tok, layout, cond, uncond = setup
    allowed = tok.allowed_mask(layout)
    out = guided_sample(model, cond, tok.num_tokens, uncond=uncond, guidance_scale=3.0, allowed=allowed,
                        top_k=5, temperature=1.5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 64)
    start = layout.image_code_start
    assert bool(((out >= start) & (out < start + tok.num_codes)).all())  # only this codebook's ids, no EOS/PAD
    codes = tok.from_unified(out, layout)
    assert tok.decode(codes).shape == (3, 3, 64, 64)


def test_cfg_at_guidance_one_equals_unguided(setup):
    model, tok, layout, cond, uncond = setup
    allowed, n = tok.allowed_mask(layout), tok.num_tokens
    memory, mask = model.encode(cond)
    plain = greedy_search(model, memory, mask, n, allowed=allowed, min_new_tokens=n)
    guided = guided_sample(model, cond, n, uncond=uncond, guidance_scale=1.0, allowed=allowed, do_sample=False)
    assert torch.equal(guided, plain)
    kw = dict(allowed=allowed, top_k=4, temperature=0.8)
    a = guided_sample(model, cond, n, uncond=uncond, guidance_scale=1.0, generator=torch.Generator().manual_seed(1), **kw)
    b = guided_sample(model, cond, n, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)
    c = guided_sample(model, cond, n, uncond=uncond, guidance_scale=4.0, allowed=allowed, do_sample=False)
    assert not torch.equal(c, plain)  # guidance does change the outcome


def test_kv_cache_equals_full_recompute(setup):
    model, tok, layout, cond, uncond = setup
    kw = dict(uncond=uncond, guidance_scale=2.5, allowed=tok.allowed_mask(layout), do_sample=False)
    with_cache = guided_sample(model, cond, 20, use_cache=True, **kw)
    without = guided_sample(model, cond, 20, use_cache=False, **kw)
    assert torch.equal(with_cache, without)


def test_uncond_rows_must_match(setup):
    model, tok, layout, cond, _ = setup
    u = torch.full((2, 3), layout.text_start)
    with pytest.raises(ValueError, match="expected 1 or 3"):
        guided_sample(model, cond, 4, uncond={"text": (u, u > 0)}, guidance_scale=2.0)


def test_captions_dropped_at_the_configured_rate():
    from tasks.text_to_image import T2ITrainSet

    torch.manual_seed(0)
    prompts = [[[10, 11], [12, 13]]] * 4
    ds = T2ITrainSet(prompts, torch.arange(8).view(4, 2), [1, 2, 3, 4], uncond=[99], uncond_prob=0.3)
    draws = [ds[i % 4]["prompt"] for i in range(2000)]
    rate = sum(p == [99] for p in draws) / len(draws)
    assert abs(rate - 0.3) < 0.04
    assert ds[2]["target"] == [4, 5] and ds[2]["id"] == 3
    never = T2ITrainSet(prompts, torch.arange(8).view(4, 2), [1, 2, 3, 4], uncond=[99], uncond_prob=0.0)
    assert all(never[0]["prompt"] != [99] for _ in range(200))


def test_real_codes_score_exactly_the_vq_ceiling(tiny_shapes, tiny_vq, tmp_path):
    """A generator that reproduced every real image's codes would score the ceiling: all_acc == vq_ceiling."""
    from modalities.text import TextTokenizer
    from tasks.text_to_image import T2IDataModule, TextToImageTask
    from zoo.instructions import t2i_prompt

    vq_dir = tiny_vq.save_pretrained(tmp_path / "vq")
    dm = T2IDataModule(str(tiny_shapes), vq_path=str(vq_dir), generate=None)
    dm.prepare_data()
    tok = TextTokenizer.train([t2i_prompt(c) for c in T2I_CAPTIONS] * 10, vocab_size=300)
    model = zoo.create_model("test-tiny", max_positions=80,
                             vocab={"text_size": tok.vocab_size, "image_code_size": tiny_vq.num_codes})
    task = TextToImageTask(model, tok, probe_train={"epochs": 1})
    object.__setattr__(task, "_datamodule", dm)
    with pytest.raises(ValueError, match=r"dec_grid=\[16, 16\] does not match the VQ tokenizer's \[8, 8\]"):
        dm.bind(zoo.create_model("test-tiny", max_positions=256, dec_grid=[16, 16]).cfg, model.layout, tok)
    dm.bind(model.cfg, model.layout, tok)
    object.__setattr__(task, "image_tokenizer", dm.load_image_tokenizer().eval())
    ids = [r.image_id for r in dm.eval_records("val")]
    real = dm.real_codes("val")
    assert real.shape == (len(ids), 64)
    metrics = task.compute_metrics("val", dict(zip(ids, real.tolist())))
    ceiling = task.vq_ceiling("val")
    assert metrics["vq_ceiling_all_acc"] == ceiling["all_acc"]
    assert {k: metrics[k] for k in ceiling} == ceiling
    # python -m tasks.tools.probe <root> --vq <folder> reports the same ceiling, from the images rather than cached codes
    from tasks.tools.probe import vq_ceiling

    direct = vq_ceiling(task.probe()[0], vq_dir, tiny_shapes)
    assert {k: direct[k] for k in ceiling} == pytest.approx(ceiling) and direct["psnr"] > 0
    # other codes are scored as themselves, against the same ceiling
    other = task.compute_metrics("val", dict(zip(ids, real.roll(1, 0).tolist())))
    assert other["vq_ceiling_all_acc"] == ceiling["all_acc"]


SHAPE_WORDS = ["circle", "square", "triangle", "diamond", "cross"]


def test_caption_gain_is_zero_without_text_and_positive_once_the_text_is_used(tiny_shapes, tiny_vq, tmp_path,
                                                                               monkeypatch):
    from modalities.text import TextTokenizer
    from tasks.text_to_image import T2IDataModule, TextToImageTask
    from zoo.instructions import t2i_prompt

    dm = T2IDataModule(str(tiny_shapes), vq_path=str(tiny_vq.save_pretrained(tmp_path / "vq")), generate=None)
    dm.prepare_data()
    captions = [r.captions[0] for r in dm.eval_records("val")]
    tok = TextTokenizer.train([t2i_prompt(c) for c in captions] * 5, vocab_size=400)  # words: single tokens
    torch.manual_seed(0)
    model = zoo.create_model("test-tiny", max_positions=80,
                             vocab={"text_size": tok.vocab_size, "image_code_size": tiny_vq.num_codes})
    task = TextToImageTask(model, tok)
    object.__setattr__(task, "_datamodule", dm)
    dm.bind(model.cfg, model.layout, tok)
    model.eval()
    # every record reads the same prompt: swapping prompts changes nothing
    prompts = dm.eval_prompts("val")
    with monkeypatch.context() as m:
        m.setattr(dm, "eval_prompts", lambda stage: prompts[:1] * len(prompts))
        assert task.caption_gain("val") == 0.0
    # record i's image is code i everywhere: only the prompt tells the first code (the rest copy it), so a
    # generator fitted to these pairs loses several nats on that code with another record's prompt
    codes = torch.arange(len(prompts))[:, None].expand(-1, 64) % tiny_vq.num_codes
    monkeypatch.setattr(dm, "real_codes", lambda stage: codes)
    targets = model.layout.codes_to_unified(codes)
    before = task.caption_gain("val")
    shape_before = task.word_gain("val", SHAPE_WORDS)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ids, mask = pad_ids(prompts)
    tgt_in = torch.cat([torch.full_like(targets[:, :1], BOS_ID), targets[:, :-1]], 1)
    for _ in range(100):
        logits = model.logits(model.decode_hidden(tgt_in, *model.encode({"text": (ids, mask)})))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = task.caption_gain("val")
    assert abs(before) < 0.01 and after > 0.02, (before, after)  # > 1.3 nats on the first of 64 codes
    # swapping only the shape words (circle → square, ...) also changes what the fitted generator expects
    shape_after = task.word_gain("val", SHAPE_WORDS)
    # (smaller than the caption gain: the other words still tell the records apart)
    assert shape_after > 0.002 and shape_after > 20 * abs(shape_before), (shape_before, shape_after)
    with pytest.raises(ValueError, match="names any of"):
        task.word_gain("val", ["zebra", "okapi"])
    for bad in (["circle"], ["circle", "circle"], ["red circle", "square"]):
        with pytest.raises(ValueError, match="attribute_words.shape must list"):
            TextToImageTask(model, tok, attribute_words={"shape": bad})


def test_onset_codes_mark_where_new_content_starts():
    from tasks.text_to_image import onset_codes

    grid = torch.tensor([[[0, 0, 0, 0],
                          [0, 5, 5, 0],
                          [0, 5, 7, 0],
                          [0, 0, 0, 0]]])
    onset = onset_codes(grid.flatten(1), (4, 4)).view(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 0] = True   # no neighbours at all
    expected[1, 1] = True   # 5 below 0 and right of 0
    expected[2, 2] = True   # 7: differs from the 5 to its left and the 5 above
    assert torch.equal(onset, expected)
    with pytest.raises(ValueError, match="4×4 grid"):
        onset_codes(torch.zeros(1, 15, dtype=torch.long), (4, 4))


def test_onset_weight_reweights_the_code_loss(setup):
    from tasks.text_to_image import TextToImageTask, onset_codes
    from zoo.vocab import PAD_ID

    model, vq, layout = setup[:3]
    torch.manual_seed(0)
    codes = torch.randint(0, 3, (2, 64))  # few distinct codes: many repeats, some onsets
    labels = torch.cat([layout.codes_to_unified(codes), torch.full((2, 1), 2)], 1)
    labels[1, -1] = PAD_ID  # padding is ignored
    hidden = torch.randn(2, 65, model.cfg.d_model)
    plain = TextToImageTask(model, None, onset_weight=0.0, label_smoothing=0.0)
    weighted = TextToImageTask(model, None, onset_weight=4.0, label_smoothing=0.0)
    for t in (plain, weighted):
        object.__setattr__(t, "image_tokenizer", vq)
    keep = labels != PAD_ID
    ce = torch.nn.functional.cross_entropy(model.logits(hidden[keep]).float(), labels[keep], reduction="none")
    w = torch.ones(labels.shape)
    w[:, :64] += 4.0 * onset_codes(codes, (8, 8))
    assert torch.allclose(plain.target_loss(hidden, labels), ce.mean())
    assert torch.allclose(weighted.target_loss(hidden, labels), (ce * w[keep]).sum() / w[keep].sum())
    with pytest.raises(ValueError, match=">= 0"):
        TextToImageTask(model, None, onset_weight=-1.0)
