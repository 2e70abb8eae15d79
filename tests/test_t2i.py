"""Text-to-image generation: image-code constraints, exact length, CFG, KV cache, caption dropping."""
import pytest
import torch

import zoo
from modalities.image_codes import ImageCodeTokenizer, VQConfig
from zoo.generation import greedy_search
from zoo.guidance import guided_sample
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
    object.__setattr__(task, "image_tokenizer", dm.load_image_tokenizer().eval())
    ids = [r.image_id for r in dm.eval_records("val")]
    real = dm.real_codes("val")
    assert real.shape == (len(ids), 64)
    metrics = task.compute_metrics("val", dict(zip(ids, real.tolist())))
    ceiling = task.vq_ceiling("val")
    assert metrics["vq_ceiling_all_acc"] == ceiling["all_acc"]
    assert {k: metrics[k] for k in ceiling} == ceiling
    # python -m tasks.probe <root> --vq <folder> reports the same ceiling, from the images rather than cached codes
    from tasks.probe import vq_ceiling

    direct = vq_ceiling(task.probe()[0], vq_dir, tiny_shapes)
    assert {k: direct[k] for k in ceiling} == pytest.approx(ceiling) and direct["psnr"] > 0
    # other codes are scored as themselves, against the same ceiling
    other = task.compute_metrics("val", dict(zip(ids, real.roll(1, 0).tolist())))
    assert other["vq_ceiling_all_acc"] == ceiling["all_acc"]
