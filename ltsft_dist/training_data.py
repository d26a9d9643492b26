"""From a config's `data` section to per-language training examples (and held-out ones), for every task.

Two steps, because a tiny model's tokenizer is trained on the text first: `read_sources` reads each source's
records (checking them, with file/line errors from the readers in `ltsft_dist.tasks`), `encode_sources` turns
them into fixed-length `Examples`. Multi-source training gets one entry per language; a single-source run is
the one-language case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ltsft_dist.config import DataConfig, SourceConfig, TrainConfig
from ltsft_dist.data import Examples
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks import Encoding, Task, format_problem, get_task
from ltsft_dist.tasks.mlm import split_held_out


@dataclass
class Source:
    """One language's records, as the task's reader returns them."""

    language: str
    records: list  # the task's record type (mlm: text lines; nli: NLIRecord; qa: QAExample; ...)
    where: str  # the file or dataset, for messages


@dataclass
class TrainingData:
    train: dict[str, Examples]  # per source language
    held_out: dict[str, Examples]  # per source language; empty without data.eval_fraction
    labels: list[str] | None = None  # the head's label names in id order (nli: entailment, neutral, ...)
    report: dict = field(default_factory=dict)  # per language: sizes, truncation, windows without answers

    @property
    def languages(self) -> list[str]:
        return list(self.train)


def resolve_format(source: SourceConfig, task: Task) -> str:
    """The source's format: "hf" for a dataset, the configured one, else the one the task tells from the file."""
    if source.hf_dataset:
        return "hf"
    if source.format != "auto":
        return source.format
    fmt = task.sniff(source.train_file)
    if fmt is None:
        raise LtsftError(f"{source.train_file}: cannot tell the {task.name} format from the name and header; set "
                         f"format: to one of {', '.join(f for f in task.formats if f != 'hf')}")
    return fmt


def read_source(source: SourceConfig, task_name: str) -> Source:
    if source.train_file and not Path(source.train_file).is_file():
        raise LtsftError(f"{source.train_file}: training file not found (language {source.language!r}); fix the "
                         "path in data.train_file or data.sources (relative paths are taken from the config's folder)")
    task = get_task(task_name)
    fmt = resolve_format(source, task)
    where = source.train_file or f"{source.hf_dataset} ({source.hf_config or 'default'}, {source.split})"
    problem = format_problem(task, fmt)
    if problem:
        raise LtsftError(f"{where}: format {fmt!r} is {problem}")
    records = task.read(source, fmt)
    return Source(source.language or getattr(records[0], "language", ""), records, where)


def read_sources(config: TrainConfig) -> list[Source]:
    return [read_source(source, config.task) for source in config.sources()]


def encoding(data: DataConfig) -> Encoding:
    return Encoding(data.max_seq_length, data.doc_stride, data.max_query_length, data.mlm_probability, data.packed)


def encode_sources(config: TrainConfig, tokenizer, sources: list[Source]) -> TrainingData:
    """Each source's examples, with its held-out share (whole records: no QA context is in both) split off before
    encoding (so no packed MLM block shares text with a training block)."""
    task, data = get_task(config.task), config.data
    labels = task.label_names([r for s in sources for r in s.records], data.labels)
    out = TrainingData({}, {}, labels)
    for source in sources:
        train, held = (split_held_out(source.records, data.eval_fraction, config.seed) if data.eval_fraction
                       else (source.records, []))
        encoded = task.encode(tokenizer, train, encoding(data), labels)
        out.train[source.language] = encoded.examples
        out.report[source.language] = {"train_records": len(train), "held_out_records": len(held), **encoded.report}
        if held:
            out.held_out[source.language] = task.held_out(task.encode(tokenizer, held, encoding(data), labels),
                                                          config.seed).examples
    return out


def build_tokenizer(config: TrainConfig, sources: list[Source]):
    """The configured tokenizer (a directory or hub id); a tiny model without one gets a WordPiece tokenizer
    trained on the sources (an encoder's or a decoder's, by `model.architecture`). Called on rank 0 alone (the
    others read the copy it saves), so it downloads alone."""
    from transformers import AutoTokenizer

    from ltsft_dist.models import tiny_tokenizer

    path = config.model.tokenizer or config.model.name_or_path
    if path is None:
        task = get_task(config.task)
        return tiny_tokenizer(config.model, [t for s in sources for t in task.texts(s.records)])
    from ltsft_dist.hub import TOKENIZER_FILES, resolve

    key = "model.tokenizer" if config.model.tokenizer else "model.name_or_path"
    directory = resolve(path, key, collective=False, allow_patterns=TOKENIZER_FILES)
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise LtsftError(f"{key}: cannot load a tokenizer from {path!r} ({err}); point model.tokenizer at a "
                         "directory or hub id with one") from None
