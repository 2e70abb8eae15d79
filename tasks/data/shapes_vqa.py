"""Shapes VQA: questions and answers about the Shapes scenes, written as a VQAv2 pair of files.

Built from the ground truth in ``scenes_{split}.json`` (see :mod:`tasks.data.shapes`). Six question
families, one question of each family per image where the scene allows it:

=========  =============================================  ====================================
family     question                                       answers
=========  =============================================  ====================================
colour     what colour is the <shape>?                    red green blue yellow purple orange
shape      what shape is the <colour> object?             circle square triangle diamond cross
count      how many objects are there?                    1 2 3
exist      is there a <colour> <shape>?                   yes no
relation   where is the <colour> <shape> relative to the  left right above below
           <colour> <shape>?
size       what size is the <colour> <shape>?             small large
=========  =============================================  ====================================

Answers are balanced within each family: each image's question is picked among the valid ones so as
to favour the family's least-used answer so far, then every answer is trimmed to the family's rarest
answer count. The family is the VQAv2 ``question_type``; ``answer_type`` is ``yes/no`` (exist),
``number`` (count) or ``other``. Every question has ten identical human answers.

Files (next to the Shapes data; the questions file also lists the images, an extension VQAv2 readers
ignore)::

    root/vqa_questions_{split}.json    {"info", "data_subtype", "images": [{"id", "file_name"}], "questions": [...]}
    root/vqa_annotations_{split}.json  {"info", "data_subtype", "annotations": [...]}
    root/refs_{split}.json             {"info", "images", "refs"}: every object's phrase and box, for
                                       visual grounding (tasks.data.grounding)
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from tasks.data.grounding import shapes_refs
from tasks.data.relation_chain import relation_word
from tasks.data.shapes import COLOURS, SHAPES, SPLITS, ShapesConfig, ensure_shapes
from zoo.atomic import atomic_file

__all__ = ["FAMILIES", "VQA_VERSION", "questions_for_scene", "build_split", "write_shapes_vqa",
           "ensure_shapes_vqa", "vqa_files", "refs_file"]

#: Bumped whenever the questions change; stored in the files' ``info``.
VQA_VERSION = 1

#: family -> (answer type, possible answers)
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "colour": ("other", tuple(COLOURS)),
    "shape": ("other", SHAPES),
    "count": ("number", ("1", "2", "3")),
    "exist": ("yes/no", ("yes", "no")),
    "relation": ("other", ("left", "right", "above", "below")),
    "size": ("other", ("small", "large")),
}


def vqa_files(root: str | Path, split: str) -> tuple[Path, Path]:
    """Paths of the questions and annotations files of ``split``."""
    root = Path(root)
    return root / f"vqa_questions_{split}.json", root / f"vqa_annotations_{split}.json"


def refs_file(root: str | Path, split: str) -> Path:
    """The grounding file of ``split`` (every object's phrase and box, :mod:`tasks.data.grounding`)."""
    return Path(root) / f"refs_{split}.json"


def _name(o: dict) -> str:
    return f"{o['colour']} {o['shape']}"


def _relation(a: dict, b: dict) -> str:
    """Where ``a`` is relative to ``b``, along the dominant axis (as in the captions)."""
    return relation_word(a["x"] - b["x"], a["y"] - b["y"])


def questions_for_scene(scene: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """Every valid ``(question, answer)`` of each family for one scene (families may be empty)."""
    objs = scene["objects"]
    shapes, colours = Counter(o["shape"] for o in objs), Counter(o["colour"] for o in objs)
    present = {(o["colour"], o["shape"]) for o in objs}
    out: dict[str, list[tuple[str, str]]] = {f: [] for f in FAMILIES}
    for o in objs:
        if shapes[o["shape"]] == 1:
            out["colour"].append((f"what colour is the {o['shape']}?", o["colour"]))
        if colours[o["colour"]] == 1:
            out["shape"].append((f"what shape is the {o['colour']} object?", o["shape"]))
        out["size"].append((f"what size is the {_name(o)}?", o["size"]))
        out["exist"].append((f"is there a {_name(o)}?", "yes"))
        for b in objs:
            if b is not o:
                out["relation"].append((f"where is the {_name(o)} relative to the {_name(b)}?", _relation(o, b)))
    # "no" questions: prefer absent pairs that share a colour or a shape with a present object
    absent = [(c, s) for s in SHAPES for c in COLOURS if (c, s) not in present]
    near = [p for p in absent if p[0] in colours or p[1] in shapes]
    out["exist"] += [(f"is there a {c} {s}?", "no") for c, s in (near or absent)]
    out["count"].append(("how many objects are there?", str(len(objs))))
    return out


def build_split(scenes: list[dict[str, Any]], seed: int, split_index: int, image_files: dict[Any, str]
                ) -> tuple[list[dict], list[dict]]:
    """VQAv2 ``questions`` and ``annotations`` lists for one split's scenes (balanced, deterministic)."""
    rng = np.random.default_rng([seed, split_index, 7919])
    used: dict[str, Counter] = {f: Counter() for f in FAMILIES}
    picked: dict[str, list[tuple[Any, str, str]]] = {f: [] for f in FAMILIES}
    for scene in scenes:
        for family, cands in questions_for_scene(scene).items():
            if not cands:
                continue
            least = min(used[family][a] for _, a in cands)
            pool = [c for c in cands if used[family][c[1]] == least]
            q, a = pool[int(rng.integers(len(pool)))]
            used[family][a] += 1
            picked[family].append((scene["image_id"], q, a))
    questions, annotations = [], []
    fam_index = {f: i for i, f in enumerate(FAMILIES)}
    for family, items in picked.items():
        answer_type, answers = FAMILIES[family]
        keep = min(used[family][a] for a in answers)  # trim to the rarest answer: exact balance
        kept: Counter = Counter()
        for image_id, q, a in items:
            if kept[a] >= keep:
                continue
            kept[a] += 1
            qid = int(image_id) * 10 + fam_index[family]
            questions.append({"image_id": image_id, "question": q, "question_id": qid})
            annotations.append({
                "question_id": qid, "image_id": image_id, "question_type": family, "answer_type": answer_type,
                "multiple_choice_answer": a,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)],
            })
    order = np.argsort([q["question_id"] for q in questions], kind="stable")
    questions = [questions[i] for i in order]
    annotations = [annotations[i] for i in order]
    return questions, annotations


def _write_json(path: Path, obj: Any) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, separators=(",", ":"))


def _info(cfg: ShapesConfig, split: str) -> dict[str, Any]:
    return {"description": "Shapes VQA (mmzoo embedded dataset)", "version": VQA_VERSION,
            "split": split, "seed": cfg.seed}


def write_shapes_vqa(root: str | Path, cfg: ShapesConfig) -> None:
    """Write the VQA pair of files of every split into an existing Shapes ``root``."""
    root = Path(root)
    for split_index, split in enumerate(SPLITS):
        scenes = json.loads((root / f"scenes_{split}.json").read_text(encoding="utf-8"))
        coco = json.loads((root / f"captions_{split}.json").read_text(encoding="utf-8"))
        files = {im["id"]: im["file_name"] for im in coco["images"]}
        questions, annotations = build_split(scenes, cfg.seed, split_index, files)
        info = _info(cfg, split)
        images = [{"id": i, "file_name": f} for i, f in files.items()]
        q_path, a_path = vqa_files(root, split)
        _write_json(refs_file(root, split), {"info": info, **shapes_refs(scenes, files, cfg.image_size)})
        _write_json(a_path, {"info": info, "data_subtype": split, "annotations": annotations})
        # questions last: its info marks the pair complete
        _write_json(q_path, {"info": info, "task_type": "Open-Ended", "data_type": "shapes",
                             "data_subtype": split, "images": images, "questions": questions})


def _complete(root: Path, cfg: ShapesConfig) -> bool:
    for split in SPLITS:
        q_path, a_path = vqa_files(root, split)
        if not a_path.is_file() or not refs_file(root, split).is_file():
            return False
        try:
            with open(q_path, encoding="utf-8") as f:
                if json.load(f).get("info") != _info(cfg, split):
                    return False
        except (OSError, ValueError):
            return False
    return True


def ensure_shapes_vqa(root: str | Path, cfg: ShapesConfig | None = None) -> Path:
    """Shapes data plus its VQA files under ``root``, generated on first use (idempotent, atomic files)."""
    cfg = cfg or ShapesConfig()
    root = ensure_shapes(root, cfg)
    if not _complete(root, cfg):
        write_shapes_vqa(root, cfg)  # deterministic: concurrent writers produce identical files
    return root
