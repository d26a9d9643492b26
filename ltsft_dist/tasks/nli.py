"""NLI data from XNLI (HF hub or the 1.0 TSV), MultiNLI (JSONL) and AmericasNLI (TSV) with one label scheme.

All sources map to entailment=0, neutral=1, contradiction=2 (the HF `xnli` ClassLabel order), so a task SFT
trained on MultiNLI + XNLI is evaluated with the same head on AmericasNLI. Records are kept per language
because multi-source training applies one language SFT per batch. Examples without a gold label
(MultiNLI's "-", HF's -1) are skipped and counted, never dropped silently. The metric is
`ltsft_dist.tasks.metrics.accuracy`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ltsft_dist.data import Examples
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks._io import load_hf_dataset, read_jsonl, read_tsv, require_keys
from ltsft_dist.tasks.base import Encoded, Encoding, Format, Task, register_task
from ltsft_dist.tasks.metrics import accuracy_scores

log = logging.getLogger(__name__)

LABELS = ("entailment", "neutral", "contradiction")
_ALIASES = {"contradictory": "contradiction"}  # the XNLI-MT translated training files
NO_GOLD = "-"  # MultiNLI: the annotators reached no majority


@dataclass(frozen=True)
class NLIRecord:
    id: str
    language: str
    premise: str
    hypothesis: str
    label: int


@dataclass
class NLISet:
    """Records per language from one or more sources; `skipped` counts examples without a gold label."""

    by_language: dict[str, list[NLIRecord]]
    skipped: int = 0
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(records) for records in self.by_language.values())

    def report(self) -> str:
        sizes = ", ".join(f"{lang}={len(records)}" for lang, records in self.by_language.items())
        return f"NLI from {', '.join(self.sources)}: {sizes}; skipped {self.skipped} without a gold label"


def label_id(raw, where: str) -> int | None:
    """0/1/2 for a label name (case-insensitive), None for "no gold label"; anything else is an error."""
    name = str(raw).strip().lower()
    if name == NO_GOLD:
        return None
    name = _ALIASES.get(name, name)
    if name not in LABELS:
        raise LtsftError(f"{where}: unknown label {raw!r}; use one of {list(LABELS)} (or '-' for no gold label)")
    return LABELS.index(name)


def _collect(records: list[tuple[str, dict]], keys: tuple[str, str, str, str, str], source: str,
             languages: list[str] | None, default_language: str | None = None) -> NLISet:
    """(where, row) pairs -> NLISet; keys name the id, language, premise, hypothesis and label columns."""
    id_key, lang_key, premise_key, hypothesis_key, label_key = keys
    wanted = None if languages is None else set(languages)
    by_language: dict[str, list[NLIRecord]] = {}
    skipped = 0
    for where, row in records:
        language = row.get(lang_key, default_language) if lang_key else default_language
        if wanted is not None and language not in wanted:
            continue
        label = label_id(row[label_key], where)
        if label is None:
            skipped += 1
            continue
        record_id = str(row.get(id_key) or where) if id_key else where
        by_language.setdefault(language, []).append(
            NLIRecord(record_id, language, row[premise_key], row[hypothesis_key], label))
    if languages is not None:
        absent = [lang for lang in languages if lang not in by_language]
        if absent:
            have = sorted({row.get(lang_key, default_language) for _, row in records}) if lang_key else []
            raise LtsftError(f"{source}: no labelled examples for language(s) {absent}; the file has {have}. "
                             "Fix the language codes or use the file that holds those languages")
    if not by_language:
        raise LtsftError(f"{source}: no labelled examples ({skipped} without a gold label)")
    if skipped:
        log.warning("%s: skipped %d examples without a gold label", source, skipped)
    return NLISet(by_language, skipped, [str(source)])


def read_xnli_tsv(path: str | Path, languages: list[str] | None = None) -> NLISet:
    """XNLI 1.0 `xnli.dev.tsv` / `xnli.test.tsv`: all 15 languages in one file, one row per (pair, language)."""
    columns = ("language", "gold_label", "sentence1", "sentence2")
    path, rows = read_tsv(path, columns)
    records = [(f"{path}:{number}", row) for number, row in rows]
    return _collect(records, ("pairID", "language", "sentence1", "sentence2", "gold_label"), str(path), languages)


def read_multinli_jsonl(path: str | Path, language: str = "en") -> NLISet:
    """MultiNLI 1.0 `multinli_1.0_train.jsonl` etc.; pairs with gold_label "-" are skipped and counted."""
    path, lines = read_jsonl(path)
    keys = ("gold_label", "sentence1", "sentence2")
    records = []
    for number, record in lines:
        where = f"{path}:{number}"
        require_keys(record, keys, where, f"each MultiNLI line needs {list(keys)}")
        records.append((where, record))
    if not records:
        raise LtsftError(f"{path}: no records")
    return _collect(records, ("pairID", "", "sentence1", "sentence2", "gold_label"), str(path), None, language)


def read_americasnli_tsv(path: str | Path, languages: list[str] | None = None) -> NLISet:
    """AmericasNLI `dev.tsv` / `test.tsv` (columns id, language, premise, hypothesis, label)."""
    columns = ("id", "language", "premise", "hypothesis", "label")
    path, rows = read_tsv(path, columns)
    records = [(f"{path}:{number}", row) for number, row in rows]
    return _collect(records, ("id", "language", "premise", "hypothesis", "label"), str(path), languages)


def records_from_dataset(dataset, language: str, source: str, premise: str = "premise",
                         hypothesis: str = "hypothesis", label: str = "label") -> NLISet:
    """A HF `datasets.Dataset` of one language. Integer labels go through the dataset's ClassLabel names
    (so any label order maps correctly); -1 means no gold label."""
    missing = [c for c in (premise, hypothesis, label) if c not in dataset.column_names]
    if missing:
        raise LtsftError(f"{source}: missing column(s) {missing} (has {dataset.column_names}); "
                         "pass the premise/hypothesis/label column names")
    names = getattr(dataset.features[label], "names", None)
    records = []
    for index, row in enumerate(dataset):
        raw = row[label]
        if isinstance(raw, int):
            if raw == -1:
                raw = NO_GOLD
            elif names is not None and 0 <= raw < len(names):
                raw = names[raw]
            else:
                raise LtsftError(f"{source} row {index}: integer label {raw} without ClassLabel names; "
                                 "cast the label column to ClassLabel(names=[...]) or use label names")
        records.append((f"{source} row {index}", {**row, label: raw}))
    if not records:
        raise LtsftError(f"{source}: the dataset is empty")
    return _collect(records, ("", "", premise, hypothesis, label), source, None, language)


def read_xnli_hf(languages: list[str], split: str = "validation", path: str = "facebook/xnli") -> NLISet:
    """XNLI from the Hugging Face hub (or its local cache), one config per language."""
    sets = []
    for language in languages:
        dataset, source = load_hf_dataset(path, language, split)
        sets.append(records_from_dataset(dataset, language, source))
    return combine(*sets)


def combine(*sets: NLISet) -> NLISet:
    """Several sources in one set (e.g. MultiNLI en + the XNLI languages), languages in first-seen order."""
    by_language: dict[str, list[NLIRecord]] = {}
    for nli_set in sets:
        for language, records in nli_set.by_language.items():
            by_language.setdefault(language, []).extend(records)
    return NLISet(by_language, sum(s.skipped for s in sets), [src for s in sets for src in s.sources])


def encode_nli(tokenizer, records: list[NLIRecord], max_len: int) -> Examples:
    """Premise/hypothesis pairs as fixed-length rows with `labels`, for *ForSequenceClassification."""
    if not records:
        raise LtsftError("encode_nli: no records to encode")
    enc = tokenizer([r.premise for r in records], [r.hypothesis for r in records], padding="max_length",
                    truncation=True, max_length=max_len, return_tensors="pt")
    tensors = {name: enc[name] for name in tokenizer.model_input_names if name in enc}
    tensors["labels"] = torch.tensor([r.label for r in records])
    return Examples(tensors)


def encode_by_language(tokenizer, nli_set: NLISet, max_len: int) -> dict[str, Examples]:
    return {lang: encode_nli(tokenizer, records, max_len) for lang, records in nli_set.by_language.items()}


def _of_language(nli_set: NLISet, language: str, where: str) -> list[NLIRecord]:
    if language not in nli_set.by_language:
        found = ", ".join(nli_set.by_language) or "none"
        raise LtsftError(f"{where}: no records for language {language!r} (languages found: {found})")
    return nli_set.by_language[language]


def _read_hf(source) -> list[NLIRecord]:
    dataset, where = load_hf_dataset(source.hf_dataset, source.hf_config, source.split)
    return _of_language(records_from_dataset(dataset, source.language, where), source.language, where)


@register_task
class NLI(Task):
    """Premise/hypothesis pairs into entailment, neutral, contradiction; scored by accuracy."""

    name = "nli"
    model_class = "AutoModelForSequenceClassification"
    formats = {
        "xnli-tsv": Format(lambda s: _of_language(read_xnli_tsv(s.train_file, [s.language]), s.language,
                                                  s.train_file), suffixes=(".tsv",), header="sentence1"),
        "americasnli-tsv": Format(lambda s: _of_language(read_americasnli_tsv(s.train_file, [s.language]),
                                                         s.language, s.train_file), suffixes=(".tsv",),
                                  header="premise"),
        "multinli-jsonl": Format(lambda s: _of_language(read_multinli_jsonl(s.train_file, s.language or "en"),
                                                        s.language or "en", s.train_file), suffixes=(".jsonl",)),
        "hf": Format(_read_hf),
    }
    labelled = True
    fixed_labels = LABELS
    metrics = ("accuracy",)

    def texts(self, records: list[NLIRecord]) -> list[str]:
        return [t for r in records for t in (r.premise, r.hypothesis)]

    def encode(self, tokenizer, records: list[NLIRecord], encoding: Encoding, labels=None) -> Encoded:
        return Encoded(encode_nli(tokenizer, records, encoding.max_seq_length), records)

    def score(self, encoded: Encoded, outputs: list[torch.Tensor], language: str, options) -> dict:
        return accuracy_scores(outputs[0], encoded.examples.tensors["labels"])
