"""Relation questions answered through a chain: both objects' locations, then the answer word.

``where is the <A> relative to the <B>?`` asks the model to find two objects by their words and compare
their positions in one hop. With ``data.relation_chain`` (a grounding file, e.g. Shapes' ``refs_train.json``)
the training target of such a question becomes ``<x_A> <y_A> <x_B> <y_B> <answer>``: the centres of A and B
as location tokens of the unified vocabulary (the bins grounding uses), then the word. The decoder writes the
two locations first, so the last step compares its own outputs. Only text tokens are scored: the location
tokens are dropped when predictions are decoded (:func:`zoo.task_specs.base.decode_text`).

``grid`` snaps each centre to the centre of its cell of a ``grid`` x ``grid`` grid (``4``: the 16-px tokens
ofa-tiny sees of a 64-px Shapes image), a coarser, easier location to learn than the fine bins.

``objects`` (``data.object_chain``) names the kinds of question that name one object (:data:`OBJECT_QUESTIONS`:
``colour`` what colour is the circle?, ``shape`` what shape is the red object?, ``size`` what size is the red
circle?, ``exist`` is there a red circle? answered yes) to train as ``<x> <y> <answer>`` too: each such question
then also teaches the model to find an object by its words, the step relation questions fail at while it is
being learnt.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Sequence

from tasks.data.grounding import GroundingRef
from zoo.vocab import VocabLayout

__all__ = ["RELATION_QUESTION", "OBJECT_QUESTIONS", "relation_word", "centre_loc_ids", "relation_chain",
           "object_chain", "relation_chains"]

#: the relation question: group 1 names the object asked about, group 2 the reference object
RELATION_QUESTION = re.compile(r"^\s*where is the (.+?) relative to the (.+?)\s*\?\s*$", re.IGNORECASE)
#: questions that name one object, by kind: group 1 is its name (the words its reference's phrase contains)
OBJECT_QUESTIONS = {kind: re.compile(p, re.IGNORECASE) for kind, p in (
    ("colour", r"^\s*what colour is the (.+?)\s*\?\s*$"),
    ("shape", r"^\s*what shape is the (.+?) object\s*\?\s*$"),
    ("size", r"^\s*what size is the (.+?)\s*\?\s*$"),
    ("exist", r"^\s*is there an? (.+?)\s*\?\s*$"),
)}


def relation_word(dx: float, dy: float) -> str:
    """Where a point lies from another, offset ``(dx, dy)`` (image axes, y down), along the dominant axis."""
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def centre_loc_ids(x: float, y: float, layout: VocabLayout, grid: int | None = None) -> list[int]:
    """A point ``(x, y)`` in [0, 1] → two location-token ids (``layout.loc_bins`` bins per axis); with ``grid``
    the point is first moved to the centre of its cell of a ``grid`` x ``grid`` grid."""
    if layout.loc_bins < 2:
        raise ValueError(f"relation chains need location tokens; the model's vocabulary has loc_bins={layout.loc_bins}")
    n = layout.loc_bins - 1
    out = []
    for v in (x, y):
        v = min(max(v, 0.0), 1.0)
        if grid:
            v = (min(int(v * grid), grid - 1) + 0.5) / grid
        out.append(layout.loc_start + min(max(round(v * n), 0), n))
    return out


def _named(refs: Sequence[GroundingRef], name: str) -> list[tuple[float, float]]:
    """Centres of the references whose phrase holds every word of ``name`` (``small red circle`` for ``red
    circle``, ``circle`` or ``red``)."""
    words = set(name.lower().split())
    return [((r.box[0] + r.box[2]) / 2, (r.box[1] + r.box[3]) / 2) for r in refs
            if words <= set(r.sentence.lower().split())]


def relation_chain(question: str, answer: str, refs: Sequence[GroundingRef], layout: VocabLayout,
                   grid: int | None = None) -> list[int] | None:
    """The four location ids ``x_A y_A x_B y_B`` that precede ``answer`` in a relation question's chain target.

    ``refs`` are the question's image's references. Returns ``None`` (train on the plain answer) when the
    question is not a relation question, or no pair of objects named by it lies as ``answer`` says (when
    several objects share a name, the first pair that agrees with the answer is used).
    """
    m = RELATION_QUESTION.match(question)
    if m is None or answer not in ("left", "right", "above", "below"):
        return None
    for ax, ay in _named(refs, m.group(1)):
        for bx, by in _named(refs, m.group(2)):
            if (ax, ay) != (bx, by) and relation_word(ax - bx, ay - by) == answer:
                return centre_loc_ids(ax, ay, layout, grid) + centre_loc_ids(bx, by, layout, grid)
    return None


def object_chain(question: str, answer: str, refs: Sequence[GroundingRef], layout: VocabLayout,
                 grid: int | None = None, kinds: Iterable[str] = tuple(OBJECT_QUESTIONS)) -> list[int] | None:
    """The two location ids ``x y`` (the centre of the one object a question of one of ``kinds`` names,
    :data:`OBJECT_QUESTIONS`) that precede ``answer``; ``None`` when the question is of no such kind, or its name
    fits no object or several (an existence question answered "no" stays a plain answer)."""
    for kind in kinds:
        m = OBJECT_QUESTIONS[kind].match(question)
        if m is not None:
            found = _named(refs, m.group(1))
            return centre_loc_ids(*found[0], layout, grid) if len(found) == 1 else None
    return None


def relation_chains(questions: Sequence[tuple[Path, str, str]], refs: Sequence[GroundingRef], layout: VocabLayout,
                    grid: int | None = None, objects: Sequence[str] = ()) -> list[list[int] | None]:
    """:func:`relation_chain` of every ``(image path, question, answer)`` with the references of its image, and
    :func:`object_chain` of the questions of the kinds ``objects`` names."""
    unknown = sorted(set(objects) - set(OBJECT_QUESTIONS))
    if unknown:
        raise ValueError(f"object chains: unknown question kinds {unknown}; known: {sorted(OBJECT_QUESTIONS)}")
    by_path: dict[Path, list[GroundingRef]] = {}
    for r in refs:
        by_path.setdefault(r.path, []).append(r)
    out = []
    for p, q, a in questions:
        chain = relation_chain(q, a, by_path.get(p, []), layout, grid)
        if chain is None and objects and RELATION_QUESTION.match(q) is None:
            chain = object_chain(q, a, by_path.get(p, []), layout, grid, objects)
        out.append(chain)
    return out
