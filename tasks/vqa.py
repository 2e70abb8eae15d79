"""Visual question answering: ``[image] <question>`` → answer text.

The datamodule reads the VQAv2 pair of files (the default, and the embedded Shapes VQA), JSONL
manifests or a Hugging Face imagefolder, validates every record before training, and tokenises
questions and answers up front. The task decodes in one of three ways (``task.decoding``):

* ``open``: free generation inside the text vocabulary (greedy or beam);
* ``trie``: generation constrained to the candidate answers by a :class:`~zoo.generation.PrefixTrie`;
* ``allcand``: every candidate is scored in one batched teacher-forced pass (the source is encoded
  once and repeated per candidate, log-probabilities summed) and the best is picked.

Scored with the official VQAv2 accuracy overall, per question type and per answer type.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from modalities.image import ImagePreprocessor
from modalities.text import TextTokenizer
from tasks.base import Seq2SeqTask
from tasks.data.collate import Seq2SeqCollator, pad_ids
from tasks.data.formats import VQARecord, read_imagefolder, read_jsonl, read_vqa
from tasks.data.coco import DataError
from tasks.data.validate import Problems, confine_roots, filter_records
from tasks.data_module import SplitInfo, TextDataModule, empty_split_error, image_preprocessor
from zoo.task_specs import decode_text, task_spec
from zoo.task_specs.vqa import DECODING
from zoo.vocab import BOS_ID, EOS_ID, PAD_ID, VocabLayout

log = logging.getLogger(__name__)


class VQASet(Dataset):
    """One item per question: preprocessed image, tokenised question and (training) answer."""

    def __init__(self, paths: list[Path], ids: list[Any], prompts: list[list[int]],
                 targets: list[list[int]] | None, preprocess: ImagePreprocessor):
        self.paths, self.ids, self.prompts, self.targets, self.preprocess = paths, ids, prompts, targets, preprocess

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"image": self.preprocess(self.paths[i]), "prompt": self.prompts[i], "id": self.ids[i]}
        if self.targets is not None:
            item["target"] = self.targets[i]
        return item


class VQAImageGroups(Dataset):
    """Training items grouped by image: one image with (up to ``questions_per_image`` of) its questions.

    The image is preprocessed and embedded once for all its questions (``encode(..., repeats=...)``),
    which makes an epoch over every question several times cheaper than one item per question.
    """

    def __init__(self, paths: list[Path], groups: list[list[int]], qids: list[Any], prompts: list[list[int]],
                 targets: list[list[int]], preprocess: ImagePreprocessor, questions_per_image: int | None = None,
                 captions: list[list[list[int]]] | None = None, caption_prompt: list[int] | None = None,
                 grounding: list[list[tuple[list[int], list[int]]]] | None = None,
                 weights: list[float] | None = None):
        self.paths, self.groups, self.qids, self.prompts, self.targets = paths, groups, qids, prompts, targets
        self.preprocess, self.k = preprocess, questions_per_image
        self.weights = torch.tensor(weights, dtype=torch.float64) if weights is not None else None
        self.captions, self.caption_prompt, self.grounding = captions, caption_prompt, grounding

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict[str, Any]:
        idx = self.groups[i]
        if self.k and len(idx) > self.k:  # draw k of the image's questions (by weight when weights are given)
            pick = (torch.multinomial(self.weights[idx], self.k) if self.weights is not None
                    else torch.randperm(len(idx))[: self.k])
            idx = [idx[j] for j in pick.tolist()]
        item = {"image": self.preprocess(self.paths[i]), "prompts": [self.prompts[j] for j in idx],
                "targets": [self.targets[j] for j in idx], "qids": [self.qids[j] for j in idx]}
        if self.captions is not None and self.captions[i]:  # auxiliary captioning target (multi-task)
            caps = self.captions[i]
            item["prompts"].append(self.caption_prompt)
            item["targets"].append(caps[int(torch.randint(len(caps), ()))])
            item["qids"].append(None)
        if self.grounding is not None and self.grounding[i]:  # auxiliary grounding target: one phrase → its box
            prompt, box = self.grounding[i][int(torch.randint(len(self.grounding[i]), ()))]
            item["prompts"].append(prompt)
            item["targets"].append(box)
            item["qids"].append(None)
        return item


class VQAGroupCollator:
    """Batches :class:`VQAImageGroups` items: ``image [b]``, ``image_counts [b]``, and per question
    ``prompt_ids/prompt_mask/tgt_in/labels [N]`` and ``ids`` (question ids)."""

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [p for s in samples for p in s["prompts"]]
        targets = [t for s in samples for t in s["targets"]]
        batch: dict[str, Any] = {"image": torch.stack([s["image"] for s in samples]),
                                 "image_counts": torch.tensor([len(s["prompts"]) for s in samples])}
        batch["prompt_ids"], batch["prompt_mask"] = pad_ids(prompts)
        batch["tgt_in"], _ = pad_ids([[BOS_ID, *t] for t in targets])
        batch["labels"], _ = pad_ids([[*t, EOS_ID] for t in targets])
        batch["ids"] = [q for s in samples for q in s["qids"]]
        return batch


def _is_positive_number(value: object) -> bool:
    """True for an int or float above 0 (not a bool, a string or NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


class VQADataModule(TextDataModule):
    """VQA data in the VQAv2, JSONL or imagefolder format; generates Shapes VQA on first use.

    ``splits`` maps ``train``/``val``/``test`` to the split's files: ``{questions, annotations}`` for
    ``vqa2``, ``{file}`` for ``jsonl``, ``{folder}`` for ``imagefolder`` (relative to ``root``). Call
    :meth:`prepare_data`, then :meth:`bind` with the model's config and layout.
    """

    def __init__(
        self,
        root: str,
        format: str = "vqa2",
        splits: dict[str, dict[str, str]] | None = None,
        image_root: str | None = None,
        image_pattern: str | None = None,
        generate: str | None = "shapes",
        shapes: dict[str, Any] | None = None,
        skip_bad: bool = False,
        check_files: str = "decode",
        tokenizer_path: str | None = None,
        tokenizer_vocab_size: int = 512,
        batch_size: int = 16,
        questions_per_image: int | None = None,
        eval_batch_size: int = 256,
        num_workers: int = 1,
        max_question_len: int = 32,
        max_answer_len: int = 8,
        max_candidates: int = 3129,
        val_limit: int | None = None,
        aux_captions: str | None = None,
        aux_grounding: str | None = None,
        relation_chain: str | None = None,
        relation_chain_grid: int | None = None,
        object_chain: list[str] | None = None,
        question_type_weights: dict[str, float] | None = None,
        allow_outside_root: bool = False,
    ):
        super().__init__()
        if format not in ("vqa2", "jsonl", "imagefolder"):
            raise ValueError(f"data.format must be vqa2|jsonl|imagefolder, got {format!r}")
        self.root = Path(root)
        self.image_root = Path(image_root) if image_root else self.root
        self.format, self.image_pattern = format, image_pattern
        self.splits = {k: dict(v) for k, v in (splits or {}).items() if v}
        self.generate, self.shapes_kwargs = generate, dict(shapes or {})
        self.skip_bad, self.check_files = skip_bad, check_files
        self.tokenizer_path, self.vocab_size = tokenizer_path, tokenizer_vocab_size
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.questions_per_image = questions_per_image
        self.max_question_len, self.max_answer_len = max_question_len, max_answer_len
        self.max_candidates, self.val_limit = max_candidates, val_limit
        self.aux_captions, self.aux_grounding = aux_captions, aux_grounding
        self.relation_chain, self.relation_chain_grid = relation_chain, relation_chain_grid
        if object_chain and not relation_chain:
            raise ValueError("data.object_chain needs data.relation_chain (the grounding file the objects' centres "
                             "come from)")
        from tasks.data.relation_chain import OBJECT_QUESTIONS

        if isinstance(object_chain, (bool, str)) or not set(object_chain or []) <= set(OBJECT_QUESTIONS):
            raise ValueError(f"data.object_chain must be a list of question kinds ({', '.join(OBJECT_QUESTIONS)}), "
                             f"got {object_chain!r}")
        self.object_chain = list(object_chain or [])
        self.question_type_weights = dict(question_type_weights or {})
        bad = {k: v for k, v in self.question_type_weights.items() if not _is_positive_number(v)}
        if bad:
            raise ValueError(f"data.question_type_weights must be positive numbers, got {bad}")
        self.allow_outside_root = allow_outside_root
        self.split_infos: dict[str, SplitInfo] = {}
        self.records: dict[str, list[VQARecord]] = {}
        self.tokenizer: TextTokenizer | None = None
        self.preprocess: ImagePreprocessor | None = None
        self.layout: VocabLayout | None = None
        self.collate = Seq2SeqCollator()

    # --- reading + validation -----------------------------------------------------------------
    def has_split(self, split: str) -> bool:
        """Whether the data has a ``split`` (``data.splits.test: null``: none to test on)."""
        return split in self.splits

    def read(self, split: str) -> list[VQARecord]:
        """The split's records, validated (bad records raise, or are skipped with ``skip_bad``)."""
        if split in self.records:
            return self.records[split]
        if split not in self.splits:
            raise ValueError(f"no {split} split configured (data.splits.{split})")
        spec = self.splits[split]
        source = self._source(split)
        problems = Problems(self.skip_bad, f"{split} split ({source})")
        if self.format == "vqa2":
            ann = spec.get("annotations")
            recs = read_vqa(self.root / spec["questions"], self.root / ann if ann else None, self.image_root,
                            self.image_pattern, problems)
        elif self.format == "jsonl":
            recs = read_jsonl(self.root / spec["file"], self.image_root if self.image_root != self.root else None,
                              "vqa", problems)
        else:
            recs = read_imagefolder(self.root / spec["folder"], "vqa", problems)
        if split == "train":
            for r in recs:
                if r.answer is None:
                    problems.report(f"{source}: {split} question {r.question_id} ({r.path.name}) has no answer "
                                    "to train on")
            recs = [r for r in recs if r.answer is not None]
        roots = confine_roots(self.allow_outside_root, self.root, self.image_root)
        recs = filter_records(recs, lambda r: r.path,
                              lambda r: f"{source}: {split} question_id={r.question_id} (image_id={r.image_id})",
                              problems, self.check_files, roots)
        problems.log()
        self.split_infos[split] = info = SplitInfo(source, len(recs), list(problems.messages))
        if not recs and split == "train":  # an empty val/test split is refused by tasks.cli.preflight unless not used
            raise DataError(f"{empty_split_error(info, split)}: nothing to train on")
        self.records[split] = recs
        return recs

    def _source(self, split: str) -> str:
        """The split's files, as named in messages."""
        spec = self.splits[split]
        if self.format == "vqa2":
            return " + ".join(str(self.root / spec[k]) for k in ("questions", "annotations") if spec.get(k))
        if self.format == "jsonl":
            return str(self.root / spec["file"])
        return str(self.root / spec["folder"] / "metadata.jsonl")

    def split_info(self, split: str) -> SplitInfo | None:
        if split not in self.splits:
            return None
        recs = self.read(split)
        info = self.split_infos[split]
        if split == "train":  # one training item per image (VQAImageGroups)
            info.units = len({r.path for r in recs})
            info.batches = info.units // self.batch_size
        return info

    def ensure_data(self) -> None:
        """Generate the embedded dataset on first use (``generate``)."""
        if self.generate == "shapes":
            from tasks.data.shapes import ShapesConfig
            from tasks.data.shapes_vqa import ensure_shapes_vqa

            ensure_shapes_vqa(self.root, ShapesConfig(**self.shapes_kwargs))
        elif self.generate:
            raise ValueError(f"unknown data generator {self.generate!r}; use 'shapes' or null")

    def prepare_data(self) -> None:
        self.ensure_data()
        for split in self.splits:
            self.read(split)  # fail here, before the long run
        self.load_tokenizer()

    def training_texts(self) -> list[str]:
        """Training questions and answers (and the auxiliary captions): what the BPE is trained on."""
        self.ensure_data()
        recs = self.read("train")
        texts = [r.question for r in recs] + [a for r in recs for a in r.answers]
        if self.aux_captions:
            from tasks.data.coco import read_coco_captions

            caps = read_coco_captions(self.root / self.aux_captions, self.image_root, check_files=False)
            texts += [task_spec("caption").prompt, *(c for r in caps for c in r.captions)]
        if self.aux_grounding:
            from tasks.data.grounding import grounding_prompt, read_grounding

            texts += [grounding_prompt(r.sentence) for r in read_grounding(self.root / self.aux_grounding, self.image_root)]
        return texts

    def tokenizer_file(self) -> Path:
        kind = "vqa" + ("-cap" if self.aux_captions else "") + ("-ground" if self.aux_grounding else "")
        return self.root / f"tokenizer-{kind}-bpe{self.vocab_size}.json"

    def model_overrides(self) -> dict[str, Any]:
        return {}

    def bind(self, model_cfg: Any, layout: VocabLayout, tokenizer: TextTokenizer | None = None) -> None:
        """Attach the model's image preprocessing and vocabulary (and optionally a pretrained tokenizer)."""
        self.preprocess = image_preprocessor(model_cfg, "VQA")
        self.attach(layout, tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if self.preprocess is None or self.layout is None:
            raise RuntimeError("VQADataModule.bind(model_cfg, layout) must be called before setup()")
        self.load_tokenizer()
        for split in self.splits:
            self.read(split)

    # --- answers / references -----------------------------------------------------------------
    def answer_candidates(self) -> list[str]:
        """The ``max_candidates`` most frequent training answers (the closed answer set)."""
        counts = Counter(r.answer for r in self.read("train"))
        return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: self.max_candidates]]

    def eval_records(self, stage: str) -> list[VQARecord]:
        recs = self.read(stage)
        return recs[: self.val_limit] if self.val_limit else recs

    def references(self, stage: str) -> dict[Any, dict[str, Any]]:
        return {r.question_id: r.annotation() for r in self.eval_records(stage)}

    def questions(self, stage: str) -> dict[Any, str]:
        return {r.question_id: r.question for r in self.eval_records(stage)}

    # --- loaders ------------------------------------------------------------------------------
    def _questions(self, recs: list[VQARecord]) -> list[list[int]]:
        """Tokenised questions; those over ``max_question_len`` are cut, with a warning naming the longest."""
        return self.encode_text([r.question for r in recs], self.max_question_len, "questions (data.max_question_len)",
                                [f"question_id={r.question_id} (image {r.path.name})" for r in recs])

    def _dataset(self, recs: list[VQARecord], train: bool) -> VQASet:
        prompts = self._questions(recs)
        targets = self.encode_text([r.answer for r in recs], self.max_answer_len) if train else None
        return VQASet([r.path for r in recs], [r.question_id for r in recs], prompts, targets, self.preprocess)

    def train_dataloader(self) -> DataLoader:
        """Batches of ``batch_size`` images, each with its questions (see :class:`VQAImageGroups`)."""
        recs = self.read("train")
        prompts = self._questions(recs)
        targets = self.encode_text([r.answer for r in recs], self.max_answer_len)
        for i, chain in enumerate(self._relation_chains(recs)):
            if chain is not None:
                targets[i] = chain + targets[i]
        by_path: dict[Path, list[int]] = {}
        for i, r in enumerate(recs):
            by_path.setdefault(r.path, []).append(i)
        captions, caption_prompt = self._aux_captions(list(by_path))
        ds = VQAImageGroups(list(by_path), list(by_path.values()), [r.question_id for r in recs], prompts, targets,
                            self.preprocess, self.questions_per_image, captions, caption_prompt,
                            self._aux_grounding(list(by_path)), self._question_weights(recs))
        return self._loader(ds, self.batch_size, shuffle=True, collate=VQAGroupCollator())

    def _question_weights(self, recs: list[VQARecord]) -> list[float] | None:
        """Each training question's draw weight from ``question_type_weights`` (1 for types not named), or
        ``None`` when none is set; a named type that no training question has is an error."""
        if not self.question_type_weights:
            return None
        types = {r.question_type for r in recs}
        unknown = sorted(set(self.question_type_weights) - types)
        if unknown:
            raise ValueError(f"data.question_type_weights names {unknown}, which no training question has "
                             f"(question types: {sorted(t for t in types if t is not None)})")
        if not self.questions_per_image:
            log.warning("data.question_type_weights has no effect with data.questions_per_image=null "
                        "(every question of an image is used each visit)")
        return [float(self.question_type_weights.get(r.question_type, 1.0)) for r in recs]

    def _aux_captions(self, paths: list[Path]) -> tuple[list[list[list[int]]] | None, list[int] | None]:
        """Tokenised captions of each training image from ``aux_captions`` (a COCO captions file), if set."""
        if not self.aux_captions:
            return None, None
        from tasks.data.coco import read_coco_captions

        problems = Problems(self.skip_bad, self.aux_captions)
        recs = read_coco_captions(self.root / self.aux_captions, self.image_root, problems=problems)
        problems.log()
        by_path = {r.path: r.captions for r in recs}
        texts = [by_path.get(p, []) for p in paths]
        flat = iter(self.encode_text([c for caps in texts for c in caps], self.max_question_len))
        return [[next(flat) for _ in caps] for caps in texts], self.encode_text([task_spec("caption").prompt], 16)[0]

    def _relation_chains(self, recs: list[VQARecord]) -> list[list[int] | None]:
        """With ``relation_chain`` (a grounding file): each relation question's four location ids that precede
        its answer in the training target (:mod:`tasks.data.relation_chain`), with ``object_chain`` also the two
        of each question that names one object; ``None`` for the others."""
        if not self.relation_chain:
            return [None] * len(recs)
        from tasks.data.grounding import read_grounding
        from tasks.data.relation_chain import relation_chains

        assert self.layout is not None
        problems = Problems(self.skip_bad, self.relation_chain)
        refs = read_grounding(self.root / self.relation_chain, self.image_root, problems)
        problems.log()
        chains = relation_chains([(r.path, r.question, r.answer) for r in recs], refs, self.layout,
                                 self.relation_chain_grid, self.object_chain)
        log.info("relation chains: %d training targets write both objects' locations before the answer",
                 sum(c is not None and len(c) == 4 for c in chains))
        if self.object_chain:
            log.info("object chains: %d training targets write the named object's location before the answer",
                     sum(c is not None and len(c) == 2 for c in chains))
        return chains

    def _aux_grounding(self, paths: list[Path]) -> list[list[tuple[list[int], list[int]]]] | None:
        """Each training image's grounding ``(prompt ids, four location ids)`` pairs from ``aux_grounding``."""
        if not self.aux_grounding:
            return None
        from tasks.data.grounding import box_to_loc_ids, grounding_prompt, read_grounding

        assert self.layout is not None
        problems = Problems(self.skip_bad, self.aux_grounding)
        refs = read_grounding(self.root / self.aux_grounding, self.image_root, problems)
        problems.log()
        prompts = self.encode_text([grounding_prompt(r.sentence) for r in refs], self.max_question_len)
        by_path: dict[Path, list[tuple[list[int], list[int]]]] = {}
        for r, p in zip(refs, prompts):
            by_path.setdefault(r.path, []).append((p, box_to_loc_ids(r.box, self.layout)))
        return [by_path.get(p, []) for p in paths]

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset(self.eval_records("val"), False), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.splits:
            raise ValueError("this dataset has no test split (data.splits.test is null)")
        return self._loader(self._dataset(self.eval_records("test"), False), self.eval_batch_size, shuffle=False)


def _metric_key(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in str(name))


class VQATask(Seq2SeqTask):
    """VQA: image + question → answer; open-ended, trie-constrained or all-candidate decoding."""

    name = "vqa"
    spec = task_spec("vqa")
    monitor_metric = "vqa_acc"

    def __init__(self, *args: Any, decoding: str = "open", candidates: list[str] | None = None,
                 candidate_chunk: int = 64, location_chain: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if decoding not in DECODING:
            raise ValueError(f"task.decoding must be one of {DECODING}, got {decoding!r}")
        self.decoding, self.candidate_chunk = decoding, candidate_chunk
        self.candidates: list[str] | None = list(candidates) if candidates else None
        self._cand: dict[str, Any] = {}
        self.location_chain = location_chain  # trained on relation chains: generation may write location tokens

    @classmethod
    def eval_settings(cls, settings: dict[str, Any], checkpoint: dict[str, Any], where: str) -> dict[str, Any]:
        """The saved settings; a model trained on relation chains keeps writing them (``location_chain``)."""
        from tasks.checkpoint import CheckpointMeta

        state = CheckpointMeta.read(checkpoint, where).state
        return {**settings, "location_chain": bool(state.get("location_chain") or settings.get("location_chain"))}

    # --- candidates ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.datamodule
        if self.candidates is None and dm is not None and hasattr(dm, "answer_candidates") and dm.has_split("train"):
            self.candidates = dm.answer_candidates()
        if dm is not None and getattr(dm, "relation_chain", None):
            if self.decoding != "open":  # closed-set decoding scores bare answers, never trained for relation questions
                raise ValueError(f"data.relation_chain trains relation answers after location tokens: it needs "
                                 f"task.decoding=open, got {self.decoding!r}")
            self.location_chain, self._allowed = True, None

    def allowed_tokens(self) -> torch.Tensor | None:
        """Text, plus the location tokens when the answers were trained as relation chains (the location
        tokens are dropped again when predictions are decoded: only the answer words are scored)."""
        if self._allowed is None:
            self._allowed = self.spec.allowed_tokens_for(self.layout, {"location_chain": self.location_chain})
        return self._allowed

    def candidate_tensors(self) -> dict[str, Any]:
        """Candidate answers as unified ids, a trie over them and teacher-forcing tensors (cached)."""
        if not self._cand:
            if not self.candidates:
                raise RuntimeError("closed-set decoding needs candidate answers (a training split or "
                                   "checkpoint['mmzoo']['candidates'])")
            ids, trie = self.spec.answer_trie(self.candidates, self.tokenizer, self.layout)
            tgt_in, _ = pad_ids([[1, *x] for x in ids])  # BOS + answer
            labels, _ = pad_ids([[*x, EOS_ID] for x in ids])  # answer + EOS
            self._cand = {"ids": ids, "trie": trie, "tgt_in": tgt_in, "labels": labels}
        return self._cand

    def checkpoint_state(self) -> dict[str, Any]:
        state = {**super().checkpoint_state(), "candidates": self.candidates}
        if self.location_chain:  # inference must let it write the location tokens before the answer
            state["location_chain"] = True
        return state

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.candidates = state.get("candidates") or self.candidates
        self.location_chain, self._allowed = bool(state.get("location_chain", self.location_chain)), None
        self._cand = {}

    # --- Seq2SeqTask hooks --------------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Cross-entropy over the answers; each image is embedded once for all its questions."""
        counts = batch.get("image_counts")
        if counts is None:
            return super().loss(batch)
        memory, mask = self.model.encode(self.model_inputs(batch), repeats={"image": counts})
        return self.target_loss(self.model.decode_hidden(batch["tgt_in"], memory, mask), batch["labels"])

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"image": batch["image"], "text": (batch["prompt_ids"], batch["prompt_mask"])}

    @torch.no_grad()
    def generate_tokens(self, batch: dict[str, Any], **overrides: Any) -> torch.Tensor:
        if self.decoding == "allcand":
            return self.rank_candidates(batch)
        if self.decoding == "trie":
            cand = self.candidate_tensors()
            longest = max(len(x) for x in cand["ids"]) + 1
            overrides = {"processors": [cand["trie"]],
                         "max_new_tokens": min(longest, self.hparams.max_new_tokens), **overrides}
        return super().generate_tokens(batch, **overrides)

    @torch.no_grad()
    def candidate_scores(self, batch: dict[str, Any]) -> torch.Tensor:
        """Sum of log-probabilities of every candidate answer for every question → ``[B, C]``.

        The source is encoded once; the memory is repeated per candidate in chunks of
        ``candidate_chunk`` candidates, each chunk one teacher-forced decoder pass.
        """
        cand = self.candidate_tensors()
        memory, mask = self.model.encode(self.model_inputs(batch))
        b, dev = memory.shape[0], memory.device
        tgt_in, labels = cand["tgt_in"].to(dev), cand["labels"].to(dev)
        scores = []
        for c0 in range(0, len(tgt_in), self.candidate_chunk):
            ci, cl = tgt_in[c0:c0 + self.candidate_chunk], labels[c0:c0 + self.candidate_chunk]
            c = ci.shape[0]
            hidden = self.model.decode_hidden(ci.repeat(b, 1), memory.repeat_interleave(c, 0),
                                              mask.repeat_interleave(c, 0))  # [B*c, L, d]
            logp = F.log_softmax(self.model.logits(hidden).float(), dim=-1)
            lab = cl.repeat(b, 1)  # [B*c, L]
            tok = logp.gather(-1, lab.unsqueeze(-1)).squeeze(-1).masked_fill(lab == PAD_ID, 0.0)
            scores.append(tok.sum(-1).view(b, c))
        return torch.cat(scores, dim=1)

    def rank_candidates(self, batch: dict[str, Any]) -> torch.Tensor:
        """The best candidate per question as generated-style tokens ``[B, L]`` (answer + EOS)."""
        best = self.candidate_scores(batch).argmax(-1)
        return self.candidate_tensors()["labels"].to(best.device)[best]

    def compute_metrics(self, stage: str, predictions: dict[Any, str]) -> dict[str, float]:
        from tasks.metrics import vqa_scores

        refs = self.scored_references(stage, self.datamodule.references(stage), predictions, "questions")
        if not any(r["answers"] for r in refs.values()):
            return {}  # unanswered test split: predictions only
        s = vqa_scores({k: predictions[k] for k in refs}, refs)
        out = {"vqa_acc": s["overall"]}
        out.update({f"vqa_acc_{_metric_key(k)}": v for k, v in s["per_question_type"].items()})
        out.update({f"vqa_acc_type_{_metric_key(k)}": v for k, v in s["per_answer_type"].items()})
        return out

    def format_predictions(self, predictions: dict[Any, str]) -> list[dict[str, Any]]:
        return [{"question_id": k, "answer": v} for k, v in predictions.items()]

    def write_samples(self, path: Path, stage: str) -> None:
        from tasks.visualize import save_grid

        s = self.samples.get(stage)
        if not s:
            return
        pre = self.datamodule.preprocess
        questions = decode_text(s["prompt_ids"], self.layout, self.tokenizer)
        texts = [f"Q: {q} A: {a}" for q, a in zip(questions, s["predictions"])]
        save_grid([pre.denormalize(x) for x in s["image"]], texts, path, references=self.sample_references(stage))
