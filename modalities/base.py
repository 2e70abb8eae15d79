"""The modality protocol: one :class:`Modality` record per modality, registered by its own file.

A modality file ends with one ``register_modality(...)`` line giving its config dataclass (``to_dict`` /
``from_dict``), the CPU preprocessor factory, the batch collate of its segment, the ``embedder(cfg, d_model)``
module factory, whether it takes a modality-type embedding, and the checks of its saved config. Shared code
(model, loading, bundles, collate) looks a modality up here instead of branching on its name. A modality
registered outside mmzoo (a test, a plug-in) needs no change to library files.

Modality-type embedding rows: models saved before this registry have a 4-row table ``text, image, image_codes,
sensor``; those modalities keep their row (``legacy_type_index``), and a new typed modality gets the next free row
of the models that use it (``ModelConfig.type_index`` records the mapping), so registering a modality never changes
the shape of a model that does not use it.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch

Check = Callable[[Any], bool]

#: mmzoo's own modality files, imported on first lookup (each registers itself)
BUILTIN_MODULES = ("modalities.text", "modalities.image", "modalities.image_codes", "modalities.sensor",
                   "modalities.florence_image")


# ------------------------------------------------------------------------------------------------
# Value checks of saved configs (plain predicates: JSON value → ok)
# ------------------------------------------------------------------------------------------------
def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_nonneg(v: Any) -> bool:
    return is_int(v) and v >= 0


def is_pos(v: Any) -> bool:
    return is_int(v) and v >= 1


def upto(limit: int, low: int = 1) -> Check:
    return lambda v: is_int(v) and low <= v <= limit


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def is_str(v: Any) -> bool:
    return isinstance(v, str)


def is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def optional(check: Check) -> Check:
    return lambda v: v is None or check(v)


def list_of(check: Check, n: int | None = None) -> Check:
    return lambda v: isinstance(v, list) and (n is None or len(v) == n) and all(check(x) for x in v)


_IDENT = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def is_ident(v: Any) -> bool:
    return isinstance(v, str) and bool(_IDENT.fullmatch(v))


def check_for_type(tp: Any) -> Check:
    """The JSON value check of a config field annotated ``tp`` (int, float, str, bool, ``X | None``,
    ``list[X]``, ``tuple[X, ...]`` / fixed tuples, ``dict``); raises ``TypeError`` for anything else."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return is_bool
    if tp is int:
        return is_int
    if tp is float:
        return is_num
    if tp is str:
        return is_str
    if tp is dict or origin is dict:
        return is_dict
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = check_for_type(rest[0]) if len(rest) == 1 else (lambda v: any(check_for_type(a)(v) for a in rest))
        return optional(inner) if len(rest) < len(args) else inner
    if origin is list:
        return list_of(check_for_type(args[0]) if args else (lambda v: True))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return list_of(check_for_type(args[0]))
        if args and all(a == args[0] for a in args):
            return list_of(check_for_type(args[0]), len(args))
    raise TypeError(f"no JSON check for a config field of type {tp!r}; give one in the modality's field_checks")


# ------------------------------------------------------------------------------------------------
# Config dataclasses
# ------------------------------------------------------------------------------------------------
def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


class ModalityConfig:
    """Mixin of modality config dataclasses: ``to_dict`` (JSON-ready: tuples as lists) and ``from_dict``
    (unknown keys refused)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)} (known: {sorted(names)})")
        return cls(**d)


# ------------------------------------------------------------------------------------------------
# The protocol and the registry
# ------------------------------------------------------------------------------------------------
def stack(items: list[torch.Tensor]) -> torch.Tensor:
    """The default collate of a modality segment: one tensor per sample, stacked."""
    return torch.stack(items)


@dataclass(frozen=True)
class PretrainableBackbone:
    """How ``model.image_pretrain`` (dense scene pretraining, ``tasks/tools/backbone_pretrain.py``) pretrains, loads
    and freezes a modality's backbone.

    ``target(cfg)``: what to pretrain, from the modality's config dict (the architecture's with the run's overrides):
    ``backbone`` (``timm:<name>``), ``out_index`` (the stage the model reads), ``image_size``, ``mean``, ``std``
    and, for a timm model built with size arguments, ``tower_kwargs``; ``module(embedder)``: the pretrained part of
    a built embedder (what ``freeze: true`` fixes). The weights file reaches the model one of two ways:
    ``config_for(path)``, config keys that make the embedder load it when built, or ``load(embedder, path)``, which
    loads it into the built embedder.
    """

    target: Callable[[dict[str, Any]], dict[str, Any]]
    module: Callable[[torch.nn.Module], torch.nn.Module]
    config_for: Callable[[str], dict[str, Any]] | None = None
    load: Callable[[torch.nn.Module, str], None] | None = None


@dataclass(frozen=True)
class Modality:
    """Everything shared code needs to know about one modality.

    ``config``: its config dataclass (``to_dict`` / ``from_dict``), saved under ``ModelConfig.modalities[name]``;
    ``embedder(cfg, d_model)``: the ``nn.Module`` that embeds a segment, called as ``module(value)`` or
    ``module(*value)`` for a tuple, returning ``(x [B,S,d], mask [B,S])`` (``None``: not an encoder input of its
    own, e.g. text, which uses the shared token embedding); ``preprocess(cfg)``: the CPU preprocessor (picklable);
    ``collate(items)``: a batch of its per-sample values; ``typed``: takes a modality-type embedding;
    ``field_checks``: per-field checks of the saved config, overriding those derived from the dataclass's field
    types (bounds, names); ``check(d)``: a further check of a saved config (raises ``ValueError``);
    ``pretrainable``: how its backbone is pretrained on dense scene labels (:class:`PretrainableBackbone`), if it can be.
    """

    name: str
    config: type | None = None
    embedder: Callable[[Any, int], torch.nn.Module] | None = None
    preprocess: Callable[[Any], Callable[..., Any]] | None = None
    collate: Callable[[list[Any]], Any] = stack
    typed: bool = True
    legacy_type_index: int | None = None
    field_checks: dict[str, Check] = field(default_factory=dict)
    check: Callable[[dict[str, Any]], None] | None = None
    pretrainable: PretrainableBackbone | None = None

    @property
    def is_input(self) -> bool:
        """Whether it is a configurable encoder input (has a config and an embedder)."""
        return self.config is not None and self.embedder is not None

    def make_config(self, d: dict[str, Any]) -> Any:
        if self.config is None:
            raise ValueError(f"modality {self.name!r} has no config")
        return self.config.from_dict(dict(d))

    def full_config(self, d: dict[str, Any]) -> dict[str, Any]:
        """The saved config with every field written out (defaults and fitted statistics)."""
        return self.make_config(d).to_dict() if self.config is not None else dict(d)

    def build_embedder(self, d: dict[str, Any], d_model: int) -> torch.nn.Module:
        if self.embedder is None:
            raise ValueError(f"modality {self.name!r} has no embedder of its own")
        return self.embedder(self.make_config(d), d_model)

    def preprocessor(self, d: dict[str, Any]) -> Callable[..., Any]:
        if self.preprocess is None:
            raise NotImplementedError(f"no preprocessing for modality {self.name!r}")
        return self.preprocess(self.make_config(d))

    def schema(self) -> dict[str, Check]:
        """The saved config's keys and the check of each value: from the config dataclass's field types, with
        :attr:`field_checks` overriding (every field has a check; unknown keys are refused by the loader)."""
        if self.config is None:
            return {}
        hints = typing.get_type_hints(self.config)
        return {f.name: self.field_checks.get(f.name) or check_for_type(hints[f.name])
                for f in dataclasses.fields(self.config)}


_REGISTRY: dict[str, Modality] = {}


def _origin(m: Modality) -> tuple[str, str] | None:
    return None if m.config is None else (m.config.__module__, m.config.__qualname__)
_builtins_loaded = False


def register_modality(name: str, **spec: Any) -> Modality:
    """Register modality ``name`` (keyword arguments: the :class:`Modality` fields) and return its record.
    Registering a name twice replaces the record only when it is equal (re-imports); otherwise it is refused."""
    if not is_ident(name):
        raise ValueError(f"modality name {name!r} must be a plain name")
    mod = Modality(name=name, **spec)
    old = _REGISTRY.get(name)
    if old is not None and _origin(old) != _origin(mod):
        raise ValueError(f"modality {name!r} is already registered (config {_origin(old)})")
    if mod.legacy_type_index is not None:
        clash = [m.name for m in _REGISTRY.values() if m.name != name and m.legacy_type_index == mod.legacy_type_index]
        if clash:
            raise ValueError(f"modality {name!r}: legacy type index {mod.legacy_type_index} is {clash[0]!r}'s")
    _REGISTRY[name] = mod
    return mod


def unregister_modality(name: str) -> None:
    """Remove a modality registered outside mmzoo (tests, plug-ins); mmzoo's own modalities stay."""
    if name in _REGISTRY and _REGISTRY[name].legacy_type_index is None and \
            (_origin(_REGISTRY[name]) or ("",))[0] not in BUILTIN_MODULES:
        del _REGISTRY[name]


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def get_modality(name: str) -> Modality:
    """The registered modality ``name``; ``KeyError`` naming the known ones otherwise."""
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown modality {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def list_modalities() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def legacy_type_index() -> dict[str, int]:
    """Modality → type-embedding row of models saved before the registry (``text, image, image_codes, sensor``)."""
    _load_builtins()
    return {m.name: m.legacy_type_index for m in sorted(_REGISTRY.values(), key=lambda m: m.legacy_type_index or 0)
            if m.legacy_type_index is not None}
