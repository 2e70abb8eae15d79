"""Evaluation metrics: COCO captioning (BLEU-1..4, CIDEr-D, ROUGE-L) and VQAv2 accuracy.

Captioning
    :func:`caption_scores` wraps pycocoevalcap's ``Bleu(4)``, ``Cider()`` (which is CIDEr-D: clipped
    tf-idf n-gram cosine with a Gaussian length penalty, x10) and ``Rouge()`` scorers. The official COCO
    pipeline first runs Stanford's Java ``PTBTokenizer`` and drops punctuation tokens; here
    :func:`normalize_caption` does a pure-Python approximation of that step, so no Java is needed.

VQA
    :func:`normalize_answer`, :func:`vqa_accuracy` and :func:`vqa_scores` follow the official VQAv2
    evaluation (``vqaEval.py``): the same punctuation / number-word / article / contraction
    normalisation, and the leave-one-out "min(#humans that said it / 3, 1)" accuracy averaged over
    the ten 9-annotator subsets, reported in percent.

Nothing here imports Lightning or torch; pycocoevalcap is imported lazily inside
:func:`caption_scores`.
"""
from __future__ import annotations

import contextlib
import io
import re
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

__all__ = [
    "normalize_caption",
    "caption_scores",
    "normalize_answer",
    "vqa_accuracy",
    "vqa_scores",
    "PTB_PUNCTUATION",
    "VQA_CONTRACTIONS",
    "VQA_NUMBER_MAP",
    "VQA_ARTICLES",
    "VQA_PUNCTUATION",
]

# ---------------------------------------------------------------------------------------------
# Captioning
# ---------------------------------------------------------------------------------------------

#: Tokens that pycocoevalcap's ``PTBTokenizer`` drops after tokenisation (lower-cased bracket names
#: included, since we lower-case first).
PTB_PUNCTUATION: frozenset[str] = frozenset(
    {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
)
# Characters that only ever make up punctuation tokens; a token made only of these is dropped
# (covers "..", "!!", "?!", "'" etc., which PTB would emit as one or more punctuation tokens).
_PUNCT_ONLY = re.compile(r"^[.?!,:;`'\-]+$")
_UNICODE_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                                 "\u2014": "--", "\u2026": "..."})
# PTB turns brackets into -LRB-/-RRB-/-LCB-/-RCB- (removed) and double quotes into ``/'' (removed).
_DROP_CHARS = re.compile(r"[()\[\]{}\"`]")
_CLITIC_NT = re.compile(r"(?<=\w)n't\b")
_CLITICS = re.compile(r"(?<=\w)'(s|re|ve|ll|d|m)\b")
_CLITIC_TOKENS = frozenset({"'s", "'re", "'ve", "'ll", "'d", "'m"})
_ALWAYS_SPLIT = re.compile(r"([?!;]|\.{2,}|-{2,})")
_COMMA_COLON = re.compile(r"(?<!\d)([,:])|([,:])(?!\d)")  # kept only between digits: 1,000  10:30
# A period is split off unless it sits inside a word/number (3.5) or ends a dotted abbreviation (u.s.).
_PERIOD = re.compile(r"(?<!\w)\.|(?<![a-z]\.[a-z])\.(?!\w)")


def normalize_caption(text: str) -> str:
    """Lower-case, tokenise and strip punctuation roughly the way COCO eval's ``PTBTokenizer`` does.

    Steps: lower-case; map curly quotes/dashes to ASCII; drop brackets, double quotes and backticks
    (PTB turns them into tokens that the COCO eval removes); split the clitics ``n't 's 're 've 'll 'd 'm``
    off their word like PTB (``"man's"`` → ``"man 's"``, ``"don't"`` → ``"do n't"``); split ``? ! ;``,
    ellipses and ``--`` off, and ``, : .`` unless they sit inside a number/word (``1,000``, ``3.5``);
    drop every token in :data:`PTB_PUNCTUATION` or made only of punctuation characters; collapse
    whitespace. Hyphenated words (``black-and-white``) stay one token, as in PTB.

    Known differences from the Java tokenizer (rare in captions): ``[ ]`` are removed (PTB keeps them as
    ``-lsb-``/``-rsb-``); PTB's special splits such as ``cannot`` → ``can not`` or ``gonna`` → ``gon na``
    are not applied; single-period abbreviations (``mr.``) lose their period (dotted ones such as
    ``u.s.`` keep it).
    """
    s = text.translate(_UNICODE_QUOTES).lower()
    s = _DROP_CHARS.sub(" ", s)
    s = _CLITIC_NT.sub(" n't", s)
    s = _CLITICS.sub(r" '\1", s)
    s = _ALWAYS_SPLIT.sub(r" \1 ", s)
    s = _COMMA_COLON.sub(" ", s)
    s = _PERIOD.sub(" ", s)
    tokens = []
    for tok in s.split():
        if tok not in _CLITIC_TOKENS:
            tok = tok.strip("'")  # opening/closing single quotes, plural possessive "dogs'"
        if not tok or tok in PTB_PUNCTUATION or _PUNCT_ONLY.match(tok):
            continue
        tokens.append(tok)
    return " ".join(tokens)


def _describe_ids(ids: Iterable[Any], limit: int = 5) -> str:
    ids = list(ids)
    try:
        ids = sorted(ids)
    except TypeError:  # mixed, unorderable id types
        pass
    shown = ", ".join(repr(i) for i in ids[:limit])
    return f"{len(ids)} (e.g. {shown}{', ...' if len(ids) > limit else ''})"


def _check_same_keys(predictions: Mapping[Any, Any], references: Mapping[Any, Any], what: str) -> None:
    if not predictions or not references:
        raise ValueError(f"{what}: predictions and references must be non-empty "
                         f"(got {len(predictions)} predictions, {len(references)} references)")
    pred_keys, ref_keys = set(predictions), set(references)
    if pred_keys != ref_keys:
        parts = []
        if ref_keys - pred_keys:
            parts.append(f"ids without a prediction: {_describe_ids(ref_keys - pred_keys)}")
        if pred_keys - ref_keys:
            parts.append(f"ids without references: {_describe_ids(pred_keys - ref_keys)}")
        raise ValueError(f"{what}: prediction and reference ids differ; " + "; ".join(parts))


def caption_scores(predictions: dict[Any, str], references: dict[Any, list[str]]) -> dict[str, float]:
    """Corpus-level COCO caption metrics with pycocoevalcap on :func:`normalize_caption`-ed text.

    Args:
        predictions: ``{image_id: predicted caption}``.
        references: ``{image_id: [reference captions]}``; must have exactly the ids of ``predictions``.

    Returns:
        ``{"bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l"}`` as floats. BLEU is corpus BLEU
        (pycocoevalcap's ``closest`` reference length) in [0, 1]; ROUGE-L is the mean per-image F
        (beta 1.2) in [0, 1]; ``cider`` is CIDEr-D (x10 scale; 10.0 when every prediction equals all
        of its references and no n-gram is shared by all images).

    Notes:
        * CIDEr-D's IDF is computed from the references of the evaluated set itself, so scores depend
          on which images are evaluated together; with a single image every n-gram has IDF
          ``log(1/1) = 0`` and CIDEr-D is 0 whatever the prediction. Use a reasonably large set.
        * An empty (or punctuation-only) prediction is scored as an empty token sequence: pycocoevalcap
          (this version, checked in tests) handles it without crashing and gives it 0 on every metric;
          it still adds its reference length to corpus BLEU's brevity penalty, as an empty caption
          should. No placeholder token is substituted.
        * References that are empty after normalisation are dropped (they would otherwise match an
          empty prediction in ROUGE-L and can make CIDEr-D's IDF table empty).

    Raises:
        ValueError: empty inputs, differing id sets (a few offending ids are named), or an image whose
            reference list is empty (or has only empty references after normalisation).
    """
    _check_same_keys(predictions, references, "caption_scores")
    gts: dict[Hashable, list[str]] = {}
    res: dict[Hashable, list[str]] = {}
    for key, refs in references.items():
        if isinstance(refs, str):
            raise ValueError(f"caption_scores: references[{key!r}] must be a list of strings, got a str")
        if len(refs) == 0:
            raise ValueError(f"caption_scores: image {key!r} has an empty reference list")
        norm_refs = [r for r in (normalize_caption(x) for x in refs) if r]
        if not norm_refs:
            raise ValueError(f"caption_scores: all references of image {key!r} are empty after normalisation")
        gts[key] = norm_refs
        pred = predictions[key]
        if not isinstance(pred, str):
            raise ValueError(f"caption_scores: predictions[{key!r}] must be a str, got {type(pred).__name__}")
        res[key] = [normalize_caption(pred)]

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its {'testlen': ...} summary
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        cider, _ = Cider().compute_score(gts, res)
        rouge, _ = Rouge().compute_score(gts, res)
    out = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["cider"] = float(cider)
    out["rouge_l"] = float(rouge)
    return out


# ---------------------------------------------------------------------------------------------
# VQA (official VQAv2 evaluation)
# ---------------------------------------------------------------------------------------------

#: The official VQA eval's contraction table (apostrophe-less form → canonical form), applied word by
#: word after lower-casing. Kept exactly as the official data, oddities included: the capitalised keys
#: ("Im", "Ive", "Id've", "I'dve") can never match a lower-cased word, and "somebody'd" maps to
#: "somebodyd".
VQA_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

#: Number words → digits. The official table also maps "none" → "0" (so "none" and "0" match).
VQA_NUMBER_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

#: Articles removed word by word.
VQA_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

#: Punctuation handled by the official ``processPunctuation`` (note: no ``'``, ``:`` or ``.`` here;
#: periods have their own rule).
VQA_PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)

# A comma between two digits ("1,000") switches punctuation handling from "replace by a space" to
# "delete", for every punctuation character of the answer.
_VQA_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official period regex is "(?!<=\d)(\.)(?!\d)"; its first group is a (mis-written) negative
# *lookahead* for the literal text "<=digit", which can never match where a "." starts, so in effect a
# period is deleted unless a digit follows it: "dog." → "dog", "3.5" stays, "5." → "5".
_VQA_PERIOD = re.compile(r"\.(?!\d)")
# The official script passes re.UNICODE as ``count`` to ``sub``, i.e. at most 32 periods are removed.
_VQA_PERIOD_MAX_REMOVALS = 32


def _vqa_process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: punctuation next to a space, or anywhere in an answer that has a
    comma between digits, is deleted; other punctuation becomes a space; periods not followed by a
    digit are deleted."""
    out = text
    delete_all = _VQA_COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in VQA_PUNCTUATION:
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _VQA_PERIOD.sub("", out, count=_VQA_PERIOD_MAX_REMOVALS)


def _vqa_process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, split on whitespace, map number words, drop
    articles, expand contractions, join with single spaces."""
    words = []
    for word in text.lower().split():
        word = VQA_NUMBER_MAP.get(word, word)
        if word not in VQA_ARTICLES:
            words.append(word)
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def _vqa_clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(ans: str) -> str:
    """Official VQAv2 answer normalisation.

    Newlines/tabs → spaces and strip; then punctuation (see :data:`VQA_PUNCTUATION`): a punctuation mark
    is deleted if it touches a space somewhere in the answer or if the answer contains a comma between
    two digits (``"1,000"`` → ``"1000"``), otherwise it is replaced by a space (``"yes!"`` → ``"yes"``,
    ``"black/white"`` → ``"black white"``); periods not followed by a digit are deleted (``"3.5"`` kept);
    then lower-case, number words ``none``/``zero``..``ten`` → digits, articles ``a an the`` removed,
    apostrophe-less contractions restored (``"dont"`` → ``"don't"``), words joined by single spaces.

    Examples: ``"Two"`` → ``"2"``, ``"the dog."`` → ``"dog"``, ``"1,000"`` → ``"1000"``.
    """
    return _vqa_process_digit_article(_vqa_process_punctuation(_vqa_clean(ans)))


def _leave_one_out_accuracy(pred: str, answers: list[str]) -> float:
    n = len(answers)
    if n == 1:
        return min(1.0, float(answers[0] == pred) / 3.0)
    matches = sum(a == pred for a in answers)
    total = 0.0
    for a in answers:  # leave answer a out; the rest contain `matches - (a == pred)` matches
        total += min(1.0, (matches - (a == pred)) / 3.0)
    return total / n


def vqa_accuracy(pred: str, human_answers: list[str], official_quirks: bool = False) -> float:
    """VQAv2 accuracy of one predicted answer, in [0, 1].

    ``acc = mean over i of min(#{j != i : answer_j == pred} / 3, 1)`` — for each of the (normally 10)
    human answers, leave it out and credit the prediction with min(matches among the others / 3, 1);
    average over the leave-one-out subsets. With 10 answers: 0 matches → 0, 1 → 0.3, 2 → 0.6,
    3 → 0.9, ≥4 → 1.0.

    Fewer than 10 answers: the same leave-one-out average over however many there are (n subsets of
    n-1). With exactly one answer there is nothing left after leaving one out, so the formula without
    leave-one-out is used instead: ``min(match / 3, 1)``, i.e. 1/3 for a match — a lone annotator is
    never full agreement.

    Normalisation (``official_quirks=False``, the default): ``pred`` and every human answer go through
    :func:`normalize_answer`, so matching is symmetric. With ``official_quirks=True`` the official
    script is reproduced exactly: only when the human answers are not all identical are they passed
    through the punctuation step and ``pred`` through the full normalisation; otherwise ``pred`` is only
    stripped (so e.g. ``"Yes"`` scores 0 against ten ``"yes"``). Human answers are never
    digit/article-processed there (VQAv2's stored answers already are).

    Raises:
        ValueError: if ``human_answers`` is empty.
    """
    if not human_answers:
        raise ValueError("vqa_accuracy: human_answers must be non-empty")
    if official_quirks:
        res = _vqa_clean(pred)
        gts = [_vqa_clean(a) for a in human_answers]
        if len(set(gts)) > 1:
            gts = [_vqa_process_punctuation(a) for a in gts]
            res = _vqa_process_digit_article(_vqa_process_punctuation(res))
        return _leave_one_out_accuracy(res, gts)
    return _leave_one_out_accuracy(normalize_answer(pred), [normalize_answer(a) for a in human_answers])


def _answer_strings(answers: Any, qid: Any) -> list[str]:
    if isinstance(answers, str) or not isinstance(answers, Iterable):
        raise ValueError(f"vqa_scores: annotations[{qid!r}]['answers'] must be a list of answers")
    out = [a["answer"] if isinstance(a, Mapping) else a for a in answers]
    if not out:
        raise ValueError(f"vqa_scores: question {qid!r} has no human answers")
    return out


def vqa_scores(preds: dict[Any, str], annotations: dict[Any, dict[str, Any]],
               official_quirks: bool = False) -> dict[str, Any]:
    """VQAv2 accuracy over a set of questions, in percent (0–100) like the official evaluation.

    Args:
        preds: ``{question_id: predicted answer}``.
        annotations: ``{question_id: {"answers": [...], "question_type": str, "answer_type": str}}``.
            ``answers`` holds strings or official-format dicts with an ``"answer"`` key.
            ``question_type``/``answer_type`` are optional; a question without one is left out of that
            breakdown only.
        official_quirks: see :func:`vqa_accuracy`.

    Returns:
        ``{"overall": float, "per_question_type": {type: float}, "per_answer_type": {type: float},
        "num_questions": int}``; each value is 100 x the mean per-question accuracy of its questions
        (not rounded; the official script rounds to 2 decimals).

    Raises:
        ValueError: empty inputs, differing question-id sets (a few offending ids are named), or a
            question without human answers.
    """
    _check_same_keys(preds, annotations, "vqa_scores")
    accs: list[float] = []
    by_qtype: dict[str, list[float]] = defaultdict(list)
    by_atype: dict[str, list[float]] = defaultdict(list)
    for qid, ann in annotations.items():
        if not isinstance(ann, Mapping) or "answers" not in ann:
            raise ValueError(f"vqa_scores: annotations[{qid!r}] must be a dict with an 'answers' list")
        acc = vqa_accuracy(preds[qid], _answer_strings(ann["answers"], qid), official_quirks=official_quirks)
        accs.append(acc)
        if ann.get("question_type") is not None:
            by_qtype[ann["question_type"]].append(acc)
        if ann.get("answer_type") is not None:
            by_atype[ann["answer_type"]].append(acc)

    def pct(xs: list[float]) -> float:
        return 100.0 * sum(xs) / len(xs)

    return {
        "overall": pct(accs),
        "per_question_type": {k: pct(v) for k, v in sorted(by_qtype.items())},
        "per_answer_type": {k: pct(v) for k, v in sorted(by_atype.items())},
        "num_questions": len(accs),
    }
