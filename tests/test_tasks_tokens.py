"""Token classification: CoNLL readers, first-subword labels, conlleval-style entity F1, and `ltsft train` +
`ltsft eval` of an NER task SFT end to end (scores equal to a hand-run evaluation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ltsft_dist.data import train_wordpiece
from ltsft_dist.demo_text import NAMES, sentences
from ltsft_dist.errors import LtsftError
from ltsft_dist.launch_env import free_port
from ltsft_dist.tasks.metrics import entity_f1, token_accuracy
from ltsft_dist.tasks.tokens import encode_tokens, predicted_tags, read_conll

CONLLU = """# sent_id = 1
# text = Anna's dog sleeps.
1-2\tAnna's\t_\t_\t_\t_\t_\t_\t_\t_
1\tAnna\tAnna\tPROPN\t_\t_\t3\tnmod\t_\t_
2\t's\t's\tPART\t_\t_\t1\tcase\t_\t_
3\tdog\tdog\tNOUN\t_\t_\t4\tnsubj\t_\t_
3.1\tis\tbe\tAUX\t_\t_\t_\t_\t_\t_
4\tsleeps\tsleep\tVERB\t_\t_\t0\troot\t_\t_

1\tGo\tgo\tVERB\t_\t_\t0\troot\t_\t_
"""

WIKIANN = """-DOCSTART- O

de:Anna B-PER
de:Schmidt I-PER
de:wohnt O
de:in O
de:Berlin B-LOC
"""


def test_conllu_keeps_words_with_their_upos(tmp_path):
    path = tmp_path / "de.conllu"
    path.write_text(CONLLU)
    first, second = read_conll(path, "en")
    assert first.words == ["Anna", "'s", "dog", "sleeps"] and first.tags == ["PROPN", "PART", "NOUN", "VERB"]
    assert second.words == ["Go"] and second.id.endswith(":10")  # its first line


def test_conll_columns_skip_docstart_and_wikiann_prefixes(tmp_path):
    path = tmp_path / "de.txt"
    path.write_text(WIKIANN)
    (sentence,) = read_conll(path, "de")
    assert sentence.words == ["Anna", "Schmidt", "wohnt", "in", "Berlin"]
    assert sentence.tags == ["B-PER", "I-PER", "O", "O", "B-LOC"]


@pytest.mark.parametrize("text, message", [
    ("", "the file is empty"),
    ("# only a comment\n", "no tagged sentences"),
    ("word\n", r":1: expected a word and its tag"),
    ("1\ta\ta\tX\t_\t_\t_\t_\t_\t_\n2\tb\tb\n", r":2: a CoNLL-U line needs 10 tab-separated columns, found 3"),
])
def test_malformed_conll_names_the_line(tmp_path, text, message):
    path = tmp_path / "bad.conll"
    path.write_text(text)
    with pytest.raises(LtsftError, match=message):
        read_conll(path, "en")


def test_entity_f1_reads_chunks_as_conlleval():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["I-ORG", "I-ORG", "B-ORG"]]
    # PER right, LOC typed wrong; in sentence 2, I-ORG after O begins a chunk (IOB1): "I-ORG I-ORG" and "B-ORG"
    predicted = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG", "I-ORG"]]
    scores = entity_f1(gold, predicted)
    # gold chunks: PER(0,2) LOC(3,4) | ORG(0,2) ORG(2,3); predicted: PER(0,2) ORG(3,4) | ORG(0,3)
    assert scores["precision"] == pytest.approx(100 * 1 / 3) and scores["recall"] == pytest.approx(100 * 1 / 4)
    assert scores["f1"] == pytest.approx(2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4) * 100)
    assert entity_f1([["O", "O"]], [["O", "O"]])["f1"] == 0.0
    assert token_accuracy([["A", "B"], ["C"]], [["A", "X"], ["C"]]) == pytest.approx(200 / 3)


def test_labels_sit_on_first_subwords_and_truncated_words_are_counted(tmp_path):
    path = tmp_path / "x.conll"
    path.write_text(WIKIANN)
    data = read_conll(path, "de")
    tokenizer = train_wordpiece(["anna wohnt in berlin"], vocab_size=60)  # "schmidt" splits into pieces
    labels = ["B-LOC", "B-PER", "I-PER", "O"]
    full = encode_tokens(tokenizer, data, 32, labels)
    row = full.examples.tensors["labels"][0]
    assert [labels[int(row[p])] for p in full.first_subword[0]] == data[0].tags
    assert int((row != -100).sum()) == 5 and full.truncated_words == 0
    cut = encode_tokens(tokenizer, data, 5, labels)  # [CLS] + 3 pieces + [SEP]
    assert cut.truncated_words == 5 - len(cut.first_subword[0]) > 0
    logits = torch.zeros(1, 32, 4)
    logits[0, :, 3] = 1.0  # "O" everywhere
    assert predicted_tags(full, logits, labels) == [["O"] * 5]
    with pytest.raises(LtsftError, match="tag 'B-PER' is not one of the labels"):
        encode_tokens(tokenizer, data, 32, ["O"])


def ner_file(path: Path, language: str, n: int, seed: int) -> Path:
    """Generated sentences tagged B-PER on the shared names, O elsewhere, in WikiANN's column format."""
    lines = []
    for sentence in sentences(language, n, seed=seed):
        lines += [f"{language}:{w} {'B-PER' if w in NAMES else 'O'}" for w in sentence.split()] + [""]
    path.write_text("\n".join(lines))
    return path


@pytest.mark.slow
def test_ner_task_sft_trains_and_evaluates_end_to_end(tmp_path):
    from transformers import AutoTokenizer

    from ltsft_dist.config import ModelConfig
    from ltsft_dist.models import load_task_model, save_tiny_base
    from ltsft_dist.sft import SparseFineTuning

    train, test = ner_file(tmp_path / "train.txt", "de", 96, 1), ner_file(tmp_path / "test.txt", "de", 40, 2)
    tiny = {"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 64}
    save_tiny_base(tmp_path / "base", ModelConfig(tiny=tiny), sentences("de", 300, seed=1), seed=0)
    config = {"kind": "task", "task": "ner", "languages": ["de"], "output_dir": str(tmp_path / "out"),
              "model": {"name_or_path": str(tmp_path / "base")}, "density": 0.05,
              "data": {"train_file": str(train), "max_seq_length": 24},
              "phase1": {"steps": 6, "lr": 3e-3}, "phase2": {"steps": 6, "lr": 3e-3},
              "batch_size": 16, "micro_batch_size": 16, "deepspeed": "zero2.json"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    for argv in (["train", str(tmp_path / "run.yaml")],
                 ["eval", "--base", str(tmp_path / "base"), "--task-sft", str(tmp_path / "out" / "sft"), "--data",
                  f"de={test}", "--max-seq-length", "24", "--out", str(tmp_path / "eval"), "--no-progress"]):
        result = subprocess.run([sys.executable, "-m", "ltsft_dist.cli", *argv], capture_output=True, text=True,
                                env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    sft = SparseFineTuning.from_pretrained(tmp_path / "out" / "sft")
    assert sft.metadata.training_config["data"]["labels"] == ["B-PER", "O"]
    assert sorted(sft.heads) == ["classifier.bias", "classifier.weight"] and sft.heads["classifier.bias"].shape == (2,)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["task"] == "ner" and results["metric"] == "entity f1"  # told by the SFT's training config
    got = results["languages"]["de"]["task-only"]
    # by hand: the SFT applied to the base, first-subword argmax, conlleval chunks
    model = load_task_model(str(tmp_path / "base"), "ner", 2)
    sft.apply(model)
    data = read_conll(test, "de")
    features = encode_tokens(AutoTokenizer.from_pretrained(str(tmp_path / "base")), data, 24, ["B-PER", "O"])
    with torch.no_grad():
        logits = model(**{k: v for k, v in features.examples.tensors.items() if k != "labels"}).logits
    expected = entity_f1([s.tags for s in data], predicted_tags(features, logits, ["B-PER", "O"]))
    assert got["f1"] == pytest.approx(expected["f1"]) and got["examples"] == 40
    assert got["words_lost_to_truncation"] == features.truncated_words
    # exported, it is a plain transformers token classifier with the tag names and the same logits
    from transformers import AutoModelForTokenClassification

    result = subprocess.run([sys.executable, "-m", "ltsft_dist.cli", "export", "--base", str(tmp_path / "base"),
                             "--sft", str(tmp_path / "out" / "sft"), "--task", "ner", "-o", str(tmp_path / "merged")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    merged = AutoModelForTokenClassification.from_pretrained(str(tmp_path / "merged")).eval()
    assert merged.config.id2label == {0: "B-PER", 1: "O"}
    with torch.no_grad():
        again = merged(**{k: v for k, v in features.examples.tensors.items() if k != "labels"}).logits
    assert torch.equal(again, logits)
