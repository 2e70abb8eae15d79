"""VQA: ``[image] <question>`` → answer; closed-set decoding follows a trie over the candidate answers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from zoo.generation import PrefixTrie
from zoo.task_specs.base import TaskSpec, encode_text, register_task_spec
from zoo.vocab import VocabLayout

#: VQA's decoding modes: free text, a trie over the candidate answers, ranking every candidate
DECODING = ("open", "trie", "allcand")


@dataclass(frozen=True)
class VQASpec(TaskSpec):
    """VQA: the question is the instruction; closed-set decoding is constrained by :meth:`answer_trie`."""

    def answer_trie(self, candidates: Sequence[str], tokenizer: Any, layout: VocabLayout
                    ) -> tuple[list[list[int]], PrefixTrie]:
        """The candidate answers' unified ids and the trie over them (generation must spell one, then EOS)."""
        ids = encode_text(tokenizer, layout, list(candidates))
        return ids, PrefixTrie(ids, layout.size)

    def processors(self, saved: Mapping[str, Any] | None, tokenizer: Any, layout: VocabLayout) -> list[Any]:
        """The answer trie of a model trained with closed-set decoding (its saved candidates), else none."""
        candidates = self.closed_set(saved)
        return [] if candidates is None else [self.answer_trie(candidates, tokenizer, layout)[1]]

    @staticmethod
    def closed_set(saved: Mapping[str, Any] | None) -> list[str] | None:
        """A saved model's candidate answers when it was trained with closed-set decoding, else ``None``."""
        saved = saved or {}
        if not saved.get("candidates") or saved.get("decoding", "open") == "open":
            return None
        return list(saved["candidates"])


VQA = register_task_spec(VQASpec("vqa", method="answer"))
