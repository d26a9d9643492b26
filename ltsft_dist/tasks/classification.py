"""Sequence classification of a text (or a text pair) into the labels of the data: JSON lines with text, optional
text_pair, and label. The label names are configured (data.labels) or the sorted labels seen."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ltsft_dist.data import Examples
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks._io import read_jsonl, require_keys
from ltsft_dist.tasks.base import Encoded, Encoding, Format, Task, register_task
from ltsft_dist.tasks.metrics import accuracy_scores


@dataclass(frozen=True)
class LabelledText:
    id: str  # file:line, or dataset row: where errors point
    text: str
    text_pair: str | None
    label: str


def read_classification(path: str | Path) -> list[LabelledText]:
    path, lines = read_jsonl(path)
    records = []
    for number, record in lines:
        where = f"{path}:{number}"
        require_keys(record, ("text", "label"), where, "each line needs text, label and optionally text_pair")
        records.append(LabelledText(where, record["text"], record.get("text_pair"), str(record["label"])))
    if not records:
        raise LtsftError(f"{path}: no records")
    return records


@register_task
class Classification(Task):
    name = "classification"
    model_class = "AutoModelForSequenceClassification"
    formats = {
        "jsonl": Format(lambda s: read_classification(s.train_file), suffixes=(".jsonl",)),
    }
    labelled = True
    metrics = ("accuracy",)

    def texts(self, records: list[LabelledText]) -> list[str]:
        return [r.text + " " + (r.text_pair or "") for r in records]

    def record_labels(self, records: list[LabelledText]) -> set[str]:
        return {r.label for r in records}

    def encode(self, tokenizer, records: list[LabelledText], encoding: Encoding, labels: list[str]) -> Encoded:
        index = {name: i for i, name in enumerate(labels)}
        for r in records:
            if r.label not in index:
                raise LtsftError(f"{r.id}: label {r.label!r} is not in data.labels {labels}: add it or fix the record")
        pairs = [r.text_pair for r in records]
        enc = tokenizer([r.text for r in records], pairs if all(p is not None for p in pairs) else None,
                        padding="max_length", truncation=True, max_length=encoding.max_seq_length,
                        return_tensors="pt")
        tensors = {name: enc[name] for name in tokenizer.model_input_names if name in enc}
        tensors["labels"] = torch.tensor([index[r.label] for r in records])
        return Encoded(Examples(tensors), records)

    def score(self, encoded: Encoded, outputs: list[torch.Tensor], language: str, options) -> dict:
        return accuracy_scores(outputs[0], encoded.examples.tensors["labels"])
