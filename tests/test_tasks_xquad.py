"""The QA pipeline on the real XQuAD data (../shared/data/xquad): reading, windows with a locally trained
tokenizer, gold answers recovered exactly through the offsets, and metric sanity in every language."""

from __future__ import annotations

import pytest
import torch
from conftest import require_shared_data

from ltsft_dist.data import train_wordpiece
from ltsft_dist.tasks import qa
from ltsft_dist.tasks.metrics import MLQA_LANGUAGES, qa_scores

LANGUAGES = ("en", "ar", "de", "es", "hi", "vi", "zh")  # all of them are also MLQA languages
WINDOWED = ("en", "ar", "hi", "zh")  # Latin, Arabic, Devanagari and Chinese script


@pytest.fixture(scope="module")
def xquad():
    root = require_shared_data() / "xquad"
    return {lang: qa.read_squad_json(root / f"xquad.{lang}.json") for lang in LANGUAGES}


def test_every_language_reads_completely_and_in_parallel(xquad):
    ids = [e.id for e in xquad["en"]]
    assert len(ids) == 1190 and len(set(ids)) == 1190
    for lang, examples in xquad.items():
        assert [e.id for e in examples] == ids, lang  # the same questions in every language
        assert {e.language for e in examples} == {lang}


def test_gold_answers_score_100_in_every_language(xquad):
    for lang, examples in xquad.items():
        golds = qa.gold_answers(examples)
        predictions = {qid: answers[0] for qid, answers in golds.items()}
        for metric_lang in (None, lang):  # XQuAD's own (SQuAD v1.1) metric and MLQA's
            scores = qa_scores(golds, predictions, metric_lang)
            assert (scores["exact_match"], scores["f1"], scores["unanswered"]) == (100.0, 100.0, 0), (lang, scores)
        wrong = {qid: xquad["en"][(i + 1) % len(examples)].answers[0]["text"] for i, qid in enumerate(golds)}
        assert qa_scores(golds, wrong, lang if lang in MLQA_LANGUAGES else None)["exact_match"] < 5


@pytest.fixture(scope="module")
def tokenizer(xquad):
    texts = {e.context for lang in WINDOWED for e in xquad[lang]} | {e.question for lang in WINDOWED
                                                                      for e in xquad[lang]}
    return train_wordpiece(sorted(texts), 4000)


@pytest.mark.parametrize("lang", WINDOWED)
def test_windows_map_gold_answers_back_through_the_offsets(xquad, tokenizer, lang):
    examples = xquad[lang]
    features = qa.encode_qa(tokenizer, examples, max_len=192, stride=64, max_query_len=48)
    report = features.report
    print(f"xquad.{lang}: {report}")
    assert report.features > len(examples)  # contexts are longer than one window
    # (nearly) every answer is inside a window and its tokens cover exactly the answer text
    missed = len(report.lost) + len(report.inexact)
    assert missed <= 0.01 * len(examples), (lang, report.lost, report.inexact)
    starts, ends = features.examples.tensors["start_positions"], features.examples.tensors["end_positions"]
    exact = 0
    for f, n in enumerate(features.example_index):
        if starts[f] > 0:
            ex, offsets = examples[n], features.offsets[f]
            exact += ex.context[offsets[starts[f]][0]:offsets[ends[f]][1]] == ex.answers[0]["text"].strip()
    assert exact >= 0.99 * int((starts > 0).sum())
    # post-processing logits that point at the labelled spans gives back the gold text for every such question
    n, length = starts.shape[0], 192
    start_logits, end_logits = torch.zeros(n, length), torch.zeros(n, length)
    has = starts > 0
    start_logits[has, starts[has]] = 10.0
    end_logits[has, ends[has]] = 10.0
    predictions = qa.predict_answers(features, examples, start_logits, end_logits, max_answer_len=192)
    missed_ids = set(report.lost) | set(report.inexact)
    wrong = [e.id for e in examples if e.id not in missed_ids and predictions[e.id] != e.answers[0]["text"]]
    assert wrong == []
    scores = qa_scores(qa.gold_answers(examples), predictions, lang)
    assert scores["exact_match"] >= 100.0 * (len(examples) - missed) / len(examples)
