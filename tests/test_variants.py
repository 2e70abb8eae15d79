"""Backbone variants (ffn=multiway|moe, attention=lfa): shapes, gradients, causality, cached decoding,
save/load, MoE routing/capacity/aux loss, multiway routing, and the MoE loss in a training step."""
import math

import pytest
import torch

import zoo
from modalities.text import TextTokenizer
from zoo.generation import greedy_search
from zoo.pretrained import Pretrained
from zoo.variants import LocalFilter, MoEFeedForward, MultiwayFeedForward

VOCAB = {"text_size": 300, "image_code_size": 16, "loc_bins": 4}
VARIANTS = {
    "multiway": {"ffn": "multiway"},
    "moe_top1": {"ffn": "moe", "num_experts": 4, "moe_top_k": 1},
    "moe_top2": {"ffn": "moe", "num_experts": 4, "moe_top_k": 2},
    "lfa": {"attention": "lfa"},
    "lfa3_multiway": {"attention": "lfa", "lfa_kernel": 3, "ffn": "multiway"},
}


def _model(overrides, seed=0, **extra):
    torch.manual_seed(seed)
    return zoo.create_model("test-tiny", **{"vocab": VOCAB, **overrides, **extra})


def _inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 304, (b, 7), generator=g)
    mask = torch.ones(b, 7, dtype=torch.bool)
    mask[1, 4:] = False  # one padded prompt
    return {"image": torch.randn(b, 3, 32, 32, generator=g), "text": (ids, mask)}


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_backward_shapes(name):
    m = _model(VARIANTS[name]).train()
    tgt = torch.randint(4, 304, (3, 6))
    logits = m(_inputs(), tgt)
    assert logits.shape == (3, 6, m.layout.size)
    loss = logits.logsumexp(-1).mean() + (m.moe_aux_loss() if m.cfg.ffn == "moe" else 0)
    loss.backward()
    if m.cfg.ffn != "dense":
        # every expert gets a gradient (DDP needs no find_unused_parameters): MoE experts stay in the graph even
        # without tokens; multiway decoder layers hold only the experts of modalities they generate
        assert all(p.grad is not None for n, p in m.named_parameters() if ".ffn." in n)
    assert m.num_active_parameters() <= m.num_parameters()


@pytest.mark.parametrize("name", VARIANTS)
def test_decoder_is_causal(name):
    m = _model(VARIANTS[name]).eval()
    memory, mask = m.encode(_inputs())
    tgt = torch.randint(4, 304, (3, 8))
    base = m.decode(tgt, memory, mask)
    changed = tgt.clone()
    changed[:, 5:] = torch.randint(4, 304, (3, 3))
    out = m.decode(changed, memory, mask)
    torch.testing.assert_close(out[:, :5], base[:, :5])
    assert not torch.allclose(out[:, 5:], base[:, 5:])


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_decoding_equals_uncached(name):
    m = _model(VARIANTS[name]).eval()
    memory, mask = m.encode(_inputs())
    with torch.no_grad():
        cached = greedy_search(m, memory, mask, 12, use_cache=True)
        plain = greedy_search(m, memory, mask, 12, use_cache=False)
        assert torch.equal(cached, plain)
        # step-by-step logits with the cache equal one teacher-forced pass
        seq = torch.cat([torch.ones(3, 1, dtype=torch.long), cached[:, :-1]], 1)
        full = m.decode(seq, memory, mask)
        cache = m.start_cache(memory, mask, seq.shape[1])
        steps = torch.cat([m.decode(seq[:, i:i + 1], cache=cache) for i in range(seq.shape[1])], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-4)


def test_lfa_cache_holds_the_filter_state_and_beams_reorder_it():
    m = _model(VARIANTS["lfa"]).eval()
    memory, mask = m.encode(_inputs())
    cache = m.start_cache(memory, mask, 4)
    m.decode(torch.ones(3, 1, dtype=torch.long), cache=cache)
    s1, s2 = cache.filter_state[0]
    assert s1.shape == s2.shape == (3, m.cfg.d_model, m.cfg.lfa_kernel - 1)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.filter_state[0][0].shape[0] == 3
    torch.testing.assert_close(cache.filter_state[0][0][0], s1[2])


def test_local_filter_bidirectional_window_and_padding():
    f = LocalFilter(4, kernel=2, causal=False, eps=1e-5).eval()
    x = torch.randn(1, 6, 4)
    y, _ = f(x)
    x2 = x.clone()
    x2[:, 3] += 1.0  # position 3 reaches positions 2, 3, 4 only (one back, one ahead)
    y2, _ = f(x2)
    changed = (y2 - y).abs().sum(-1)[0] > 1e-6
    assert changed.tolist() == [False, False, True, True, True, False]
    valid = torch.tensor([[True] * 4 + [False] * 2])
    x3 = x.clone()
    x3[:, 4:] = 100.0  # padding content never leaks into real positions
    torch.testing.assert_close(f(x3, valid)[0][:, :4], f(x, valid)[0][:, :4])


@pytest.mark.parametrize("name", VARIANTS)
def test_save_load_round_trip(name, tmp_path):
    tok = TextTokenizer.train(["a small red circle", "a blue square left of a cross"] * 20, vocab_size=300)
    m = _model(VARIANTS[name], vocab={**VOCAB, "text_size": tok.vocab_size}).eval()
    folder = Pretrained(m, tok).save_pretrained(tmp_path / name)
    loaded = zoo.load(folder)
    for key in ("ffn", "attention", "num_experts", "moe_top_k", "moe_capacity_factor", "lfa_kernel"):
        assert getattr(loaded.model.cfg, key) == getattr(m.cfg, key)
    inputs = _inputs()
    inputs["text"] = (inputs["text"][0].clamp(max=m.layout.image_code_start - 1), inputs["text"][1])
    tgt = torch.randint(4, m.layout.image_code_start, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(inputs, tgt), m(inputs, tgt))


def test_unknown_variant_names_fail_early():
    with pytest.raises(ValueError, match="ffn must be one of"):
        _model({"ffn": "sparse"})
    with pytest.raises(ValueError, match="attention must be one of"):
        _model({"attention": "flash"})
    with pytest.raises(ValueError, match="moe_top_k"):
        _model({"ffn": "moe", "moe_top_k": 3})


# --- multiway -----------------------------------------------------------------------------------
def test_multiway_expert_follows_each_positions_modality():
    m = _model({"ffn": "multiway"}).eval()
    layer = m.encoder[0].ffn
    assert isinstance(layer, MultiwayFeedForward) and list(layer.experts) == ["text", "image"]
    assert list(m.decoder[0].ffn.experts) == ["text"]  # the decoder only generates text here
    seen = {}

    def spy(name):
        def hook(mod, args, out):
            seen.setdefault(name, []).append(args[0].shape[:-1].numel())  # positions sent to the expert
        return hook

    for name, ffn in layer.experts.items():
        ffn.register_forward_hook(spy(name))
    inputs = _inputs(b=2)
    with torch.no_grad():
        x, mask = m.embed_segments(inputs)
        m.encode(inputs)
    n_image = x.shape[1] - 7
    assert seen == {"text": [2 * 7], "image": [2 * n_image]}
    # the encoder's route: image positions → expert 1, prompt positions → expert 0
    spans = []
    m.embed_segments(inputs, spans=spans)
    assert m._encoder_route(mask, spans) == [(1, n_image), (0, 7)]  # image segment → expert 1, prompt → 0
    # decoder: every position → the text expert (this model has no image_codes expert)
    assert m.decoder_route(torch.tensor([[1, 10, m.layout.image_code_start + 3]])) == 0


def test_multiway_decoder_routes_image_codes_to_their_expert():
    m = _model({"ffn": "multiway"})
    m.cfg.modalities["image_codes"] = {}  # route table only; no embedder is needed for the decoder route
    lo = m.layout.image_code_start
    tgt = torch.tensor([[1, 10, lo, lo + 15, m.layout.loc_start]])
    assert m.decoder_route(tgt).tolist() == [[0, 0, 1, 1, 0]]  # decoder experts: text, image_codes


def test_multiway_output_is_each_positions_own_expert():
    m = _model({"ffn": "multiway"})
    ffn = m.encoder[0].ffn  # experts: text, image
    x = torch.randn(2, 5, m.cfg.d_model)
    route = torch.tensor([[0, 1, 0, 1, 1], [1, 1, 0, 0, 0]])
    out = ffn(x, route)
    experts = list(ffn.experts.values())
    for b in range(2):
        for t in range(5):
            torch.testing.assert_close(out[b, t], experts[route[b, t]](x[b, t]))
    # the span and single-expert forms agree with the per-position form
    spans = torch.tensor([[1, 1, 0, 0, 0]] * 2)
    torch.testing.assert_close(ffn(x, [(1, 2), (0, 3)]), ffn(x, spans))
    torch.testing.assert_close(ffn(x, 1), ffn(x, torch.ones(2, 5, dtype=torch.long)))


# --- mixture of experts -------------------------------------------------------------------------
def _moe(e=4, k=1, cf=1.0, d=8, f=16):
    cfg = zoo.model_config("test-tiny", d_model=d, ffn_dim=f, n_heads=2, ffn="moe", num_experts=e,
                           moe_top_k=k, moe_capacity_factor=cf)
    torch.manual_seed(0)
    return MoEFeedForward(cfg)


def _force_router(moe, logits_per_expert):
    """Make the router ignore its input: every token gets the same logits (via a constant input feature)."""
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, 0] = torch.tensor(logits_per_expert)


def test_moe_aux_loss_known_values():
    moe = _moe(e=4, cf=100.0).train()
    x = torch.zeros(1, 10, 8)
    x[..., 0] = 1.0
    _force_router(moe, [0.0, 0.0, 0.0, 0.0])  # uniform router: f·P summed = 1/E → loss 1
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(1.0)
    _force_router(moe, [2.0, 0.0, 0.0, 0.0])  # everything to expert 0: loss = E * P_0
    moe(x)
    p0 = math.exp(2) / (math.exp(2) + 3)
    assert moe.aux_loss.item() == pytest.approx(4 * p0, rel=1e-5)
    assert moe.stats["utilisation"].tolist() == [1.0, 0.0, 0.0, 0.0]
    # two groups of tokens that prefer different experts: f = (0.5, 0.5, 0, 0)
    torch.manual_seed(1)
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1]])
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, 0] = probs[0].log()
        moe.router.weight[:, 1] = probs[1].log()
    x = torch.zeros(1, 4, 8)
    x[0, :2, 0] = 1.0
    x[0, 2:, 1] = 1.0
    moe(x)
    expected = 4 * (0.5 * 0.4 + 0.5 * 0.35 + 0 + 0)  # P = mean of the two rows
    assert moe.aux_loss.item() == pytest.approx(expected, rel=1e-5)


def test_moe_capacity_drops_tokens_over_capacity():
    moe = _moe(e=4, k=1, cf=1.0).train()
    x = torch.randn(1, 16, 8)
    x[..., 0] = 5.0
    _force_router(moe, [9.0, 0.0, 0.0, 0.0])  # all 16 tokens choose expert 0; capacity = 1.0*16/4 = 4
    out = moe(x)
    zero_rows = (out[0].abs().sum(-1) == 0)
    assert zero_rows.sum().item() == 12  # dropped tokens contribute nothing (the residual carries them)
    assert zero_rows[:4].sum().item() == 0  # the first tokens in order fill the capacity
    assert moe.stats["dropped"].item() == pytest.approx(12 / 16)
    moe.eval()  # evaluation never drops
    assert (moe(x)[0].abs().sum(-1) == 0).sum().item() == 0
    assert moe.stats["dropped"].item() == 0.0


def test_moe_top2_first_choices_before_second_and_gates_sum_to_one():
    moe = _moe(e=4, k=2, cf=1.0).train()  # capacity = 1.0*2*8/4 = 4
    x = torch.randn(1, 8, 8)
    x[..., 0] = 1.0
    _force_router(moe, [3.0, 2.0, 0.0, 0.0])  # first choice 0, second choice 1 for every token
    out = moe(x)
    assert moe.stats["dropped"].item() == pytest.approx(8 / 16)  # 4 of 8 first + 4 of 8 second choices kept
    # per-token output equals the gated sum of its kept experts
    p = torch.tensor([3.0, 2.0]).softmax(0)
    h = lambda e, v: torch.nn.functional.gelu(v @ moe.w1[e], approximate=moe.approximate) @ moe.w2[e]
    torch.testing.assert_close(out[0, 0], p[0] * h(0, x[0, 0]) + p[1] * h(1, x[0, 0]))
    torch.testing.assert_close(out[0, 7], torch.zeros(8))


def test_moe_padding_is_not_routed():
    moe = _moe(e=4, cf=100.0).train()
    x = torch.randn(2, 5, 8)
    valid = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out = moe(x, valid)
    assert out[1, 2:].abs().sum() == 0
    assert moe.stats["utilisation"].sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(out[0], moe(x[:1])[0])


def test_moe_aux_loss_joins_the_training_loss_and_is_logged(tiny_shapes, tmp_path):
    import csv

    from tasks.cli.train import train
    from tests.conftest import compose

    cfg = compose(["experiment=caption_shapes", "model=test_tiny", "data.num_workers=0", "data.batch_size=4",
                   "data.eval_batch_size=16", "data.tokenizer_vocab_size=300", "task.max_new_tokens=4",
                   f"data.root={tiny_shapes}", "data.shapes.n_train=64", "data.shapes.n_val=16",
                   "data.shapes.n_test=16", "trainer.max_steps=3", "trainer.max_epochs=1",
                   "trainer.log_every_n_steps=1", "test=false", "trainer.limit_val_batches=1",
                   "+model.overrides.ffn=moe", "+model.overrides.num_experts=2"], tmp_path)
    train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    aux = [float(r["train/moe_aux_loss"]) for r in rows if r.get("train/moe_aux_loss")]
    assert len(aux) == 3 and all(0 < a < 2 * 2 for a in aux)  # 2 MoE layers, each 1 when balanced, 2 at worst
    assert any(r.get("train/moe_dropped_frac") for r in rows) and any(r.get("train/moe_util_e1") for r in rows)


@pytest.mark.parametrize("name", ["multiway", "moe_top2", "lfa"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    grads = []
    for ckpt in (False, True):
        m = _model({**VARIANTS[name], "grad_checkpointing": ckpt}).train()
        logits = m(_inputs(), torch.randint(4, 304, (3, 6), generator=torch.Generator().manual_seed(0)))
        aux = m.moe_aux_loss()
        (logits.logsumexp(-1).mean() + (aux if aux is not None else 0)).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-4)
