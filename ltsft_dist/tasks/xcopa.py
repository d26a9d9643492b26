"""XCOPA (Ponti et al., 2020), causal commonsense reasoning in 11 languages, scored zero-shot by log-likelihood as
lm-evaluation-harness scores it: the premise without its final punctuation, then the language's word for "because"
(question: cause) or "therefore" (effect), continued by each choice with its first letter lower-cased.

Files are the release's JSON lines, `{"premise", "choice1", "choice2", "question", "label"}` (e.g.
`val.et.jsonl`); English COPA in the same shape is read as language `en`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks._io import read_jsonl, require_keys
from ltsft_dist.tasks.base import Format, register_task
from ltsft_dist.tasks.choice import LogLikelihoodChoice

# (cause, effect) connectors per language, lm-evaluation-harness's.
CONNECTORS = {
    "en": ("because", "therefore"), "et": ("sest", "seetõttu"), "ht": ("poukisa", "donk sa"),
    "id": ("karena", "maka"), "it": ("perché", "quindi"), "qu": ("imataq", "chaymi"),
    "sw": ("kwa sababu", "kwa hiyo"), "ta": ("காரணமாக", "எனவே"), "th": ("เพราะ", "ดังนั้น"),
    "tr": ("çünkü", "bu yüzden"), "vi": ("bởi vì", "vì vậy"), "zh": ("因为", "所以"),
}


@dataclass(frozen=True)
class COPARecord:
    where: str  # file:line
    language: str
    premise: str
    choices: tuple[str, str]
    question: str  # cause | effect
    label: int


def read_xcopa(source) -> list[COPARecord]:
    if source.language not in CONNECTORS:
        raise LtsftError(f"{source.train_file}: XCOPA has no connectors for language {source.language!r}; use one "
                         f"of {', '.join(CONNECTORS)}")
    path, lines = read_jsonl(source.train_file)
    records = []
    for number, row in lines:
        where = f"{path}:{number}"
        require_keys(row, ("premise", "choice1", "choice2", "question", "label"), where,
                     "each XCOPA line needs premise, choice1, choice2, question (cause|effect) and label (0|1)")
        if row["question"] not in ("cause", "effect") or row["label"] not in (0, 1):
            raise LtsftError(f"{where}: question must be 'cause' or 'effect' and label 0 or 1, got "
                             f"{row['question']!r} and {row['label']!r}")
        records.append(COPARecord(where, source.language, row["premise"], (row["choice1"], row["choice2"]),
                                  row["question"], row["label"]))
    return records


@register_task
class XCOPA(LogLikelihoodChoice):
    name = "xcopa"
    formats = {"jsonl": Format(read_xcopa, suffixes=(".jsonl",))}

    def context(self, record: COPARecord) -> str:
        cause, effect = CONNECTORS[record.language]
        return record.premise.strip()[:-1] + " " + (cause if record.question == "cause" else effect)

    def choices(self, record: COPARecord) -> list[str]:
        return [c[0].lower() + c[1:] for c in record.choices]

    def gold(self, record: COPARecord) -> int:
        return record.label
