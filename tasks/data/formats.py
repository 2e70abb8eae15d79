"""Readers for the dataset formats users already have.

* COCO captions JSON: :func:`tasks.data.coco.read_coco_captions`
* Karpathy split JSON (``dataset_coco.json``): :func:`read_karpathy`
* VQAv2 questions + annotations pair: :func:`read_vqa`
* JSONL manifests, ``{"image", "captions"}`` or ``{"image", "question", "answers"}``: :func:`read_jsonl`
* Hugging Face imagefolder (a folder with ``metadata.jsonl`` whose ``file_name`` is relative to it):
  :func:`read_imagefolder`
* WebDataset tar shards (streamed): :mod:`tasks.data.webdataset`

Every reader returns :class:`CaptionRecord` or :class:`VQARecord` lists and reports bad records to a
:class:`~tasks.data.validate.Problems` (raise by default, skip with ``skip_bad``). Image files are
checked separately by :func:`tasks.data.validate.filter_records`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modalities.text import read_text_file
from tasks.data.coco import CaptionRecord, DataError, read_json
from tasks.data.validate import Problems, describe_value

__all__ = ["CaptionRecord", "VQARecord", "read_karpathy", "read_vqa", "read_jsonl", "read_imagefolder",
           "VQAV2_IMAGE_PATTERN"]

#: Where the official VQAv2 images live relative to the image root.
VQAV2_IMAGE_PATTERN = "{data_subtype}/COCO_{data_subtype}_{image_id:012d}.jpg"


@dataclass
class VQARecord:
    """One question about one image with its human answers (empty for unanswered test questions)."""

    question_id: Any
    image_id: Any
    path: Path
    question: str
    answers: list[str] = field(default_factory=list)
    answer: str | None = None  # the training target: VQAv2's multiple_choice_answer or the most common
    question_type: str | None = None
    answer_type: str | None = None

    def annotation(self) -> dict[str, Any]:
        """The entry :func:`tasks.metrics.vqa_scores` expects."""
        return {"answers": self.answers, "question_type": self.question_type, "answer_type": self.answer_type}


def _nonempty(x: Any) -> bool:
    return isinstance(x, str) and bool(x.strip())


def _majority(answers: list[str]) -> str | None:
    if not answers:
        return None
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    return max(counts, key=lambda a: counts[a])  # ties: the first given


# ----------------------------------------------------------------------------- Karpathy
def read_karpathy(json_path: str | Path, image_root: str | Path, split: str,
                  problems: Problems | None = None) -> list[CaptionRecord]:
    """Captions of one split of a Karpathy split file; ``split="train"`` includes ``restval``.

    Image path: ``image_root / filepath / filename`` (``filepath`` may be absent); id: ``cocoid``, else
    ``imgid``.
    """
    problems = problems if problems is not None else Problems()
    json_path, root = Path(json_path), Path(image_root)
    data = read_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{json_path}: not a Karpathy split file (needs an 'images' list)")
    wanted = {"train", "restval"} if split == "train" else {split}
    out = []
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "filename" not in img or "split" not in img:
            problems.report(f"{json_path}: images[{i}] lacks 'filename' or 'split'")
            continue
        if img["split"] not in wanted:
            continue
        image_id = img.get("cocoid", img.get("imgid", i))
        sentences = img.get("sentences", [])
        if not isinstance(sentences, list):
            problems.report(f"{json_path}: images[{i}] (id={image_id}) has 'sentences' {describe_value(sentences)}, "
                            "not a list")
            continue
        caps = [s.get("raw", " ".join(map(str, s.get("tokens", [])))) for s in sentences if isinstance(s, dict)]
        wrong = next((c for c in caps if not isinstance(c, str)), "")
        if not isinstance(wrong, str):
            problems.report(f"{json_path}: images[{i}] (id={image_id}) has a sentence 'raw' {describe_value(wrong)}, "
                            "not a string")
            continue
        caps = [c.strip() for c in caps if _nonempty(c)]
        if not caps:
            problems.report(f"{json_path}: images[{i}] (id={image_id}, {img['filename']}) has no non-empty sentence")
            continue
        out.append(CaptionRecord(image_id, root / img.get("filepath", "") / img["filename"], caps))
    return out


# ----------------------------------------------------------------------------- VQAv2
def read_vqa(questions_path: str | Path, annotations_path: str | Path | None, image_root: str | Path,
             image_pattern: str | None = None, problems: Problems | None = None) -> list[VQARecord]:
    """Read a VQAv2 questions file and (optionally, absent for test) its annotations file.

    Image paths come from an ``images`` list (``[{"id", "file_name"}]``) in the questions file if it has
    one, else from ``image_pattern`` formatted with ``image_id`` and ``data_subtype`` (default: the
    official :data:`VQAV2_IMAGE_PATTERN`), relative to ``image_root``.
    """
    problems = problems if problems is not None else Problems()
    q_path, root = Path(questions_path), Path(image_root)
    qdata = read_json(q_path)
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise DataError(f"{q_path}: not a VQAv2 questions file (needs a 'questions' list)")
    subtype = qdata.get("data_subtype", "")
    files: dict[Any, Path] | None = None
    if isinstance(qdata.get("images"), list):
        files = {}
        for i, im in enumerate(qdata["images"]):
            if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
                raise DataError(f"{q_path}: images[{i}] lacks 'id' or 'file_name'")
            files[im["id"]] = root / im["file_name"]
    pattern = image_pattern or VQAV2_IMAGE_PATTERN
    anns: dict[Any, dict] = {}
    if annotations_path is not None:
        a_path = Path(annotations_path)
        adata = read_json(a_path)
        if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
            raise DataError(f"{a_path}: not a VQAv2 annotations file (needs an 'annotations' list)")
        for i, a in enumerate(adata["annotations"]):
            if not isinstance(a, dict) or "question_id" not in a:
                problems.report(f"{a_path}: annotations[{i}] lacks 'question_id'")
                continue
            answers = a.get("answers", [])
            answers = [x.get("answer") if isinstance(x, dict) else x for x in answers] if isinstance(answers, list) \
                else [answers]
            wrong = next((x for x in answers if not isinstance(x, str)), "")
            if not isinstance(wrong, str):
                problems.report(f"{a_path}: annotations[{i}] (question_id={a['question_id']}) has an answer "
                                f"{describe_value(wrong)}, not a string")
                continue
            if not answers or not all(_nonempty(x) for x in answers):
                problems.report(f"{a_path}: annotations[{i}] (question_id={a['question_id']}) has an empty answer")
                continue
            anns[a["question_id"]] = {**a, "answers": [x.strip() for x in answers]}
    out = []
    for i, q in enumerate(qdata["questions"]):
        if not isinstance(q, dict) or "question_id" not in q or "image_id" not in q:
            problems.report(f"{q_path}: questions[{i}] lacks 'question_id' or 'image_id'")
            continue
        qid, image_id = q["question_id"], q["image_id"]
        where = f"{q_path}: questions[{i}] (question_id={qid}, image_id={image_id})"
        if not isinstance(q.get("question"), str):
            problems.report(f"{where} has question {describe_value(q.get('question'))}, not a string")
            continue
        if not _nonempty(q.get("question")):
            problems.report(f"{where} has an empty question")
            continue
        if files is not None:
            if image_id not in files:
                problems.report(f"{where} points at unknown image_id {image_id!r}")
                continue
            path = files[image_id]
        else:
            path = root / pattern.format(image_id=image_id, data_subtype=subtype)
        a = anns.get(qid)
        if annotations_path is not None and a is None:
            problems.report(f"{where} has no annotation in {annotations_path}")
            continue
        answers = a["answers"] if a else []
        out.append(VQARecord(qid, image_id, path, q["question"].strip(), answers,
                             (a.get("multiple_choice_answer") or _majority(answers)) if a else None,
                             a.get("question_type") if a else None, a.get("answer_type") if a else None))
    if anns:
        known = {r.question_id for r in out}
        stray = [qid for qid in anns if qid not in known]
        if stray and len(stray) == len(anns):
            raise DataError(f"{annotations_path}: no annotation matches a question of {q_path}")
    return out


# ----------------------------------------------------------------------------- JSONL / imagefolder
def _jsonl_rows(path: Path, problems: Problems) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    # decoded whole first: a byte that is not UTF-8 is named by its line and column
    for lineno, line in enumerate(read_text_file(path, DataError).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.report(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(row, dict):
            problems.report(f"{path}:{lineno}: a line must be a JSON object")
            continue
        rows.append((lineno, row))
    return rows


def _row_record(row: dict, lineno: int, path: Path, root: Path, image_key: str, kind: str,
                problems: Problems) -> CaptionRecord | VQARecord | None:
    where = f"{path}:{lineno}"
    image = row.get(image_key)
    if image is not None and not isinstance(image, str):
        problems.report(f"{where}: '{image_key}' is {describe_value(image)}, not a file name")
        return None
    if not _nonempty(image):
        problems.report(f"{where}: no '{image_key}'")
        return None
    image_path = root / image
    if kind == "caption":
        caps = row.get("captions", row.get("caption", row.get("text")))
        key = next((k for k in ("captions", "caption", "text") if k in row), "captions")
        caps = [caps] if isinstance(caps, str) else caps
        if caps is not None and not isinstance(caps, list):
            problems.report(f"{where} ({image}): '{key}' is {describe_value(caps)}, not a string or a list of strings")
            return None
        wrong = next((c for c in caps or [] if not isinstance(c, str)), "")
        if not isinstance(wrong, str):
            problems.report(f"{where} ({image}): a caption in '{key}' is {describe_value(wrong)}, not a string")
            return None
        if not isinstance(caps, list) or not caps or not all(_nonempty(c) for c in caps):
            problems.report(f"{where} ({image}): empty or missing caption(s)")
            return None
        return CaptionRecord(row.get("id", image), image_path, [c.strip() for c in caps])
    if kind == "vqa":
        question, answers = row.get("question"), row.get("answers", row.get("answer"))
        answers = [answers] if isinstance(answers, str) else (answers or [])
        answers = [a.get("answer") if isinstance(a, dict) else a for a in answers] if isinstance(answers, list) \
            else [answers]
        if question is not None and not isinstance(question, str):
            problems.report(f"{where} ({image}): 'question' is {describe_value(question)}, not a string")
            return None
        wrong = next((a for a in answers if not isinstance(a, str)), "")
        if not isinstance(wrong, str):
            problems.report(f"{where} ({image}): an answer is {describe_value(wrong)}, not a string")
            return None
        if not _nonempty(question):
            problems.report(f"{where} ({image}): empty or missing question")
            return None
        if answers and not all(_nonempty(a) for a in answers):
            problems.report(f"{where} ({image}): empty answer")
            return None
        answers = [a.strip() for a in answers]
        return VQARecord(row.get("question_id", row.get("id", lineno)), row.get("image_id", image), image_path,
                         question.strip(), answers, _majority(answers), row.get("question_type"),
                         row.get("answer_type"))
    raise ValueError(f"kind must be 'caption' or 'vqa', got {kind!r}")


def read_jsonl(path: str | Path, image_root: str | Path | None = None, kind: str = "caption",
               problems: Problems | None = None, image_key: str = "image") -> list[CaptionRecord] | list[VQARecord]:
    """A JSONL manifest: one object per line, the image path relative to ``image_root`` (default: the
    manifest's folder). Captions: ``{"image", "captions": [...]}`` (or ``caption``/``text``); VQA:
    ``{"image", "question", "answers": [...]}``; optional ``id``/``question_id``/``image_id``."""
    problems = problems if problems is not None else Problems()
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    recs = [_row_record(row, n, path, root, image_key, kind, problems) for n, row in _jsonl_rows(path, problems)]
    return [r for r in recs if r is not None]


def read_imagefolder(folder: str | Path, kind: str = "caption", problems: Problems | None = None
                     ) -> list[CaptionRecord] | list[VQARecord]:
    """A Hugging Face imagefolder: ``folder/metadata.jsonl`` rows with ``file_name`` relative to ``folder``."""
    folder = Path(folder)
    return read_jsonl(folder / "metadata.jsonl", folder, kind, problems, image_key="file_name")
