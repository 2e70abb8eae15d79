"""``TaskSpec``: what training (``tasks``) and inference (``zoo.pretrained``) share about one task.

A spec holds the instruction (prompt) text, how texts become ids of the unified vocabulary (the text offset),
the vocabulary ranges generation may emit, the generation defaults a saved model's ``tasks`` entry overrides,
how generated ids become outputs, and the model-card example. A task is its own file in this package plus a
:func:`register_task_spec` line; the Lightning task and the ``Pretrained`` method both read the same spec.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from zoo.vocab import EOS_ID, VocabLayout

#: generation defaults of the text-writing tasks (a model's task entry in config.json overrides them)
DEFAULT_GENERATION: dict[str, Any] = {"max_new_tokens": 32, "num_beams": 1, "length_penalty": 1.0}


# ------------------------------------------------------------------------------------------------
# Text <-> unified ids (the text range starts at ``layout.text_start``)
# ------------------------------------------------------------------------------------------------
def unified_text_ids(rows: Iterable[Sequence[int]], layout: VocabLayout) -> list[list[int]]:
    """The tokenizer's raw ids per row → ids of the unified vocabulary."""
    off = layout.text_start
    return [[int(t) + off for t in row] for row in rows]


def encode_text(tokenizer: Any, layout: VocabLayout, texts: Sequence[str], max_len: int | None = None
                ) -> list[list[int]]:
    """Unified-vocabulary ids of ``texts`` (each cut to ``max_len`` tokens; one batched tokenizer call)."""
    return unified_text_ids(tokenizer.encode_batch(list(texts), max_len), layout)


def text_batch(rows: Sequence[Sequence[int]], layout: VocabLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokenizer's raw ids per row → a padded text segment: unified ids ``[B, L]`` and mask (True = real)."""
    ids = torch.zeros(len(rows), max(1, max((len(r) for r in rows), default=0)), dtype=torch.long)
    for i, r in enumerate(unified_text_ids(rows, layout)):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return ids, ids != 0


def decode_text(tokens: torch.Tensor, layout: VocabLayout, tokenizer: Any) -> list[str]:
    """Generated unified ids ``[B, T]`` → strings (cut at the first EOS, text range only)."""
    lo, hi = layout.ranges()["text"]
    tokens = torch.as_tensor(tokens).cpu()
    before_eos = (tokens == EOS_ID).long().cumsum(1) == 0
    keep = before_eos & (tokens >= lo) & (tokens < hi)
    return tokenizer.decode_batch([(row[k] - lo).tolist() for row, k in zip(tokens, keep)])


# ------------------------------------------------------------------------------------------------
# The spec
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    """One task's shared definition (see the module docstring). The base writes text: its outputs are decoded
    from the text range; subclasses change what they need (VQA's answer trie, text-to-image's codes)."""

    name: str
    #: the ``Pretrained`` method that runs the task (named in errors about untrained tasks)
    method: str = ""
    #: the instruction; ``{}`` stands for the task's input text (a caption, ...)
    prompt: str = ""
    generation: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_GENERATION))
    #: the vocabulary ranges generation may emit (and EOS)
    vocab: tuple[str, ...] = ("text",)
    #: a line of the model card's "Load" example (``None``: no example)
    card_example: str | None = None

    def instruction(self, text: str = "") -> str:
        """The instruction text (for prompts with ``{}``: filled with ``text``, stripped)."""
        return self.prompt.format(text.strip()) if "{}" in self.prompt else self.prompt

    def allowed_tokens(self, layout: VocabLayout) -> torch.Tensor:
        """Boolean ``[V]`` mask of the ids generation may emit."""
        return layout.allowed_mask(*self.vocab)

    def allowed_tokens_for(self, layout: VocabLayout, saved: Mapping[str, Any] | None) -> torch.Tensor:
        """:meth:`allowed_tokens` of a model trained with the saved task entry ``saved``: plus the location tokens
        where it was trained to write them before its answer (``location_chain``, VQA's relation chains; they are
        dropped when decoded)."""
        allowed = self.allowed_tokens(layout)
        if (saved or {}).get("location_chain"):
            allowed = allowed | layout.allowed_mask("loc_bins", eos=False)
        return allowed

    def decode(self, tokens: torch.Tensor, layout: VocabLayout, tokenizer: Any) -> list[Any]:
        """Generated ids ``[B, T]`` → outputs (texts)."""
        return decode_text(tokens, layout, tokenizer)

    def processors(self, saved: Mapping[str, Any] | None, tokenizer: Any, layout: VocabLayout) -> list[Any]:
        """Generation processors a model trained with the saved task entry ``saved`` decodes with (none here)."""
        return []

    def generation_settings(self, saved: Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Generation settings: these defaults < a model's saved task entry (known keys) < ``overrides`` (not None)."""
        kw = {**self.generation, **{k: v for k, v in (saved or {}).items() if k in self.generation}}
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return kw


#: the spec of a task that writes text and names no registered spec (e.g. a plugin task)
TEXT_TASK = TaskSpec("text")

_SPECS: dict[str, TaskSpec] = {}


def register_task_spec(spec: TaskSpec) -> TaskSpec:
    """Add a spec to the registry (by its name); a name registered twice is an error."""
    if spec.name in _SPECS and _SPECS[spec.name] is not spec:
        raise ValueError(f"task spec {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def registered_specs() -> dict[str, TaskSpec]:
    """The registry: name → spec, in registration order."""
    return _SPECS
