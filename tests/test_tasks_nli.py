"""NLI readers (XNLI TSV and HF, MultiNLI JSONL, AmericasNLI TSV): one label scheme, per-language records,
skipped examples counted, bad input reported with file and line; encoding feeds a classifier."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from ltsft_dist.data import train_wordpiece
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks import nli
from ltsft_dist.tasks.metrics import accuracy

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tasks"
XNLI_HEADER = (FIXTURES / "xnli.dev.tsv").read_text().split("\n")[0]


def test_label_scheme_matches_hf_xnli():
    assert nli.LABELS == ("entailment", "neutral", "contradiction")  # HF xnli ClassLabel order
    assert [nli.label_id(x, "here") for x in ("entailment", "Neutral", "contradiction", "contradictory")] == \
        [0, 1, 2, 2]
    assert nli.label_id("-", "here") is None


def test_xnli_tsv_per_language_with_literal_quotes():
    data = nli.read_xnli_tsv(FIXTURES / "xnli.dev.tsv", languages=["en", "de"])
    assert list(data.by_language) == ["en", "de"]  # sw was not asked for
    en = data.by_language["en"]
    assert [r.label for r in en] == [2, 0, 1]
    assert [r.id for r in en] == ["1c", "2e", "3n"]
    # csv.QUOTE_NONE: a leading quote stays literal instead of swallowing the following lines
    assert en[1].premise == '"Well, I was not even thinking about that.'
    assert en[1].hypothesis == "I was not thinking about it."
    assert len(nli.read_xnli_tsv(FIXTURES / "xnli.dev.tsv")) == 8


def test_multinli_skips_and_reports_pairs_without_gold_label(caplog):
    data = nli.read_multinli_jsonl(FIXTURES / "multinli_sample.jsonl")
    assert data.skipped == 1
    assert [r.id for r in data.by_language["en"]] == ["1c", "2e", "3n"]
    assert "skipped 1 without a gold label" in data.report()
    assert "skipped 1" in caplog.text


def test_americasnli_tsv():
    data = nli.read_americasnli_tsv(FIXTURES / "americasnli_dev.tsv", languages=["quy"])
    assert [(r.id, r.language, r.label) for r in data.by_language["quy"]] == [("2001", "quy", 1), ("2002", "quy", 2)]


def test_same_pair_gets_the_same_label_from_every_source(monkeypatch):
    """The contradiction pair "1c" is 2 in XNLI TSV, MultiNLI, and HF (even with another ClassLabel order)."""
    labels = {nli.read_xnli_tsv(FIXTURES / "xnli.dev.tsv", ["en"]).by_language["en"][0].label,
              nli.read_multinli_jsonl(FIXTURES / "multinli_sample.jsonl").by_language["en"][0].label,
              nli.read_americasnli_tsv(FIXTURES / "americasnli_dev.tsv").by_language["aym"][0].label}
    other_order = datasets.ClassLabel(names=["contradiction", "entailment", "neutral"])
    features = datasets.Features(premise=datasets.Value("string"), hypothesis=datasets.Value("string"),
                                 label=other_order)
    ds = datasets.Dataset.from_dict({"premise": ["p"], "hypothesis": ["h"], "label": [0]}, features=features)
    labels.add(nli.records_from_dataset(ds, "en", "local").by_language["en"][0].label)
    assert labels == {2}


def test_xnli_from_the_hub_loader(monkeypatch):
    """The real datasets.load_dataset code path, fed a local Dataset with HF xnli's features."""
    features = datasets.Features(premise=datasets.Value("string"), hypothesis=datasets.Value("string"),
                                 label=datasets.ClassLabel(names=list(nli.LABELS)))
    calls = []

    def fake_load(path, name, split):
        calls.append((path, name, split))
        rows = {"premise": [f"{name} p1", f"{name} p2", f"{name} p3"], "hypothesis": ["h1", "h2", "h3"],
                "label": [0, 2, -1]}
        return datasets.Dataset.from_dict(rows, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = nli.read_xnli_hf(["de", "sw"], split="test")
    assert calls == [("facebook/xnli", "de", "test"), ("facebook/xnli", "sw", "test")]
    assert {lang: [r.label for r in rs] for lang, rs in data.by_language.items()} == {"de": [0, 2], "sw": [0, 2]}
    assert data.by_language["sw"][1].premise == "sw p2"
    assert data.skipped == 2

    def failing_load(path, name, split):
        raise ValueError(f"BuilderConfig {name!r} not found")

    monkeypatch.setattr(datasets, "load_dataset", failing_load)
    with pytest.raises(LtsftError, match=r"load_dataset\('facebook/xnli', 'xx'.*check the language code"):
        nli.read_xnli_hf(["xx"])


def test_combine_keeps_languages_and_skips():
    data = nli.combine(nli.read_multinli_jsonl(FIXTURES / "multinli_sample.jsonl"),
                       nli.read_xnli_tsv(FIXTURES / "xnli.dev.tsv", ["de", "en"]))
    assert list(data.by_language) == ["en", "de"]
    assert (len(data.by_language["en"]), data.skipped) == (6, 1)


def test_encoded_pairs_train_a_classifier_head():
    data = nli.read_xnli_tsv(FIXTURES / "xnli.dev.tsv")
    texts = [t for rs in data.by_language.values() for r in rs for t in (r.premise, r.hypothesis)]
    tok = train_wordpiece(texts, 200)
    per_language = nli.encode_by_language(tok, data, max_len=24)
    de = per_language["de"]
    assert de.tensors["input_ids"].shape == (3, 24)
    assert de.tensors["labels"].tolist() == [2, 0, 1]
    assert (de.tensors["input_ids"] == tok.sep_token_id).sum(1).tolist() == [2, 2, 2]  # premise [SEP] hypothesis
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20, vocab_size=len(tok),
        max_position_embeddings=32, num_labels=3))
    out = model(**de.tensors)
    assert torch.isfinite(out.loss)
    assert 0.0 <= accuracy(out.logits, de.tensors["labels"]) <= 1.0


# ------------------------------------------------------------------------------------------------ bad input


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_unknown_label_names_file_and_line(tmp_path):
    path = _write(tmp_path, "anli.tsv", "id\tlanguage\tpremise\thypothesis\tlabel\n1\taym\tp\th\tneutral\n"
                                        "2\taym\tp\th\tentails\n")
    with pytest.raises(LtsftError, match=r"anli.tsv:3: unknown label 'entails'; use one of \['entailment'"):
        nli.read_americasnli_tsv(path)


def test_missing_column_names_the_header(tmp_path):
    path = _write(tmp_path, "xnli.tsv", "language\tsentence1\tsentence2\nen\ta\tb\n")
    with pytest.raises(LtsftError, match=r"xnli.tsv:1: missing column\(s\) \['gold_label'\]"):
        nli.read_xnli_tsv(path)


def test_wrong_field_count_names_the_line(tmp_path):
    path = _write(tmp_path, "anli.tsv", "id\tlanguage\tpremise\thypothesis\tlabel\n1\taym\tp\th\tneutral\n"
                                        "2\taym\tp with\ta tab\th\tneutral\n")
    with pytest.raises(LtsftError, match=r"anli.tsv:3: 6 tab-separated fields, the header has 5"):
        nli.read_americasnli_tsv(path)


def test_language_without_data_lists_what_the_file_has():
    with pytest.raises(LtsftError, match=r"no labelled examples for language\(s\) \['fr'\]; the file has "
                                         r"\['de', 'en', 'sw'\]"):
        nli.read_xnli_tsv(FIXTURES / "xnli.dev.tsv", ["en", "fr"])


def test_empty_and_malformed_files(tmp_path):
    with pytest.raises(LtsftError, match="empty.jsonl: the file is empty"):
        nli.read_multinli_jsonl(_write(tmp_path, "empty.jsonl", "\n \n"))
    with pytest.raises(LtsftError, match="header but no rows"):
        nli.read_xnli_tsv(_write(tmp_path, "head.tsv", XNLI_HEADER + "\n"))
    good = json.dumps({"gold_label": "neutral", "sentence1": "a", "sentence2": "b"})
    with pytest.raises(LtsftError, match=r"bad.jsonl:2: not valid JSON"):
        nli.read_multinli_jsonl(_write(tmp_path, "bad.jsonl", good + "\n{\"gold_label\": \n"))
    with pytest.raises(LtsftError, match=r"keys.jsonl:1: missing \['sentence2'\]"):
        nli.read_multinli_jsonl(_write(tmp_path, "keys.jsonl", '{"gold_label": "neutral", "sentence1": "a"}\n'))
    with pytest.raises(LtsftError, match=r"only-dash.jsonl: no labelled examples \(1 without a gold label\)"):
        nli.read_multinli_jsonl(_write(tmp_path, "only-dash.jsonl", good.replace("neutral", "-") + "\n"))
    with pytest.raises(LtsftError, match="not found"):
        nli.read_xnli_tsv(tmp_path / "missing.tsv")
