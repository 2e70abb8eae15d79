"""A lean inference forward of timm's DaViT (Florence-2's image tower) on packed CPU weights.

Inside :func:`zoo.cpu_linears.packed_linears`, ``forward_features`` of a timm ``DaVit`` runs here instead of
through its modules. Same parameters, same operations in the same order, with fewer passes over the activations:

- activations stay in one ``[B, H, W, C]`` layout (the convolutions read it as channels-last NCHW, oneDNN's
  native layout), so no layout copies between the convolutional position encodings and the token blocks;
- the MLP's exact GELU is fused into its first GEMM, and the residual adds of the attention output projection
  and the MLP's second GEMM into those GEMMs (oneDNN post-ops; bit-identical to the separate kernels);
- the window reverse, crop and residual add of the spatial block are one strided add;
- the position encodings add in place into the convolution's output.

The image tower is most of Florence-2's inference time at 768 px (about 80 % at batch 1, ``benchmarks/florence2.py``),
and its GEMMs already run at the fp32 peak; what this removes is the rest (copies, separate GELU and add passes).
Anything it does not cover runs timm's own forward: training mode, autograd, autocast, hooks, other dtypes or
devices, DaViT variants other than Florence-2's (channel attention v2, no CPE activation, FFN on, no head norm);
``MMZOO_FAST_DAVIT=0`` turns it off.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as nn_module

from zoo.onednn import PackedWeight, onednn_linear, packed_applies

_DAVIT = ("timm.models.davit", "DaVit")


def is_davit(module: nn.Module) -> bool:
    """Whether ``module`` is timm's ``DaVit`` (checked by class name: timm is imported only where it is used)."""
    cls = type(module)
    return (cls.__module__, cls.__name__) == _DAVIT


def _linear_add(x: torch.Tensor, other: torch.Tensor, packed: PackedWeight, lin: nn.Linear) -> torch.Tensor:
    """``other + lin(x)`` for 2-D ``x`` / ``other``, the add fused into the GEMM."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed.get(lin.weight), lin.bias, "add")


def _plain_ln(ln: nn.Module) -> bool:
    """``nn.LayerNorm``, or timm's subclass without its fast-norm path (then the same ``F.layer_norm``)."""
    from timm.layers import LayerNorm

    return type(ln) is nn.LayerNorm or (type(ln) is LayerNorm and not getattr(ln, "_fast_norm", False))


def _covered(tower: nn.Module) -> bool:
    """Whether every block of ``tower`` is the Florence-2 DaViT layout this forward implements, with no hooks,
    no dropout or drop-path at work, and plain linear layers."""
    from timm.layers import LayerNorm2d, Mlp
    from timm.models.davit import ChannelAttentionV2, ChannelBlock, SpatialBlock, WindowAttention

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return False
    for m in tower.modules():
        if m._forward_hooks or m._forward_pre_hooks or m.training:
            return False
    if type(tower.stem.norm) is not LayerNorm2d or getattr(tower.stem.norm, "_fast_norm", False) or type(tower.norm_pre) is not nn.Identity:
        return False
    for stage in tower.stages:
        ds = stage.downsample
        if type(ds) is not nn.Identity and (type(ds.norm) is not LayerNorm2d or ds.even_k
                                             or getattr(ds.norm, "_fast_norm", False)):
            return False
        for pair in stage.blocks:
            for block in pair:
                if type(block) not in (SpatialBlock, ChannelBlock):
                    return False
                attn_type = WindowAttention if type(block) is SpatialBlock else ChannelAttentionV2
                if (type(block.attn) is not attn_type or type(block.mlp) is not Mlp
                        or type(block.mlp.act) is not nn.GELU or block.mlp.act.approximate != "none"
                        or type(block.mlp.norm) is not nn.Identity
                        or not (_plain_ln(block.norm1) and _plain_ln(block.norm2))
                        or any(type(c.act) is not nn.Identity for c in (block.cpe1, block.cpe2))):
                    return False
                if type(block) is ChannelBlock and not block.attn.dynamic_scale:
                    return False
                if not all(type(lin) is nn.Linear for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc1,
                                                               block.mlp.fc2)):
                    return False
    return True


class FastDaViT:
    """``forward_features`` of one timm ``DaVit`` on packed weights (see the module docstring)."""

    def __init__(self, tower: nn.Module, packed: dict[int, PackedWeight]):
        self.tower = tower
        self.packed = packed

    def applies(self, x: torch.Tensor) -> bool:
        lin = self.tower.stages[0].blocks[0][0].attn.qkv
        return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu") and packed_applies(x, lin.weight)
                and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in self.tower.parameters())
                and _covered(self.tower))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` → features ``[B, C, h, w]`` (a channels-last view)."""
        if not self.applies(x):
            return type(self.tower).forward_features(self.tower, x)
        t = self.tower
        stem = t.stem
        pad_r, pad_b = (-x.shape[3]) % stem.stride[1], (-x.shape[2]) % stem.stride[0]
        x = stem.conv(F.pad(x, (0, pad_r, 0, pad_b)))
        x = self._norm(x.permute(0, 2, 3, 1), stem.norm)  # [B, H, W, C]
        for stage in t.stages:
            if type(stage.downsample) is not nn.Identity:
                ds = stage.downsample
                x = ds.conv(self._norm(x, ds.norm).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            for spatial, channel in stage.blocks:
                x = self._spatial(spatial, x.contiguous())
                x = self._channel(channel, x)
        return x.permute(0, 3, 1, 2)

    # --- pieces ---------------------------------------------------------------------------------
    @staticmethod
    def _norm(x: torch.Tensor, ln: nn.Module) -> torch.Tensor:
        return F.layer_norm(x, ln.weight.shape, ln.weight, ln.bias, ln.eps)

    @staticmethod
    def _cpe(x: torch.Tensor, cpe: nn.Module) -> torch.Tensor:
        """``x + dwconv(x)`` for ``x [B, H, W, C]`` (contiguous) → ``[B, H, W, C]`` contiguous."""
        feat = cpe.proj(x.permute(0, 3, 1, 2))  # channels-last in, channels-last out
        return feat.add_(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous()  # fp32 add commutes: x + feat

    def _mlp(self, x2: torch.Tensor, block: nn.Module) -> torch.Tensor:
        """``x + fc2(gelu(fc1(norm2(x))))`` for 2-D ``x2``, GELU and residual fused into the GEMMs."""
        mlp, p = block.mlp, self.packed
        h = self._norm(x2, block.norm2)
        h = onednn_linear(h, p[id(mlp.fc1)].get(mlp.fc1.weight), mlp.fc1.bias, "none")
        return _linear_add(h, x2, p[id(mlp.fc2)], mlp.fc2)

    def _spatial(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        b, hh, ww, c = x.shape
        ws = block.window_size
        attn, p = block.attn, self.packed
        shortcut = self._cpe(x, block.cpe1)  # [B, H, W, C]
        h = self._norm(shortcut, block.norm1)
        pad_r, pad_b = (-ww) % ws[1], (-hh) % ws[0]
        if pad_r or pad_b:
            h = F.pad(h, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = hh + pad_b, ww + pad_r
        nh, nw = hp // ws[0], wp // ws[1]
        n = ws[0] * ws[1]
        windows = h.view(b, nh, ws[0], nw, ws[1], c).permute(0, 1, 3, 2, 4, 5).reshape(-1, c)  # [B*nW*N, C]
        heads = attn.num_heads
        qkv = onednn_linear(windows, p[id(attn.qkv)].get(attn.qkv.weight), attn.qkv.bias)
        q, k, v = qkv.view(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)  # [B*nW, heads, N, hd]
        y = onednn_linear(y.transpose(1, 2).reshape(-1, c), p[id(attn.proj)].get(attn.proj.weight), attn.proj.bias)
        y = y.view(b, nh, nw, ws[0], ws[1], c).permute(0, 1, 3, 2, 4, 5)  # window reverse (a view)
        if pad_r or pad_b:
            x = shortcut + y.reshape(b, hp, wp, c)[:, :hh, :ww]
        else:  # reverse and residual add in one strided pass: shortcut + attn(...), as timm
            x = torch.empty_like(shortcut)
            torch.add(shortcut.view(b, nh, ws[0], nw, ws[1], c), y, out=x.view(b, nh, ws[0], nw, ws[1], c))
        x = self._cpe(x, block.cpe2)
        return self._mlp(x.reshape(-1, c), block).view(b, hh, ww, c)

    def _channel(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        b, hh, ww, c = x.shape
        n = hh * ww
        attn, p = block.attn, self.packed
        x = self._cpe(x, block.cpe1).reshape(b * n, c)
        h = self._norm(x, block.norm1)
        g = attn.groups
        qkv = onednn_linear(h, p[id(attn.qkv)].get(attn.qkv.weight), attn.qkv.bias)
        q, k, v = qkv.view(b, n, 3, g, c // g).permute(2, 0, 3, 1, 4).unbind(0)  # [B, G, N, hd]
        q = q * n ** -0.5
        a = (q.transpose(-1, -2) @ k).softmax(dim=-1)  # [B, G, hd, hd]
        y = (a @ v.transpose(-1, -2)).transpose(-1, -2)  # [B, G, N, hd]
        x = _linear_add(y.transpose(1, 2).reshape(b * n, c), x, p[id(attn.proj)], attn.proj)
        x = self._cpe(x.view(b, hh, ww, c), block.cpe2)
        return self._mlp(x.reshape(b * n, c), block).view(b, hh, ww, c)


def install(model: nn.Module, packed: dict[int, PackedWeight]) -> list[nn.Module]:
    """Point ``forward_features`` of every timm ``DaVit`` in ``model`` at :class:`FastDaViT` (whose linear layers
    ``packed`` holds); returns the towers patched (``del tower.forward_features`` undoes it)."""
    towers: list[nn.Module] = []
    if os.environ.get("MMZOO_FAST_DAVIT", "1") == "0":  # timm's own forward (A/B comparisons)
        return towers
    for m in model.modules():
        if is_davit(m) and "forward_features" not in m.__dict__:
            lins = [x for x in m.modules() if type(x) is nn.Linear]
            if any(id(x) not in packed for x in lins):
                continue
            m.forward_features = FastDaViT(m, packed)  # type: ignore[method-assign]
            towers.append(m)
    return towers
