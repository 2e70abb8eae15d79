"""Inference for the layout route of text-to-image: plan with the unified model, render with the saved renderer.

A model folder of that route holds ``renderer/`` (:mod:`zoo.layout_renderer`: ``config.json`` with known, typed
keys and ``renderer.safetensors``), named by the model's ``config.json`` entry::

    "renderer": {"folder": "renderer", "format": "mmzoo.LayoutRenderer", "max_layout_len": 48}

:class:`zoo.pretrained.Pretrained` calls :func:`load_renderer` / :func:`renderer_entry` when loading / saving,
and :func:`plan_layouts` / :func:`render_texts` from ``plan_layout()`` / ``generate_image()``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from zoo.layout_plan import layout_prompt, parse_layout
from zoo.layout_renderer import FORMAT, Layout, LayoutRenderer

RENDERER_DIR = "renderer"
ENTRY_KEYS = {"folder": str, "format": str, "max_layout_len": int}


def renderer_entry(renderer: LayoutRenderer, max_layout_len: int) -> dict[str, Any]:
    """The ``config.json`` entry that names a saved renderer."""
    return {"folder": RENDERER_DIR, "format": FORMAT, "max_layout_len": int(max_layout_len)}


def check_entry(entry: Any, where: str) -> dict[str, Any]:
    """Validate a ``config.json`` ``renderer`` entry: exactly :data:`ENTRY_KEYS` with their types, a plain
    subfolder name and the renderer format."""
    from zoo.loading import ModelFolderError, UnsafeModelError

    if not isinstance(entry, dict):
        raise ModelFolderError(f"{where}: 'renderer' must be an object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise ModelFolderError(f"{where}: unknown renderer key(s) {unknown}; known: {sorted(ENTRY_KEYS)}")
    for key, typ in ENTRY_KEYS.items():
        v = entry.get(key)
        if not isinstance(v, typ) or isinstance(v, bool):
            raise ModelFolderError(f"{where}: renderer.{key} must be a {typ.__name__}, got {v!r:.100}")
    sub = entry["folder"]
    if sub in ("", ".", "..") or Path(sub).name != sub or "\\" in sub:
        raise UnsafeModelError(f"{where}: renderer.folder must name a subfolder of the model folder, got {sub!r}")
    if entry["format"] != FORMAT:
        raise ModelFolderError(f"{where}: renderer.format {entry['format']!r} is not {FORMAT!r}")
    if not 5 <= entry["max_layout_len"] <= 4096:
        raise ModelFolderError(f"{where}: renderer.max_layout_len must be in [5, 4096], got {entry['max_layout_len']}")
    return entry


def load_renderer(root: Path, folder: Path, entry: Any, where: str) -> tuple[LayoutRenderer, int]:
    """The renderer a model folder names (reads confined to ``root``), and the longest layout its planner writes."""
    entry = check_entry(entry, where)
    sub = Path(folder) / entry["folder"]
    if not sub.exists() and not sub.is_symlink():
        raise FileNotFoundError(f"{sub}: config.json names the layout renderer folder {entry['folder']!r}, but it is "
                                "missing; re-export the model (zoo-export)")
    return LayoutRenderer.from_pretrained(sub, root), entry["max_layout_len"]


@torch.no_grad()
def plan_layouts(bundle: Any, texts: Sequence[str], batch_size: int = 32) -> list[Layout]:
    """Greedy layout plans of captions (stage 1): the unified model writes text with location tokens."""
    from zoo.generation import generate
    from zoo.task_specs.text_to_image import LAYOUT_PLAN

    renderer = bundle.renderer
    allowed = LAYOUT_PLAN.allowed_tokens(bundle.layout).to(bundle.device)
    max_len = bundle.model.cfg.max_positions
    out: list[Layout] = []
    bundle.model.eval()
    for i in range(0, len(texts), batch_size):
        cond = {"text": bundle._text_segment([layout_prompt(str(t)) for t in texts[i:i + batch_size]], max_len)}
        with bundle.autocast():
            tokens = generate(bundle.model, cond, max_new_tokens=bundle.max_layout_len, allowed=allowed)
        for row in tokens.cpu().tolist():
            out.append(parse_layout(row, bundle.layout, bundle.tokenizer, renderer.cfg)[0])
    return out


@torch.no_grad()
def render_texts(bundle: Any, texts: Sequence[str], batch_size: int = 32) -> tuple[torch.Tensor, list[Layout]]:
    """Images ``[B,3,S,S]`` in ``[0, 1]`` (CPU) of captions and the layouts they were drawn from."""
    layouts = plan_layouts(bundle, texts, batch_size)
    return bundle.renderer.render(layouts, batch_size), layouts
