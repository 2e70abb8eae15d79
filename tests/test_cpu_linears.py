"""Packed oneDNN fp32 linears for CPU generation: same numbers as F.linear, never stale, never in autograd."""
import pytest
import torch
from torch import nn

import zoo
from zoo import cpu_linears
from zoo.cpu_linears import onednn_available, packed_linears
from zoo.generation import generate
from zoo.layers import FeedForward

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no packed oneDNN linears")]


def _model(**overrides):
    torch.manual_seed(0)
    return zoo.create_model("test-tiny", **overrides).eval()


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_packed_layers_match_f_linear_and_are_restored_after_the_block(activation):
    model = _model(activation=activation)
    x = torch.randn(3, 5, model.cfg.d_model)
    ffn = model.decoder[0].ffn
    assert isinstance(ffn, FeedForward)
    layer = ffn.fc1
    with torch.inference_mode():
        ref, ref_ffn, ref_logits = layer(x), ffn(x), model.logits(x)
        with packed_linears(model):
            assert "forward" in layer.__dict__ and "forward" in ffn.__dict__ and model.packed_output is not None
            out, out_ffn, logits = layer(x), ffn(x), model.logits(x)  # the FFN fuses its GELU into fc1's GEMM
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_ffn, ref_ffn, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-4)
    assert out.shape == ref.shape and out_ffn.shape == ref_ffn.shape and logits.shape == ref_logits.shape
    assert "forward" not in layer.__dict__ and "forward" not in ffn.__dict__ and model.packed_output is None


def test_packed_weights_follow_in_place_updates():
    model = _model()
    layer = next(m for m in model.modules() if isinstance(m, nn.Linear))
    x = torch.randn(4, layer.in_features)
    with torch.inference_mode(), packed_linears(model):
        before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # what an optimizer step or load_state_dict does
    with torch.inference_mode(), packed_linears(model):
        after = layer(x)
    torch.testing.assert_close(after - layer.bias, 2 * (before - layer.bias), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("fused", [True, False])
def test_packed_weights_follow_optimizer_steps(fused):
    """Fused AdamW writes parameters without bumping their version counters: the packed copies must still follow
    (generation during training, e.g. validation between epochs, uses the weights of that moment)."""
    model = _model()
    layer = next(m for m in model.modules() if isinstance(m, nn.Linear))
    x = torch.randn(4, layer.in_features)
    with torch.inference_mode(), packed_linears(model):
        layer(x)  # packs
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    version = layer.weight._version
    layer(x).pow(2).sum().backward()
    opt.step()
    if fused:
        assert layer.weight._version == version  # why the version counter alone cannot tell
    with torch.inference_mode():
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
        with packed_linears(model):
            after = layer(x)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)

def test_autograd_inside_the_block_uses_plain_linears():
    model = _model()
    layer = next(m for m in model.modules() if isinstance(m, nn.Linear))
    x = torch.randn(4, layer.in_features, requires_grad=True)
    with packed_linears(model):
        layer(x).sum().backward()
    assert layer.weight.grad is not None and x.grad is not None


def test_generation_tokens_equal_the_unpacked_path(monkeypatch):
    model = _model()
    src = torch.randint(model.layout.text_start, model.layout.text_start + 40, (3, 11))
    mask = torch.ones_like(src, dtype=torch.bool)
    with torch.no_grad():  # spread the logits so that greedy choices are not ties
        model.embed_tokens.weight.normal_(0, 1.0)
    with torch.inference_mode():
        packed = [generate(model, {"text": (src, mask)}, max_new_tokens=8, num_beams=k) for k in (1, 3)]
    assert model in cpu_linears._PACKED  # generation went through the packed path
    monkeypatch.setattr(cpu_linears, "onednn_available", lambda: False)
    with torch.inference_mode():
        plain = [generate(model, {"text": (src, mask)}, max_new_tokens=8, num_beams=k) for k in (1, 3)]
    for a, b in zip(packed, plain):
        assert torch.equal(a, b)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("MMZOO_CPU_PACKED", "0")
    model = _model()
    layer = next(m for m in model.modules() if isinstance(m, nn.Linear))
    with packed_linears(model):
        assert "forward" not in layer.__dict__ and model.__dict__.get("packed_output") is None
