"""From a config's `data` section to per-language training examples (and held-out ones), for every task.

Two steps, because a tiny model's tokenizer is trained on the text first: `read_sources` reads each source's
records (checking them, with file/line errors from the readers in `ltsft_dist.tasks`), `encode_sources` turns
them into fixed-length `Examples`. Multi-source training gets one entry per language; a single-source run is
the one-language case. A language SFT's text is a lazy `TextSource`, never a list: its encoding goes through the
token cache in `data.cache_dir` (collective: rank 0 tokenises, every rank maps the result). The held-out set is
bounded by `data.eval_max_examples`, a seeded subset of the held-out rows.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ltsft_dist.config import DataConfig, SourceConfig, TrainConfig
from ltsft_dist.data import Examples
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks import Encoding, Task, format_problem, get_task
from ltsft_dist.tasks.mlm import split_held_out
from ltsft_dist.token_cache import TextSource


@dataclass
class Source:
    """One language's records, as the task's reader returns them."""

    language: str
    records: list | TextSource  # the task's records (mlm/clm: a lazy TextSource; nli: NLIRecords; ...)
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
    language = source.language or ("" if isinstance(records, TextSource) else getattr(records[0], "language", ""))
    return Source(language, records, where)


def read_sources(config: TrainConfig) -> list[Source]:
    return [read_source(source, config.task) for source in config.sources()]


def encoding(data: DataConfig) -> Encoding:
    return Encoding(data.max_seq_length, data.doc_stride, data.max_query_length, data.mlm_probability, data.packed,
                    data.mlm_own_tokens)


def cache_dir(config: TrainConfig) -> str:
    """`data.cache_dir`, by default `token_cache` beside the output directory (a pipeline's stages share it)."""
    return config.data.cache_dir or str(Path(config.output_dir).resolve().parent / "token_cache")


def bounded(examples: Examples, limit: int, seed: int) -> Examples:
    """At most `limit` rows (0: all), a seeded random subset kept in order, as tensors (held-out sets are small)."""
    n = len(examples)
    rows = torch.arange(n)
    if limit and n > limit:
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return Examples({name: t[rows] for name, t in examples.tensors.items()}, examples.mlm)


def encode_sources(config: TrainConfig, tokenizer, sources: list[Source]) -> TrainingData:
    """Each source's examples, with its held-out share (whole records: no QA context is in both) split off before
    encoding (so no packed MLM block shares text with a training block). Collective for language SFTs (the token
    cache)."""
    task, data = get_task(config.task), config.data
    labels = (task.label_names([r for s in sources for r in s.records], data.labels) if task.labelled else None)
    out = TrainingData({}, {}, labels)
    for source in sources:
        records = source.records
        if isinstance(records, TextSource):
            records = dataclasses.replace(records, cache_dir=cache_dir(config))
        train, held = (split_held_out(records, data.eval_fraction, config.seed) if data.eval_fraction
                       else (records, []))
        encoded = task.encode(tokenizer, train, encoding(data), labels)
        out.train[source.language] = encoded.examples
        report = {} if isinstance(records, TextSource) else {"train_records": len(train), "held_out_records": len(held)}
        out.report[source.language] = {**report, **encoded.report}
        if held:
            held_encoded = task.encode(tokenizer, held, encoding(data), labels)
            if not len(held_encoded.examples):
                raise LtsftError(f"{source.where}: no held-out rows at data.eval_fraction={data.eval_fraction}; add "
                                 "text or raise data.eval_fraction")
            if isinstance(records, TextSource):
                out.report[source.language].update({f"held_out_{k}": v for k, v in held_encoded.report.items()})
            share_own_tokens(encoded.examples, held_encoded.examples)
            held_encoded.examples = bounded(held_encoded.examples, data.eval_max_examples, config.seed)
            out.held_out[source.language] = task.held_out(held_encoded, config.seed).examples
    return out


def share_own_tokens(train: Examples, held: Examples) -> None:
    """A language's own tokens (data.mlm_own_tokens) are those of all its text, training and held-out: a word
    that only the held-out text has must be scored there too."""
    if train.mlm is not None and train.mlm.own is not None:
        train.mlm.own = held.mlm.own = train.mlm.own | held.mlm.own


def token_summary(language: str, report: dict) -> str | None:
    """One line of where a language SFT's text went (None for other tasks): tokens, used, dropped, repeated."""
    if "tokens" not in report:
        return None
    tokens = report["tokens"] + report.get("held_out_tokens", 0)
    used = report["tokens_used"] + report.get("held_out_tokens_used", 0)
    dropped = report["tokens_dropped"] + report.get("held_out_tokens_dropped", 0)
    return (f"data [{language}]: {tokens} tokens, {used} used ({used / max(tokens, 1):.2%}: "
            f"{report['tokens_used']} train, {report.get('held_out_tokens_used', 0)} held out), {dropped} dropped "
            f"({report['truncated'] + report.get('held_out_truncated', 0)} lines truncated; data.packed: true uses "
            f"every token), {report['tokens_repeated']} repeated in an overlapping last block")


def build_tokenizer(config: TrainConfig, sources: list[Source]):
    """The configured tokenizer (a directory or hub id); a tiny model without one gets a WordPiece tokenizer
    trained on the sources (an encoder's or a decoder's, by `model.architecture`). Called on rank 0 alone (the
    others read the copy it saves), so it downloads alone."""
    from transformers import AutoTokenizer

    from ltsft_dist.models import tiny_tokenizer

    path = config.model.tokenizer or config.model.name_or_path
    if path is None:
        task = get_task(config.task)
        return tiny_tokenizer(config.model, itertools.chain.from_iterable(task.texts(s.records) for s in sources))
    from ltsft_dist.hub import TOKENIZER_FILES, resolve

    key = "model.tokenizer" if config.model.tokenizer else "model.name_or_path"
    directory = resolve(path, key, collective=False, allow_patterns=TOKENIZER_FILES)
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise LtsftError(f"{key}: cannot load a tokenizer from {path!r} ({err}); point model.tokenizer at a "
                         "directory or hub id with one") from None
