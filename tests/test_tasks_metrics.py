"""QA metrics equal the official SQuAD v1.1 and MLQA scripts on hand-checked cases; NLI accuracy.

Expected values were worked out by hand from the official scripts' rules (evaluate-v1.1.py,
facebookresearch/MLQA mlqa_evaluation_v1.py): F1 = 2PR/(P+R) over the normalised tokens.
"""

from __future__ import annotations

import pytest
import torch

from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks.metrics import accuracy, exact_match, f1, normalize_answer, qa_scores

CASES = [  # prediction, gold, lang (None = SQuAD v1.1), EM, F1
    # SQuAD v1.1: English articles, ASCII punctuation only
    ("the Eiffel Tower", "Eiffel Tower.", None, 1, 1),
    ("Eiffel Tower in Paris", "the Eiffel Tower", None, 0, 2 / 3),  # P 2/4, R 2/2
    ("paris paris london", "paris london london", None, 0, 2 / 3),  # multiset overlap 2 of 3
    ("The", "an", None, 1, 0),  # both normalise to "": EM 1 but F1 0, as in the official script
    ("«Paris»", "Paris", None, 0, 0),  # « » are not ASCII punctuation
    ("der Vertrag von Versailles", "Vertrag von Versailles", None, 0, 6 / 7),  # P 3/4, R 1
    ("भारत।", "भारत", None, 0, 0),  # the danda is not ASCII punctuation
    ("سل ة", "سلالة", None, 0, 0),
    ("北京大学", "北京", None, 0, 0),  # one whitespace token each
    # MLQA: Unicode punctuation and per-language articles
    ("«Paris»", "Paris", "en", 1, 1),
    ("der Vertrag von Versailles", "Vertrag von Versailles", "de", 1, 1),
    ("Die Verträge", "den Verträge", "de", 1, 1),
    ("los Estados Unidos", "Estados Unidos", "es", 1, 1),
    ("las", "una", "es", 1, 0),
    ("của Việt Nam", "Việt Nam", "vi", 1, 1),
    ("những cái bàn", "bàn", "vi", 1, 1),
    ("Việt Nam", "Việt", "vi", 0, 2 / 3),
    ("भारत।", "भारत", "hi", 1, 1),
    ("the भारत", "भारत", "hi", 0, 2 / 3),  # Hindi has no article rule, so "the" stays
    ("قاهرة", "القاهرة", "ar", 1, 1),
    ("سل ة", "سلالة", "ar", 1, 1),  # MLQA removes "ال" inside words too: سلالة -> "سل ة"
    # MLQA zh: one token per Chinese character, whitespace tokens otherwise
    ("北京大学", "北京", "zh", 0, 2 / 3),  # 北 京 大 学 vs 北 京
    ("2008年北京奥运会", "北京奥运会", "zh", 0, 5 / 6),  # P 5/7, R 1
    ("NFL联盟", "NFL", "zh", 0, 1 / 2),  # nfl 联 盟 vs nfl
    ("北京，", "北京", "zh", 1, 1),
    ("the 北京", "北京", "zh", 0, 4 / 5),  # no article rule for zh
]


@pytest.mark.parametrize("prediction,gold,lang,em,score", CASES)
def test_official_scores_hand_checked(prediction, gold, lang, em, score):
    assert exact_match(prediction, gold, lang) == em
    assert f1(prediction, gold, lang) == pytest.approx(score, abs=1e-12)


def test_normalisation_details():
    assert normalize_answer("  The  Big,  Apple! ") == "big apple"
    assert normalize_answer("2008年北京", "zh") == "2008 年 北 京"
    assert normalize_answer("Die Katze, der Hund", "de") == "katze hund"
    with pytest.raises(LtsftError, match="SQuAD v1.1 metric"):
        normalize_answer("Αθήνα", "el")  # XQuAD targets are scored with the SQuAD script


def test_corpus_scores_take_the_best_gold_and_count_unanswered():
    golds = {"q1": ["Denver Broncos", "Broncos"], "q2": ["Carolina Panthers"], "q3": ["Levi's Stadium"]}
    predictions = {"q1": "Broncos", "q2": "the Panthers", "extra": "ignored"}
    scores = qa_scores(golds, predictions)
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)  # q2: P 1, R 1/2
    assert (scores["total"], scores["unanswered"]) == (3, 1)
    with pytest.raises(LtsftError, match="no gold"):
        qa_scores({}, predictions)


def test_accuracy_from_ids_or_logits():
    labels = torch.tensor([0, 2, 2])
    assert accuracy(torch.tensor([[2.0, 1, 0], [0, 3, 1], [0, 0, 1]]), labels) == pytest.approx(2 / 3)
    assert accuracy([0, 2, 1], [0, 2, 2]) == pytest.approx(2 / 3)
    with pytest.raises(LtsftError, match="one prediction per labelled example"):
        accuracy([0, 1], labels)
