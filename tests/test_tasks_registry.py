"""The task registry's contract: every registered task has what the interface requires and works through it
(read -> texts -> encode -> forward -> score), unknown task and format names fail naming the valid ones, a new task
is one registered class, and nothing outside `ltsft_dist/tasks/` branches on a task's name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import BertConfig

from ltsft_dist.config import SourceConfig, load_config
from ltsft_dist.data import Examples, train_wordpiece
from ltsft_dist.errors import LtsftError
from ltsft_dist.evaluation import EvalOptions, read_eval_data
from ltsft_dist.tasks import FORMAT_NAMES, Encoded, Encoding, Task, get_task, task_names
from ltsft_dist.tasks import base as registry
from ltsft_dist.tasks.classification import Classification
from ltsft_dist.training_data import read_source

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
PACKAGE = Path(__file__).parent.parent / "ltsft_dist"
LINES = ["the river flows north", "a cat sat on the mat", "she reads the book", "we walk to the town"] * 3


def _files(tmp_path: Path) -> dict[str, Path]:
    """One small file per task, in a format the task tells by itself (format: auto)."""
    text = tmp_path / "text.txt"
    text.write_text("\n".join(LINES) + "\n")
    jsonl = tmp_path / "cls.jsonl"
    jsonl.write_text("".join(f'{{"text": "{line}", "label": "{"ab"[i % 2]}"}}\n' for i, line in enumerate(LINES)))
    conll = tmp_path / "ner.conll"
    conll.write_text("Anna B-PER\nwohnt O\nin O\nBerlin B-LOC\n\nDer O\nFluss O\nflie\u00dft O\n")
    conllu = tmp_path / "pos.conllu"
    conllu.write_text("1\tAnna\t_\tPROPN\t_\t_\t2\tnsubj\t_\t_\n2\tschl\u00e4ft\t_\tVERB\t_\t_\t0\troot\t_\t_\n\n"
                      "1\tWir\t_\tPRON\t_\t_\t2\tnsubj\t_\t_\n2\tgehen\t_\tVERB\t_\t_\t0\troot\t_\t_\n")
    instruct = tmp_path / "instruct.jsonl"
    instruct.write_text("".join(f'{{"prompt": "{a}", "response": "{b}"}}\n' for a, b in zip(LINES, LINES[1:])))
    copa = tmp_path / "copa.jsonl"
    copa.write_text("".join(json.dumps({"premise": f"{a}.", "choice1": b, "choice2": c, "question": q, "label": i % 2})
                            + "\n" for i, (a, b, c, q) in enumerate(zip(LINES, LINES[1:], LINES[2:],
                                                                      ["cause", "effect"] * 6))))
    return {"mlm": text, "clm": text, "instruct": instruct, "xcopa": copa, "classification": jsonl,
            "nli": FIXTURES / "xnli.dev.tsv", "xnli_ll": FIXTURES / "xnli.dev.tsv", "qa": FIXTURES / "squad_tiny.json",
            "belebele": FIXTURES / "belebele_eng_Latn.jsonl", "ner": conll, "pos": conllu}


def _overrides(task: type[Task], *names: str) -> list[str]:
    return [name for name in names if getattr(task, name) is not getattr(Task, name)]


def test_the_eleven_tasks_are_registered_with_what_the_interface_requires():
    assert sorted(task_names()) == ["belebele", "classification", "clm", "instruct", "mlm", "ner", "nli", "pos", "qa",
                                    "xcopa", "xnli_ll"]
    assert sorted(task_names(evaluated=True)) == ["belebele", "classification", "clm", "ner", "nli", "pos", "qa",
                                                  "xcopa", "xnli_ll"]
    assert task_names(kind="language") == ["mlm", "clm"]
    assert [name for name in task_names() if get_task(name).decoder] == ["clm", "instruct", "xcopa", "xnli_ll",
                                                                         "belebele"]
    for name in task_names():
        task = get_task(name)
        assert task.name == name and task.kind in ("language", "task")
        assert task.auto_class().__name__ == task.model_class  # a real transformers Auto class
        assert task.formats and set(task.formats) <= set(FORMAT_NAMES) - {"auto"}
        assert all(callable(fmt.read) for fmt in task.formats.values())
        assert any(fmt.suffixes for fmt in task.formats.values()), f"{name}: no file format to sniff"
        assert _overrides(type(task), "texts", "encode") == ["texts", "encode"], name
        if task.labelled and task.fixed_labels is None:
            assert _overrides(type(task), "record_labels") == ["record_labels"], name
        if task.metrics:
            assert _overrides(type(task), "score") == ["score"], name
            assert task.output_fields


@pytest.mark.parametrize("name", ["mlm", "clm", "instruct", "classification", "nli", "qa", "ner", "pos", "xcopa",
                                  "xnli_ll", "belebele"])
def test_every_task_reads_encodes_and_scores_through_the_interface(name, tmp_path):
    task, path = get_task(name), _files(tmp_path)[name]
    fmt = task.sniff(path)
    assert fmt in task.formats
    language = "en" if name in ("nli", "qa", "xcopa", "xnli_ll", "belebele") else "de"
    records = read_source(SourceConfig(language=language, train_file=str(path)), name).records
    texts = task.texts(records)
    assert texts and all(isinstance(t, str) and t.strip() for t in texts)
    tokenizer = train_wordpiece(texts, vocab_size=300, causal=task.decoder)
    labels = task.label_names(records, None)
    assert (labels is not None) == task.labelled
    encoded = task.encode(tokenizer, records, Encoding(max_seq_length=64, stride=8, max_query_length=8), labels)
    assert isinstance(encoded, Encoded) and isinstance(encoded.examples, Examples)
    assert encoded.records == records
    n = len(list(records))  # (a language task's records are a lazy TextSource)
    # QA: windows per question; multiple choice: a row per choice; clm: packed blocks of the lines
    assert encoded.rows == n or name in ("qa", "xcopa", "xnli_ll", "belebele") and encoded.rows > n or name == "clm"
    assert all(len(t) == encoded.rows for t in encoded.examples.tensors.values())
    assert encoded.examples.mlm is not None or any(k in encoded.examples.tensors for k in ("labels", "start_positions"))
    if not task.metrics:
        return
    model = task.auto_class().from_config(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32,
                                                     max_position_embeddings=64, num_labels=len(labels or "01")))
    with torch.inference_mode():
        outputs = task.forward(model.eval(), encoded.examples.tensors)
    assert len(outputs) == len(task.output_fields) and all(o.shape[0] == encoded.rows for o in outputs)
    scores = task.score(encoded, outputs, language, EvalOptions())
    assert set(task.metrics) <= set(scores) and scores["examples"] == n
    assert all(0 <= scores[m] <= 100 for m in task.metrics)


def test_unknown_task_and_format_names_list_the_valid_ones(tmp_path):
    with pytest.raises(LtsftError, match=r"--task: 'nope' is not a task; use one of .*classification.*mlm.*qa"):
        get_task("nope", "--task")
    with pytest.raises(LtsftError, match=r"'mlm' is not an evaluated task; use one of .*nli.*qa"):
        get_task("mlm", "--task", evaluated=True)
    config = {"kind": "task", "task": "nli", "model": {"tiny": {"vocab_size": 10}}, "density": 0.1,
              "data": {"train_file": "x.tsv", "format": "xnli_tsv"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(LtsftError, match=r"data.train_file.format: 'xnli_tsv' is not one of auto, xnli-tsv, "
                                         r"americasnli-tsv, multinli-jsonl, hf \(did you mean xnli-tsv\?\)"):
        load_config(path)
    config["data"]["format"] = "squad"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(LtsftError, match="'squad' is a QA format; nli data is read as one of auto, xnli-tsv"):
        load_config(path)
    with pytest.raises(LtsftError, match=r"--format conll is an NER(/POS)? format; qa data is read as one of auto, squad"):
        read_eval_data("qa", "en", FIXTURES / "squad_tiny.json", "conll")


def test_a_new_task_is_one_registered_class(tmp_path):
    """What a new task module does: subclass `Task` (here: classification under another name) and register it;
    configs, training data and the model builder then know it."""

    class Sentiment(Classification):
        name = "sentiment"

    registry.register_task(Sentiment)
    try:
        assert "sentiment" in task_names() and "sentiment" in task_names(evaluated=True)  # scored as classification is
        with pytest.raises(LtsftError, match="'sentiment' is registered twice"):
            registry.register_task(Sentiment)
        path = _files(tmp_path)["classification"]
        config = {"kind": "task", "task": "sentiment", "model": {"tiny": {"vocab_size": 10}}, "density": 0.1,
                  "data": {"train_file": str(path)}}
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
        assert load_config(tmp_path / "run.yaml").task == "sentiment"
        assert len(read_source(SourceConfig(language="en", train_file=str(path)), "sentiment").records) == 12
    finally:
        del registry._TASKS["sentiment"]


def test_no_module_outside_tasks_branches_on_a_task_name():
    """Task-specific behaviour lives in the task's module: no `task == "qa"`, `task in (...)` or a table keyed
    by task names anywhere else in the package."""
    names = "|".join(task_names())
    branch = re.compile(r"task (==|in|!=)")  # as `git grep -E` finds them
    table = re.compile(rf"[\"']({names})[\"']\s*:")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "tasks":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if branch.search(line) or table.search(line):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not found, "task-name branches outside ltsft_dist/tasks/:\n" + "\n".join(found)
