"""Backbone: shapes, padding mask, causality, KV cache, constrained generation, checkpointing."""
import pytest
import torch

import zoo
from zoo.generation import beam_search, greedy_search
from zoo.vocab import BOS_ID, EOS_ID, PAD_ID, VocabLayout


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = zoo.create_model("test-tiny")
    m.eval()
    return m


def _inputs(m, b=3, lp=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = m.cfg.modalities["image"]["image_size"]
    px = torch.randn(b, 3, s, s, generator=g)
    ids = torch.randint(m.layout.text_start, m.layout.image_code_start, (b, lp), generator=g)
    mask = torch.ones(b, lp, dtype=torch.bool)
    return px, ids, mask


def test_forward_shapes(model):
    px, ids, mask = _inputs(model)
    tgt = torch.randint(4, 100, (3, 7))
    logits = model({"image": px, "text": (ids, mask)}, tgt)
    n_img = model.embedders["image"].num_tokens
    assert logits.shape == (3, 7, model.layout.size)
    memory, mm = model.encode({"image": px, "text": (ids, mask)})
    assert memory.shape == (3, n_img + 5, model.cfg.d_model) and mm.shape == (3, n_img + 5)


def test_padding_mask_ignores_pad_content(model):
    px, ids, mask = _inputs(model, b=1)
    tgt = torch.randint(4, 100, (1, 6))
    base = model({"image": px, "text": (ids, mask)}, tgt)
    # append 3 padded positions with arbitrary ids: output must not change
    ids2 = torch.cat([ids, torch.randint(4, 100, (1, 3))], 1)
    mask2 = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)], 1)
    padded = model({"image": px, "text": (ids2, mask2)}, tgt)
    torch.testing.assert_close(base, padded, atol=1e-5, rtol=1e-5)
    # ...while changing a real token does change it
    ids3 = ids.clone()
    ids3[0, 0] += 1
    assert not torch.allclose(base, model({"image": px, "text": (ids3, mask)}, tgt))


def test_decoder_is_causal(model):
    px, ids, mask = _inputs(model, b=2)
    tgt = torch.randint(4, 100, (2, 8))
    a = model({"image": px, "text": (ids, mask)}, tgt)
    tgt2 = tgt.clone()
    tgt2[:, 5:] = torch.randint(4, 100, (2, 3))
    b = model({"image": px, "text": (ids, mask)}, tgt2)
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_cached_decoding_matches_uncached(model):
    px, ids, mask = _inputs(model, b=2)
    memory, mm = model.encode({"image": px, "text": (ids, mask)})
    seq = torch.cat([torch.full((2, 1), BOS_ID), torch.randint(4, 100, (2, 6))], 1)
    full = model.decode(seq, memory, mm)
    cache = model.start_cache(memory, mm, max_len=7)
    steps = [model.decode(seq[:, i:i + 1], cache=cache) for i in range(7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    # prefill several tokens at once, then continue one by one
    cache = model.start_cache(memory, mm, max_len=7)
    pre = model.decode(seq[:, :4], cache=cache)
    rest = [model.decode(seq[:, i:i + 1], cache=cache) for i in range(4, 7)]
    torch.testing.assert_close(torch.cat([pre, *rest], 1), full, atol=1e-5, rtol=1e-4)
    assert torch.equal(greedy_search(model, memory, mm, 12), greedy_search(model, memory, mm, 12, use_cache=False))


def test_dec_grid_adds_row_and_column_embeddings_to_the_grid_positions():
    torch.manual_seed(0)
    m = zoo.create_model("test-tiny", dec_grid=[2, 3]).eval()  # 6 grid positions of max_positions
    pos = m.decoder_positions(0, 8)
    torch.testing.assert_close(pos[4], m.dec_pos.weight[4] + m.dec_row.weight[1] + m.dec_col.weight[1])
    torch.testing.assert_close(pos[6:], m.dec_pos.weight[6:8])  # past the grid: the plain 1-D positions
    torch.testing.assert_close(m.decoder_positions(5, 3), pos[5:8])  # an offset window (the KV cache's) agrees
    # the grid changes the logits, and cached decoding still matches uncached decoding
    plain = zoo.create_model("test-tiny").eval()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith(("dec_row", "dec_col"))})
    px, ids, mask = _inputs(m, b=2)
    memory, mm = m.encode({"image": px, "text": (ids, mask)})
    seq = torch.cat([torch.full((2, 1), BOS_ID), torch.randint(4, 100, (2, 7))], 1)
    full = m.decode(seq, memory, mm)
    assert not torch.allclose(full, plain.decode(seq, memory, mm))
    cache = m.start_cache(memory, mm, max_len=8)
    steps = [m.decode(seq[:, i:i + 1], cache=cache) for i in range(8)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    for bad in ([0, 3], [2], [100, 100]):
        with pytest.raises(ValueError, match="dec_grid"):
            zoo.create_model("test-tiny", dec_grid=bad)


def test_beams_sharing_one_source_match_a_repeated_source(model):
    """rows_per_source=k (beam search's cache) gives the logits of k explicit copies of the source, also
    after reordering rows within each source's beams and with a padded source."""
    px, ids, mask = _inputs(model, b=2)
    mask[1, 4:] = False
    memory, mm = model.encode({"image": px, "text": (ids, mask)})
    k = 3
    shared = model.start_cache(memory, mm, max_len=5, rows_per_source=k)
    copied = model.start_cache(memory.repeat_interleave(k, 0), mm.repeat_interleave(k, 0), max_len=5)
    assert shared.cross[0][0].shape[0] == 2 and copied.cross[0][0].shape[0] == 2 * k
    tok = torch.full((2 * k, 1), BOS_ID)
    for step in range(4):
        a, b = model.decode(tok, cache=shared), model.decode(tok, cache=copied)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        order = torch.tensor([2, 2, 0, 4, 3, 3]) if step % 2 == 0 else torch.tensor([1, 0, 2, 5, 5, 4])
        shared.reorder(order)
        copied.reorder(order)
        tok = torch.randint(4, 100, (2 * k, 1))
    with pytest.raises(ValueError, match="rows_per_source"):
        model.start_cache(memory, mm, max_len=5, rows_per_source=0)


def test_sdpa_and_math_attention_agree():
    torch.manual_seed(0)
    a = zoo.create_model("test-tiny", attn_impl="math").eval()
    b = zoo.create_model("test-tiny", attn_impl="sdpa").eval()
    b.load_state_dict(a.state_dict())
    px, ids, mask = _inputs(a)
    mask[0, 3:] = False
    tgt = torch.randint(4, 100, (3, 5))
    torch.testing.assert_close(a({"image": px, "text": (ids, mask)}, tgt), b({"image": px, "text": (ids, mask)}, tgt),
                               atol=1e-5, rtol=1e-4)


def test_constrained_generation_stays_in_range(model):
    px, ids, mask = _inputs(model)
    memory, mm = model.encode({"image": px, "text": (ids, mask)})
    allowed = model.layout.allowed_mask("image_codes", eos=False)
    lo, hi = model.layout.ranges()["image_codes"]
    for out in (greedy_search(model, memory, mm, 9, allowed=allowed),
                beam_search(model, memory, mm, 9, num_beams=3, allowed=allowed)):
        assert out.shape == (3, 9)
        assert ((out >= lo) & (out < hi)).all()


def test_min_new_tokens_blocks_eos():
    torch.manual_seed(0)
    m = zoo.create_model("test-tiny").eval()
    with torch.no_grad():
        m.embed_tokens.weight[EOS_ID] *= 50  # make EOS very likely
    px, ids, mask = _inputs(m)
    memory, mm = m.encode({"image": px, "text": (ids, mask)})
    assert (greedy_search(m, memory, mm, 6)[:, 0] == EOS_ID).all()
    out = greedy_search(m, memory, mm, 6, min_new_tokens=4)
    assert (out[:, :4] != EOS_ID).all() and (out[:, :4] != PAD_ID).all()


def test_beam_search_beats_or_equals_greedy_likelihood(model):
    px, ids, mask = _inputs(model, b=4, seed=3)
    memory, mm = model.encode({"image": px, "text": (ids, mask)})
    allowed = model.layout.allowed_mask("text")

    def logprob(seqs):
        tgt_in = torch.cat([torch.full((len(seqs), 1), BOS_ID), seqs[:, :-1]], 1)
        lp = torch.log_softmax(model.decode(tgt_in, memory, mm).masked_fill(~allowed, -1e9), -1)
        tok_lp = lp.gather(-1, seqs.unsqueeze(-1)).squeeze(-1)
        return (tok_lp * (seqs != PAD_ID)).sum(-1)

    g = greedy_search(model, memory, mm, 5, allowed=allowed)
    b = beam_search(model, memory, mm, 5, num_beams=4, allowed=allowed, length_penalty=0.0)
    n = max(g.shape[1], b.shape[1])
    pad = lambda x: torch.nn.functional.pad(x, (0, n - x.shape[1]), value=PAD_ID)
    assert (logprob(pad(b)) >= logprob(pad(g)) - 1e-4).all()


def test_beam_one_equals_greedy(model):
    px, ids, mask = _inputs(model, b=2, seed=5)
    memory, mm = model.encode({"image": px, "text": (ids, mask)})
    g = greedy_search(model, memory, mm, 8)
    b = beam_search(model, memory, mm, 8, num_beams=1)
    assert torch.equal(g, b)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = zoo.create_model("test-tiny")
    b = zoo.create_model("test-tiny", grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    a.train(), b.train()
    px, ids, mask = _inputs(a)
    tgt = torch.randint(4, 100, (3, 5))
    for m in (a, b):
        m({"image": px, "text": (ids, mask)}, tgt).float().pow(2).mean().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_tied_output_projection(model):
    h = torch.randn(2, 3, model.cfg.d_model)
    torch.testing.assert_close(model.logits(h), h @ model.embed_tokens.weight.T)


def test_vocab_layout_ranges_and_roundtrip():
    lay = VocabLayout(text_size=10, image_code_size=5, loc_bins=3)
    assert lay.ranges() == {"specials": (0, 4), "text": (4, 14), "image_codes": (14, 19), "loc_bins": (19, 22)}
    assert VocabLayout.from_dict(lay.to_dict()) == lay
    codes = torch.arange(5)
    assert torch.equal(lay.unified_to_codes(lay.codes_to_unified(codes)), codes)
    bad = lay.to_dict()
    bad["ranges"]["text"] = [4, 15]
    with pytest.raises(ValueError, match="disagree"):
        VocabLayout.from_dict(bad)
    with pytest.raises(KeyError, match="unknown vocabulary segment"):
        lay.allowed_mask("audio")


def test_registry_errors():
    with pytest.raises(KeyError, match="unknown architecture"):
        zoo.create_model("ofa-gigantic")
    with pytest.raises(ValueError, match="unknown override"):
        zoo.create_model("test-tiny", n_layers=3)
    assert {"ofa-tiny", "ofa-base", "test-tiny"} <= set(zoo.list_models())


def test_patch_image_stem():
    """``patch:<size>``: a linear patch embedding (no CNN), one token per patch; a bad size is refused."""
    torch.manual_seed(0)
    m = zoo.create_model("test-tiny", modalities={"image": {"backbone": "patch:8", "backbone_kwargs": {"embed_dim": 32}}})
    px, ids, mask = _inputs(m, b=2)
    assert m.embedders["image"].num_tokens == (m.cfg.modalities["image"]["image_size"] // 8) ** 2
    logits = m({"image": px, "text": (ids, mask)}, torch.randint(4, 100, (2, 3)))
    logits.float().sum().backward()
    assert m.embedders["image"].backbone.proj.weight.grad is not None
    with pytest.raises(ValueError, match="patch size"):
        zoo.create_model("test-tiny", modalities={"image": {"backbone": "patch:7"}})
    with pytest.raises(ValueError, match="no pretrained weights"):
        zoo.create_model("test-tiny", modalities={"image": {"backbone": "patch:8", "pretrained": "x.safetensors"}})


def test_ffn_activation_exact_gelu_by_default_and_legacy_configs_keep_tanh():
    from zoo.config import ModelConfig
    from zoo.layers import FeedForward

    cfg = zoo.model_config("test-tiny")
    assert cfg.activation == "gelu"
    x = torch.randn(4, cfg.d_model) * 3
    for activation, approximate in (("gelu", "none"), ("gelu_tanh", "tanh")):
        torch.manual_seed(0)
        ffn = FeedForward(ModelConfig.from_dict({**cfg.to_dict(), "activation": activation}))
        want = ffn.fc2(torch.nn.functional.gelu(ffn.fc1(x), approximate=approximate))
        torch.testing.assert_close(ffn(x), want)
    exact, tanh = (FeedForward(ModelConfig.from_dict({**cfg.to_dict(), "activation": a})) for a in ("gelu", "gelu_tanh"))
    tanh.load_state_dict(exact.state_dict())
    assert not torch.equal(exact(x), tanh(x))  # the two forms really differ
    # a config.json written before the field existed was trained with the tanh form
    legacy = {k: v for k, v in cfg.to_dict().items() if k != "activation"}
    assert ModelConfig.from_dict(legacy).activation == "gelu_tanh"
    assert ModelConfig.from_dict(cfg.to_dict()).activation == "gelu"
    with pytest.raises(ValueError, match="activation"):
        ModelConfig.from_dict({**cfg.to_dict(), "activation": "relu"})
