"""Key tables: map a published state dict onto ours, every tensor used exactly once.

A table is data: ``{scope: [(our_key, their_key(s), op), ...]}``. Keys hold placeholders filled per scope:
``global`` (none), ``enc`` / ``dec`` (``{i}``: encoder / decoder layer), ``stage`` (``{s}``: DaViT stages 1..3),
``block`` (``{s}``, ``{b}``: block ``b`` of stage ``s``). Ops (a closed set, nothing is looked up by name):

- ``copy``: the tensor as is;   ``t``: transposed (a ``[in, out]`` matrix parameter → a Linear weight);
- ``cat``: their tensors concatenated along dim 0 (separate q/k/v projections → our fused one);
- ``vocab``: rows 0 and 1 swapped along the vocabulary axis (BART's ``<s>, <pad>`` → our ``<pad>, <s>``);
  a ``[1, V]`` bias is flattened to ``[V]``.

``aliases`` name tied copies (e.g. ``lm_head.weight`` of the shared embedding): where present they must equal
their source and count as used.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from zoo.loading import UPCAST_FROM, ModelFolderError

Entry = tuple[str, "str | Sequence[str]", str]
Table = dict[str, list[Entry]]
OPS = ("copy", "t", "cat", "vocab")


class KeyMapError(ModelFolderError, KeyError):
    """A checkpoint does not match its key table (a missing, unused or misshapen tensor); the message names the
    tensor and the file."""

    def __str__(self) -> str:  # KeyError quotes its message; print it plainly
        return str(self.args[0]) if self.args else ""


def expand(table: Table, sizes: dict[str, int | Sequence[int]]) -> list[tuple[str, list[str], str]]:
    """Entries with their placeholders filled: ``sizes`` gives ``enc``/``dec`` layer counts and ``depths`` (per
    DaViT stage)."""
    out: list[tuple[str, list[str], str]] = []

    def add(ours: str, theirs: "str | Sequence[str]", op: str, **kw: int) -> None:
        if op not in OPS:
            raise ValueError(f"key table: unknown op {op!r} for {ours!r}; known: {OPS}")
        names = [theirs] if isinstance(theirs, str) else list(theirs)
        out.append((ours.format(**kw), [n.format(**kw) for n in names], op))

    for scope, entries in table.items():
        for ours, theirs, op in entries:
            if scope == "global":
                add(ours, theirs, op)
            elif scope in ("enc", "dec"):
                for i in range(int(sizes[scope])):  # type: ignore[arg-type]
                    add(ours, theirs, op, i=i)
            elif scope == "stage":
                for s in range(1, len(sizes["depths"])):  # type: ignore[arg-type]
                    add(ours, theirs, op, s=s)
            elif scope == "block":
                for s, depth in enumerate(sizes["depths"]):  # type: ignore[arg-type]
                    for b in range(depth):
                        add(ours, theirs, op, s=s, b=b)
            else:
                raise ValueError(f"key table: unknown scope {scope!r}")
    return out


def _swap01(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1) if t.ndim == 2 and t.shape[0] == 1 else t
    perm = torch.arange(t.shape[0])
    perm[0], perm[1] = 1, 0
    return t.index_select(0, perm)


def _their_shapes(op: str, n: int, want: torch.Size) -> list[tuple[int, ...]]:
    """The shapes a published tensor may have to give ``want`` through ``op`` (one of ``n`` for ``cat``)."""
    if op == "t":
        return [tuple(reversed(want))] if len(want) == 2 else []
    if op == "cat":
        return [(want[0] // n, *want[1:])] if len(want) >= 1 and want[0] % n == 0 else []
    if op == "vocab" and len(want) == 1:
        return [tuple(want), (1, want[0])]
    return [tuple(want)]


def _check_tensor(name: str, got: torch.Tensor, shapes: list[tuple[int, ...]], dtype: torch.dtype, where: str,
                  config: str) -> None:
    if tuple(got.shape) not in shapes:
        need = " or ".join(str(list(s)) for s in shapes) or "another shape"
        raise KeyMapError(f"{where}: tensor {name!r} has shape {list(got.shape)} but the architecture in {config} "
                          f"needs {need}")
    if got.dtype != dtype and not (dtype == torch.float32 and got.dtype in UPCAST_FROM):
        raise KeyMapError(f"{where}: tensor {name!r} is {got.dtype} but the model needs {dtype} (only float16 / "
                          "bfloat16 are upcast to float32)")


def convert(state: dict[str, torch.Tensor], entries: Iterable[tuple[str, list[str], str]],
            aliases: Sequence[tuple[str, str]] = (), where: str = "checkpoint",
            expected: dict[str, torch.Tensor] | None = None, config: str = "config.json") -> dict[str, torch.Tensor]:
    """Their ``state`` → our state dict. Raises :class:`KeyMapError` naming a missing or an unused key, and, given
    our ``expected`` state dict (meta tensors suffice), a tensor of the wrong shape or dtype before any op runs."""
    entries = list(entries)
    used: set[str] = set()
    for key, theirs, op in entries:
        missing = [n for n in theirs if n not in state]
        if missing:
            raise KeyMapError(f"{where}: tensor {missing[0]!r} is missing (needed for {key!r})")
        dup = [n for n in theirs if n in used]
        if dup:
            raise KeyMapError(f"{where}: tensor {dup[0]!r} is mapped twice by the key table")
        used.update(theirs)
        if expected is not None:
            if key not in expected:
                raise KeyMapError(f"{where}: the key table maps {theirs[0]!r} to {key!r}, which the architecture in "
                                  f"{config} does not have")
            shapes = _their_shapes(op, len(theirs), expected[key].shape)
            for n in theirs:
                _check_tensor(n, state[n], shapes, expected[key].dtype, where, config)
    for alias, source in aliases:
        if alias in state:
            a, b = state[alias], state.get(source)
            if b is None or a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
                raise KeyMapError(f"{where}: tensor {alias!r} should be a tied copy of {source!r} but differs")
            used.add(alias)
    unused = sorted(set(state) - used)
    if unused:
        raise KeyMapError(f"{where}: tensor {unused[0]!r} is not used by the key table "
                          f"({len(unused)} unused: {unused[:5]})")
    ours: dict[str, torch.Tensor] = {}
    for key, theirs, op in entries:
        ts = [state[n] for n in theirs]
        if op == "copy":
            ours[key] = ts[0]
        elif op == "t":
            ours[key] = ts[0].t()
        elif op == "cat":
            ours[key] = torch.cat(ts, dim=0)
        else:  # vocab
            ours[key] = _swap01(ts[0])
    return ours


def invert(ours: dict[str, torch.Tensor], entries: Iterable[tuple[str, list[str], str]]) -> dict[str, torch.Tensor]:
    """Our state dict → theirs (the inverse of :func:`convert`; ``cat`` splits into equal parts)."""
    theirs: dict[str, torch.Tensor] = {}
    for key, names, op in entries:
        t = ours[key]
        if op == "copy":
            theirs[names[0]] = t
        elif op == "t":
            theirs[names[0]] = t.t().contiguous()
        elif op == "cat":
            for n, part in zip(names, t.chunk(len(names), dim=0)):
                theirs[n] = part.contiguous()
        else:
            theirs[names[0]] = _swap01(t)
    return theirs
