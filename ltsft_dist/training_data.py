"""From a config's `data` section to per-language training examples (and held-out ones), for every task.

Two steps, because a tiny model's tokenizer is trained on the text first: `read_sources` reads each source's
records (checking them, with file/line errors from the readers in `ltsft_dist.tasks`), `encode_sources` turns
them into fixed-length `Examples`. Multi-source training gets one entry per language; a single-source run is
the one-language case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ltsft_dist.config import SourceConfig, TrainConfig
from ltsft_dist.data import Examples, read_classification
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks import mlm, nli, qa, tokens
from ltsft_dist.tasks._io import load_hf_dataset


@dataclass
class Source:
    """One language's records, as the task's reader returns them."""

    language: str
    records: list  # mlm: str lines; classification: dicts; nli: NLIRecord; qa: QAExample
    where: str  # the file or dataset, for messages

    def texts(self) -> list[str]:
        """What a locally trained tokenizer learns from."""
        first = self.records[0]
        if isinstance(first, str):
            return self.records
        if isinstance(first, nli.NLIRecord):
            return [t for r in self.records for t in (r.premise, r.hypothesis)]
        if isinstance(first, tokens.TaggedSentence):
            return [" ".join(r.words) for r in self.records]
        if isinstance(first, qa.QAExample):
            contexts = list(dict.fromkeys(r.context for r in self.records))
            return contexts + [r.question for r in self.records]
        return [r["text"] + " " + r.get("text_pair", "") for r in self.records]


@dataclass
class TrainingData:
    train: dict[str, Examples]  # per source language
    held_out: dict[str, Examples]  # per source language; empty without data.eval_fraction
    labels: list[str] | None = None  # classification label names in id order (nli: entailment, neutral, ...)
    report: dict = field(default_factory=dict)  # per language: sizes, truncation, windows without answers

    @property
    def languages(self) -> list[str]:
        return list(self.train)


def resolve_format(source: SourceConfig, task: str) -> str:
    if source.hf_dataset:
        return "hf"
    if source.format != "auto":
        return source.format
    suffix = Path(source.train_file).suffix.lower()
    if task == "mlm":
        return "text"
    if task == "classification":
        return "jsonl"
    if task == "qa":
        return "squad"
    if task in ("ner", "pos"):
        return "conll"
    if suffix == ".jsonl":
        return "multinli_jsonl"
    if suffix == ".tsv":
        with Path(source.train_file).open(encoding="utf-8") as f:
            header = f.readline().rstrip("\n").split("\t")
        return "americasnli_tsv" if "premise" in header else "xnli_tsv"
    raise LtsftError(f"{source.train_file}: cannot tell the NLI format from the extension {suffix!r}; set "
                     "format: xnli_tsv, americasnli_tsv or multinli_jsonl")


def read_source(source: SourceConfig, task: str) -> Source:
    if source.train_file and not Path(source.train_file).is_file():
        raise LtsftError(f"{source.train_file}: training file not found (language {source.language!r}); fix the "
                         "path in data.train_file or data.sources (relative paths are taken from the config's folder)")
    fmt = resolve_format(source, task)
    lang = source.language
    where = source.train_file or f"{source.hf_dataset} ({source.hf_config or 'default'}, {source.split})"
    readers = {
        ("mlm", "text"): lambda: mlm.read_text_lines(source.train_file),
        ("mlm", "hf"): lambda: mlm.load_hf_lines(source.hf_dataset, source.hf_config, source.split, source.column),
        ("classification", "jsonl"): lambda: read_classification(source.train_file),
        ("nli", "xnli_tsv"): lambda: _nli_records(nli.read_xnli_tsv(source.train_file, [lang]), lang, where),
        ("nli", "americasnli_tsv"): lambda: _nli_records(nli.read_americasnli_tsv(source.train_file, [lang]), lang,
                                                         where),
        ("nli", "multinli_jsonl"): lambda: _nli_records(nli.read_multinli_jsonl(source.train_file, lang or "en"),
                                                        lang or "en", where),
        ("nli", "hf"): lambda: _nli_records(nli.records_from_dataset(
            load_hf_dataset(source.hf_dataset, source.hf_config, source.split)[0], lang, where), lang, where),
        ("qa", "squad"): lambda: qa.read_squad_json(source.train_file, lang or None),
        ("qa", "hf"): lambda: qa.load_squad_hf(source.hf_dataset, lang, source.hf_config, source.split),
        **{(t, "conll"): lambda: tokens.read_conll(source.train_file, lang) for t in ("ner", "pos")},
        **{(t, "hf"): lambda: tokens.load_hf_sentences(source.hf_dataset, lang, source.hf_config, source.split)
           for t in ("ner", "pos")},
    }
    reader = readers.get((task, fmt))
    if reader is None:
        usable = sorted(f for t, f in readers if t == task)
        raise LtsftError(f"{where}: format {fmt!r} does not hold {task} data; use one of {', '.join(usable)}")
    records = reader()
    if not records:
        raise LtsftError(f"{where}: no {task} examples for language {lang!r}")
    if task == "qa" and not lang:
        lang = records[0].language
    return Source(lang, records, where)


def _nli_records(nli_set: nli.NLISet, language: str, where: str) -> list:
    if language not in nli_set.by_language:
        found = ", ".join(nli_set.by_language) or "none"
        raise LtsftError(f"{where}: no records for language {language!r} (languages found: {found})")
    return nli_set.by_language[language]


def read_sources(config: TrainConfig) -> list[Source]:
    return [read_source(source, config.task) for source in config.sources()]


def encode_sources(config: TrainConfig, tokenizer, sources: list[Source]) -> TrainingData:
    data = config.data
    out = TrainingData({}, {})
    if config.task == "classification":
        out.labels = data.labels or sorted({str(r["label"]) for s in sources for r in s.records})
    elif config.task == "nli":
        out.labels = list(nli.LABELS)
    elif config.task in ("ner", "pos"):
        out.labels = data.labels or sorted({t for s in sources for r in s.records for t in r.tags})
    for source in sources:
        lang = source.language
        if config.task == "mlm":
            if data.eval_fraction:
                split = mlm.build_mlm_data(tokenizer, source.records, data.max_seq_length, data.packed,
                                           data.eval_fraction, config.seed, data.mlm_probability)
                out.train[lang], out.held_out[lang], out.report[lang] = split.train, split.eval, split.report
            else:
                encoded = mlm.encode_text(tokenizer, source.records, data.max_seq_length, data.packed,
                                          data.mlm_probability)
                out.train[lang] = encoded.examples
                out.report[lang] = {"train_rows": len(encoded.examples), "truncated": encoded.truncated,
                                    "empty": encoded.empty}
            continue
        train, held = _split(source.records, data.eval_fraction, config.seed)
        out.train[lang], losses = _encode(config, tokenizer, train, out.labels, source.where)
        out.report[lang] = {"train_records": len(train), "held_out_records": len(held), **losses}
        if held:
            out.held_out[lang], _ = _encode(config, tokenizer, held, out.labels, source.where)
    return out


def _split(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Held-out records (whole questions for QA, so no context leaks from training into evaluation)."""
    if not fraction:
        return records, []
    return mlm.split_held_out(records, fraction, seed)


def _encode(config: TrainConfig, tokenizer, records: list, labels: list[str] | None,
            where: str) -> tuple[Examples, dict]:
    """The records' examples, and what encoding cost them (QA windows, words past max_seq_length) for the report."""
    data = config.data
    if config.task == "qa":
        features = qa.encode_qa(tokenizer, records, data.max_seq_length, data.doc_stride, data.max_query_length)
        return features.examples, {"windows": str(features.report)}
    if config.task == "nli":
        return nli.encode_nli(tokenizer, records, data.max_seq_length), {}
    if config.task in ("ner", "pos"):
        features = tokens.encode_tokens(tokenizer, records, data.max_seq_length, labels)
        return features.examples, {"words_truncated": features.truncated_words}
    index = {name: i for i, name in enumerate(labels)}
    for r in records:
        if str(r["label"]) not in index:
            raise LtsftError(f"{where}: label {r['label']!r} is not in data.labels {labels}: add it or fix the record")
    pairs = [r.get("text_pair") for r in records]
    enc = tokenizer([r["text"] for r in records], pairs if all(p is not None for p in pairs) else None,
                    padding="max_length", truncation=True, max_length=data.max_seq_length, return_tensors="pt")
    tensors = {name: enc[name] for name in tokenizer.model_input_names if name in enc}
    tensors["labels"] = torch.tensor([index[str(r["label"])] for r in records])
    return Examples(tensors), {}


def build_tokenizer(config: TrainConfig, sources: list[Source]):
    """The configured tokenizer; a tiny model without one gets a WordPiece tokenizer trained on the sources."""
    from transformers import AutoTokenizer

    from ltsft_dist.data import train_wordpiece

    path = config.model.tokenizer or config.model.name_or_path
    if path is None:
        texts = [t for s in sources for t in s.texts()]
        return train_wordpiece(texts, vocab_size=int(config.model.tiny.get("vocab_size", 1000)))
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise LtsftError(f"model.tokenizer: cannot load a tokenizer from {path!r} ({err})") from None
