"""Typed training configuration, loaded from YAML/JSON and validated before any process starts work.

Errors name the file, the key path and the fix, e.g.
`run.yaml: phase1.lr: expected a number, got 'fast'`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ltsft_dist.eligibility import EligibilityConfig
from ltsft_dist.errors import LtsftError
from ltsft_dist.multisource import SamplingConfig

PACKAGE_DS_CONFIGS = Path(__file__).resolve().parent.parent / "ds_configs"


@dataclass
class PhaseConfig:
    steps: int = 100  # optimizer steps in this phase
    lr: float = 5e-5  # peak learning rate; linear warm-up, then linear decay to 0 (as in the paper)
    warmup_steps: int = 0
    l1: float = 0.0  # λ of the L1 pull toward θ⁰ (the paper uses 0.1 for language SFTs)


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # a hub id or a local transformers directory
    tiny: dict | None = None  # or: build a randomly initialised model from these config values (offline tests, demo)
    architecture: str = "bert"  # for `tiny`: bert | xlm-roberta
    tokenizer: str | None = None  # tokenizer directory; defaults to name_or_path


@dataclass
class SourceConfig:
    """One source language's training data: a file, or a HF dataset (hf_dataset + hf_config + split)."""

    language: str = ""
    train_file: str | None = None
    format: str = "auto"  # auto (by task, extension and header) | text | jsonl | squad | xnli-tsv | multinli-jsonl |
    #                       americasnli-tsv | conll (ner/pos: CoNLL-U or word ... tag columns) | hf
    hf_dataset: str | None = None  # e.g. facebook/xnli, squad, wikitext
    hf_config: str | None = None  # e.g. the language's config name
    split: str = "train"
    column: str = "text"  # mlm from a HF dataset: the text column


@dataclass
class DataConfig:
    train_file: str = ""  # single source: mlm: one text per line; classification: JSON lines with text,
    #                       [text_pair,] label; nli: an XNLI/AmericasNLI TSV or MultiNLI JSONL; qa: SQuAD JSON
    format: str = "auto"  # how to read train_file (see SourceConfig.format)
    sources: list[SourceConfig] = field(default_factory=list)  # multi-source: one entry per source language
    max_seq_length: int = 64
    mlm_probability: float = 0.15
    packed: bool = False  # mlm: concatenate lines and cut into max_seq_length blocks (else one line per row)
    doc_stride: int = 32  # qa: context tokens shared by consecutive windows of a long context
    max_query_length: int = 24  # qa: question tokens kept
    labels: list[str] | None = None  # classification/ner/pos label names, in id order; default: sorted labels seen
    eval_fraction: float = 0.0  # held out from training for the eval loss (the paper: 5% for language SFTs)
    eval_every: int = 0  # phase-2 steps between evaluations; the best φ by eval loss is kept (0: phase end only)


@dataclass
class TrainConfig:
    kind: str = "language"  # language | task | bitfit
    task: str | None = None  # mlm | classification | nli | qa | ner | pos (default: mlm for language SFTs, else
    #                          classification)
    languages: list[str] = field(default_factory=list)  # language code(s), recorded in the SFT
    output_dir: str = "runs/ltsft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    k: int | None = None  # number of parameters to select ...
    density: float | None = None  # ... or a fraction of the eligible parameters
    selection: str = "magnitude"  # magnitude (LT-SFT) | random (RAND-SFT) | all (BitFit: no phase 1)
    rounds: int = 1  # iterative selection: rounds of phase1 -> select K/rounds more -> phase2
    phase1: PhaseConfig = field(default_factory=PhaseConfig)
    phase2: PhaseConfig = field(default_factory=PhaseConfig)
    batch_size: int = 8  # global batch per optimizer step (all ranks, all accumulation steps)
    micro_batch_size: int = 8  # per rank per forward pass
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # clipping of the (masked) global gradient norm; 0 disables it
    seed: int = 42
    deepspeed: str = "zero2.json"  # DeepSpeed config: a path, or a file name in the repo's ds_configs/
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig)
    log_every: int = 10
    checkpoint_every: int = 0  # steps between periodic checkpoints (0: only when stopped by SIGUSR1/SIGTERM)
    resume: bool = True  # continue from the latest complete checkpoint in output_dir/checkpoints
    language_sfts: dict[str, str] = field(default_factory=dict)  # task SFTs: source language -> its language
    #   SFT directory, active for every step that trains on that language (multi-source per-step swap)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # multi-source: language per step
    on_nonfinite_loss: str = "stop"  # stop: fail naming the step and the last checkpoint | skip: skip such steps

    def validate(self, where: str = "config") -> None:
        from ltsft_dist.tasks import format_problem, get_task, task_names

        def bad(key: str, msg: str):
            raise LtsftError(f"{where}: {key}: {msg}")

        if self.kind not in ("language", "task", "bitfit"):
            bad("kind", f"{self.kind!r} is not one of language, task, bitfit")
        if self.selection not in ("magnitude", "random", "all"):
            bad("selection", f"{self.selection!r} is not one of magnitude, random, all")
        if self.kind == "bitfit" and self.selection != "all":
            self.selection = "all"
        if self.selection != "all" and (self.k is None) == (self.density is None):
            bad("k", "give exactly one of k (a count) or density (a fraction of the eligible parameters)")
        if self.k is not None and self.k <= 0:
            bad("k", f"must be positive, got {self.k}")
        if self.density is not None and not 0 < self.density <= 1:
            bad("density", f"must lie in (0, 1], got {self.density}")
        if self.on_nonfinite_loss not in ("stop", "skip"):
            bad("on_nonfinite_loss", f"{self.on_nonfinite_loss!r} is not one of stop, skip")
        if self.rounds < 1:
            bad("rounds", "must be at least 1")
        for name in ("phase1", "phase2"):
            phase = getattr(self, name)
            if phase.steps < 0 or phase.lr < 0 or phase.l1 < 0 or phase.warmup_steps < 0:
                bad(name, "steps, lr, l1 and warmup_steps must be non-negative")
        if self.batch_size <= 0 or self.micro_batch_size <= 0:
            bad("batch_size", "batch_size and micro_batch_size must be positive")
        if (self.model.name_or_path is None) == (self.model.tiny is None):
            bad("model", "give exactly one of model.name_or_path or model.tiny")
        if self.task is None:
            self.task = "mlm" if self.kind == "language" else "classification"
        task = get_task(self.task, f"{where}: task")
        if (self.kind == "language") != (task.kind == "language"):
            bad("task", f"language SFTs train task {' or '.join(task_names(kind='language'))}, and task {self.task} "
                        f"trains a {task.kind} SFT: set kind: {task.kind}")
        if self.language_sfts and self.kind == "language":
            bad("language_sfts", "language SFTs are activated while training task SFTs only: remove them")
        data = self.data
        if data.train_file and data.sources:
            bad("data", "give exactly one of data.train_file (one source) or data.sources (a list, one per language)")
        for i, source in enumerate(self.sources() if data.train_file or data.sources else []):
            key = f"data.sources[{i}]" if data.sources else "data.train_file"
            problem = format_problem(task, source.format)
            if problem:
                bad(f"{key}.format", f"{source.format!r} is {problem}")
            if bool(source.train_file) == bool(source.hf_dataset):
                bad(key, "give exactly one of train_file or hf_dataset")
            if data.sources and not source.language:
                bad(f"{key}.language", "every source needs its language code")
        languages = [s.language for s in self.sources()]
        if len(set(languages)) != len(languages):
            bad("data.sources", f"a language appears twice in {languages}: merge its files into one source")
        missing = sorted(set(self.language_sfts) - set(languages))
        if missing:
            bad("language_sfts", f"{missing[0]!r} is not a source language ({', '.join(languages)})")
        if not 0 <= data.eval_fraction < 1:
            bad("data.eval_fraction", f"must lie in [0, 1), got {data.eval_fraction}")
        if data.eval_every < 0:
            bad("data.eval_every", "must be non-negative")

    def sources(self) -> list[SourceConfig]:
        """The training sources; a single data.train_file is the one source of the first configured language."""
        if self.data.sources:
            return self.data.sources
        language = self.languages[0] if self.languages else ""
        return [SourceConfig(language=language, train_file=self.data.train_file or None, format=self.data.format)]

    def k_for(self, n_eligible: int) -> int:
        if self.selection == "all":
            return n_eligible
        k = self.k if self.k is not None else max(1, round(self.density * n_eligible))
        if k > n_eligible:
            raise LtsftError(f"k={k} exceeds the {n_eligible} eligible parameters: lower k or widen eligibility")
        return k

    def deepspeed_path(self, base_dir: Path | None = None) -> Path:
        candidates = [Path(self.deepspeed)]
        if base_dir is not None:
            candidates.append(base_dir / self.deepspeed)
        candidates.append(PACKAGE_DS_CONFIGS / self.deepspeed)
        for c in candidates:
            if c.is_file():
                return c
        raise LtsftError(f"deepspeed: config {self.deepspeed!r} not found (looked in: "
                         f"{', '.join(str(c) for c in candidates)})")


def _convert(value, tp, key: str, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for inner in options[:-1]:
            try:
                return _convert(value, inner, key, where)
            except LtsftError:
                pass
        return _convert(value, options[-1], key, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise LtsftError(f"{where}: {key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where, prefix=key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise LtsftError(f"{where}: {key}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise LtsftError(f"{where}: {key}: expected a mapping, got {value!r}")
        if not args:
            return value
        return {_convert(k, args[0], key, where): _convert(v, args[1], f"{key}.{k}", where) for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    raise LtsftError(f"{where}: {key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls, data: dict, where: str = "config", prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LtsftError(f"{where}: unknown key {prefix + unknown[0]!r}; valid keys here: {', '.join(sorted(known))}")
    return cls(**{k: _convert(v, hints[k], prefix + k, where) for k, v in data.items()})


def read_mapping(path: str | Path, what: str = "config file") -> dict:
    """A YAML/JSON file holding a mapping; errors name the file, the line and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise LtsftError(f"{what} {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise LtsftError(f"{path}:{line} is not valid YAML/JSON: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise LtsftError(f"{path}: expected a mapping of keys at the top level")
    return data


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Load a YAML/JSON config; `overrides` are `key.path=value` strings (value parsed as YAML)."""
    path = Path(path)
    data = read_mapping(path)
    for item in overrides:
        if "=" not in item:
            raise LtsftError(f"override {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    config = from_dict(TrainConfig, data, where=str(path))
    config.validate(str(path))
    if not (config.data.train_file or config.data.sources):  # (the recipe as a library takes examples directly)
        raise LtsftError(f"{path}: data: give exactly one of data.train_file (one source) or data.sources (a list, "
                         "one per language)")
    return config


def to_dict(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))
