"""Typed training configuration, loaded from YAML/JSON and validated before any process starts work.

Errors name the file, the key path and the fix, e.g.
`run.yaml: phase1.lr: expected a number, got 'fast'`.
"""

from __future__ import annotations

import copy
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

PACKAGE_DS_CONFIGS = Path(__file__).resolve().parent / "ds_configs"


def field_help(text: str) -> dict:
    """A field's help text, as peft declares it: `ltsft train --help-config` and the docs list it."""
    return {"help": text}


@dataclass
class PhaseConfig:
    steps: int = field(default=100, metadata=field_help("optimizer steps in this phase"))
    lr: float = field(default=5e-5, metadata=field_help("peak learning rate; linear warm-up, then linear decay to 0 "
                                                   "(as in the paper)"))
    warmup_steps: int = field(default=0, metadata=field_help("steps of linear warm-up from 0 to lr"))
    l1: float = field(default=0.0, metadata=field_help("λ of the L1 pull toward θ⁰ (the paper uses 0.1 for language "
                                                  "SFTs)"))


MODEL_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # model.dtype -> torch's name


@dataclass
class ModelConfig:
    name_or_path: str | None = field(default=None, metadata=field_help("a hub id or a local transformers directory"))
    tiny: dict | None = field(default=None, metadata=field_help(
        "or: build a randomly initialised model from these config values (offline tests, demo)"))
    architecture: str = field(default="bert", metadata=field_help(
        "for `tiny`: bert | xlm-roberta (encoders) | llama | qwen2 | mistral | gemma (decoders: task clm)"))
    tokenizer: str | None = field(default=None, metadata=field_help("tokenizer directory; defaults to name_or_path"))
    gradient_checkpointing: bool = field(default=False, metadata=field_help(
        "recompute activations in the backward pass instead of keeping them (transformers' gradient "
        "checkpointing): less memory for long sequences and large decoders, about a third more compute"))
    dtype: str = field(default="fp32", metadata=field_help(
        "fp32 | bf16 | fp16: the dtype the weights are loaded (or built) in, whatever the checkpoint stores. Train in "
        "mixed precision with the DeepSpeed config (e.g. zero2_bf16.json); its fp32 masters are made from these "
        "weights, so a half-precision load rounds θ⁰ to that precision (and saves host memory while loading). "
        "fp32 (the default) keeps θ⁰ exact; bf16/fp16 must match the DeepSpeed config's precision"))

    def torch_dtype(self, where: str = "config"):
        """`dtype` as a torch dtype; raises `LtsftError` naming the key when it is not one of MODEL_DTYPES."""
        import torch

        if self.dtype not in MODEL_DTYPES:
            raise LtsftError(f"{where}: model.dtype: {self.dtype!r} is not one of {', '.join(MODEL_DTYPES)}")
        return getattr(torch, MODEL_DTYPES[self.dtype])

    def check_architecture(self, task, where: str) -> None:
        """A tiny model's architecture is known and of the kind the task trains (a decoder or an encoder)."""
        from ltsft_dist.models import TINY_CONFIGS, is_decoder
        from ltsft_dist.tasks import get_task, task_names

        if self.architecture not in TINY_CONFIGS:
            raise LtsftError(f"{where}: model.architecture: {self.architecture!r} is not one of "
                             f"{', '.join(TINY_CONFIGS)}")
        if is_decoder(self.architecture) != task.decoder:
            have, need = ("an encoder", "decoder") if task.decoder else ("a decoder", "encoder")
            other = [n for n in task_names(kind=task.kind) if get_task(n).decoder != task.decoder]
            fix = f"set task: {other[0]} to train this architecture, or " if other else ""
            fitting = ", ".join(a for a in TINY_CONFIGS if is_decoder(a) == task.decoder)
            raise LtsftError(f"{where}: model.architecture: {self.architecture!r} is {have}, and task {task.name} "
                             f"trains {need} models only: {fix}set model.architecture to one of {fitting}")


@dataclass
class SourceConfig:
    """One source language's training data: a file, or a HF dataset (hf_dataset + hf_config + split)."""

    language: str = field(default="", metadata=field_help("language code of this source"))
    train_file: str | None = field(default=None, metadata=field_help(
        "training file; a relative path is taken from the config's folder where it exists there"))
    format: str = field(default="auto", metadata=field_help(
        "auto (by task, extension and header) | text | jsonl | squad | xnli-tsv | multinli-jsonl | americasnli-tsv | "
        "conll (ner/pos: CoNLL-U or word ... tag columns) | hf"))
    hf_dataset: str | None = field(default=None, metadata=field_help("or: a HF dataset, e.g. facebook/xnli, squad, "
                                                                "wikitext"))
    hf_config: str | None = field(default=None, metadata=field_help("the HF dataset's config name, e.g. the language's"))
    split: str = field(default="train", metadata=field_help("the HF dataset's split"))
    column: str = field(default="text", metadata=field_help("mlm from a HF dataset: the text column"))


@dataclass
class DataConfig:
    train_file: str = field(default="", metadata=field_help(
        "single source: mlm/clm: one text per line; classification: JSON lines with text, [text_pair,] label; nli: an "
        "XNLI/AmericasNLI TSV or MultiNLI JSONL; qa: SQuAD JSON (relative: from the config's folder where it "
        "exists there)"))
    format: str = field(default="auto", metadata=field_help("how to read train_file (see data.sources[].format)"))
    sources: list[SourceConfig] = field(default_factory=list, metadata=field_help(
        "multi-source: one entry per source language (instead of train_file)"))
    max_seq_length: int = field(default=64, metadata=field_help("tokens per model input"))
    mlm_probability: float = field(default=0.15, metadata=field_help("mlm: fraction of tokens masked"))
    packed: bool = field(default=True, metadata=field_help(
        "mlm: concatenate lines and cut into max_seq_length blocks, the last one padded, so every token is used "
        "(false: one line per row, long lines truncated and the cut tokens reported as dropped); clm always packs"))
    mlm_own_tokens: bool = field(default=False, metadata=field_help(
        "mlm: score each masked token among the tokens of this language's text only (the softmax over them; a random "
        "replacement outside them becomes [MASK]), as the demo's base is pretrained; for a language the base never "
        "saw, whose tied word rows a full softmax pushes against every other language's (false: the whole "
        "vocabulary, the paper's MLM)"))
    doc_stride: int = field(default=32, metadata=field_help("qa: context tokens shared by consecutive windows of a "
                                                       "long context"))
    max_query_length: int = field(default=24, metadata=field_help("qa: question tokens kept"))
    labels: list[str] | None = field(default=None, metadata=field_help(
        "classification/ner/pos label names, in id order; default: sorted labels seen"))
    eval_fraction: float = field(default=0.0, metadata=field_help(
        "held out from training for the eval loss (the paper: 5% for language SFTs)"))
    eval_every: int = field(default=0, metadata=field_help(
        "phase-2 steps between evaluations; the best φ by eval loss is kept (0: phase end only)"))
    eval_max_examples: int = field(default=2000, metadata=field_help(
        "held-out rows evaluated at most, a seeded random subset of them (0: all); bounds every evaluation's cost"))
    cache_dir: str = field(default="", metadata=field_help(
        "mlm/clm: where text is tokenised once and memory-mapped by every rank, one directory per (text, "
        "tokenizer, max_seq_length, packing, split); must be seen by every rank (default: token_cache beside "
        "output_dir, shared by a pipeline's stages)"))


@dataclass
class TrainConfig:
    kind: str = field(default="language", metadata=field_help("language | task | bitfit"))
    task: str | None = field(default=None, metadata=field_help(
        "mlm | clm (decoders) | classification | nli | qa | ner | pos (default: mlm for language SFTs, clm for those "
        "of a tiny decoder, else classification)"))
    languages: list[str] = field(default_factory=list, metadata=field_help("language code(s), recorded in the SFT"))
    output_dir: str = field(default="runs/ltsft", metadata=field_help(
        "where the SFT, checkpoints, tokenizer and logs go"))
    model: ModelConfig = field(default_factory=ModelConfig, metadata=field_help("the base model θ⁰"))
    data: DataConfig = field(default_factory=DataConfig, metadata=field_help("the training data"))
    k: int | None = field(default=None, metadata=field_help("number of parameters to select ..."))
    density: float | None = field(default=None, metadata=field_help("... or a fraction of the eligible parameters"))
    selection: str = field(default="magnitude", metadata=field_help(
        "magnitude (LT-SFT) | random (RAND-SFT) | all (BitFit: no phase 1; kind bitfit implies it)"))
    rounds: int = field(default=1, metadata=field_help(
        "iterative selection: rounds of phase1 -> select K/rounds more -> phase2"))
    phase1: PhaseConfig = field(default_factory=PhaseConfig, metadata=field_help("full fine-tuning"))
    phase2: PhaseConfig = field(default_factory=PhaseConfig, metadata=field_help("masked fine-tuning from θ⁰"))
    batch_size: int = field(default=8, metadata=field_help(
        "global batch per optimizer step (all ranks, all accumulation steps)"))
    micro_batch_size: int = field(default=8, metadata=field_help("per rank per forward pass"))
    weight_decay: float = field(default=0.0, metadata=field_help("AdamW weight decay (not on biases and LayerNorms)"))
    max_grad_norm: float = field(default=1.0, metadata=field_help(
        "clipping of the (masked) global gradient norm; 0 disables it"))
    seed: int = field(default=42, metadata=field_help("seed of the data order, masking and random selection"))
    deepspeed: str = field(default="zero2.json", metadata=field_help(
        "DeepSpeed config: a path (relative: from the config's folder where it exists there), or a file name in "
        "the package's ds_configs/ (zero0-3.json, zero1-3_bf16.json)"))
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig, metadata=field_help(
        "which parameters may change (default: by kind)"))
    log_every: int = field(default=10, metadata=field_help("steps between log lines and TensorBoard scalars"))
    checkpoint_every: int = field(default=0, metadata=field_help(
        "steps between periodic checkpoints (0: only when stopped by SIGUSR1/SIGTERM)"))
    resume: bool = field(default=True, metadata=field_help(
        "continue from the latest complete checkpoint in output_dir/checkpoints"))
    language_sfts: dict[str, str] = field(default_factory=dict, metadata=field_help(
        "task SFTs: source language -> its language SFT directory, active for every step that trains on that "
        "language (multi-source per-step swap)"))
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata=field_help(
        "multi-source: which language each step trains on"))
    on_nonfinite_loss: str = field(default="stop", metadata=field_help(
        "stop: fail naming the step and the last checkpoint | skip: skip such steps"))

    def complete(self) -> TrainConfig:
        """A copy with the keys that default from others filled in: task from kind (a language SFT of a tiny decoder
        trains the decoders' language task, clm), selection `all` for BitFit."""
        from ltsft_dist.models import language_task

        task = self.task or (language_task(self.model) if self.kind == "language" else "classification")
        return dataclasses.replace(copy.deepcopy(self), task=task, selection="all" if self.kind == "bitfit" else self.selection)

    def validate(self, where: str = "config") -> None:
        """Raise `LtsftError` naming the key and the fix; checks `complete()`'s values and changes nothing."""
        from ltsft_dist.tasks import format_problem, get_task, task_names

        def bad(key: str, msg: str):
            raise LtsftError(f"{where}: {key}: {msg}")

        if self.kind not in ("language", "task", "bitfit"):
            bad("kind", f"{self.kind!r} is not one of language, task, bitfit")
        if self.selection not in ("magnitude", "random", "all"):
            bad("selection", f"{self.selection!r} is not one of magnitude, random, all")
        full = self.complete()
        if full.selection != "all" and (self.k is None) == (self.density is None):
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
        self.model.torch_dtype(where)
        task = get_task(full.task, f"{where}: task")
        if self.model.tiny is not None:
            self.model.check_architecture(task, where)
        if (self.kind == "language") != (task.kind == "language"):
            bad("task", f"language SFTs train task {' or '.join(task_names(kind='language'))}, and task {full.task} "
                        f"trains a {task.kind} SFT: set kind: {task.kind}")
        if self.eligibility.tie_output_embeddings and self.kind != "language":
            bad("eligibility.tie_output_embeddings", f"ties a language SFT's prediction head, and a {self.kind} SFT "
                                                     "has none: remove it")
        if self.data.mlm_own_tokens and not task.own_tokens:
            bad("data.mlm_own_tokens", f"task {full.task} does not score masked tokens: remove it (it is for "
                                       f"{' and '.join(n for n in task_names() if get_task(n).own_tokens)})")
        if self.data.mlm_own_tokens and len(self.sources()) > 1:
            bad("data.mlm_own_tokens", "scores the tokens of one language's text: give one source (data.train_file)")
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
        if isinstance(data.eval_max_examples, bool) or not isinstance(data.eval_max_examples, int) \
                or data.eval_max_examples < 0:
            bad("data.eval_max_examples", f"must be a whole number ≥ 0 (0: all), got {data.eval_max_examples!r}")

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

    def deepspeed_path(self) -> Path:
        """`deepspeed` as a path, else a file of that name shipped in the package's ds_configs/."""
        candidates = [Path(self.deepspeed), PACKAGE_DS_CONFIGS / self.deepspeed]
        for c in candidates:
            if c.is_file():
                return c
        raise LtsftError(f"deepspeed: config {self.deepspeed!r} not found (looked in: "
                         f"{', '.join(str(c) for c in candidates)})")


def beside(path: str | None, base_dir: Path) -> str | None:
    """The one rule for a relative input path in a config file: taken from the file's folder where it exists
    there, else kept as given (relative to the working directory, or a name looked up elsewhere, e.g. a
    packaged DeepSpeed config or a hub id)."""
    if not path or Path(path).is_absolute() or not (base_dir / path).exists():
        return path
    return str(base_dir / path)


def resolve_train_paths(data: dict, base_dir: Path) -> dict:
    """A copy of a training config mapping with its input paths resolved by `beside`."""
    data = copy.deepcopy(data)
    section = data.get("data")
    if isinstance(section, dict):
        if isinstance(section.get("train_file"), str):
            section["train_file"] = beside(section["train_file"], base_dir)
        for source in section.get("sources") or []:
            if isinstance(source, dict) and isinstance(source.get("train_file"), str):
                source["train_file"] = beside(source["train_file"], base_dir)
    if isinstance(data.get("language_sfts"), dict):
        data["language_sfts"] = {lang: beside(p, base_dir) if isinstance(p, str) else p
                                 for lang, p in data["language_sfts"].items()}
    if isinstance(data.get("deepspeed"), str):
        data["deepspeed"] = beside(data["deepspeed"], base_dir)
    return data


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
    """Load, complete and validate a YAML/JSON training config; `overrides` are `key.path=value` strings (value
    parsed as YAML). Relative input paths follow `beside`."""
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
    config = from_dict(TrainConfig, resolve_train_paths(data, path.resolve().parent), where=str(path))
    config.validate(str(path))
    if not (config.data.train_file or config.data.sources):  # (the recipe as a library takes examples directly)
        raise LtsftError(f"{path}: data: give exactly one of data.train_file (one source) or data.sources (a list, "
                         "one per language)")
    return config.complete()


def config_help(cls, prefix: str = "") -> str:
    """Every key of a config dataclass, nested ones as dotted paths, with its type, default and help."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}:  {f.metadata.get('help', '')}")
            lines.append(config_help(tp, key + "."))
            continue
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        type_name = tp.__name__ if typing.get_origin(tp) is None else str(tp).replace("typing.", "")
        lines.append(f"{key} ({type_name}, default {default!r}):  {f.metadata.get('help', '')}")
        if inner is not None and dataclasses.is_dataclass(inner):
            lines.append(config_help(inner, key + "[]."))
    return "\n".join(lines)


def to_dict(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))
