"""Tests for ``tasks.metrics``: COCO caption metrics wrapper and official-style VQAv2 accuracy."""
from __future__ import annotations

import contextlib
import io
import math

import pytest

from tasks.metrics import (
    caption_scores,
    normalize_answer,
    normalize_caption,
    vqa_accuracy,
    vqa_scores,
)

# ---------------------------------------------------------------------------------------------
# normalize_caption
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A Dog, running on the BEACH.", "a dog running on the beach"),
        ("Two dogs -- running (fast)!", "two dogs running fast"),
        ('He said "hi" ... then left; ok?', "he said hi then left ok"),
        ("  lots \n of\t  space  ", "lots of space"),
        ("A man's hat", "a man 's hat"),  # PTB splits clitics
        ("Don't stop", "do n't stop"),
        ("The dogs' toys", "the dogs toys"),  # trailing possessive quote is a punctuation token
        ("black-and-white photo - old", "black-and-white photo old"),  # hyphenated words stay whole
        ("1,000 dogs at 10:30 and 3.5 cats.", "1,000 dogs at 10:30 and 3.5 cats"),  # inside numbers kept
        ("A U.S. flag.", "a u.s. flag"),
        ("\u201cQuoted\u201d \u2018text\u2019\u2026", "quoted text"),
        ("?!...;:,", ""),
    ],
)
def test_normalize_caption(text: str, expected: str) -> None:
    assert normalize_caption(text) == expected


# ---------------------------------------------------------------------------------------------
# caption_scores
# ---------------------------------------------------------------------------------------------

KEYS = ["bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l"]

FIXED_REFS = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
        "A person on a surfboard riding a wave.", "Man surfing on a big blue wave."],
    2: ["Two cats sleeping on a red couch.", "A pair of cats curled up on a sofa.",
        "Two kittens asleep on the couch.", "Cats are napping on a red sofa."],
    3: ["A plate of food with broccoli and rice.", "Rice, broccoli and chicken on a white plate.",
        "A white plate topped with rice and vegetables."],
    4: ["A red double decker bus on a city street.", "A bus driving down the street.",
        "A double-decker bus parked by the sidewalk.", "The red bus is on the road.",
        "A tall bus on a busy street."],
    "img5": ["A dog catching a frisbee in the park.", "A brown dog jumps for a frisbee.",
             "Dog leaping to catch a flying disc on the grass."],
}
FIXED_PREDS = {
    1: "a man riding a wave on a surfboard",
    2: "two cats sleeping on a couch",
    3: "a plate of rice and broccoli",
    4: "a red bus driving down a city street",
    "img5": "a dog is playing with a ball",
}


def _pycocoevalcap_direct(gts: dict, res: dict) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
        rouge, _ = Rouge().compute_score(gts, res)
    return {"bleu1": bleu[0], "bleu2": bleu[1], "bleu3": bleu[2], "bleu4": bleu[3],
            "cider": float(cider), "rouge_l": float(rouge)}


def test_caption_scores_matches_pycocoevalcap_directly(capsys: pytest.CaptureFixture[str]) -> None:
    scores = caption_scores(FIXED_PREDS, FIXED_REFS)
    assert capsys.readouterr().out == ""  # Bleu's "{'testlen': ...}" print is silenced
    assert sorted(scores) == sorted(KEYS)
    assert all(isinstance(v, float) for v in scores.values())

    gts = {k: [normalize_caption(r) for r in v] for k, v in FIXED_REFS.items()}
    res = {k: [normalize_caption(FIXED_PREDS[k])] for k in FIXED_REFS}
    direct = _pycocoevalcap_direct(gts, res)
    for k in KEYS:
        assert scores[k] == pytest.approx(direct[k], abs=1e-6), k

    # Sanity: a decent but imperfect prediction set.
    assert 0.0 < scores["bleu4"] < scores["bleu3"] < scores["bleu2"] < scores["bleu1"] < 1.0
    assert 0.0 < scores["cider"] < 10.0
    assert 0.0 < scores["rouge_l"] < 1.0
    # Regression pin (values recorded from pycocoevalcap 1.2 on this normalisation): catches silent
    # changes to normalize_caption or the scorer versions.
    pinned = {"bleu1": 0.8607662606943112, "bleu2": 0.7652219709777742, "bleu3": 0.6302889716269721,
              "bleu4": 0.49663540821501734, "cider": 2.0230981024785315, "rouge_l": 0.7129127428581875}
    assert scores == pytest.approx(pinned, abs=1e-6)
    # Order of the dicts must not matter.
    shuffled = caption_scores(dict(reversed(list(FIXED_PREDS.items()))), FIXED_REFS)
    for k in KEYS:
        assert shuffled[k] == pytest.approx(scores[k], abs=1e-9)


DISTINCT_CAPTIONS = {
    0: "a red bus parked on the street",
    1: "two cats sleeping on a sofa",
    2: "a man riding a wave on a surfboard",
    3: "a plate of food with broccoli and rice",
}


def test_exact_matches_give_bleu_1_and_cider_10() -> None:
    # Every prediction equals all three of its (identical) references, and captions differ across
    # images. CIDEr-D per image = 10 * mean_n sim_n with sim_n = clipped cosine of the tf-idf n-gram
    # vectors times exp(-len_diff^2 / 2 sigma^2). Identical vectors: min(v, v) * v summed = |v|^2, so the
    # cosine is exactly 1, the length penalty is exp(0) = 1, for each n = 1..4 as long as the caption has
    # some n-gram with non-zero idf (idf = log(N / df) > 0 for n-grams not in every image; every caption
    # has >= 4 words and its own 4-grams). Hence 10 * 1 = 10 per image and overall.
    refs = {k: [c, c, c] for k, c in DISTINCT_CAPTIONS.items()}
    preds = {k: c.upper() + "." for k, c in DISTINCT_CAPTIONS.items()}  # normalisation removes the diff
    scores = caption_scores(preds, refs)
    assert scores["cider"] == pytest.approx(10.0, abs=1e-6)
    # BLEU: all n-grams correct, hypothesis length == closest reference length → BP = 1. pycocoevalcap
    # smooths each precision as (correct + 1e-15) / (guess + 1e-9), hence approx.
    for n in range(1, 5):
        assert scores[f"bleu{n}"] == pytest.approx(1.0, abs=1e-6)
    assert scores["rouge_l"] == pytest.approx(1.0, abs=1e-12)


def test_cider_single_image_is_zero() -> None:
    # With one image every n-gram has document frequency 1 = N, idf = log(1) - log(1) = 0: all
    # tf-idf vectors vanish and CIDEr-D is 0 even for a perfect prediction (BLEU is still 1).
    scores = caption_scores({7: "a red bus parked on the street"}, {7: ["a red bus parked on the street"] * 2})
    assert scores["cider"] == 0.0
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)


def test_no_shared_words_gives_zero() -> None:
    refs = {k: [c, c] for k, c in DISTINCT_CAPTIONS.items()}
    preds = {k: "zebra giraffe elephant lion tiger" for k in DISTINCT_CAPTIONS}
    scores = caption_scores(preds, refs)
    for k in KEYS:
        assert scores[k] == pytest.approx(0.0, abs=1e-6), k
    assert scores["cider"] == 0.0
    assert scores["rouge_l"] == 0.0


def test_hand_checkable_bleu1_and_rouge_l() -> None:
    # BLEU-1: "a dog" vs "a dog runs": precision 2/2, brevity penalty exp(1 - 3/2) = exp(-0.5).
    s = caption_scores({1: "A dog"}, {1: ["a dog runs"]})
    assert s["bleu1"] == pytest.approx(math.exp(-0.5), abs=1e-6)
    # ROUGE-L: "a dog runs fast" vs "a dog runs": LCS 3, P = 3/4, R = 1, beta = 1.2:
    # F = (1 + 1.44) * 0.75 * 1 / (1 + 1.44 * 0.75) = 1.83 / 2.08.
    s = caption_scores({1: "a dog runs fast"}, {1: ["a dog runs"]})
    assert s["rouge_l"] == pytest.approx(1.83 / 2.08, abs=1e-9)


def test_empty_predictions_are_scored_zero() -> None:
    refs = {k: [c, c] for k, c in DISTINCT_CAPTIONS.items()}
    all_empty = caption_scores({k: "" for k in refs}, refs)
    assert all_empty == pytest.approx({k: 0.0 for k in KEYS}, abs=1e-6)
    punct_only = caption_scores({k: " ...!? " for k in refs}, refs)
    assert punct_only == pytest.approx({k: 0.0 for k in KEYS}, abs=1e-6)

    # One empty prediction among perfect ones: same as pycocoevalcap on the empty token sequence, and
    # strictly below the all-perfect scores.
    preds = dict(DISTINCT_CAPTIONS)
    preds[2] = ""
    scores = caption_scores(preds, refs)
    gts = {k: [normalize_caption(r) for r in v] for k, v in refs.items()}
    direct = _pycocoevalcap_direct(gts, {k: [normalize_caption(preds[k])] for k in refs})
    for k in KEYS:
        assert scores[k] == pytest.approx(direct[k], abs=1e-6), k
    # ROUGE-L is a per-image mean: 3 perfect images, one 0.
    assert scores["rouge_l"] == pytest.approx(0.75, abs=1e-9)
    assert scores["cider"] < 10.0 * 3 / 4 + 1e-6


def test_caption_scores_errors() -> None:
    refs = {1: ["a cat"], 2: ["a dog"], 3: ["a bird"]}
    with pytest.raises(ValueError, match=r"without a prediction.*3"):
        caption_scores({1: "a cat", 2: "a dog"}, refs)
    with pytest.raises(ValueError, match=r"without references.*99"):
        caption_scores({1: "a cat", 2: "a dog", 3: "a bird", 99: "x"}, refs)
    with pytest.raises(ValueError, match="empty reference list"):
        caption_scores({1: "a cat", 2: "a dog", 3: "x"}, {1: ["a cat"], 2: ["a dog"], 3: []})
    with pytest.raises(ValueError, match="empty after normalisation"):
        caption_scores({1: "a cat", 2: "a dog"}, {1: ["a cat"], 2: ["...", "!"]})
    with pytest.raises(ValueError, match="non-empty"):
        caption_scores({}, {})
    with pytest.raises(ValueError, match="list of strings"):
        caption_scores({1: "a cat", 2: "a dog"}, {1: ["a cat"], 2: "a dog"})  # type: ignore[dict-item]


def test_empty_references_after_normalisation_are_dropped() -> None:
    refs = {k: [c, c] for k, c in DISTINCT_CAPTIONS.items()}
    with_junk = {k: v + ["..."] for k, v in refs.items()}
    preds = {k: "" for k in refs}
    # The junk refs would make ROUGE-L of an empty prediction 1.0 if kept.
    assert caption_scores(preds, with_junk) == pytest.approx(caption_scores(preds, refs), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ans, expected",
    [
        ("Two", "2"),
        ("ten", "10"),
        ("none", "0"),  # the official number map includes none → 0
        ("the dog.", "dog"),
        ("An apple", "apple"),
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("yes!", "yes"),
        ("yes, no", "yes no"),  # ", " touches a space → deleted
        ("black/white", "black white"),  # no space next to "/" → replaced by a space
        ("1,000", "1000"),  # comma between digits → every punctuation mark is deleted
        ("1,000 / 2", "1000 2"),
        ("3.5", "3.5"),  # period followed by a digit is kept
        ("5.", "5"),  # period not followed by a digit is deleted
        ("  Red\tcar\n", "red car"),
        ("o'clock", "o'clock"),  # apostrophe is not official punctuation
    ],
)
def test_normalize_answer(ans: str, expected: str) -> None:
    assert normalize_answer(ans) == expected


@pytest.mark.parametrize(
    "matches, expected",
    [
        # 10 answers, `matches` of them equal to the prediction. Leaving out one of the matching
        # answers leaves matches-1 among the other 9, otherwise `matches`; each subset scores
        # min(count / 3, 1), average over the 10 subsets:
        (0, 0.0),  # every subset has 0 matches
        (1, 0.3),  # (1 * 0 + 9 * 1/3) / 10 = 3/10
        (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
        (3, 0.9),  # (3 * 2/3 + 7 * 1) / 10 = 9/10
        (4, 1.0),  # (4 * min(3/3, 1) + 6 * min(4/3, 1)) / 10 = 1
        (7, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_ten_answers(matches: int, expected: float) -> None:
    answers = ["cat"] * matches + ["dog", "bird", "horse", "cow", "sheep", "mouse", "fish", "ant", "bee", "owl"][
        : 10 - matches
    ]
    assert len(answers) == 10
    assert vqa_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)
    # Normalisation applies to prediction and human answers alike.
    assert vqa_accuracy("The cat!", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_fewer_answers() -> None:
    # 4 answers, 1 match: left-out match → 0 of 3 others; 3 other subsets → 1/3 each: (0 + 3/3) / 4.
    assert vqa_accuracy("2", ["two", "3", "4", "5"]) == pytest.approx(0.25)
    # 3 answers all matching: each subset of 2 has 2 matches → 2/3.
    assert vqa_accuracy("yes", ["yes", "yes", "yes"]) == pytest.approx(2 / 3)
    # Exactly one answer: no leave-one-out, min(match / 3, 1).
    assert vqa_accuracy("yes", ["Yes"]) == pytest.approx(1 / 3)
    assert vqa_accuracy("no", ["yes"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


def test_vqa_accuracy_official_quirks() -> None:
    # Official script: when all human answers agree, the prediction is not normalised at all.
    assert vqa_accuracy("Yes", ["yes"] * 10, official_quirks=True) == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0
    # When they disagree, the prediction is fully normalised ("Two" → "2", 5 matches → 1.0).
    assert vqa_accuracy("Two", ["2"] * 5 + ["3"] * 5, official_quirks=True) == 1.0
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7, official_quirks=True) == pytest.approx(0.9)


def test_vqa_scores_breakdown() -> None:
    annotations = {
        1: {"answers": ["yes"] * 10, "question_type": "is the", "answer_type": "yes/no"},  # "yes" → 1.0
        2: {"answers": ["yes"] * 10, "question_type": "is the", "answer_type": "yes/no"},  # "no" → 0.0
        3: {"answers": ["2"] * 3 + ["3"] * 7, "question_type": "how many", "answer_type": "number"},  # 0.9
        4: {"answers": ["red"] + ["blue"] * 9, "question_type": "what color is the",
            "answer_type": "other"},  # 1 match → 0.3
        5: {"answers": [{"answer": "cat", "answer_id": i} for i in range(2)]
            + [{"answer": "dog", "answer_id": i} for i in range(2, 10)],
            "question_type": "what is the", "answer_type": "other"},  # "a cat" → "cat", 2 matches → 0.6
    }
    preds = {1: "yes", 2: "no", 3: "two", 4: "Red.", 5: "a cat"}
    out = vqa_scores(preds, annotations)
    # overall = 100 * (1 + 0 + 0.9 + 0.3 + 0.6) / 5 = 56
    assert out["overall"] == pytest.approx(56.0)
    assert out["num_questions"] == 5
    assert out["per_question_type"] == pytest.approx(
        {"is the": 50.0, "how many": 90.0, "what color is the": 30.0, "what is the": 60.0})
    assert out["per_answer_type"] == pytest.approx({"yes/no": 50.0, "number": 90.0, "other": 45.0})


def test_vqa_scores_errors_and_optional_types() -> None:
    ann = {1: {"answers": ["yes"] * 10}, 2: {"answers": ["no"] * 10, "answer_type": "yes/no"}}
    out = vqa_scores({1: "yes", 2: "yes"}, ann)
    assert out["overall"] == pytest.approx(50.0)
    assert out["per_question_type"] == {}
    assert out["per_answer_type"] == pytest.approx({"yes/no": 0.0})
    with pytest.raises(ValueError, match=r"without a prediction.*2"):
        vqa_scores({1: "yes"}, ann)
    with pytest.raises(ValueError, match="no human answers"):
        vqa_scores({1: "yes"}, {1: {"answers": []}})
    with pytest.raises(ValueError, match="non-empty"):
        vqa_scores({}, {})
