"""The lean single-token decoder step: bit-identical to the module path, and only where it covers the model."""
import pytest
import torch
from torch import nn

import zoo
from zoo.cpu_linears import onednn_available, packed_linears
from zoo.fast_decode import FastDecodeStep
from zoo.generation import generate

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no packed oneDNN linears")]


def _model(**overrides):
    torch.manual_seed(0)
    model = zoo.create_model("test-tiny", **overrides).eval()
    with torch.no_grad():  # spread the logits so that greedy choices are not ties
        model.embed_tokens.weight.normal_(0, 1.0)
    return model


def _source(model, rows: int = 3, padded: bool = True):
    src = torch.randint(model.layout.text_start, model.layout.text_start + 40, (rows, 11))
    mask = torch.ones_like(src, dtype=torch.bool)
    if padded:
        mask[0, 7:] = False  # one padded source row: the cross-attention mask must be honoured
    return src, mask


@pytest.mark.parametrize("rows_per_source,activation,dec_grid",
                         [(1, "gelu", None), (3, "gelu", None), (1, "gelu_tanh", None), (1, "gelu", [2, 2])])
def test_step_logits_are_bit_identical_to_the_module_path(rows_per_source, activation, dec_grid):
    model = _model(activation=activation, dec_grid=dec_grid)  # a 2×2 grid: 4 grid positions, then plain ones
    src, mask = _source(model)
    with torch.inference_mode(), packed_linears(model):
        memory, mmask = model.encode({"text": (src, mask)})
        fast = model.start_cache(memory, mmask, 6, rows_per_source=rows_per_source)
        slow = model.start_cache(memory, mmask, 6, rows_per_source=rows_per_source)
        assert isinstance(fast.fast_step, FastDecodeStep)
        slow.fast_step = None
        cur = torch.full((len(src) * rows_per_source, 1), 1, dtype=torch.long)
        for _ in range(5):
            a, b = model.decode(cur, cache=fast), model.decode(cur, cache=slow)
            assert a.shape == b.shape == (len(cur), 1, model.layout.size)
            assert torch.equal(a, b)
            cur = a[:, -1].argmax(-1, keepdim=True)
        assert fast.length == slow.length == 5
        for i in range(len(model.decoder)):
            assert torch.equal(fast.k[i][:, :, :5], slow.k[i][:, :, :5])


def test_generation_runs_the_fast_step_and_gives_the_same_tokens(monkeypatch):
    model = _model()
    src, mask = _source(model)
    calls = []
    real = FastDecodeStep.__call__
    monkeypatch.setattr(FastDecodeStep, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    with torch.inference_mode():
        fast = [generate(model, {"text": (src, mask)}, max_new_tokens=8, min_new_tokens=8, num_beams=k)
                for k in (1, 3)]
    assert len(calls) >= 2 * 7
    monkeypatch.setattr(FastDecodeStep, "build", classmethod(lambda cls, m, mem: None))
    with torch.inference_mode():
        slow = [generate(model, {"text": (src, mask)}, max_new_tokens=8, min_new_tokens=8, num_beams=k)
                for k in (1, 3)]
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def _build(model):
    src, mask = _source(model, padded=False)
    with torch.inference_mode(), packed_linears(model):
        memory, mmask = model.encode({"text": (src, mask)})
        return FastDecodeStep.build(model, memory)


def test_not_built_where_the_module_path_must_run():
    model = _model()
    assert _build(model) is not None
    # a forward hook on any decoder module must run: the module path
    handle = model.decoder[-1].cross_attn.register_forward_hook(lambda m, i, o: None)
    assert _build(model) is None
    handle.remove()
    assert _build(model) is not None
    # a wrapped linear (LoRA, quantized, ...) runs its own forward
    class Wrapped(nn.Linear):
        pass
    fc1 = model.decoder[0].ffn.fc1
    wrapped = Wrapped(fc1.in_features, fc1.out_features)
    wrapped.load_state_dict(fc1.state_dict())
    model.decoder[0].ffn.fc1 = wrapped
    assert _build(model) is None
    # training mode, autograd, and outside the packed block
    model = _model()
    model.train()
    assert _build(model) is None
    model.eval()
    model.decoder[0].drop.train()  # one submodule left in training mode: its dropout must run
    assert _build(model) is None
    model.eval()
    src, mask = _source(model, padded=False)
    with torch.no_grad():
        memory, _ = model.encode({"text": (src, mask)})
    assert FastDecodeStep.build(model, memory) is None  # no packed weights outside packed_linears
    with torch.enable_grad(), packed_linears(model):
        assert FastDecodeStep.build(model, memory) is None
    # bf16 autocast (bf16-mixed validation): activations change dtype between kernels; generation still runs
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), packed_linears(model):
        assert FastDecodeStep.build(model, memory) is None
        out = generate(model, {"text": (src, torch.ones_like(src, dtype=torch.bool))}, max_new_tokens=4)
    assert out.shape[0] == len(src)


def test_not_built_for_layer_variants():
    assert _build(_model(ffn="moe")) is None


def test_too_long_decoding_raises():
    model = _model()
    src, mask = _source(model, padded=False)
    with torch.inference_mode(), packed_linears(model):
        memory, mmask = model.encode({"text": (src, mask)})
        cache = model.start_cache(memory, mmask, 4)
        assert cache.fast_step is not None
        cache.length = model.cfg.max_positions
        with pytest.raises(ValueError, match="max_positions"):
            model.decode(torch.ones(len(src), 1, dtype=torch.long), cache=cache)
