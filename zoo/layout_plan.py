"""Scene layouts as text with location tokens: text-to-image's first stage ("plan, then render").

The unified model reads ``what is the layout of the image? caption: <text>`` and writes the layout as one
sequence of the unified vocabulary (LayoutGPT-style: the object, then its box)::

    <tone> <size> <colour> <shape> <loc x0><loc y0><loc x1><loc y1> <size> <colour> <shape> <loc …>×4 …

e.g. ``dark small red triangle <loc 12><loc 20><loc 31><loc 39> large blue circle <loc …>×4``: one entry per
object, left to right, its words then its box as four location tokens (the same ``loc_bins`` bins per side as
grounding). Writing the words first lets the box follow from them (a "small" object gets a small box).
:func:`layout_target` writes the ids of a layout, :func:`parse_layout` reads generated ids back (entries that
are not known words followed by four location tokens are dropped and counted).
"""
from __future__ import annotations

from typing import Any, Sequence

from zoo.layout_renderer import Layout, LayoutRendererConfig
from zoo.task_specs.base import unified_text_ids
from zoo.vocab import EOS_ID, VocabLayout

#: ``what is the layout of the image? caption: <text>`` → the layout sequence
LAYOUT_PROMPT = "what is the layout of the image? caption: {}"


def layout_prompt(caption: str) -> str:
    """The layout-planning instruction for one caption."""
    return LAYOUT_PROMPT.format(caption.strip())


def box_to_bins(box: Sequence[float], loc_bins: int) -> list[int]:
    """``(x0, y0, x1, y1)`` in ``[0, 1]`` → four bin indices in ``[0, loc_bins)``."""
    if loc_bins < 2:
        raise ValueError(f"layouts need location tokens; the model's vocabulary has loc_bins={loc_bins}")
    n = loc_bins - 1
    return [min(max(round(float(v) * n), 0), n) for v in box]


def bins_to_box(bins: Sequence[int], loc_bins: int) -> tuple[float, float, float, float]:
    n = loc_bins - 1
    return tuple(b / n for b in bins)  # type: ignore[return-value]


def quantize_box(box: Sequence[float], loc_bins: int) -> tuple[float, float, float, float]:
    """The box the model can write: ``box`` rounded to the location bins (what the renderer trains on)."""
    return bins_to_box(box_to_bins(box, loc_bins), loc_bins)


def layout_pieces(lay: Layout, layout: VocabLayout, tokenizer: Any, cache: dict[str, list[int]] | None = None
                  ) -> tuple[list[int], list[list[int]]]:
    """The unified ids of a layout's tone word and of each object's entry (its words, then 4 location tokens);
    ``cache`` memoises the text ids of repeated words."""
    cache = {} if cache is None else cache

    def text(s: str) -> list[int]:
        if s not in cache:
            cache[s] = unified_text_ids([tokenizer.encode(s)], layout)[0]
        return cache[s]

    objects = [text(f"{o['size']} {o['colour']} {o['shape']}")
               + [layout.loc_start + b for b in box_to_bins(o["box"], layout.loc_bins)] for o in lay.objects]
    return text(lay.tone), objects


def layout_target(lay: Layout, layout: VocabLayout, tokenizer: Any) -> list[int]:
    """Unified ids of a layout (without BOS/EOS): the tone word, then per object its words and 4 location tokens."""
    tone, objects = layout_pieces(lay, layout, tokenizer)
    return tone + [t for o in objects for t in o]


def parse_layout(ids: Sequence[int], layout: VocabLayout, tokenizer: Any, words: LayoutRendererConfig
                 ) -> tuple[Layout, int]:
    """Generated unified ids → ``(Layout, number of dropped entries)``.

    Reading stops at EOS. Each entry is a run of text naming one size, colour and shape of ``words`` followed by
    four location tokens; the first run also names the tone (the first of ``words.tones`` when it names none).
    An entry whose text does not name exactly one known word of each kind, with other than four location
    tokens, or with a box of zero area is dropped; so is trailing text without a box."""
    lo, hi = layout.text_start, layout.image_code_start
    loc_lo, loc_hi = layout.loc_start, layout.size
    runs: list[tuple[list[int], list[int]]] = [([], [])]  # (text ids, location bins)
    for t in ids:
        t = int(t)
        if t == EOS_ID:
            break
        if loc_lo <= t < loc_hi:
            runs[-1][1].append(t - loc_lo)
        elif lo <= t < hi:
            if runs[-1][1]:  # text after a box starts the next entry
                runs.append(([], []))
            runs[-1][0].append(t - lo)
    tone = words.tones[0]
    objects, dropped = [], 0
    for i, (text, locs) in enumerate(runs):
        toks = tokenizer.decode(text).split() if text else []
        if i == 0:
            tone = next((w for w in toks if w in words.tones), tone)
            toks = [w for w in toks if w not in words.tones]
            if not toks and not locs:
                continue
        found = {}
        for key, vocab in (("size", words.sizes), ("colour", words.colours), ("shape", words.shapes)):
            hits = [w for w in toks if w in vocab]
            if len(hits) == 1:
                found[key] = hits[0]
        box = bins_to_box(locs, layout.loc_bins) if len(locs) == 4 else None
        if box is None or len(found) != 3 or box[2] <= box[0] or box[3] <= box[1]:
            dropped += 1
            continue
        objects.append({"box": box, **found})
    return Layout(tone, objects), dropped


def layout_text(lay: Layout, image_size: int = 64) -> str:
    """A readable one-line form of a layout (boxes in pixels), for sample grids and logs."""
    parts = [lay.tone]
    for o in lay.objects:
        x0, y0, x1, y1 = (round(v * image_size) for v in o["box"])
        parts.append(f"[{x0},{y0},{x1},{y1}] {o['size']} {o['colour']} {o['shape']}")
    return "; ".join(parts)
