"""A corpus of tampered model folders, tried through every entry point that loads a model folder.

Each case copies a real saved tiny model (a captioner, a text-to-image model with its ``image_codes/`` VQ
tokenizer, or a layout-route text-to-image model with its ``renderer/``) and tampers with it: pickle payloads under every weight-file name, ``_target_`` anywhere, backbone
names and kwargs that point outside the folder or to a hub, symlinks out of the folder, truncated and tampered
safetensors, wrong shapes and dtypes, broken configs and tokenizers, escaping ``image_codes`` and ``renderer`` folders, oversized renderer configs. The ``fl_``
cases do the same to a tiny Florence-2 in its three layouts (transformers', Microsoft's with ``pytorch_model.bin``
and remote-code ``auto_map``, our own saved one), plus Python files named by ``auto_map`` that would create the
marker if ever imported, and key-table mismatches. Every pickle
payload, if ever unpickled, creates a marker file; a case passes when no marker appears and loading either refuses
with the expected error (type + a message naming the file or key) or, for the few harmless tamperings, loads and
ignores them.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python -m tests.safety_corpus     # prints the counts, exits 1 on any failure
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import pickle
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

TEXTS = ["a small red circle", "a large blue square to the left of a green cross",
         "what is the complete image? caption: a yellow triangle above a purple diamond"] * 20
TINY_VQ = dict(channels=[8, 8, 8, 8], num_codes=16, latent_channels=4, norm_num_groups=4)
ST = "model.safetensors"
VQ_ST = "image_codes/diffusion_pytorch_model.safetensors"


# ------------------------------------------------------------------------------------------------
# Payloads: unpickling one runs a command that creates its marker file
# ------------------------------------------------------------------------------------------------
class ShellPayload:
    """Pickles to ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


class TouchPayload:
    """Pickles to ``pathlib.Path(marker).touch()``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@dataclass
class Ctx:
    """Where a corpus run lives: the base folders, a folder outside them, the marker folder. The Florence-2 bases
    (:data:`FLORENCE_BASES`) are built on first use, once per context."""

    root: Path
    caption: Path
    t2i: Path
    outside: Path
    markers: Path
    image: Path
    florence: dict[str, Path] = field(default_factory=dict)
    layout: Path | None = None  # the layout-route base, built on first use

    def marker(self, case: str) -> Path:
        return self.markers / case

    def base(self, name: str) -> Path:
        if name in ("caption", "t2i"):
            return getattr(self, name)
        if name == "layout":
            if self.layout is None:
                self.layout = make_layout_base(self.root / "base")
            return self.layout
        if not self.florence:
            self.florence.update(make_florence_bases(self.root / "base"))
        return self.florence[name]

    def payload_pickle(self, case: str) -> bytes:
        return pickle.dumps({"encoder.0.weight": ShellPayload(self.marker(case))})


@dataclass
class Case:
    """One tampered folder: how to build it from a base copy and what loading it must do."""

    name: str
    build: Callable[[Path, Ctx, str], None]
    error: type[BaseException] | None  # None: loads, the tampering ignored
    match: str = ""  # regex the error message must contain (it names the file or the key)
    base: str = "caption"  # caption | t2i | one of FLORENCE_BASES
    allow_pickle: bool = False
    match_without_opt_in: str | None = None  # for entry points that never pass allow_pickle (zoo-eval)


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------
def _edit_json(path: Path, fn: Callable[[Any], Any]) -> None:
    obj = json.loads(path.read_text())
    out = fn(obj)
    path.write_text(json.dumps(obj if out is None else out))


def cfg_edit(fn: Callable[[dict], Any]) -> Callable[[Path, Ctx, str], None]:
    return lambda folder, ctx, name: _edit_json(folder / "config.json", fn)


def vq_cfg_edit(fn: Callable[[dict], Any]) -> Callable[[Path, Ctx, str], None]:
    return lambda folder, ctx, name: _edit_json(folder / "image_codes" / "config.json", fn)


def write(rel: str, data: bytes | str, unlink: tuple[str, ...] = ()) -> Callable[[Path, Ctx, str], None]:
    def build(folder: Path, ctx: Ctx, name: str) -> None:
        for u in unlink:
            (folder / u).unlink()
        (folder / rel).write_bytes(data.encode() if isinstance(data, str) else data)
    return build


def payload_at(rel: str, unlink: tuple[str, ...] = (ST,), kind: str = "pickle") -> Callable[[Path, Ctx, str], None]:
    """A pickle payload at ``rel`` (raw pickle, ``torch.save`` zip, or wrapped in a Lightning-style state_dict)."""
    def build(folder: Path, ctx: Ctx, name: str) -> None:
        for u in unlink:
            (folder / u).unlink()
        target = folder / rel
        if kind == "pickle":
            target.write_bytes(ctx.payload_pickle(name))
        elif kind == "torch_zip":
            torch.save({"encoder.0.weight": TouchPayload(ctx.marker(name))}, target)
        else:  # state_dict
            torch.save({"state_dict": {"model.x": ShellPayload(ctx.marker(name))}, "epoch": 1}, target)
    return build


def weights_edit(fn: Callable[[dict], None], rel: str = ST) -> Callable[[Path, Ctx, str], None]:
    def build(folder: Path, ctx: Ctx, name: str) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(str(folder / rel))
        fn(state)
        save_file(state, str(folder / rel))
    return build


def truncate(rel: str, keep: Callable[[int], int]) -> Callable[[Path, Ctx, str], None]:
    def build(folder: Path, ctx: Ctx, name: str) -> None:
        data = (folder / rel).read_bytes()
        (folder / rel).write_bytes(data[:keep(len(data))])
    return build


def header_edit(fn: Callable[[Any], Any], raw: bytes | None = None) -> Callable[[Path, Ctx, str], None]:
    """Rewrite the safetensors header of ``model.safetensors`` (``raw``: replace it by these bytes)."""
    def build(folder: Path, ctx: Ctx, name: str) -> None:
        data = (folder / ST).read_bytes()
        n = int.from_bytes(data[:8], "little")
        body = data[8 + n:]
        if raw is None:
            header = json.loads(data[8:8 + n])
            new = json.dumps(fn(header) or header).encode()
        else:
            new = raw
        (folder / ST).write_bytes(len(new).to_bytes(8, "little") + new + body)
    return build


def link_out(rel: str, relative: bool = False) -> Callable[[Path, Ctx, str], None]:
    """Replace ``rel`` by a symlink to a copy of it outside the model folder."""
    def build(folder: Path, ctx: Ctx, name: str) -> None:
        src = folder / rel
        dst = ctx.outside / name / Path(rel).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
            shutil.rmtree(src)
        else:
            shutil.copy2(src, dst)
            src.unlink()
        src.symlink_to(os.path.relpath(dst, src.parent) if relative else dst)
    return build


def link_payload_out(rel: str) -> Callable[[Path, Ctx, str], None]:
    def build(folder: Path, ctx: Ctx, name: str) -> None:
        (folder / ST).unlink()
        dst = ctx.outside / name / "payload.bin"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(ctx.payload_pickle(name))
        (folder / rel).symlink_to(dst)
    return build


def outside_payload(ctx: Ctx, name: str) -> Path:
    """A pickle payload file outside the model folder (what a backbone kwarg would point at)."""
    path = ctx.outside / name / "weights.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ctx.payload_pickle(name))
    return path


def local_dir_clip(ctx: Ctx, name: str) -> Path:
    """An open_clip ``local-dir:`` folder outside the model folder, whose weights are a pickle payload."""
    d = ctx.outside / name / "clip"
    d.mkdir(parents=True, exist_ok=True)
    import open_clip

    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("ViT-B-32")}))
    (d / "open_clip_pytorch_model.bin").write_bytes(ctx.payload_pickle(name))
    return d


def image_cfg(**edit: Any) -> Callable[[dict], None]:
    def fn(c: dict) -> None:
        c["modalities"]["image"].update(edit)
    return fn


def backbone(name_fn: Callable[[Ctx, str], str], **kwargs: Any) -> Callable[[Path, Ctx, str], None]:
    def build(folder: Path, ctx: Ctx, name: str) -> None:
        _edit_json(folder / "config.json", image_cfg(backbone=name_fn(ctx, name), backbone_kwargs=dict(kwargs)))
    return build


def kwargs_case(bb: str, key: str, value_fn: Callable[[Ctx, str], Any]) -> Callable[[Path, Ctx, str], None]:
    def build(folder: Path, ctx: Ctx, name: str) -> None:
        _edit_json(folder / "config.json", image_cfg(backbone=bb, backbone_kwargs={key: value_fn(ctx, name)}))
    return build


def _nbt_float(state: dict) -> None:
    key = next(k for k in state if k.endswith("num_batches_tracked"))
    state[key] = state[key].float()


def _all_floats(dtype: torch.dtype) -> Callable[[dict], None]:
    def fn(state: dict) -> None:
        for k, v in state.items():
            if v.dtype == torch.float32:
                state[k] = v.to(dtype)
    return fn


def _set_num_codes(n: int) -> Callable[[dict], None]:
    def fn(c: dict) -> None:
        c["image_codes"]["num_codes"] = n
    return fn


def _text_size(c: dict, ranges: bool) -> None:
    v = c["vocab"]
    v["text_size"] += 10
    if ranges:
        v["ranges"]["text"][1] += 10
        for seg in ("image_codes", "loc_bins"):
            v["ranges"][seg] = [x + 10 for x in v["ranges"][seg]]


def _nested(depth: int) -> list:
    out: list = []
    for _ in range(depth):
        out = [out]
    return out


def _huge_vocab(c: dict) -> None:
    c["vocab"].pop("ranges")
    c["vocab"]["text_size"] = 10**9


def _other_tokenizer(folder: Path, ctx: Ctx, name: str) -> None:
    from modalities.text import TextTokenizer

    TextTokenizer.train(TEXTS, vocab_size=280).save(folder)


def _rename_vq(folder: Path, ctx: Ctx, name: str) -> None:
    (folder / "image_codes").rename(folder / "vq_elsewhere")


# ------------------------------------------------------------------------------------------------
# The corpus
# ------------------------------------------------------------------------------------------------
U, M, F = "UnsafeModelError", "ModelFolderError", FileNotFoundError


def _err(kind: Any) -> type[BaseException]:
    from zoo.loading import ModelFolderError, UnsafeModelError

    return {"UnsafeModelError": UnsafeModelError, "ModelFolderError": ModelFolderError}.get(kind, kind)


def _pickle_cases(out: list[Case]) -> None:
    refuse = r"{f}: refusing to load a pickle weights file"
    restricted = r"{f}: cannot be read with torch\.load\(weights_only=True\)"
    top = ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "model.pkl", "weights.pickle")
    vq = [f"image_codes/diffusion_pytorch_model{s}" for s in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    for rel, base, unlink in [(n, "caption", (ST,)) for n in top] + [(n, "t2i", (VQ_ST,)) for n in vq]:
        f = re.escape(rel)
        slug = rel.replace("/", "_").replace(".", "_")
        out.append(Case(f"pickle_{slug}", payload_at(rel, unlink), U, refuse.format(f=f), base))
        out.append(Case(f"pickle_{slug}_allow_pickle", payload_at(rel, unlink), U, restricted.format(f=f), base,
                        allow_pickle=True, match_without_opt_in=refuse.format(f=f)))
    for kind, rel in (("torch_zip", "model.pt"), ("state_dict", "model.ckpt")):
        f = re.escape(rel)
        out.append(Case(f"pickle_{kind}", payload_at(rel, kind=kind), U, refuse.format(f=f)))
        out.append(Case(f"pickle_{kind}_allow_pickle", payload_at(rel, kind=kind), U, restricted.format(f=f),
                        allow_pickle=True, match_without_opt_in=refuse.format(f=f)))
    out.append(Case("pickle_named_safetensors", lambda f, c, n: (f / ST).write_bytes(c.payload_pickle(n)), M,
                    r"model\.safetensors: not a valid safetensors file"))
    out.append(Case("pickle_named_vq_safetensors", lambda f, c, n: (f / VQ_ST).write_bytes(c.payload_pickle(n)), M,
                    r"image_codes/diffusion_pytorch_model\.safetensors: not a valid safetensors file", "t2i"))


def _target_cases(out: list[Case]) -> None:
    t = {"_target_": "os.system", "command": "touch /tmp/mmzoo-pwned"}
    edits = {
        "top": (lambda c: c.update(_target_="os.system"), "_target_"),
        "modality": (lambda c: c["modalities"]["image"].update(_target_="timm.create_model"),
                     "modalities.image._target_"),
        "backbone_kwargs": (image_cfg(backbone_kwargs={"act_layer": dict(t)}),
                            "modalities.image.backbone_kwargs.act_layer._target_"),
        "list": (image_cfg(mean=[dict(t), 0.5, 0.5]), "modalities.image.mean[0]._target_"),
        "tasks": (lambda c: c["tasks"]["caption"].update(processor=dict(t)), "tasks.caption.processor._target_"),
        "vocab": (lambda c: c["vocab"].update(_target_="zoo.vocab.VocabLayout"), "vocab._target_"),
    }
    for label, (fn, key) in edits.items():
        out.append(Case(f"target_{label}", cfg_edit(fn), U, rf"config\.json: key '{re.escape(key)}' = .*instantiate"))
    out.append(Case("target_image_codes_entry", cfg_edit(lambda c: c["image_codes"].update(loader=dict(t))), U,
                    r"config\.json: key 'image_codes\.loader\._target_'", "t2i"))
    out.append(Case("target_vq_config", vq_cfg_edit(lambda c: c.update(act_fn=dict(t))), U,
                    r"image_codes/config\.json: key 'act_fn\._target_'", "t2i"))


def _backbone_cases(out: list[Case]) -> None:
    refused = r"config\.json: modalities\.image\.backbone: .*refused"
    names: dict[str, Callable[[Ctx, str], str]] = {
        "open_clip_local_dir_outside": lambda c, n: f"open_clip:local-dir:{local_dir_clip(c, n)}",
        "open_clip_local_dir_relative": lambda c, n: "open_clip:local-dir:./clip",
        "open_clip_hf_hub": lambda c, n: "open_clip:hf-hub:evil/clip",
        "open_clip_url": lambda c, n: "open_clip:https://example.com/clip.bin",
        "open_clip_hf_text_tower": lambda c, n: "open_clip:roberta-ViT-B-32",
        "timm_hf_hub": lambda c, n: "timm:hf-hub:timm/resnet18.a1_in1k",
        "timm_local_dir": lambda c, n: f"timm:local-dir:{c.outside}",
        "timm_absolute_path": lambda c, n: f"timm:{outside_payload(c, n)}",
        "timm_url": lambda c, n: "timm:https://example.com/resnet.pth",
        "timm_relative_path": lambda c, n: "timm:../../resnet18",
        "timm_unregistered": lambda c, n: "timm:not_a_timm_model",
        "unknown_kind": lambda c, n: "torchvision:resnet18",
        "no_kind": lambda c, n: "resnet18",
    }
    for label, fn in names.items():
        out.append(Case(f"backbone_{label}", backbone(fn), U, refused))
    out.append(Case("backbone_open_clip_local_dir_weights_only_false",
                    backbone(lambda c, n: f"open_clip:local-dir:{local_dir_clip(c, n)}", weights_only=False),
                    U, refused))
    kwargs: dict[str, tuple[str, str, Callable[[Ctx, str], Any]]] = {
        "pretrained_image_path": ("open_clip:ViT-B-32", "pretrained_image_path",
                                  lambda c, n: str(outside_payload(c, n))),
        "pretrained_text_path": ("open_clip:ViT-B-32", "pretrained_text_path",
                                 lambda c, n: str(outside_payload(c, n))),
        "weights_only_false": ("open_clip:ViT-B-32", "weights_only", lambda c, n: False),
        "open_clip_cache_dir": ("open_clip:ViT-B-32", "cache_dir", lambda c, n: str(c.outside)),
        "open_clip_pretrained_image": ("open_clip:ViT-B-32", "pretrained_image", lambda c, n: True),
        "open_clip_vision_cfg": ("open_clip:ViT-B-32", "vision_cfg",
                                 lambda c, n: {"timm_model_name": "hf-hub:evil/x", "timm_model_pretrained": True}),
        "open_clip_jit": ("open_clip:ViT-B-32", "jit", lambda c, n: True),
        "checkpoint_path": ("timm:test_resnet", "checkpoint_path", lambda c, n: str(outside_payload(c, n))),
        "pretrained_cfg_overlay": ("timm:test_resnet", "pretrained_cfg_overlay",
                                   lambda c, n: {"file": str(outside_payload(c, n))}),
        "pretrained_cfg": ("timm:test_resnet", "pretrained_cfg", lambda c, n: {"hf_hub_id": "evil/x"}),
        "pretrained_true": ("timm:test_resnet", "pretrained", lambda c, n: True),
        "timm_cache_dir": ("timm:test_resnet", "cache_dir", lambda c, n: str(c.outside)),
        "features_only": ("timm:test_resnet", "features_only", lambda c, n: False),
        "norm_layer_path": ("timm:test_resnet", "norm_layer", lambda c, n: "/tmp/evil.py"),
        "act_layer_object": ("timm:test_resnet", "act_layer", lambda c, n: {"module": "os", "name": "system"}),
    }
    for label, (bb, key, fn) in kwargs.items():
        out.append(Case(f"kwargs_{label}", kwargs_case(bb, key, fn), U,
                        rf"config\.json: modalities\.image\.backbone_kwargs\.{key}: .*refused"))
    out.append(Case("kwargs_not_an_object", cfg_edit(image_cfg(backbone_kwargs=["pretrained_cfg_overlay"])), M,
                    r"config\.json: key 'modalities\.image\.backbone_kwargs' has an invalid value"))


def _symlink_cases(out: list[Case]) -> None:
    out_msg = r"{f}: points to .*outside the model folder"
    for rel, base in (("config.json", "caption"), (ST, "caption"), ("tokenizer.json", "caption"),
                      ("image_codes", "t2i"), ("image_codes/config.json", "t2i"), (VQ_ST, "t2i")):
        slug = rel.replace("/", "_").replace(".", "_")
        out.append(Case(f"symlink_{slug}", link_out(rel), U, out_msg.format(f=re.escape(rel)), base))
    out.append(Case("symlink_relative_safetensors", link_out(ST, relative=True), U, out_msg.format(f=re.escape(ST))))
    out.append(Case("symlink_pickle_payload_allow_pickle", link_payload_out("pytorch_model.bin"), U,
                    out_msg.format(f=r"pytorch_model\.bin"), allow_pickle=True,
                    match_without_opt_in=r"pytorch_model\.bin: refusing to load a pickle"))


def _safetensors_cases(out: list[Case]) -> None:
    st = r"model\.safetensors: "
    out += [
        Case("st_truncated_half", truncate(ST, lambda n: n // 2), M, st + "truncated"),
        Case("st_truncated_4_bytes", truncate(ST, lambda n: 4), M, st + r"not a valid safetensors file \(4 bytes"),
        Case("st_empty", truncate(ST, lambda n: 0), M, st + r"not a valid safetensors file \(0 bytes"),
        Case("st_text_file", write(ST, "these are not the weights you are looking for"),
             M, st + "not a valid safetensors"),
        Case("st_header_length_huge", lambda f, c, n: (f / ST).write_bytes(b"\xff" * 8 + (f / ST).read_bytes()[8:]), M,
             st + "not a valid safetensors file: its header length says"),
        Case("st_header_not_json", header_edit(None, raw=b"{not json at all}"),
             M, st + "not a valid safetensors file: its header is not UTF-8 JSON"),
        Case("st_header_list", header_edit(None, raw=b"[1, 2, 3]"),
             M, st + "not a valid safetensors file: its header is not a JSON object"),
        Case("st_offsets_past_end",
             header_edit(lambda h: h[max((k for k in h if k != "__metadata__"),
                                         key=lambda k: h[k]["data_offsets"][1])]["data_offsets"].__setitem__(1, 10**9)),
             M, st + "truncated: its tensors need"),
        Case("st_vq_truncated", truncate(VQ_ST, lambda n: n - 100), M,
             r"image_codes/diffusion_pytorch_model\.safetensors: truncated", "t2i"),
    ]


def _tensor_cases(out: list[Case]) -> None:
    st = r"model\.safetensors: "
    out += [
        Case("tensor_wrong_shape", weights_edit(lambda s: s.__setitem__("dec_pos.weight", torch.zeros(10, 32))), M,
             st + r"tensor 'dec_pos\.weight' has shape \[10, 32\] but the architecture in .*config\.json "
                  r"needs \[64, 32\]"),
        Case("tensor_int64", weights_edit(lambda s: s.__setitem__("dec_pos.weight", s["dec_pos.weight"].long())), M,
             st + r"tensor 'dec_pos\.weight' is torch\.int64 but the model needs torch\.float32"),
        Case("tensor_float64", weights_edit(lambda s: s.__setitem__("enc_norm.weight", s["enc_norm.weight"].double())),
             M, st + r"tensor 'enc_norm\.weight' is torch\.float64 but the model needs torch\.float32"),
        Case("tensor_uint8", weights_edit(lambda s: s.__setitem__("enc_norm.bias", s["enc_norm.bias"].to(torch.uint8))),
             M, st + r"tensor 'enc_norm\.bias' is torch\.uint8"),
        Case("tensor_counter_as_float", weights_edit(_nbt_float),
             M, st + r"tensor '.*num_batches_tracked' is torch\.float32"),
        Case("tensor_missing", weights_edit(lambda s: s.pop("dec_pos.weight")), M,
             st + r"its tensors do not match .*missing \['dec_pos\.weight'\]"),
        Case("tensor_unexpected", weights_edit(lambda s: s.__setitem__("evil.weight", torch.zeros(2))), M,
             st + r"its tensors do not match .*unexpected \['evil\.weight'\]"),
        Case("config_shape_change", cfg_edit(lambda c: c.update(max_positions=32)), M,
             st + r"tensor '(enc|dec)_pos\.weight' has shape \[64, 32\] but .* needs \[32, 32\]"),
        Case("tensor_vq_wrong_shape",
             weights_edit(lambda s: s.__setitem__("quantize.embedding.weight", torch.zeros(8, 4)), VQ_ST), M,
             r"image_codes/diffusion_pytorch_model\.safetensors: tensor 'quantize\.embedding\.weight' "
             r"has shape \[8, 4\]", "t2i"),
        Case("tensor_vq_int64", weights_edit(lambda s: s.__setitem__("quantize.embedding.weight",
                                                                     s["quantize.embedding.weight"].long()), VQ_ST), M,
             r"image_codes/diffusion_pytorch_model\.safetensors: tensor 'quantize\.embedding\.weight' is torch\.int64",
             "t2i"),
        # harmless: half-precision weights are upcast deliberately
        Case("tensor_fp16_upcast", weights_edit(_all_floats(torch.float16)), None),
        Case("tensor_bf16_upcast", weights_edit(_all_floats(torch.bfloat16)), None),
    ]


def _config_cases(out: list[Case]) -> None:
    c = r"config\.json: "
    out += [
        Case("config_not_utf8", write("config.json", b'{"arch": "test-tiny\xff\xfe"}'), M, c + "not UTF-8"),
        Case("config_utf16",
             lambda f, x, n: (f / "config.json").write_bytes((f / "config.json").read_text().encode("utf-16")),
             M, c + "not UTF-8"),
        Case("config_list", write("config.json", "[1, 2, 3]"), M, c + "expected a JSON object, got a JSON list"),
        Case("config_number", write("config.json", "42"), M, c + "expected a JSON object, got a JSON int"),
        Case("config_string", write("config.json", '"test-tiny"'), M, c + "expected a JSON object, got a JSON str"),
        Case("config_invalid_json", write("config.json", "{not json"), M, c + "invalid JSON"),
        Case("config_d_model_string", cfg_edit(lambda d: d.update(d_model="32")),
             M, c + "key 'd_model' has an invalid value"),
        Case("config_n_heads_bool", cfg_edit(lambda d: d.update(n_heads=True)),
             M, c + "key 'n_heads' has an invalid value"),
        Case("config_dec_grid_string", cfg_edit(lambda d: d.update(dec_grid="4x4")),
             M, c + "key 'dec_grid' has an invalid value"),
        Case("config_dropout_nan", cfg_edit(lambda d: d.update(dropout=float("nan"))),
             M, c + "key 'dropout' has an invalid value"),
        Case("config_unknown_key", cfg_edit(lambda d: d.update(hooks={"on_load": "os.system"})),
             U, c + "unknown key 'hooks'"),
        Case("config_unknown_modality", cfg_edit(lambda d: d["modalities"].update(audio={"loader": "x"})), U,
             c + r"unknown modality 'modalities\.audio'"),
        Case("config_unknown_image_key", cfg_edit(image_cfg(loader="pickle")),
             U, c + r"unknown key 'modalities\.image\.loader'"),
        Case("config_modality_not_object", cfg_edit(lambda d: d["modalities"].update(image=["timm:test_resnet"])), M,
             c + r"'modalities\.image' must be an object"),
        Case("config_unknown_vocab_key", cfg_edit(lambda d: d["vocab"].update(file="/etc/passwd")), U,
             c + r"unknown key 'vocab\.file'"),
        Case("config_task_setting_path", cfg_edit(lambda d: d["tasks"]["caption"].update(vq_path="/outside/vq")), U,
             c + r"unknown key 'tasks\.caption\.vq_path'"),
        Case("config_tasks_string", cfg_edit(lambda d: d.update(tasks="caption")),
             M, c + "key 'tasks' has an invalid value"),
        Case("config_format_newer", cfg_edit(lambda d: d.update(format=99)), M, c + "format 99 is newer"),
        Case("config_arch_unregistered", cfg_edit(lambda d: d.update(arch="evil-arch")),
             U, c + "architecture 'evil-arch' is not registered"),
        Case("config_vocab_ranges_disagree", cfg_edit(lambda d: _text_size(d, ranges=False)),
             M, c + "not a valid mmzoo model config: .*disagree"),
        Case("config_vocab_resized", cfg_edit(lambda d: _text_size(d, ranges=True)), M,
             r"model\.safetensors: tensor 'embed_tokens\.weight' has shape"),
        Case("config_layers_huge", cfg_edit(lambda d: d.update(enc_layers=10**7)), M,
             c + "key 'enc_layers' has an invalid value"),
        # a vocabulary of 10^9 tokens (its ranges consistent): 128 GB if built; refused from the shapes alone
        Case("config_vocab_huge", cfg_edit(_huge_vocab), M,
             r"model\.safetensors: tensor 'embed_tokens\.weight' has shape \[\d+, 32\] "
             r"but .* needs \[1000000\d+, 32\]"),
        Case("config_nested_too_deeply", write("config.json", '{"arch": ' + "[" * 100000 + "]" * 100000 + "}"), M,
             c + "JSON nested too deeply"),
        Case("config_nested_deep_value", cfg_edit(lambda d: d["tasks"]["caption"].update(candidates=_nested(900))), M,
             c + r"(key 'tasks\.caption\.candidates' has an invalid value|nested too deeply)"),
        Case("config_empty_object", write("config.json", "{}"), M, r"model\.safetensors: its tensors do not match"),
        # harmless: a modality's pretrained entry (a training-time source) is dropped, never read
        Case("config_pretrained_outside_ignored",
             lambda f, x, n: _edit_json(f / "config.json", image_cfg(pretrained=str(outside_payload(x, n)))), None),
    ]


def _tokenizer_cases(out: list[Case]) -> None:
    t = r"tokenizer\.json: "
    out += [
        Case("tokenizer_not_json", write("tokenizer.json", "{broken"), M, t + r"not a valid tokenizer\.json"),
        Case("tokenizer_not_utf8", write("tokenizer.json", b"\xff\xfe\x00{"), M, t + "not UTF-8"),
        Case("tokenizer_wrong_object", write("tokenizer.json", '{"version": "1.0", "model": {"type": "Evil"}}'), M,
             t + r"not a valid tokenizer\.json"),
        Case("tokenizer_other_vocab", _other_tokenizer, M, t + r"has \d+ tokens but .*config\.json's vocab\.text_size"),
        Case("tokenizer_nested_too_deeply", write("tokenizer.json", '{"model": ' + "[" * 100000 + "]" * 100000 + "}"),
             M, t + r"not a valid tokenizer\.json"),
        Case("tokenizer_missing", lambda f, c, n: (f / "tokenizer.json").unlink(), F, t + "missing"),
    ]


def _image_codes_cases(out: list[Case]) -> None:
    sub = r"config\.json: image_codes\.folder must name a subfolder"
    v = r"image_codes/config\.json: "
    for label, value in (("parent", "../outside"), ("absolute", "/tmp"), ("dot", "."), ("nested", "image_codes/.."),
                         ("backslash", "..\\outside"), ("number", 7)):
        bad_type = r"config\.json: key 'image_codes\.folder' has an invalid value"
        out.append(Case(f"image_codes_folder_{label}",
                        cfg_edit(lambda c, value=value: c["image_codes"].update(folder=value)),
                        U if label != "number" else M, sub if label != "number" else bad_type, "t2i"))
    out += [
        Case("image_codes_folder_missing", _rename_vq,
             F, r"image_codes: config\.json names the image-code tokenizer folder",
             "t2i"),
        Case("image_codes_entry_string", cfg_edit(lambda c: c.update(image_codes="image_codes")), M,
             r"config\.json: key 'image_codes' has an invalid value", "t2i"),
        Case("image_codes_entry_num_codes", cfg_edit(_set_num_codes(32)), M,
             r"config\.json: image_codes\.num_codes is 32 but the tokenizer", "t2i"),
        Case("image_codes_entry_grid", cfg_edit(lambda c: c["image_codes"].update(grid=[4, 4])), M,
             r"config\.json: image_codes\.grid is \[4, 4\] but the tokenizer", "t2i"),
        Case("vq_class_name", vq_cfg_edit(lambda c: c.update(_class_name="UNet2DModel")),
             M, v + "describes 'UNet2DModel'", "t2i"),
        Case("vq_unknown_key", vq_cfg_edit(lambda c: c.update(custom_pipeline="evil.py")),
             U, v + "unknown key 'custom_pipeline'",
             "t2i"),
        Case("vq_value_object", vq_cfg_edit(lambda c: c.update(act_fn={"module": "os"})),
             M, v + "key 'act_fn' has an invalid value",
             "t2i"),
        Case("vq_bad_block_type", vq_cfg_edit(lambda c: c.update(down_block_types=["EvilBlock"] * 4)), M,
             v + "not a valid VQModel config", "t2i"),
        Case("vq_not_utf8", write("image_codes/config.json", b'{"_class_name": "VQ\xffModel"}'),
             M, v + "not UTF-8", "t2i"),
        Case("vq_list", write("image_codes/config.json", "[]"), M, v + "expected a JSON object", "t2i"),
        Case("vq_codebook_resized", vq_cfg_edit(lambda c: c.update(num_vq_embeddings=32)), M,
             r"image_codes/diffusion_pytorch_model\.safetensors: tensor 'quantize\.embedding\.weight' "
             r"has shape \[16, 4\] but the architecture in .*image_codes/config\.json needs \[32, 4\]", "t2i"),
        # harmless: a stray pickle beside the safetensors weights is never read
        Case("stray_pickle_beside_vq_safetensors", payload_at("image_codes/diffusion_pytorch_model.bin", unlink=()),
             None, base="t2i"),
    ]
    out.append(Case("stray_pickle_beside_safetensors", payload_at("pytorch_model.bin", unlink=()), None))


# ------------------------------------------------------------------------------------------------
# Florence-2 folders: the published layouts (transformers', Microsoft's) and our own saved one
# ------------------------------------------------------------------------------------------------
#: ``florence``: transformers' layout (model.safetensors, processor_config.json, generation_config.json);
#: ``florence_ms``: Microsoft's original layout (pytorch_model.bin, remote-code ``auto_map`` in config.json);
#: ``florence_saved``: our own folder (``save_pretrained``: config.json with a ``florence2`` entry)
FLORENCE_BASES = ("florence", "florence_ms", "florence_saved")
FL_ST = "model.safetensors"
FL_BIN = "pytorch_model.bin"
#: a published tensor / our saved tensor the tensor cases tamper with
FL_TENSOR = "model.language_model.decoder.embed_positions.weight"
FL_SAVED_TENSOR = "dec_pos.weight"
REMOTE_CODE = ("configuration_florence2.py", "modeling_florence2.py", "processing_florence2.py", "__init__.py")


def make_florence_bases(root: Path) -> dict[str, Path]:
    """The tiny Florence-2 test model (as tests/test_florence2.py builds it: a random transformers
    ``Florence2ForConditionalGeneration``, 64 px, d32) saved in the three layouts the Florence loader reads."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from florence2_reference import build_reference, write_microsoft

    from zoo.imported.florence2 import load_folder

    native = root / "florence"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        build_reference(native, image_size=64, depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), heads=(2, 2, 4, 4),
                        window=3, d_model=32, layers=2, n_heads=4, ffn=64, seed=0)
    loaded = load_folder(native)
    write_microsoft(native, root / "florence_ms", loaded)
    loaded.save_pretrained(root / "florence_saved")
    return {"florence": native, "florence_ms": root / "florence_ms", "florence_saved": root / "florence_saved"}


def remote_code(extra: Callable[[dict], None] | None = None) -> Callable[[Path, Ctx, str], None]:
    """Python files in the folder that create the case's marker when imported, named by config.json's
    ``auto_map`` (and ``trust_remote_code: true``): loading must ignore them."""
    def build(folder: Path, ctx: Ctx, name: str) -> None:
        for f in REMOTE_CODE:
            (folder / f).write_text(f"import pathlib\npathlib.Path({str(ctx.marker(name))!r}).touch()\n")

        def edit(c: dict) -> None:
            c["auto_map"] = {"AutoConfig": "configuration_florence2.Florence2Config",
                             "AutoProcessor": "processing_florence2.Florence2Processor",
                             "AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration"}
            c["trust_remote_code"] = True
            if extra is not None:
                extra(c)
        _edit_json(folder / "config.json", edit)
    return build


def bin_edit(fn: Callable[[dict], None]) -> Callable[[Path, Ctx, str], None]:
    """Edit the tensors of ``pytorch_model.bin`` (a plain state dict: readable with weights_only=True)."""
    def build(folder: Path, ctx: Ctx, name: str) -> None:
        state = torch.load(folder / FL_BIN, map_location="cpu", weights_only=True)
        fn(state)
        torch.save(state, folder / FL_BIN)
    return build


def _set(key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    return lambda s: s.__setitem__(key, fn(s[key]))


def _text_cfg(**edit: Any) -> Callable[[dict], None]:
    return lambda c: c["text_config"].update(edit)


def _pop_text(key: str) -> Callable[[dict], None]:
    def fn(c: dict) -> None:
        c["text_config"].pop(key)
    return fn


def _florence_cases(out: list[Case]) -> None:
    t, ms, sv = "florence", "florence_ms", "florence_saved"
    c, g, st = r"config\.json: ", r"generation_config\.json: ", r"model\.safetensors: "
    restricted = r"pytorch_model\.bin: cannot be read with torch\.load\(weights_only=True\)"
    outside = r"{f}: points to .*outside the model folder"
    target = rf"{c}key '{{k}}' = .*instantiate"
    out += [
        # pickle payloads: .bin only through torch.load(weights_only=True), and only without safetensors
        Case("fl_pickle_bin_only", payload_at(FL_BIN, (FL_ST,)), U, restricted, t),
        Case("fl_pickle_bin_only_allow_pickle", payload_at(FL_BIN, (FL_ST,)), U, restricted, t, allow_pickle=True,
             match_without_opt_in=restricted),
        Case("fl_pickle_bin_torch_zip", payload_at(FL_BIN, (FL_ST,), kind="torch_zip"), U, restricted, t),
        Case("fl_ms_pickle_bin", payload_at(FL_BIN, ()), U, restricted, ms),
        Case("fl_ms_pickle_bin_state_dict", payload_at(FL_BIN, (), kind="state_dict"), U, restricted, ms),
        Case("fl_saved_pickle_bin_only", payload_at(FL_BIN, (FL_ST,)), U, restricted, sv),
        Case("fl_pickle_named_safetensors", lambda f, x, n: (f / FL_ST).write_bytes(x.payload_pickle(n)), M,
             st + "not a valid safetensors file", t),
        # harmless: a payload beside the safetensors weights is never read
        Case("fl_stray_pickle_beside_safetensors", payload_at(FL_BIN, ()), None, base=t),
        Case("fl_saved_stray_pickle_beside_safetensors", payload_at(FL_BIN, ()), None, base=sv),
        # _target_ anywhere in any JSON file read
        Case("fl_target_top", cfg_edit(lambda d: d.update(_target_="os.system")), U, target.format(k="_target_"), t),
        Case("fl_target_text_config", cfg_edit(_text_cfg(_target_="transformers.BartModel")), U,
             target.format(k=r"text_config\._target_"), t),
        Case("fl_target_vision_list", cfg_edit(lambda d: d["vision_config"].update(depths=[{"_target_": "os.system"}])),
             U, target.format(k=r"vision_config\.depths\[0\]\._target_"), t),
        Case("fl_ms_target_vision", cfg_edit(lambda d: d["vision_config"]["image_pos_embed"].update(_target_="x.y")),
             U, target.format(k=r"vision_config\.image_pos_embed\._target_"), ms),
        Case("fl_target_generation_config",
             lambda f, x, n: _edit_json(f / "generation_config.json", lambda d: d.update(_target_="os.system")), U,
             g + "key '_target_' = .*instantiate", t),
        Case("fl_target_processor_config",
             lambda f, x, n: _edit_json(f / "processor_config.json",
                                        lambda d: d["image_processor"].update(_target_="PIL.Image.open")), U,
             r"processor_config\.json: key 'image_processor\._target_' = .*instantiate", t),
        Case("fl_saved_target_meta", cfg_edit(lambda d: d["florence2"].update(_target_="os.system")), U,
             target.format(k=r"florence2\._target_"), sv),
        Case("fl_saved_target_generation", cfg_edit(lambda d: d["florence2"]["generation"].update(
            logits_processor={"_target_": "os.system"})), U,
             target.format(k=r"florence2\.generation\.logits_processor\._target_"), sv),
        # remote code: auto_map / trust_remote_code are data that is never used; the .py files never import
        Case("fl_auto_map_remote_code", remote_code(), None, base=t),
        Case("fl_ms_auto_map_remote_code", remote_code(), None, base=ms),
        Case("fl_auto_map_in_text_config", remote_code(lambda d: d["text_config"].update(
            auto_map={"AutoModel": "modeling_florence2.Evil"})), None, base=t),
        # harmless: unknown keys of a PUBLISHED config are ignored (nothing is built from them)
        Case("fl_published_extra_keys_ignored", cfg_edit(lambda d: d.update(custom_pipeline="evil.py",
                                                                           processor_class="Evil")), None, base=t),
        # our own saved folder is strict: every key known, the florence2 entry through its schema
        Case("fl_saved_auto_map", remote_code(), U, c + "unknown key 'auto_map'", sv),
        Case("fl_saved_meta_unknown_key", cfg_edit(lambda d: d["florence2"].update(hooks="os.system")), U,
             c + r"unknown key 'florence2\.hooks'", sv),
        Case("fl_saved_generation_unknown_key", cfg_edit(lambda d: d["florence2"]["generation"].update(
            streamer="evil")), U, c + r"unknown key 'florence2\.generation\.streamer'", sv),
        Case("fl_saved_generation_bad_value", cfg_edit(lambda d: d["florence2"]["generation"].update(num_beams="3")),
             M, c + r"key 'florence2\.generation\.num_beams' has an invalid value", sv),
        Case("fl_saved_meta_layout", cfg_edit(lambda d: d["florence2"].update(layout="remote")), M,
             c + r"key 'florence2\.layout' has an invalid value", sv),
        Case("fl_saved_unknown_modality_key", cfg_edit(lambda d: d["modalities"]["florence_image"].update(
            checkpoint_path="/tmp/x.pth")), U, c + r"unknown key 'modalities\.florence_image\.checkpoint_path'", sv),
        Case("fl_saved_layers_huge", cfg_edit(lambda d: d.update(enc_layers=10**7)), M,
             c + "key 'enc_layers' has an invalid value", sv),
        # symlinks out of the folder, for every file the loader reads
        *[Case(f"fl_symlink_{rel.replace('.', '_')}", link_out(rel), U, outside.format(f=re.escape(rel)), base)
          for rel, base in (("config.json", t), (FL_ST, t), ("tokenizer.json", t), ("generation_config.json", t),
                            ("processor_config.json", t), ("README.md", t), (FL_BIN, ms),
                            ("preprocessor_config.json", ms))],
        Case("fl_saved_symlink_tokenizer", link_out("tokenizer.json"), U, outside.format(f=r"tokenizer\.json"), sv),
        Case("fl_saved_symlink_safetensors_relative", link_out(FL_ST, relative=True), U,
             outside.format(f=re.escape(FL_ST)), sv),
        Case("fl_symlink_payload_bin", link_payload_out(FL_BIN), U, outside.format(f=r"pytorch_model\.bin"), t),
        # safetensors framing
        Case("fl_st_truncated_half", truncate(FL_ST, lambda n: n // 2), M, st + "truncated", t),
        Case("fl_st_empty", truncate(FL_ST, lambda n: 0), M, st + r"not a valid safetensors file \(0 bytes", t),
        Case("fl_st_header_length_huge",
             lambda f, x, n: (f / FL_ST).write_bytes(b"\xff" * 8 + (f / FL_ST).read_bytes()[8:]), M,
             st + "not a valid safetensors file: its header length says", t),
        Case("fl_saved_st_truncated", truncate(FL_ST, lambda n: n - 100), M, st + "truncated", sv),
        # shapes and dtypes, named by the published tensor name and the file
        Case("fl_tensor_wrong_shape", weights_edit(_set(FL_TENSOR, lambda v: torch.zeros(10, 32))), M,
             st + rf"tensor '{re.escape(FL_TENSOR)}' has shape \[10, 32\] but the architecture in .*config\.json "
                  r"needs \[258, 32\]", t),
        Case("fl_tensor_int64", weights_edit(_set(FL_TENSOR, lambda v: v.long())), M,
             st + rf"tensor '{re.escape(FL_TENSOR)}' is torch\.int64 but the model needs torch\.float32", t),
        Case("fl_tensor_float64", weights_edit(_set(FL_TENSOR, lambda v: v.double())), M,
             st + rf"tensor '{re.escape(FL_TENSOR)}' is torch\.float64", t),
        Case("fl_tensor_qkv_wrong_shape", weights_edit(_set(
            "model.language_model.encoder.layers.0.self_attn.k_proj.weight", lambda v: torch.zeros(32, 31))), M,
             st + r"tensor 'model\.language_model\.encoder\.layers\.0\.self_attn\.k_proj\.weight' has shape "
                  r"\[32, 31\] but .* needs \[32, 32\]", t),
        Case("fl_ms_tensor_3d_for_transpose", bin_edit(lambda s: s.__setitem__("image_projection",
                                                                              torch.zeros(2, 2, 2))), M,
             r"pytorch_model\.bin: tensor 'image_projection' has shape \[2, 2, 2\] but .* needs \[64, 32\]", ms),
        Case("fl_ms_tensor_wrong_shape", bin_edit(_set("language_model.model.shared.weight", lambda v: v[:100])), M,
             r"pytorch_model\.bin: tensor 'language_model\.model\.shared\.weight' has shape \[100, 32\]", ms),
        Case("fl_ms_tensor_int64", bin_edit(_set("language_model.final_logits_bias", lambda v: v.long())), M,
             r"pytorch_model\.bin: tensor 'language_model\.final_logits_bias' is torch\.int64", ms),
        Case("fl_saved_tensor_wrong_shape", weights_edit(_set(FL_SAVED_TENSOR, lambda v: torch.zeros(10, 32))), M,
             st + r"tensor 'dec_pos\.weight' has shape \[10, 32\] but the architecture in .*config\.json "
                  r"needs \[258, 32\]", sv),
        Case("fl_saved_tensor_int64", weights_edit(_set(FL_SAVED_TENSOR, lambda v: v.long())), M,
             st + r"tensor 'dec_pos\.weight' is torch\.int64 but the model needs torch\.float32", sv),
        Case("fl_config_shape_change", cfg_edit(_text_cfg(max_position_embeddings=64)), M,
             st + r"tensor 'model\.language_model\.(en|de)coder\.embed_positions\.weight' has shape \[258, 32\] "
                  r"but .* needs \[66, 32\]", t),
        # harmless: half-precision weights are upcast deliberately
        Case("fl_tensor_fp16_upcast", weights_edit(_all_floats(torch.float16)), None, base=t),
        Case("fl_tensor_bf16_upcast", weights_edit(_all_floats(torch.bfloat16)), None, base=t),
        Case("fl_ms_tensor_fp16_upcast", bin_edit(_all_floats(torch.float16)), None, base=ms),
        Case("fl_saved_tensor_bf16_upcast", weights_edit(_all_floats(torch.bfloat16)), None, base=sv),
        # the key table: every tensor used exactly once
        Case("fl_key_unknown", weights_edit(lambda s: s.__setitem__("model.evil.weight", torch.zeros(2))), M,
             st + r"tensor 'model\.evil\.weight' is not used by the key table", t),
        Case("fl_key_missing", weights_edit(lambda s: s.pop(FL_TENSOR)), M,
             st + rf"tensor '{re.escape(FL_TENSOR)}' is missing \(needed for", t),
        Case("fl_ms_key_unknown", bin_edit(lambda s: s.__setitem__("vision_tower.evil", torch.zeros(2))), M,
             r"pytorch_model\.bin: tensor 'vision_tower\.evil' is not used by the key table", ms),
        Case("fl_ms_tied_copy_differs", bin_edit(_set("language_model.lm_head.weight", lambda v: v + 1)), M,
             r"pytorch_model\.bin: tensor 'language_model\.lm_head\.weight' should be a tied copy", ms),
        Case("fl_saved_key_unknown", weights_edit(lambda s: s.__setitem__("evil.weight", torch.zeros(2))), M,
             st + r"its tensors do not match .*unexpected \['evil\.weight'\]", sv),
        # config.json: broken files and keys of the wrong type, each named
        Case("fl_config_not_utf8", write("config.json", b'{"model_type": "florence2\xff"}'), M, c + "not UTF-8", t),
        Case("fl_config_list", write("config.json", "[1, 2]"), M, c + "expected a JSON object, got a JSON list", t),
        Case("fl_config_invalid_json", write("config.json", '{"model_type": "florence2", '), M, c + "invalid JSON", t),
        Case("fl_config_text_config_string", cfg_edit(lambda d: d.update(text_config="bart")), M,
             c + "key 'text_config' has an invalid value", t),
        Case("fl_config_d_model_string", cfg_edit(_text_cfg(d_model="32")), M,
             c + r"key 'text_config\.d_model' has an invalid value", t),
        Case("fl_config_layers_huge", cfg_edit(_text_cfg(encoder_layers=10**7)), M,
             c + r"key 'text_config\.encoder_layers' has an invalid value", t),
        Case("fl_config_vocab_huge", cfg_edit(_text_cfg(vocab_size=10**12)), M,
             c + r"key 'text_config\.vocab_size' has an invalid value", t),
        Case("fl_config_missing_d_model", cfg_edit(_pop_text("d_model")), M,
             c + r"key 'text_config\.d_model' is missing", t),
        Case("fl_config_depths_not_list", cfg_edit(lambda d: d["vision_config"].update(depths="1,1,2,1")), M,
             c + r"key 'vision_config\.depths' has an invalid value", t),
        Case("fl_config_vision_neither_layout", cfg_edit(lambda d: d.update(vision_config={"hidden": 3})), M,
             c + "model_type 'florence2' but the vision config matches neither published layout", t),
        Case("fl_config_activation", cfg_edit(_text_cfg(activation_function="relu")), M,
             c + r"unsupported Florence-2 config: activation 'relu'", t),
        Case("fl_ms_config_pos_embed_string", cfg_edit(lambda d: d["vision_config"].update(image_pos_embed="50")), M,
             c + r"key 'vision_config\.image_pos_embed' has an invalid value", ms),
        Case("fl_saved_config_not_utf8",
             lambda f, x, n: (f / "config.json").write_bytes((f / "config.json").read_text().encode("utf-16")), M,
             c + "not UTF-8", sv),
        # the other JSON / tokenizer files
        Case("fl_generation_not_object", write("generation_config.json", "[2]"), M,
             g + "expected a JSON object", t),
        Case("fl_generation_bad_value", lambda f, x, n: _edit_json(f / "generation_config.json",
                                                                    lambda d: d.update(num_beams="lots")), M,
             g + "key 'num_beams' has an invalid value", t),
        Case("fl_processor_not_utf8", write("processor_config.json", b'{"image_processor": "\xff"}'), M,
             r"processor_config\.json: not UTF-8", t),
        Case("fl_processor_size_string", lambda f, x, n: _edit_json(
            f / "processor_config.json", lambda d: d["image_processor"].update(size="64")), M,
             r"processor_config\.json: key 'image_processor\.size' has an invalid value", t),
        Case("fl_ms_preprocessor_mean_object", lambda f, x, n: _edit_json(
            f / "preprocessor_config.json", lambda d: d.update(image_mean={"module": "os"})), M,
             r"preprocessor_config\.json: key 'image_mean' has an invalid value", ms),
        Case("fl_tokenizer_not_json", write("tokenizer.json", "{broken"), M, r"tokenizer\.json: not a valid", t),
        Case("fl_tokenizer_not_utf8", write("tokenizer.json", b"\xff\xfe\x00{"), M, r"tokenizer\.json: not UTF-8", t),
        Case("fl_tokenizer_missing", lambda f, x, n: (f / "tokenizer.json").unlink(), F, "no tokenizer.json", t),
        Case("fl_saved_tokenizer_wrong_object", write("tokenizer.json", '{"model": {"type": "Evil"}}'), M,
             r"tokenizer\.json: not a valid", sv),
    ]


RR = "renderer/renderer.safetensors"


def renderer_cfg_edit(fn: Callable[[dict], Any]) -> Callable[[Path, Ctx, str], None]:
    return lambda folder, ctx, name: _edit_json(folder / "renderer" / "config.json", fn)


def _renderer_cases(out: list[Case]) -> None:
    """The layout route's ``renderer/`` folder (text-to-image, ``task.decoder=layout``)."""
    L, r = "layout", r"renderer/config\.json: "
    sub = r"config\.json: renderer\.folder must name a subfolder of the model folder"
    for label, value in (("parent", "../outside"), ("absolute", "/tmp"), ("dot", "."), ("backslash", "..\\outside")):
        out.append(Case(f"renderer_folder_{label}", cfg_edit(lambda c, value=value: c["renderer"].update(folder=value)),
                        U, sub, L))
    out += [
        Case("renderer_folder_number", cfg_edit(lambda c: c["renderer"].update(folder=7)), M,
             r"config\.json: renderer\.folder must be a str", L),
        Case("renderer_folder_missing", lambda f, x, n: shutil.rmtree(f / "renderer"), F,
             r"renderer: config\.json names the layout renderer folder", L),
        Case("renderer_entry_target", cfg_edit(lambda c: c["renderer"].update(loader={"_target_": "os.system"})), U,
             r"config\.json: key 'renderer\.loader\._target_'", L),
        Case("renderer_entry_unknown_key", cfg_edit(lambda c: c["renderer"].update(module="evil.py")), M,
             r"config\.json: unknown renderer key", L),
        Case("renderer_entry_format", cfg_edit(lambda c: c["renderer"].update(format="pickle")), M,
             r"config\.json: renderer\.format 'pickle' is not", L),
        Case("renderer_entry_string", cfg_edit(lambda c: c.update(renderer="renderer")), M,
             r"config\.json: key 'renderer' has an invalid value", L),
        Case("renderer_dir_symlink_out", link_out("renderer"), U, r"renderer: points to .*outside the model folder", L),
        Case("renderer_weights_symlink_out", link_out(RR), U,
             re.escape(RR) + r": points to .*outside the model folder", L),
        Case("renderer_cfg_target", renderer_cfg_edit(lambda c: c.update(_target_="os.system")), U,
             r + r"key '_target_'", L),
        Case("renderer_cfg_unknown_key", renderer_cfg_edit(lambda c: c.update(module="evil")), M,
             r + "unknown renderer config key", L),
        Case("renderer_cfg_width_huge", renderer_cfg_edit(lambda c: c.update(width=10**9)), M,
             r + r"LayoutRendererConfig\.width must be an int in", L),
        Case("renderer_cfg_words_huge", renderer_cfg_edit(lambda c: c.update(colours=[f"c{i}" for i in range(5000)])),
             M, r + r"LayoutRendererConfig\.colours has 5000 words", L),
        Case("renderer_cfg_not_utf8", write("renderer/config.json", b'{"width": "\xff"}'), M, r + "not UTF-8", L),
        Case("renderer_weights_pickle", payload_at(RR, unlink=()), M,
             re.escape(RR) + ": not a valid safetensors file", L),
        Case("renderer_weights_resized", weights_edit(lambda s: s.update(
            {k: torch.zeros(3, 3) for k in list(s)[:1]}), RR), M, re.escape(RR) + r": tensor '.*' has shape \[3, 3\]", L),
        Case("renderer_weights_extra_tensor", weights_edit(lambda s: s.update(evil=torch.zeros(1)), RR), M,
             re.escape(RR) + r".*'evil'", L),
        # harmless: a stray pickle beside the renderer's safetensors is never read
        Case("stray_pickle_beside_renderer", payload_at("renderer/renderer.bin", unlink=()), None, "", L),
    ]


def corpus() -> list[Case]:
    """Every tampered-folder case."""
    out: list[Case] = []
    for add in (_pickle_cases, _target_cases, _backbone_cases, _symlink_cases, _safetensors_cases, _tensor_cases,
                _config_cases, _tokenizer_cases, _image_codes_cases, _renderer_cases, _florence_cases):
        add(out)
    names = [c.name for c in out]
    assert len(names) == len(set(names)), "duplicate case names"
    return out


# ------------------------------------------------------------------------------------------------
# Base folders and entry points
# ------------------------------------------------------------------------------------------------
def make_context(root: Path) -> Ctx:
    """Save the two real tiny models the cases start from."""
    import numpy as np
    from PIL import Image

    import zoo
    from modalities.image_codes import ImageCodeTokenizer, VQConfig
    from modalities.text import TextTokenizer
    from zoo.pretrained import Pretrained

    tok = TextTokenizer.train(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = zoo.create_model("test-tiny", vocab={"text_size": tok.vocab_size, "image_code_size": 16, "loc_bins": 4})
    caption = Pretrained(model.eval(), tok, tasks={"caption": {"max_new_tokens": 4}})
    caption = caption.save_pretrained(root / "base" / "caption")
    vq = ImageCodeTokenizer.from_config(VQConfig(**TINY_VQ)).eval()
    t2i_model = zoo.create_model("test-tiny", max_positions=80,
                                 vocab={"text_size": tok.vocab_size, "image_code_size": 16})
    t2i = Pretrained(t2i_model.eval(), tok, tasks={"text_to_image": {"guidance_scale": 2.0, "top_k": 4}},
                     image_tokenizer=vq).save_pretrained(root / "base" / "t2i")
    image = root / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    for d in ("outside", "markers", "cases", "hub", "out"):
        (root / d).mkdir()
    return Ctx(root, caption, t2i, root / "outside", root / "markers", image)


def make_layout_base(root: Path) -> Path:
    """A real tiny layout-route text-to-image model (planner + ``renderer/``)."""
    import zoo
    from modalities.text import TextTokenizer
    from zoo.layout_renderer import LayoutRenderer, LayoutRendererConfig
    from zoo.pretrained import Pretrained

    tok = TextTokenizer.train(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = zoo.create_model("test-tiny", max_positions=80, vocab={"text_size": tok.vocab_size, "loc_bins": 8})
    renderer = LayoutRenderer(LayoutRendererConfig(width=8, depth=1, embed_dim=4)).eval()
    return Pretrained(model.eval(), tok, tasks={"text_to_image": {}}, renderer=renderer,
                      max_layout_len=24).save_pretrained(root / "layout")


def build_case(case: Case, ctx: Ctx) -> Path:
    folder = ctx.root / "cases" / case.name
    shutil.copytree(ctx.base(case.base), folder)
    case.build(folder, ctx, case.name)
    return folder


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def via_load(folder: Path, case: Case, ctx: Ctx) -> None:
    import zoo

    zoo.load(folder, allow_pickle=case.allow_pickle)


def via_hub(folder: Path, case: Case, ctx: Ctx) -> None:
    """``zoo.load("hf-hub:tampered/<case>")`` from a Hub cache laid out by hand, offline."""
    import zoo

    commit = f"{abs(hash(case.name)):040x}"[:40]
    repo = ctx.root / "hub" / f"models--tampered--{case.name.replace('_', '-')}"
    snap = repo / "snapshots" / commit
    if not snap.exists():
        shutil.copytree(folder, snap, symlinks=True)
        for link in [p for p in snap.rglob("*") if p.is_symlink()]:  # keep each link pointing where it did
            target = (folder / link.relative_to(snap)).resolve()
            link.unlink()
            link.symlink_to(target)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    with _env(HF_HUB_CACHE=str(ctx.root / "hub"), HF_HUB_OFFLINE="1"):
        zoo.load(f"hf-hub:tampered/{case.name.replace('_', '-')}", allow_pickle=case.allow_pickle)


def via_predict(folder: Path, case: Case, ctx: Ctx) -> None:
    """``zoo-predict`` (its ``main``; errors become ``SystemExit("error: ...")``)."""
    from zoo.predict import main

    if case.base in ("t2i", "layout"):
        args = ["task=t2i", "input=a red circle", f"out={ctx.root / 'out' / case.name}"]
    elif case.base in FLORENCE_BASES:
        args = ["task=detect", f"input={ctx.image}", "max_new_tokens=4", f"out={ctx.root / 'out' / case.name}.json"]
    else:
        args = ["task=caption", f"input={ctx.image}"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main([f"pretrained={folder}", *args, f"allow_pickle={str(case.allow_pickle).lower()}"])


def via_eval(folder: Path, case: Case, ctx: Ctx) -> None:
    """What ``zoo-eval ckpt=<folder>`` loads the model with (it never passes allow_pickle)."""
    from tasks.cli.evaluate import load_for_eval

    # a Florence-2 folder holds no mmzoo task: zoo-eval is told which (task=caption)
    load_for_eval(str(folder), "caption" if case.base in FLORENCE_BASES else None)


def via_finetune(folder: Path, case: Case, ctx: Ctx) -> None:
    """What ``zoo-finetune pretrained=<folder>`` loads the starting point with."""
    from omegaconf import OmegaConf

    from tasks.adapters import from_pretrained

    cfg = OmegaConf.create({"pretrained": str(folder), "finetune": {"mode": "full", "allow_pickle": case.allow_pickle}})
    with contextlib.redirect_stdout(io.StringIO()):
        from_pretrained(cfg)


ENTRY_POINTS: dict[str, Callable[[Path, Case, Ctx], None]] = {
    "zoo.load": via_load, "hf-hub": via_hub, "zoo-predict": via_predict, "zoo-eval": via_eval,
    "zoo-finetune": via_finetune,
}
#: entry points that pass ``allow_pickle`` on
PASSES_ALLOW_PICKLE = {"zoo.load", "hf-hub", "zoo-predict", "zoo-finetune"}


@dataclass
class Outcome:
    case: str
    entry: str
    status: str  # refused | loaded | executed | raw | not_refused
    detail: str = ""


def try_case(case: Case, folder: Path, entry: str, ctx: Ctx) -> Outcome:
    """Load ``folder`` through ``entry`` and judge what happened."""
    for m in ctx.markers.iterdir():
        m.unlink()
    exc: BaseException | None = None
    try:
        ENTRY_POINTS[entry](folder, case, ctx)
    except (Exception, SystemExit) as e:  # noqa: BLE001 — judged below
        exc = e
    if any(ctx.markers.iterdir()):
        return Outcome(case.name, entry, "executed", f"marker created; {type(exc).__name__ if exc else 'no error'}")
    if exc is None:
        return Outcome(case.name, entry, "loaded" if case.error is None else "not_refused")
    if isinstance(exc, SystemExit):
        msg, type_ok = str(exc.code), str(exc.code).startswith("error: ")
    else:
        msg, type_ok = str(exc), case.error is not None and isinstance(exc, _err(case.error))
    pattern = case.match
    if case.allow_pickle and entry not in PASSES_ALLOW_PICKLE and case.match_without_opt_in:
        pattern = case.match_without_opt_in
    if case.error is not None and type_ok and re.search(pattern, msg, re.S):
        return Outcome(case.name, entry, "refused", msg)
    return Outcome(case.name, entry, "raw", f"{type(exc).__name__}: {msg[:400]}")


@dataclass
class Summary:
    folders: int = 0
    attempts: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    bad: list[Outcome] = field(default_factory=list)

    def add(self, o: Outcome) -> None:
        self.attempts += 1
        self.counts[o.status] = self.counts.get(o.status, 0) + 1
        if o.status in ("executed", "raw", "not_refused"):
            self.bad.append(o)

    def __str__(self) -> str:
        c = self.counts
        lines = [f"tampered folders tried: {self.folders}",
                 f"loads attempted: {self.attempts} ({self.folders} folders x {len(ENTRY_POINTS)} entry points: "
                 f"{', '.join(ENTRY_POINTS)})",
                 f"refused with the expected clear error: {c.get('refused', 0)}",
                 f"loaded safely (harmless tampering ignored): {c.get('loaded', 0)}",
                 f"code executions (markers created): {c.get('executed', 0)}",
                 f"raw (unclear) errors: {c.get('raw', 0)}",
                 f"tampered folders loaded without a refusal: {c.get('not_refused', 0)}"]
        lines += [f"  FAIL {o.case} via {o.entry}: {o.status}: {o.detail}" for o in self.bad]
        return "\n".join(lines)


def run(root: Path, cases: list[Case] | None = None) -> Summary:
    ctx = make_context(root)
    summary = Summary()
    for case in cases or corpus():
        folder = build_case(case, ctx)
        summary.folders += 1
        for entry in ENTRY_POINTS:
            summary.add(try_case(case, folder, entry, ctx))
    return summary


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d, contextlib.chdir(d):
        summary = run(Path(d))
    print(summary)
    sys.exit(1 if summary.bad else 0)


if __name__ == "__main__":
    main()
