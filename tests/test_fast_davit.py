"""The lean DaViT forward (zoo/fast_davit.py) against timm's own, inside and outside packed_linears."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from zoo.cpu_linears import onednn_available, packed_linears
from zoo.fast_davit import FastDaViT, is_davit

pytestmark = pytest.mark.skipif(not onednn_available(), reason="needs PyTorch's oneDNN linear kernels")


class Holder(nn.Module):
    """A model holding a tower, as the Florence-2 image embedder does."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower


def tower(window: int = 3) -> nn.Module:
    import timm

    torch.manual_seed(0)
    t = timm.create_model("davit_base_fl", pretrained=False, num_classes=0, depths=(1, 1, 2, 1),
                          embed_dims=(16, 32, 48, 64), num_heads=(2, 2, 4, 4), window_size=window).eval()
    with torch.no_grad():  # random norms and biases, so that a skipped or misplaced one shows
        for p in t.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return t


@pytest.mark.parametrize("size,window", [(96, 3), (80, 3), (64, 5)])  # windows fit / stage grids padded
def test_fast_forward_equals_timm(size, window):
    t = tower(window)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = t.forward_features(x)
        holder = Holder(t)
        with packed_linears(holder):
            fast = t.__dict__.get("forward_features")
            assert isinstance(fast, FastDaViT) and fast.applies(x)  # the lean path runs, not the fallback
            out = t.forward_features(x)
        assert "forward_features" not in t.__dict__  # restored after the block
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - ref).abs().max() < 1e-3 * ref.abs().max()


def test_falls_back_to_timm_where_not_covered():
    t = tower()
    x = torch.randn(1, 3, 64, 64)
    holder = Holder(t)
    with torch.no_grad():
        ref = t.forward_features(x)
    with packed_linears(holder):
        fast = t.__dict__["forward_features"]
        with torch.no_grad():
            assert fast.applies(x)
        assert not fast.applies(x)  # autograd on: timm's forward, gradients flow
        out = t.forward_features(x.requires_grad_())
        out.sum().backward()
        assert x.grad is not None
        t.stages[2].blocks[0][0].register_forward_hook(lambda *a: None)  # a hook inside: timm's forward runs it
        with torch.no_grad():
            assert not fast.applies(x)
            torch.testing.assert_close(t.forward_features(x), ref)
    assert is_davit(t) and not is_davit(holder)


def test_switch_off(monkeypatch):
    monkeypatch.setenv("MMZOO_FAST_DAVIT", "0")
    t = tower()
    with packed_linears(Holder(t)):
        assert "forward_features" not in t.__dict__


def test_florence2_generation_uses_it_with_identical_tokens(tmp_path, monkeypatch):
    """Florence-2 generation runs the lean tower (padded windows in the later stages) and gives transformers'
    tokens, the same as with timm's forward."""
    import sys
    from pathlib import Path

    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    from florence2_reference import build_reference

    from zoo.imported.florence2 import load_folder

    ref, processor = build_reference(tmp_path / "m", image_size=80, window=3, seed=3)
    ours = load_folder(tmp_path / "m")
    pixels = torch.randn(2, 3, 80, 80, generator=torch.Generator().manual_seed(0))
    calls = []
    call = FastDaViT.__call__
    monkeypatch.setattr(FastDaViT, "__call__", lambda self, x: calls.append(self.applies(x)) or call(self, x))
    for beams in (1, 3):
        kw = dict(num_beams=beams, max_new_tokens=10, min_new_tokens=10)
        inputs = processor(text=["<CAPTION>", "<OD>"], images=list(pixels), return_tensors="pt", padding=True)
        inputs["pixel_values"] = pixels
        with torch.no_grad():
            expected = ref.generate(**inputs, **kw)
        fast = ours.generate_ids(list(pixels), ["<CAPTION>", "<OD>"], **kw)
        monkeypatch.setenv("MMZOO_FAST_DAVIT", "0")
        plain = ours.generate_ids(list(pixels), ["<CAPTION>", "<OD>"], **kw)
        monkeypatch.delenv("MMZOO_FAST_DAVIT")
        assert torch.equal(fast, expected) and torch.equal(plain, expected)
    assert calls == [True, True]  # one lean tower pass per generation, none with the switch off
