"""Belebele (Bandarkar et al., 2024), multiple-choice reading comprehension on FLORES passages in 122 language
variants, scored zero-shot by log-likelihood as lm-evaluation-harness scores it: the passage, the question and the
four answers lettered A-D, then "Answer:", continued by each letter.

Files are the release's JSON lines (one per language, e.g. `est_Latn.jsonl`), with Belebele's field names:
`{"flores_passage", "question", "mc_answer1", ..., "mc_answer4", "correct_answer_num"}` (the correct answer's
number, 1-4, a string in the release); other fields (link, dialect, ...) are ignored. The HF dataset
`facebook/belebele` (config: the language variant, split `test`) has the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks._io import load_hf_dataset, read_jsonl, require_keys
from ltsft_dist.tasks.base import Format, register_task
from ltsft_dist.tasks.choice import LogLikelihoodChoice

ANSWERS = tuple(f"mc_answer{n}" for n in range(1, 5))
FIELDS = ("flores_passage", "question", *ANSWERS, "correct_answer_num")
LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class BelebeleRecord:
    where: str  # file:line, or the dataset and row
    passage: str
    question: str
    answers: tuple[str, str, str, str]
    correct: int  # 0-3


def _record(row: dict, where: str) -> BelebeleRecord:
    require_keys(row, FIELDS, where, f"each Belebele record needs {', '.join(FIELDS)}")
    texts = [row[key] for key in FIELDS[:-1]]
    bad = next((key for key, text in zip(FIELDS, texts) if not isinstance(text, str) or not text.strip()), None)
    if bad:
        raise LtsftError(f"{where}: {bad} must be non-empty text, got {row[bad]!r}; fix the record")
    correct = str(row["correct_answer_num"]).strip()
    if correct not in ("1", "2", "3", "4"):
        raise LtsftError(f"{where}: correct_answer_num must be 1, 2, 3 or 4 (the number of the right mc_answer), "
                         f"got {row['correct_answer_num']!r}")
    return BelebeleRecord(where, row["flores_passage"], row["question"], tuple(row[key] for key in ANSWERS),
                          int(correct) - 1)


def read_belebele_jsonl(source) -> list[BelebeleRecord]:
    path, lines = read_jsonl(source.train_file)
    return [_record(row, f"{path}:{number}") for number, row in lines]


def read_belebele_hf(source) -> list[BelebeleRecord]:
    dataset, where = load_hf_dataset(source.hf_dataset, source.hf_config, source.split)
    return [_record(row, f"{where} row {index}") for index, row in enumerate(dataset)]


@register_task
class Belebele(LogLikelihoodChoice):
    name = "belebele"
    formats = {"jsonl": Format(read_belebele_jsonl, suffixes=(".jsonl",)), "hf": Format(read_belebele_hf)}

    def context(self, record: BelebeleRecord) -> str:
        answers = "".join(f"\n{letter}: {answer}" for letter, answer in zip(LETTERS, record.answers))
        return f"P: {record.passage}\nQ: {record.question.strip()}{answers}\nAnswer:"

    def choices(self, record: BelebeleRecord) -> list[str]:
        return list(LETTERS)

    def gold(self, record: BelebeleRecord) -> int:
        return record.correct
