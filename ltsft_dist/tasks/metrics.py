"""Task metrics whose numbers equal the official scripts', so results compare with published ones.

QA: `lang=None` is the SQuAD v1.1 evaluation (`evaluate-v1.1.py`, also the official metric of XQuAD);
`lang="de"` etc. is MLQA's (`mlqa_evaluation_v1.py`): Unicode punctuation, per-language articles and,
for zh, one token per Chinese character. Quirks of the official scripts are reproduced on purpose
(e.g. MLQA removes every Arabic "ال", also inside words; two answers that normalise to "" have EM 1, F1 0).
"""

from __future__ import annotations

import re
import string
import sys
import unicodedata
from collections import Counter
from functools import cache

import torch

from ltsft_dist.errors import LtsftError

MLQA_LANGUAGES = ("en", "es", "hi", "vi", "de", "ar", "zh")
_MLQA_ARTICLES = {
    "en": r"\b(a|an|the)\b",
    "es": r"\b(un|una|unos|unas|el|la|los|las)\b",
    "vi": r"\b(của|là|cái|chiếc|những)\b",
    "de": r"\b(ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b",
    "ar": r"\sال^|ال",
}
_SQUAD_PUNCT = frozenset(string.punctuation)
_CJK = re.compile(r"[\u4e00-\u9fa5]")


@cache
def _mlqa_punct() -> frozenset[str]:
    """Every Unicode punctuation character (category P*) plus ASCII punctuation, as in MLQA's script."""
    return frozenset(chr(i) for i in range(sys.maxunicode)
                     if unicodedata.category(chr(i)).startswith("P")) | _SQUAD_PUNCT


def _mixed_segmentation(text: str, punct: frozenset[str]) -> list[str]:
    """zh: each Chinese character (and punctuation mark) is a token; other runs split on whitespace."""
    tokens, run = [], ""
    for char in text:
        if _CJK.search(char) or char in punct:
            tokens.extend(run.split())
            run = ""
            tokens.append(char)
        else:
            run += char
    tokens.extend(run.split())
    return tokens


def normalize_answer(text: str, lang: str | None = None) -> str:
    """Lower-case, drop punctuation, articles and extra whitespace (SQuAD v1.1 when lang is None, else MLQA)."""
    text = text.lower()
    if lang is None:
        text = "".join(ch for ch in text if ch not in _SQUAD_PUNCT)
        return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())
    if lang not in MLQA_LANGUAGES:
        raise LtsftError(f"MLQA evaluation has no rules for language {lang!r} (it knows {list(MLQA_LANGUAGES)}); "
                         "use the SQuAD v1.1 metric (lang=None) for other languages, as XQuAD does")
    punct = _mlqa_punct()
    text = "".join(ch for ch in text if ch not in punct)
    if lang in _MLQA_ARTICLES:
        text = re.sub(_MLQA_ARTICLES[lang], " ", text)
    tokens = _mixed_segmentation(text, punct) if lang == "zh" else text.split()
    return " ".join(t for t in tokens if t.strip())


def exact_match(prediction: str, gold: str, lang: str | None = None) -> float:
    return float(normalize_answer(prediction, lang) == normalize_answer(gold, lang))


def f1(prediction: str, gold: str, lang: str | None = None) -> float:
    predicted, wanted = normalize_answer(prediction, lang).split(), normalize_answer(gold, lang).split()
    same = sum((Counter(predicted) & Counter(wanted)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(wanted)
    return 2 * precision * recall / (precision + recall)


def qa_scores(golds: dict[str, list[str]], predictions: dict[str, str], lang: str | None = None) -> dict:
    """Official corpus scores in percent: max over the gold answers of each question, unanswered questions 0.

    Returns exact_match, f1, total (questions) and unanswered (gold ids with no prediction)."""
    if not golds:
        raise LtsftError("qa_scores: no gold questions to evaluate; check that the evaluation file was read")
    em = score = 0.0
    unanswered = 0
    for qid, answers in golds.items():
        if qid not in predictions:
            unanswered += 1
            continue
        em += max(exact_match(predictions[qid], a, lang) for a in answers)
        score += max(f1(predictions[qid], a, lang) for a in answers)
    total = len(golds)
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * score / total, "total": total,
            "unanswered": unanswered}


def accuracy(predictions, labels) -> float:
    """Fraction of correct labels; `predictions` may be class ids or logits (argmax over the last dim)."""
    predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
    if predictions.dim() == labels.dim() + 1:
        predictions = predictions.argmax(-1)
    if predictions.shape != labels.shape or labels.numel() == 0:
        raise LtsftError(f"accuracy: {tuple(predictions.shape)} predictions for {tuple(labels.shape)} labels; "
                         "pass one prediction per labelled example")
    return (predictions == labels).float().mean().item()


def accuracy_scores(logits, labels) -> dict:
    """A classifier's scores: accuracy in percent, the number of examples and each example's 0/1 correctness
    (`correct`, what the paired bootstrap of `ltsft_dist.report` resamples)."""
    predictions, labels = torch.as_tensor(logits).argmax(-1), torch.as_tensor(labels)
    return {"accuracy": 100.0 * accuracy(predictions, labels), "examples": labels.numel(),
            "correct": (predictions == labels).int().tolist()}


def token_accuracy(gold: list[list[str]], predicted: list[list[str]]) -> float:
    """Per-word accuracy (POS), over the words that have a prediction."""
    pairs = [(g, p) for gs, ps in zip(gold, predicted) for g, p in zip(gs, ps)]
    return 100.0 * sum(g == p for g, p in pairs) / max(1, len(pairs))


def _chunks(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) entities of a BIO / IOB1 / IO tag sequence, as conlleval reads them: an entity begins at
    B-X, or at I-X after O or after another type, and ends where the next one begins or at O."""
    chunks, kind, start = set(), None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, entity = tag.partition("-") if "-" in tag else (("O", "", None) if tag == "O" else ("I", "", tag))
        if kind is not None and (prefix in ("O", "B") or entity != kind):
            chunks.add((kind, start, i))
            kind = None
        if prefix != "O" and kind is None:
            kind, start = entity, i
    return chunks


def entity_f1(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Micro-averaged entity precision, recall and F1 (×100) over exact (type, span) matches, as conlleval."""
    correct = found = expected = 0
    for g, p in zip(gold, predicted):
        gold_chunks, predicted_chunks = _chunks(g[:len(p)]), _chunks(p)
        correct += len(gold_chunks & predicted_chunks)
        found += len(predicted_chunks)
        expected += len(gold_chunks)
    precision = 100.0 * correct / found if found else 0.0
    recall = 100.0 * correct / expected if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
