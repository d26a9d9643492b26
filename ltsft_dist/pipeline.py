"""The paper's whole recipe from one config: base → language SFTs → multi-source task SFT → zero-shot evaluation.

Each stage is an ordinary training run (`ltsft_dist.train`) or evaluation (`ltsft_dist.evaluation.evaluate`)
whose config the pipeline writes: `run_stage_here` runs it in this process (on the ranks of the launcher that
started it), `stage_argv` is the `ltsft` command line that runs it on freshly launched ranks. A stage's directory
is named by a hash of everything it depends on (its config, the bytes of its input files, the hashes of the
stages it uses), so re-running skips finished stages, a changed input re-runs exactly the stages downstream of
it, and an interrupted stage resumes from its own checkpoints (same inputs, same directory).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ltsft_dist.config import SourceConfig, TrainConfig, beside, from_dict, read_mapping, resolve_train_paths, to_dict
from ltsft_dist.errors import LtsftError
from ltsft_dist.evaluation import EvalConfig
from ltsft_dist.files import write_text
from ltsft_dist.tasks import get_task

DONE = "DONE"  # written last into a stage directory: the stage finished


@dataclass
class BaseConfig:
    """The base model θ⁰: a hub id/directory, or a tiny model built here (offline demo, tests)."""

    name_or_path: str | None = field(default=None, metadata={"help": "a hub id or a local transformers directory"})
    tiny: dict | None = field(default=None, metadata={
        "help": "or: config values of a tiny model; its tokenizer is trained on the languages' text"})
    architecture: str = field(default="bert", metadata={"help": "for `tiny`: bert | xlm-roberta"})
    pretrain_steps: int = field(default=0, metadata={
        "help": "tiny only: dense MLM steps on the languages' text, a stand-in for a pretrained base; each step "
                "trains on one language and predicts its masked words among that language's own tokens, on rows "
                "encoded as the language SFTs read them (language_sft.data's max_seq_length and packed)"})
    pretrain_languages: list[str] | None = field(default=None, metadata={
        "help": "tiny only: the languages pretrained on (default: all); the others are unseen by the base, their "
                "embedding rows stay as initialised (as a language XLM-R never saw)"})
    pretrain_batch_size: int = field(default=32, metadata={"help": "tiny only: rows per pretraining step"})
    pretrain_lr: float = field(default=1e-3, metadata={"help": "tiny only: learning rate of pretrain_steps"})
    seed: int = field(default=0, metadata={"help": "tiny only: seed of its initialisation and pretraining"})


@dataclass
class PipelineConfig:
    output_dir: str = field(default="runs/pipeline", metadata={
        "help": "where the stages' directories go (relative: from the config's folder)"})
    ranks: int = field(default=2, metadata={
        "help": "local ranks per stage when `ltsft pipeline` is not itself under a launcher"})
    base: BaseConfig = field(default_factory=BaseConfig, metadata={"help": "the base model θ⁰"})
    languages: dict[str, SourceConfig] = field(default_factory=dict, metadata={
        "help": "language -> its text (language SFT data), as a data.sources[] entry of `ltsft train`"})
    language_sft: dict = field(default_factory=dict, metadata={
        "help": "`ltsft train` keys shared by every language SFT (see ltsft train --help-config)"})
    task_sft: dict = field(default_factory=dict, metadata={
        "help": "`ltsft train` keys of the task SFT (task, data.sources, ...)"})
    evaluation: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "the zero-shot evaluation"})


@dataclass
class Stage:
    name: str  # base | lang:<xx> | task | eval
    directory: Path
    needs: list[str]
    config: dict | None = None  # train stages: the `ltsft train` config; eval: the `ltsft eval` arguments

    @property
    def done(self) -> bool:
        return (self.directory / DONE).is_file()


def load_pipeline(path: str | Path) -> PipelineConfig:
    path = Path(path)
    data = read_mapping(path, "pipeline config")
    config = from_dict(PipelineConfig, data, where=str(path))
    base_dir = path.resolve().parent
    for language, source in config.languages.items():
        source.language = language
        source.train_file = beside(source.train_file, base_dir)
    config.language_sft = resolve_train_paths(config.language_sft, base_dir)
    config.task_sft = resolve_train_paths(config.task_sft, base_dir)
    config.evaluation.data = {lang: beside(p, base_dir) for lang, p in config.evaluation.data.items()}
    if not Path(config.output_dir).is_absolute():
        config.output_dir = str(base_dir / config.output_dir)
    _check(config, str(path))
    return config


def _check(config: PipelineConfig, where: str) -> None:
    if (config.base.name_or_path is None) == (config.base.tiny is None):
        raise LtsftError(f"{where}: base: give exactly one of base.name_or_path or base.tiny")
    if config.base.pretrain_steps and config.base.tiny is None:
        raise LtsftError(f"{where}: base.pretrain_steps: only a tiny base is pretrained here; remove it")
    if not config.task_sft.get("data", {}).get("sources"):
        raise LtsftError(f"{where}: task_sft.data.sources: list the task's source languages and their files")
    if not config.evaluation.data:
        raise LtsftError(f"{where}: evaluation.data: map each target language to its evaluation file")
    ev = config.evaluation
    if ev.task is None:  # the task SFT's own task, scored zero-shot (nli, qa, ...)
        get_task(config.task_sft.get("task"), f"{where}: task_sft.task", evaluated=True)
    else:  # another one, e.g. xcopa for an instruction-tuned decoder
        get_task(ev.task, f"{where}: evaluation.task", evaluated=True)
    for key in ("base", "task_sft", "lang_sft", "out", "max_query_length"):
        if getattr(ev, key) != getattr(EvalConfig(), key):
            raise LtsftError(f"{where}: evaluation.{key} is set by the pipeline (from its stages); remove it")
    ev.check()
    if config.ranks < 1:
        raise LtsftError(f"{where}: ranks: must be at least 1")
    for name in ("language_sft", "task_sft"):
        for key in ("kind", "output_dir", "model", "languages", "language_sfts"):
            if key in getattr(config, name):
                raise LtsftError(f"{where}: {name}.{key} is set by the pipeline; remove it")
    for language in config.languages:  # every stage's config is valid before anything runs
        _train_config(language_stage_config(config, language, "BASE"), f"{where}: language_sft ({language})")
    _train_config(task_stage_config(config, "BASE", {}), f"{where}: task_sft")


def _train_config(data: dict, where: str) -> TrainConfig:
    config = from_dict(TrainConfig, copy.deepcopy(data), where=where)
    config.validate(where)
    return config.complete()


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def language_stage_config(config: PipelineConfig, language: str, base_dir: str) -> dict:
    source = config.languages[language]
    data = ({"train_file": source.train_file, "format": source.format} if source.train_file
            else {"sources": [to_dict(source)]})
    return _merge(config.language_sft, {"kind": "language", "languages": [language],
                                        "model": {"name_or_path": base_dir}, "data": data})


def task_stage_config(config: PipelineConfig, base_dir: str, language_sfts: dict[str, str]) -> dict:
    return _merge(config.task_sft, {"kind": "task", "model": {"name_or_path": base_dir},
                                    "language_sfts": language_sfts})


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.read_bytes() if part.is_file() else b"<missing>")
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


def _files(data: dict) -> list[Path]:
    """Input files named anywhere in a stage config (their bytes are part of the stage's identity)."""
    found = []
    for key, value in data.items():
        if isinstance(value, dict):
            found += _files(value)
        elif isinstance(value, list):
            found += [f for v in value if isinstance(v, dict) for f in _files(v)]
        elif key == "train_file" and value:
            found.append(Path(value))
    return found


def plan(config: PipelineConfig) -> list[Stage]:
    """Every stage with its content-addressed directory, in the order they run."""
    root = Path(config.output_dir)
    texts = [Path(s.train_file) for s in config.languages.values() if s.train_file]
    pretraining = [pretraining_encoding(config)] if config.base.pretrain_steps else []
    base_hash = (_digest(to_dict(config.base), *pretraining, *texts) if config.base.tiny
                 else _digest(config.base.name_or_path))
    base = Stage("base", root / f"base-{base_hash}", [])
    base_dir = config.base.name_or_path if config.base.tiny is None else str(base.directory / "model")
    stages = [base] if config.base.tiny else []
    lang_dirs = {}
    for language in config.languages:
        data = language_stage_config(config, language, base_dir)
        stage = Stage(f"lang:{language}", root / f"lang-{language}-{_digest(data, base_hash, *_files(data))}",
                      ["base"] if config.base.tiny else [], data)
        stage.config["output_dir"] = str(stage.directory)
        lang_dirs[language] = str(stage.directory / "sft")
        stages.append(stage)
    sources = [s["language"] for s in config.task_sft["data"]["sources"]]
    task_langs = {lang: lang_dirs[lang] for lang in sources if lang in lang_dirs}
    data = task_stage_config(config, base_dir, task_langs)
    task = Stage("task", None, [s.name for s in stages if s.name in {"base", *(f"lang:{l}" for l in task_langs)}], data)
    task.directory = root / f"task-{_digest(data, base_hash, [lang_dirs[l] for l in task_langs], *_files(data))}"
    task.config["output_dir"] = str(task.directory)
    stages.append(task)
    ev = config.evaluation
    targets = {lang: lang_dirs.get(lang) for lang in ev.data}
    args = {"base": base_dir, "task_sft": str(task.directory / "sft"),
            "task": ev.task or data.get("task", "classification"),
            "lang_sfts": {lang: d for lang, d in targets.items() if d}, "data": ev.data,
            "max_seq_length": ev.max_seq_length, "stride": ev.stride, "batch_size": ev.batch_size,
            "limit": ev.limit, "max_query_length": _train_config(data, "task_sft").data.max_query_length,
            "qa_metric": ev.qa_metric, "format": ev.format}
    needs = ["task", *(f"lang:{lang}" for lang, d in targets.items() if d)]
    evaluation = Stage("eval", root / f"eval-{_digest(args, task.directory.name, *map(Path, ev.data.values()))}",
                       needs, args)
    stages.append(evaluation)
    return stages


def stage_argv(stage: Stage) -> list[str]:
    """The `ltsft` arguments that run a train or eval stage on launched ranks (a train stage's config is written
    to its directory)."""
    a = stage.config
    if stage.name != "eval":
        path = stage.directory / "config.yaml"
        write_text(path, yaml.safe_dump(a, sort_keys=False))
        return ["train", str(path)]
    argv = ["eval", "--base", a["base"], "--task-sft", a["task_sft"], "--task", a["task"],
            "--out", str(stage.directory), "--max-seq-length", str(a["max_seq_length"]), "--stride", str(a["stride"]),
            "--batch-size", str(a["batch_size"]), "--max-query-length", str(a["max_query_length"]),
            "--qa-metric", a["qa_metric"]]
    for lang, path in a["lang_sfts"].items():
        argv += ["--lang-sft", f"{lang}={path}"]
    for lang, path in a["data"].items():
        argv += ["--data", f"{lang}={path}"]
    if a["limit"]:
        argv += ["--limit", str(a["limit"])]
    if a["format"]:
        argv += ["--format", a["format"]]
    return argv


def run_stage_here(config: PipelineConfig, stage: Stage, rank: int) -> int:
    """Run one stage in this process, on the ranks of the launcher that started it (if any); returns the exit
    status its `ltsft` command would have (`ltsft_dist.training.EXIT_REQUEUE` when stopped on request)."""
    if stage.name == "base":
        if rank == 0:
            build_base(config, stage)
        return 0
    if stage.name == "eval":
        return _evaluate_stage(stage)
    from ltsft_dist.training import EXIT_REQUEUE, train

    if rank == 0:
        stage_argv(stage)  # the stage's config, written beside its outputs as a record
    result = train(train_stage_config(stage))
    return EXIT_REQUEUE if result.preempted is not None else 0


def train_stage_config(stage: Stage) -> TrainConfig:
    """A training stage's `TrainConfig`, validated."""
    return _train_config(stage.config, f"stage {stage.name}")


def _evaluate_stage(stage: Stage) -> int:
    from ltsft_dist.engine import join_launched_group
    from ltsft_dist.evaluation import EvalOptions, evaluate, markdown_table, write_results

    a = stage.config
    join_launched_group()
    options = EvalOptions(max_seq_length=a["max_seq_length"], stride=a["stride"], batch_size=a["batch_size"],
                          max_query_length=a["max_query_length"], limit=a["limit"], qa_metric=a["qa_metric"],
                          format=a["format"])
    results = evaluate(a["base"], a["task_sft"], a["data"], a["lang_sfts"], a["task"], options)
    if results is not None:
        write_results(results, stage.directory)
        print(markdown_table(results))
    return 0


def mark_done(stage: Stage) -> None:
    write_text(stage.directory / DONE, json.dumps({"stage": stage.name}))


def describe(stages: list[Stage]) -> str:
    lines = []
    for s in stages:
        state = "done, skipped" if s.done else ("interrupted, resumes" if s.directory.exists() else "to run")
        needs = f" (after {', '.join(s.needs)})" if s.needs else ""
        lines.append(f"  {s.name:<10} {state:<20} {s.directory}{needs}")
    return "\n".join(lines)


def build_base(config: PipelineConfig, stage: Stage) -> None:
    """The tiny base: tokenizer and model from the languages' text, optionally pretrained (dense MLM, input and
    output embeddings tied) on some of them so that they share a model as a multilingual pretrained base would. A
    language's masked words are scored among its own tokens only, and random replacements stay inside it, so the
    rows of a language left out of pretraining get no gradient at all (with tied embeddings, a full softmax would
    push them around)."""
    import torch
    from transformers import AutoModelForMaskedLM

    from ltsft_dist.config import ModelConfig
    from ltsft_dist.models import save_tiny_base
    from ltsft_dist.training_data import read_source

    b = config.base
    pretrained = b.pretrain_languages or list(config.languages)
    unknown = sorted(set(pretrained) - set(config.languages))
    if unknown:
        raise LtsftError(f"base.pretrain_languages: {unknown} are not in `languages` ({', '.join(config.languages)})"
                         "; list languages whose text the pipeline has")
    texts = {lang: list(read_source(source, "mlm").records) for lang, source in config.languages.items()}
    model_dir = stage.directory / "model"
    save_tiny_base(model_dir, ModelConfig(tiny=b.tiny, architecture=b.architecture),
                   [t for lines in texts.values() for t in lines], seed=b.seed)
    torch.manual_seed(b.seed)
    model = AutoModelForMaskedLM.from_pretrained(str(model_dir))
    # One word matrix for input and output, as BERT and XLM-R are pretrained (the saved tiny base holds an untied
    # copy, still equal to the input embedding); language SFTs may keep it tied (eligibility.tie_output_embeddings).
    model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.config.tie_word_embeddings = True
    if b.pretrain_steps:
        _pretrain(config, model, str(model_dir), texts, pretrained)
    model.save_pretrained(str(model_dir))


def pretraining_encoding(config: PipelineConfig) -> tuple[int, bool]:
    """(max_seq_length, packed) of the tiny base's pretraining rows: its language SFTs' `data`. A base that saw one
    sentence per row and is then given packed blocks (whose later positions it never saw) starts its language SFTs
    far from converged (measured on the demo: held-out MLM loss 2.8 on sentences, 7.5 on blocks)."""
    language = (config.base.pretrain_languages or list(config.languages))[0]
    data = _train_config(language_stage_config(config, language, "BASE"), "language_sft").data
    return data.max_seq_length, data.packed


def _pretrain(config: PipelineConfig, model, model_dir: str, texts: dict[str, list[str]], pretrained: list[str]):
    """Dense MLM on the `pretrained` languages in turn, each scored among its own tokens."""
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from ltsft_dist.data import StepOrder, among_own, over_outputs
    from ltsft_dist.tasks.mlm import encode_text

    b = config.base
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    max_len, packed = pretraining_encoding(config)
    orders, own = {}, {}
    for i, lang in enumerate(pretrained):
        examples = encode_text(tokenizer, texts[lang], max_len, packed, own_tokens=True).examples
        own[lang] = over_outputs(examples.mlm.own, model.config.vocab_size)  # language SFTs: data.mlm_own_tokens
        orders[lang] = StepOrder(examples, b.pretrain_batch_size, b.pretrain_batch_size, 0, 1, b.seed * 1000 + i)
    optimizer = torch.optim.AdamW(model.parameters(), lr=b.pretrain_lr, weight_decay=0.0)  # unseen rows stay put
    model.train()
    for step in tqdm(range(b.pretrain_steps), desc="pretraining the tiny base"):
        lang = pretrained[step % len(pretrained)]
        batch = orders[lang].batch_at(step // len(pretrained), 0)
        labels = batch.pop("labels")
        logits = among_own(model(**batch).logits, own[lang])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
