"""The task interface and its registry: everything the trainer, the evaluation and the export need to know of a task.

A task is one module in `ltsft_dist.tasks` that defines a `Task` subclass and registers it (`register_task`), as
peft's `register_peft_method` does for methods. The rest of the package looks tasks up by name (`get_task`) and
never branches on a task's name. Its parts:

- `kind`: the kind of SFT it trains (a language SFT learns a language, a task SFT a task);
- `decoder`: whether its models are decoders (causal LMs: Llama, Qwen2, ...) rather than encoders (BERT, XLM-R);
- `token_loss`: whether its loss is a per-token mean over a varying number of labelled tokens per row;
- `model_class`: the `transformers` Auto class of its model, `prepare_model` for what that model needs first;
- `formats`: its readers, keyed by format name from one vocabulary (`FORMAT_NAMES`), and one rule that tells the
  format of a file (`sniff`);
- `encode`: records -> `Encoded`, the one encoded type, whose `examples` carry the model's forward arguments and
  its training targets: the loss is the model's own (`model(**batch).loss`), so a task shapes its loss by the
  labels it encodes (-100 where nothing is learnt, e.g. on a prompt);
- `label_names` / `head_labels`: the names of the head's outputs, from the data and from a trained SFT;
- `forward` and `score`: model outputs for evaluation and the task's official scores of them (`metrics`);
- `texts`: what a locally trained tokenizer learns from.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ltsft_dist.data import Examples
from ltsft_dist.errors import LtsftError

# Every format name any task reads, spelled one way. "auto": told from the file (`Task.sniff`); "hf": a Hugging Face
# dataset (a source's hf_dataset).
FORMAT_NAMES = ("auto", "text", "jsonl", "squad", "xnli-tsv", "americasnli-tsv", "multinli-jsonl", "conll", "hf")
TARGETS = ("labels", "start_positions", "end_positions")  # training targets among the encoded tensors


@dataclass(frozen=True)
class Format:
    """One way a task's data is stored: `read(source)` returns the records of `source.language`.

    `source` has the fields of `ltsft_dist.config.SourceConfig` (language, train_file, hf_dataset, hf_config, split,
    column). `suffixes` and `header` are what `Task.sniff` recognises a file of this format by."""

    read: Callable
    suffixes: tuple[str, ...] = ()
    header: str | None = None  # a column the first line of a TSV file names


@dataclass(frozen=True)
class Encoding:
    """How records become fixed-length rows (training takes these from `data`, evaluation from its options)."""

    max_seq_length: int
    stride: int = 128  # qa: context tokens shared by consecutive windows
    max_query_length: int = 64  # qa: question tokens kept
    mlm_probability: float = 0.15  # mlm: share of the tokens masked
    packed: bool = False  # mlm: lines concatenated and cut into blocks
    own_tokens: bool = False  # mlm: record the text's own tokens in Examples.mlm.own (data.mlm_own_tokens)


@dataclass
class Encoded:
    """Records as model inputs: what training feeds and what evaluation maps the outputs back to records with."""

    examples: Examples  # forward arguments and training targets (labels, start/end positions, or Examples.mlm)
    records: list  # the records encoded, in order
    features: object = None  # how rows map back to records (QA windows, first subwords); None: one row per record
    report: dict = field(default_factory=dict)  # what encoding cost them (truncation, answers out of every window)
    labels: list[str] | None = None  # the names of the head's outputs, for labelled tasks

    @property
    def rows(self) -> int:
        return len(self.examples)


class Task:
    """A task; subclasses set the class attributes and implement `encode` (and `score` if it is evaluated)."""

    name: ClassVar[str]
    kind: ClassVar[str] = "task"  # the SFT kind that trains it: language | task
    decoder: ClassVar[bool] = False  # trains decoder models (causal LMs), else encoders
    # The loss is a mean over labelled tokens (-100 elsewhere) whose number varies per row: the trainer averages
    # over the global batch's labelled tokens. A decoder's labels must then be -100 at position 0 (never predicted).
    token_loss: ClassVar[bool] = False
    # It can score its masked tokens among its text's own tokens (data.mlm_own_tokens): `encode` records them in
    # `Examples.mlm.own`, and its `score_among_own_tokens(model, own)` restricts the model's output to them.
    own_tokens: ClassVar[bool] = False
    model_class: ClassVar[str]  # a transformers Auto class, e.g. "AutoModelForSequenceClassification"
    formats: ClassVar[dict[str, Format]]
    labelled: ClassVar[bool] = False  # the head's outputs are named labels (recorded as data.labels)
    fixed_labels: ClassVar[tuple[str, ...] | None] = None  # the same labels for every data set
    metrics: ClassVar[tuple[str, ...]] = ()  # the scores `score` returns; () for a task not evaluated zero-shot
    output_fields: ClassVar[tuple[str, ...]] = ("logits",)  # model outputs `forward` returns, in this order

    def auto_class(self):
        import transformers

        return getattr(transformers, self.model_class)

    def prepare_model(self, model: torch.nn.Module, tie_output_embeddings: bool = False) -> None:
        """What the model needs before training or loading an SFT of this task. A decoder's output head is
        untied from its input embeddings: it stays frozen at θ⁰ (the eligibility default) while they train,
        unless a language SFT's eligibility.tie_output_embeddings keeps them one matrix."""
        if self.decoder and not tie_output_embeddings:
            from ltsft_dist.models import untie_output_embeddings

            untie_output_embeddings(model)

    # --- data --------------------------------------------------------------------------------------------------

    def sniff(self, path: str | Path) -> str | None:
        """The format of a file: the task's only file format, else the one whose suffix (and TSV header) the file
        has; None when that does not decide it."""
        path = Path(path)
        files = [name for name, fmt in self.formats.items() if fmt.suffixes]
        if len(files) == 1:
            return files[0]
        header = None
        matches = []
        for name in files:
            fmt = self.formats[name]
            if path.suffix.lower() not in fmt.suffixes:
                continue
            if fmt.header is not None:
                if header is None:
                    with path.open(encoding="utf-8-sig") as f:
                        header = f.readline().rstrip("\r\n").split("\t")
                if fmt.header not in header:
                    continue
            matches.append(name)
        return matches[0] if len(matches) == 1 else None

    def read(self, source, fmt: str) -> list:
        records = self.formats[fmt].read(source)
        if not records:
            where = source.train_file or source.hf_dataset
            raise LtsftError(f"{where}: no {self.name} examples for language {source.language!r}")
        return records

    def texts(self, records: list) -> list[str]:
        """What a locally trained tokenizer learns from."""
        raise NotImplementedError

    def record_labels(self, records: list) -> set[str]:
        """The label names occurring in the records (labelled tasks without fixed labels)."""
        raise NotImplementedError

    def label_names(self, records: list, configured: list[str] | None) -> list[str] | None:
        """The head's output names in id order: the task's fixed ones, the configured ones, else those seen."""
        if not self.labelled:
            return None
        if self.fixed_labels is not None:
            return list(self.fixed_labels)
        return list(configured) if configured else sorted(self.record_labels(records))

    def head_labels(self, training_config: dict, flag: str) -> list[str] | None:
        """The label names a trained task SFT recorded (`data.labels` of its training config), for evaluation and
        export; `flag` names the SFT in the error."""
        if not self.labelled:
            return None
        labels = (training_config.get("data") or {}).get("labels") or self.fixed_labels
        if not labels:
            raise LtsftError(f"{flag}: no label names in its training config (data.labels); retrain it with this "
                             "version of ltsft, which records them")
        return list(labels)

    def encode(self, tokenizer, records: list, encoding: Encoding, labels: list[str] | None) -> Encoded:
        raise NotImplementedError

    def encode_for_eval(self, tokenizer, records: list, encoding: Encoding, labels: list[str] | None) -> Encoded:
        """What zero-shot evaluation scores: the training encoding, unless the task scores other rows than it
        trains on (clm: each token once, where training repeats some to keep every row full)."""
        return self.encode(tokenizer, records, encoding, labels)

    def held_out(self, encoded: Encoded, seed: int) -> Encoded:
        """Held-out examples as the eval loss needs them (e.g. fixed masks), from their encoding."""
        return encoded

    def held_out_scores(self, loss: float) -> dict[str, float]:
        """Scores reported beside a held-out loss (clm: perplexity); the best φ is still chosen by the loss."""
        return {}

    # --- evaluation --------------------------------------------------------------------------------------------

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The model outputs `score` takes, for a batch of the encoded tensors (by default: the model's outputs
        `output_fields` without the training targets; a task scoring log-likelihoods would use them)."""
        out = model(**{name: t for name, t in batch.items() if name not in TARGETS})
        return [getattr(out, name).float() for name in self.output_fields]

    def score(self, encoded: Encoded, outputs: list[torch.Tensor], language: str, options) -> dict:
        """The task's scores (`metrics`, plus `examples`) of the outputs for all rows of `encoded`."""
        raise NotImplementedError

    def metric_title(self, options) -> str:
        return "accuracy"

    def check_eval(self, options, languages: list[str]) -> None:
        """Refuse evaluation options this task cannot honour for these languages, before any model runs."""


_TASKS: dict[str, Task] = {}


def register_task(task: type[Task]) -> type[Task]:
    """Make a task known by its name (used as a class decorator in the task's module)."""
    if task.name in _TASKS:
        raise LtsftError(f"task {task.name!r} is registered twice")
    unknown = sorted(set(task.formats) - set(FORMAT_NAMES))
    if unknown:
        raise LtsftError(f"task {task.name!r}: format {unknown[0]!r} is not in FORMAT_NAMES; add it there")
    _TASKS[task.name] = task()
    return task


def task_names(evaluated: bool = False, kind: str | None = None) -> list[str]:
    """The registered tasks' names (`evaluated`: only those with zero-shot scores; `kind`: training that SFT kind)."""
    return [name for name, task in _TASKS.items()
            if (task.metrics or not evaluated) and kind in (None, task.kind)]


def get_task(name: str | None, where: str = "task", evaluated: bool = False) -> Task:
    """The registered task `name`; an unknown one is an error naming `where` and the valid names."""
    task = _TASKS.get(name)
    if task is None or (evaluated and not task.metrics):
        valid = task_names(evaluated)
        what = "not an evaluated task" if task is not None else "not a task"
        raise LtsftError(f"{where}: {name!r} is {what}; use one of {', '.join(valid)}")
    return task


def format_problem(task: Task, fmt: str) -> str | None:
    """Why `fmt` is no format of `task` (to follow "<where> <fmt> is ..."), None when it is one."""
    if fmt == "auto" or fmt in task.formats:
        return None
    valid = ", ".join(["auto", *task.formats])
    if fmt in FORMAT_NAMES:
        owners = "/".join(t.name.upper() for t in _TASKS.values() if fmt in t.formats)
        article = "an" if owners[0] in "AEFHILMNORSX" else "a"  # as the letters are spoken: an NLI, a QA
        return f"{article} {owners} format; {task.name} data is read as one of {valid}"
    close = difflib.get_close_matches(fmt.replace("_", "-"), FORMAT_NAMES, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"not one of {valid}{hint}"
