"""Extractive QA: SQuAD-format reading, windows with stride, start/end labels through the offsets, answers lost
to truncation reported, n-best post-processing back to text, HF squad-like datasets, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from ltsft_dist.data import train_wordpiece
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks import qa

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tasks" / "squad_tiny.json"


@pytest.fixture(scope="module")
def examples():
    return qa.read_squad_json(FIXTURE, language="en")


@pytest.fixture(scope="module")
def tok(examples):
    return train_wordpiece([e.context for e in examples] + [e.question for e in examples], 300)


def oracle_logits(features):
    """Logits that peak at the labelled start/end of every window that holds its answer."""
    n, length = features.examples.tensors["input_ids"].shape
    start, end = torch.zeros(n, length), torch.zeros(n, length)
    for f in range(n):
        s, e = features.examples.tensors["start_positions"][f], features.examples.tensors["end_positions"][f]
        if s > 0:
            start[f, s], end[f, e] = 5.0, 5.0
    return start, end


def test_reads_squad_v1_format(examples):
    assert [e.id for e in examples] == ["elbe-source", "elbe-saxony", "elbe-mouth", "elbe-length", "curie-born",
                                        "curie-year"]
    assert qa.gold_answers(examples)["elbe-saxony"] == ["Dresden", "Dresden, the capital of Saxony"]
    assert {e.language for e in examples} == {"en"}


def test_language_from_official_file_names():
    assert qa.infer_language("/data/xquad/xquad.de.json") == "de"
    assert qa.infer_language("MLQA_V1/dev/dev-context-zh-question-en.json") == "zh"  # answers are in the context
    assert qa.infer_language("train-v1.1.json") is None
    with pytest.raises(LtsftError, match="pass language="):
        qa.read_squad_json(FIXTURE)


def test_windows_overlap_by_stride_and_label_the_answer(examples, tok):
    features = qa.encode_qa(tok, examples, max_len=48, stride=8, max_query_len=16)
    ids = features.examples.tensors["input_ids"]
    assert ids.shape[1] == 48 and ids.shape[0] == len(features.offsets) == len(features.example_index)
    elbe = [f for f, n in enumerate(features.example_index) if n == 0]
    assert len(elbe) >= 3  # the long context needs several windows
    for a, b in zip(elbe, elbe[1:]):  # consecutive windows share exactly `stride` context tokens
        tail = [o for o in features.offsets[a] if o is not None][-8:]
        head = [o for o in features.offsets[b] if o is not None][:8]
        assert tail == head
    starts, ends = features.examples.tensors["start_positions"], features.examples.tensors["end_positions"]
    for f, n in enumerate(features.example_index):
        ex, offsets = examples[n], features.offsets[f]
        if starts[f] == 0:
            assert ends[f] == 0
            continue
        gold = ex.answers[0]["text"]
        assert ex.context[offsets[starts[f]][0]:offsets[ends[f]][1]] == gold
    labelled = {features.example_index[f] for f in range(len(starts)) if starts[f] > 0}
    assert labelled == set(range(len(examples)))  # every answer is in some window
    report = features.report
    assert (report.examples, report.features, report.lost, report.inexact) == (6, len(starts), [], [])
    assert report.windows_without_answer == int((starts == 0).sum()) > 0


def test_answers_lost_to_truncation_are_reported_not_dropped(examples, tok, caplog):
    """An answer longer than a window's context fits in no window: reported, its windows kept at index 0."""
    context = examples[0].context
    long_answer = context[:context.index("Dresden")].strip()  # the first two sentences
    too_long = qa.QAExample("too-long", "Which course?", context, [{"text": long_answer, "answer_start": 0}], "en")
    features = qa.encode_qa(tok, [too_long, examples[4]], max_len=32, stride=4, max_query_len=8)
    assert len(tok.tokenize(long_answer)) > 32 - 3 - len(tok.tokenize("Which course?"))  # > room per window
    assert features.report.lost == ["too-long"]
    assert set(features.example_index) == {0, 1}  # the question still has its windows
    for f, n in enumerate(features.example_index):
        if n == 0:
            assert features.examples.tensors["start_positions"][f] == 0
    assert any(features.examples.tensors["start_positions"][f] > 0
               for f, n in enumerate(features.example_index) if n == 1)
    assert "1 answers lost to truncation" in caplog.text
    assert "answers lost to truncation: 1;" in str(features.report)


def test_long_questions_are_cut_to_max_query_len(examples, tok):
    long_question = qa.QAExample("long", "Where " * 40 + "is Warsaw?", examples[4].context, examples[4].answers, "en")
    features = qa.encode_qa(tok, [long_question], max_len=48, stride=8, max_query_len=10)
    question_tokens = [s for s in _sequence_ids(tok, features, 0) if s == 0]
    assert len(question_tokens) == 10
    assert features.report.questions_truncated == 1


def _sequence_ids(tok, features, f):
    ids = features.examples.tensors["input_ids"][f].tolist()
    first_sep = ids.index(tok.sep_token_id)
    return [0] * (first_sep - 1) + [None] + [1] * (len(ids) - first_sep - 1)


def test_postprocessing_recovers_answers_and_respects_limits(examples, tok):
    features = qa.encode_qa(tok, examples, max_len=48, stride=8, max_query_len=16)
    start, end = oracle_logits(features)
    predictions = qa.predict_answers(features, examples, start, end)
    assert predictions == {e.id: e.answers[0]["text"] for e in examples}
    # an answer longer than max_answer_len tokens is never predicted: "about 1094 kilometres" has > 2 tokens
    short = qa.predict_answers(features, examples, start, end, max_answer_len=2)
    assert short["elbe-length"] != "about 1094 kilometres"
    assert len(tok.tokenize(short["curie-born"])) <= 2
    # the best window wins: boost a wrong span in one Elbe window above the gold one
    f = next(f for f, n in enumerate(features.example_index) if n == 2 and features.examples.tensors[
        "start_positions"][f] == 0)
    inside = [i for i, o in enumerate(features.offsets[f]) if o is not None]
    start[f, inside[0]], end[f, inside[1]] = 9.0, 9.0
    context, offsets = examples[2].context, features.offsets[f]
    assert qa.predict_answers(features, examples, start, end)["elbe-mouth"] == \
        context[offsets[inside[0]][0]:offsets[inside[1]][1]]
    # spans outside the context (question, [CLS], padding) are never chosen, even if they score best
    no_context = torch.zeros_like(start)
    no_context[:, 0] = 100.0
    assert set(qa.predict_answers(features, examples, no_context, no_context, n_best=1).values()) == {""}
    with pytest.raises(LtsftError, match="do not match"):
        qa.predict_answers(features, examples, start[:2], end[:2])


def test_features_feed_a_question_answering_model(examples, tok):
    features = qa.encode_qa(tok, examples, max_len=48, stride=8, max_query_len=16)
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=20, vocab_size=len(tok),
                                                max_position_embeddings=64))
    out = model(**features.examples.tensors)
    assert torch.isfinite(out.loss)
    predictions = qa.predict_answers(features, examples, out.start_logits.detach(), out.end_logits.detach())
    assert set(predictions) == {e.id for e in examples}
    for e in examples:  # whatever an untrained model picks is a piece of its own context
        assert predictions[e.id] in e.context


def test_too_large_stride_is_a_clear_error(examples, tok):
    with pytest.raises(LtsftError, match="stride=50 must be smaller"):
        qa.encode_qa(tok, examples, max_len=64, stride=50, max_query_len=16)


def test_hf_squad_like_dataset(monkeypatch, examples):
    rows = {"id": [e.id for e in examples], "title": ["t"] * len(examples), "context": [e.context for e in examples],
            "question": [e.question for e in examples],
            "answers": [{"text": [a["text"] for a in e.answers], "answer_start": [a["answer_start"] for a in e.answers]}
                        for e in examples]}
    calls = []

    def fake_load(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    loaded = qa.load_squad_hf("google/xquad", "de", config="xquad.de")
    assert calls == [("google/xquad", "xquad.de", "validation")]
    assert [(e.id, e.answers, e.language) for e in loaded] == [(e.id, e.answers, "de") for e in examples]
    rows["answers"][1] = {"text": ["Dresden"], "answer_start": [3]}
    with pytest.raises(LtsftError, match=r"question elbe-saxony, answer 0: answer_start 3 does not match"):
        qa.load_squad_hf("google/xquad", "de", config="xquad.de")


# ------------------------------------------------------------------------------------------------ bad input


def _squad(tmp_path, qas, context="Paris is the capital of France.", name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": context, "qas": qas}]}]}), encoding="utf-8")
    return path


def test_answer_start_mismatch_names_the_question_and_the_fix(tmp_path):
    path = _squad(tmp_path, [{"id": "q1", "question": "?", "answers": [{"text": "France", "answer_start": 20}]}])
    with pytest.raises(LtsftError, match=r"bad.json: question q1, answer 0: answer_start 20 does not match the "
                                         r"answer 'France'.*set answer_start to 24"):
        qa.read_squad_json(path, "en")
    path = _squad(tmp_path, [{"id": "q2", "question": "?", "answers": [{"text": "Lyon", "answer_start": 0}]}])
    with pytest.raises(LtsftError, match="does not occur in the context"):
        qa.read_squad_json(path, "en")


def test_malformed_and_incomplete_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": "1.1",\n "data": [\n {"title": "t",, }]}', encoding="utf-8")
    with pytest.raises(LtsftError, match=r"broken.json:3: not valid JSON"):
        qa.read_squad_json(broken, "en")
    with pytest.raises(LtsftError, match=r"question q1: missing \['answers'\]"):
        qa.read_squad_json(_squad(tmp_path, [{"id": "q1", "question": "?"}]), "en")
    with pytest.raises(LtsftError, match=r"data\[0\].paragraphs\[0\]: missing \['context'\]"):
        path = tmp_path / "noctx.json"
        path.write_text(json.dumps({"data": [{"paragraphs": [{"qas": []}]}]}))
        qa.read_squad_json(path, "en")
    with pytest.raises(LtsftError, match="question q1: no answers"):
        qa.read_squad_json(_squad(tmp_path, [{"id": "q1", "question": "?", "answers": []}]), "en")
    dup = [{"id": "q1", "question": "?", "answers": [{"text": "Paris", "answer_start": 0}]}] * 2
    with pytest.raises(LtsftError, match="duplicate question id 'q1'"):
        qa.read_squad_json(_squad(tmp_path, dup), "en")
    with pytest.raises(LtsftError, match="no questions"):
        qa.read_squad_json(_squad(tmp_path, []), "en")
    with pytest.raises(LtsftError, match="not SQuAD v1.1 format"):
        path = tmp_path / "list.json"
        path.write_text("[1, 2]")
        qa.read_squad_json(path, "en")
    with pytest.raises(LtsftError, match="the file is empty"):
        path = tmp_path / "empty.json"
        path.write_text("")
        qa.read_squad_json(path, "en")
