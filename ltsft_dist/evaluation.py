"""Zero-shot cross-lingual evaluation per target language: θ⁰ + φ_task + φ_lang, and TA-only θ⁰ + φ_task (without a
task SFT, for a task that needs no head, e.g. a decoder's perplexity: θ⁰ + φ_lang, and θ⁰).

One model is loaded and the SFTs are applied and reverted in place (revert restores the saved values exactly), so
every setting sees exactly θ⁰ underneath. Under a launcher the batches are dealt round-robin to the ranks; every
batch has the same rows whatever the world size, so the gathered logits, and hence the scores, do not depend on it.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ltsft_dist.config import SourceConfig, field_help, from_dict, read_mapping
from ltsft_dist import comm
from ltsft_dist.devices import inference_device, to_device
from ltsft_dist.errors import LtsftError
from ltsft_dist.naming import body_prefix
from ltsft_dist.files import write_atomically
from ltsft_dist.hub import resolve
from ltsft_dist.sft import SparseFineTuning, base_fingerprint
from ltsft_dist.tasks import FORMAT_NAMES, Encoding, Task, format_problem, get_task, task_names
from ltsft_dist.tasks.qa import QA_METRICS

log = logging.getLogger(__name__)

COMPOSED, TASK_ONLY = "task+lang", "task-only"  # with and without the language SFT
SETTING_TITLES = {COMPOSED: "task+lang", TASK_ONLY: "TA-only"}
SETTINGS = {COMPOSED: "θ⁰ + φ_task + φ_lang", TASK_ONLY: "θ⁰ + φ_task"}
BASE_SETTING_TITLES = {COMPOSED: "θ⁰+lang", TASK_ONLY: "θ⁰"}  # no task SFT
BASE_SETTINGS = {COMPOSED: "θ⁰ + φ_lang", TASK_ONLY: "θ⁰"}
METRIC_TITLES = {"exact_match": "EM", "f1": "F1", "accuracy": "acc", "acc": "acc", "acc_norm": "acc_norm",
                 "perplexity": "ppl"}
FILE_FORMATS = tuple(f for f in FORMAT_NAMES if f not in ("auto", "hf"))  # what --format takes


@dataclass
class EvalOptions:
    """How to evaluate; the defaults are XQuAD's official settings (384-token windows, stride 128)."""

    max_seq_length: int = field(default=384, metadata=field_help(
        "tokens per model input (QA window, NLI pair, tagged sentence)"))
    stride: int = field(default=128, metadata=field_help("QA: context tokens shared by consecutive windows"))
    max_query_length: int = field(default=64, metadata=field_help("QA: questions are cut to this many tokens"))
    batch_size: int = field(default=32, metadata=field_help("model inputs per forward pass on each rank"))
    limit: int | None = field(default=None, metadata=field_help("first N questions / pairs per language, for quick runs"))
    qa_metric: str = field(default="squad", metadata=field_help(
        "squad: XQuAD's official (SQuAD v1.1) script; mlqa: MLQA's per-language one"))
    format: str | None = field(default=None, metadata=field_help(
        "reader of every data file; None: told from the file's extension and header"))
    device: str | None = field(default=None, metadata=field_help(
        "where the model runs: None for this rank's accelerator when there is one, else the CPU"))

    def check(self) -> None:
        for key in ("max_seq_length", "stride", "max_query_length", "batch_size", "limit"):
            number = getattr(self, key)
            if number is not None and (number < 0 or (number == 0 and key != "stride")):
                raise LtsftError(f"--{key.replace('_', '-')} must be {'>= 0' if key == 'stride' else 'positive'}, "
                                 f"got {number}")
        if self.qa_metric not in QA_METRICS:
            raise LtsftError(f"--qa-metric {self.qa_metric}: use one of {', '.join(QA_METRICS)}")
        if self.format is not None and self.format not in FILE_FORMATS:
            raise LtsftError(f"--format {self.format}: use one of {', '.join(FILE_FORMATS)}")

    def encoding(self) -> Encoding:
        return Encoding(self.max_seq_length, self.stride, self.max_query_length)


@dataclass
class EvalConfig(EvalOptions):
    """An evaluation: what to evaluate and how. The keys of an `ltsft eval` config file (flags override them) and of
    a pipeline's `evaluation` section (which sets base, task_sft, task and lang_sft itself)."""

    base: str | None = field(default=None, metadata=field_help(
        "base model: a hub id or a directory written by save_pretrained, with its tokenizer"))
    task_sft: str | None = field(default=None, metadata=field_help(
        "the task SFT, with its dense task head; none: θ⁰ with and without each language SFT, for a task without a "
        "head (a decoder's: clm perplexity, xcopa, ...), which --task then names"))
    task: str | None = field(default=None, metadata=field_help(
        "the evaluated task (e.g. xcopa for an instruction task SFT); default: the task the SFT was trained for, "
        "else told by its head parameters"))
    lang_sft: dict[str, str] = field(default_factory=dict, metadata=field_help("target language -> its language SFT"))
    data: dict[str, str] = field(default_factory=dict, metadata=field_help("target language -> evaluation file"))
    out: str | None = field(default=None, metadata=field_help("directory for results.json and results.md"))


def load_eval_config(path) -> EvalConfig:
    """An eval config file, through the same typed reader as train and pipeline configs."""
    return from_dict(EvalConfig, read_mapping(path, "eval config"), where=f"eval config {path}")


# ---------------------------------------------------------------------------------------------- inputs


def require_same_base(sft: SparseFineTuning, model: torch.nn.Module, flag: str, base_dir) -> None:
    """An SFT of another base would load (same shapes are possible) and give meaningless scores: refuse it."""
    expected = sft.metadata.base_fingerprint
    actual = base_fingerprint(model)
    if expected and expected != actual:
        raise LtsftError(f"{flag}: trained on base {sft.metadata.base_model!r} (fingerprint {expected[:12]}), but "
                         f"--base {base_dir} has fingerprint {actual[:12]}; use the SFT trained for this base, or "
                         "the base it was trained on")


def head_names(model: torch.nn.Module) -> set[str]:
    """Parameters outside the shared body: what a task SFT must carry for this model. A language model's output
    embeddings are not among them: SFTs keep them frozen, so the base's own serve."""
    from ltsft_dist.eligibility import output_embedding_name

    prefix, lm_head = body_prefix(model), output_embedding_name(model)
    return {name for name, _ in model.named_parameters() if not name.startswith(prefix) and name != lm_head}


def infer_task(sft: SparseFineTuning, base_dir) -> str:
    """The task the SFT was trained for (recorded in its training config), else the task whose head (built on the
    meta device, so nothing is allocated) has exactly the SFT's head names."""
    from transformers import AutoConfig

    evaluated = task_names(evaluated=True)
    recorded = sft.metadata.training_config.get("task")
    if recorded in evaluated:
        return recorded

    config = AutoConfig.from_pretrained(base_dir)
    matches = []
    # Without a recorded task there are no recorded label names either: only tasks that need none are candidates.
    for name in [n for n in evaluated if not get_task(n).labelled or get_task(n).fixed_labels]:
        with torch.device("meta"):
            skeleton = get_task(name).auto_class().from_config(config)
        if sft.heads and set(sft.heads) == head_names(skeleton):
            matches.append(name)
    if len(matches) != 1:
        raise LtsftError(f"--task-sft: cannot tell the task from its heads {sorted(sft.heads) or '(none)'}; "
                         f"pass --task {' or --task '.join(matches or evaluated)}")
    return matches[0]


def read_eval_data(task: str, language: str, path, data_format: str | None = None, limit: int | None = None):
    """The labelled examples of one target language, with the reader the format (or the file) calls for."""
    spec = get_task(task, "--task", evaluated=True)
    path = Path(path)
    if not path.is_file():
        raise LtsftError(f"--data {language}={path}: file not found; check the path")
    problem = format_problem(spec, data_format) if data_format else None
    if problem:
        raise LtsftError(f"--format {data_format} is {problem}")
    data_format = data_format or spec.sniff(path)
    if data_format is None:
        raise LtsftError(f"--data {path}: cannot tell the {task} format from the name and header; pass --format "
                         f"({', '.join(f for f in spec.formats if f != 'hf')})")
    examples = spec.read(SourceConfig(language=language, train_file=str(path)), data_format)
    return list(itertools.islice(examples, limit)) if limit else examples  # (clm's text is a lazy TextSource)


# ---------------------------------------------------------------------------------------------- running


class _Runner:
    """Forward passes over this rank's share of the batches on the model's device; the outputs of all ranks
    gathered on rank 0, on the CPU."""

    def __init__(self, model, batch_size: int, device: torch.device):
        self.model, self.batch_size, self.device, self.progress = model, batch_size, device, None
        self.rank, self.world = comm.rank(), comm.world_size()

    def my_batches(self, n: int) -> range:
        return range(self.rank * self.batch_size, n, self.world * self.batch_size)

    @torch.inference_mode()
    def outputs(self, inputs: dict[str, torch.Tensor], task: Task) -> list[torch.Tensor] | None:
        n = len(inputs["input_ids"])
        mine = {}
        for start in self.my_batches(n):
            batch = to_device({name: t[start:start + self.batch_size] for name, t in inputs.items()}, self.device)
            mine[start] = task.forward(self.model, batch)
            self.progress.update()
        parts = comm.gather_object(mine, dst=0)  # on the CPU
        if self.rank != 0:
            return None
        merged = {start: out for part in parts for start, out in part.items()}
        return [torch.cat([merged[s][i] for s in sorted(merged)]) for i in range(len(task.output_fields))]


def load_sft_flag(location: str, flag: str, kind: str | None = None) -> SparseFineTuning:
    """An SFT named on the command line (`flag` says where, e.g. "--lang-sft de"); a wrong `kind` is refused."""
    try:
        sft = SparseFineTuning.from_pretrained(location)
    except LtsftError as err:  # its message names the path already
        raise LtsftError(f"{flag}: {err}") from None
    if kind is not None and sft.metadata.kind != kind:
        raise LtsftError(f"{flag} {location}: a {sft.metadata.kind} SFT, expected a {kind} SFT; check the flag")
    return sft


@dataclass
class _Inputs:
    """Everything an evaluation needs, checked before any model runs (so every rank fails alike, and early)."""

    task: str
    base: Path  # the base's local directory (a hub id's snapshot in the cache)
    task_sft: SparseFineTuning | None  # None: θ⁰ (+ φ_lang) is evaluated
    lang_sfts: dict[str, SparseFineTuning]
    examples: dict[str, list]
    labels: list[str] | None = None  # the label names, in the head's output order


def _load_inputs(base_dir, task_sft: str | None, data: dict[str, str], lang_sfts: dict[str, str], task: str | None,
                 options: EvalOptions) -> _Inputs:
    if not data:
        raise LtsftError("no evaluation data: pass --data LANG=PATH for every target language")
    no_data = sorted(set(lang_sfts) - set(data))
    if no_data:
        raise LtsftError(f"--lang-sft {no_data[0]}=... has no --data {no_data[0]}=PATH; add the evaluation file of "
                         "that language or drop its language SFT")
    options.check()
    if task_sft is None and task is None:
        headless = ", ".join(n for n in task_names(evaluated=True) if get_task(n).decoder)
        raise LtsftError("missing --task-sft: give it on the command line or as task_sft: in the eval config; without "
                         f"one, --task names a task scored on the base alone ({headless})")
    sft = load_sft_flag(task_sft, "--task-sft", "task") if task_sft else None
    config_dir = resolve(base_dir, "--base", allow_patterns=["config.json"])  # the base's kind before its weights
    if not (config_dir / "config.json").is_file():
        raise LtsftError(f"--base {base_dir}: no config.json in {config_dir}; pass a hub model or a directory "
                         "written by save_pretrained (model and tokenizer)")
    task = task or infer_task(sft, config_dir)
    spec = get_task(task, "--task", evaluated=True)
    spec.check_eval(options, list(data))
    _require_base_kind(base_dir, config_dir, spec)
    base = resolve(base_dir, "--base")  # a hub id: rank 0 downloads it first
    languages = {}
    for lang, path in lang_sfts.items():
        languages[lang] = load_sft_flag(path, f"--lang-sft {lang}", "language")
        if languages[lang].metadata.languages and lang not in languages[lang].metadata.languages:
            raise LtsftError(f"--lang-sft {lang}={path}: that SFT is for {languages[lang].metadata.languages}, "
                             f"not {lang}; check the language code")
    labels = spec.head_labels(sft.metadata.training_config, f"--task-sft {task_sft}") if sft else None
    examples = {lang: read_eval_data(task, lang, path, options.format, options.limit)
                for lang, path in data.items()}
    return _Inputs(task, base, sft, languages, examples, labels)


def _require_base_kind(base_dir, config_dir: Path, task: Task) -> None:
    """A decoder task (xcopa, clm, ...) needs a decoder base and an encoder task an encoder base, as the base's
    config.json tells."""
    from ltsft_dist.preflight import base_kind

    decoder, model_type = base_kind(config_dir)
    if decoder is not None and decoder != task.decoder:
        have, need = ("a decoder", "an encoder") if decoder else ("an encoder", "a decoder")
        raise LtsftError(f"--base {base_dir}: {have} (model_type {model_type!r} in its config.json), but --task "
                         f"{task.name} scores {need.split()[1]} models: pass {need} base, or the --task for this one")


def _load_model(base_dir, inputs: _Inputs, task_sft: str | None, lang_sfts: dict[str, str]):
    """The task model and tokenizer of the base, refusing SFTs of another base or without this task's head."""
    from transformers import AutoTokenizer

    from ltsft_dist.models import load_task_model

    try:
        tokenizer = AutoTokenizer.from_pretrained(inputs.base)
    except (OSError, ValueError) as err:
        raise LtsftError(f"--base {base_dir}: no usable tokenizer there ({err}); save the base's tokenizer "
                         "into it (tokenizer.save_pretrained)") from None
    model = load_task_model(inputs.base, inputs.task, len(inputs.labels) if inputs.labels else None)
    if inputs.task_sft is not None:
        require_same_base(inputs.task_sft, model, f"--task-sft {task_sft}", base_dir)
    for lang, lang_sft in inputs.lang_sfts.items():
        require_same_base(lang_sft, model, f"--lang-sft {lang}={lang_sfts[lang]}", base_dir)
    missing = sorted(head_names(model) - set(inputs.task_sft.heads if inputs.task_sft else ()))
    if missing and inputs.task_sft is None:
        raise LtsftError(f"--task {inputs.task} needs a task head ({missing[0]!r}, ...), which a task SFT carries: "
                         "pass --task-sft")
    if missing:
        raise LtsftError(f"--task-sft {task_sft} carries no {inputs.task} head ({missing[0]!r} is missing; it has "
                         f"{sorted(inputs.task_sft.heads) or 'no heads'}): pass the --task it was trained for")
    return model, tokenizer


def evaluate(base_dir, task_sft: str | None, data: dict[str, str], lang_sfts: dict[str, str] | None = None,
             task: str | None = None, options: EvalOptions | None = None, show_progress: bool = True) -> dict | None:
    """Scores per target language and setting; the result on rank 0, None on the other ranks.

    `data` maps each target language to its evaluation file, `lang_sfts` (a subset of those languages) to its
    language SFT; languages without one are evaluated TA-only only. Without `task_sft` (a task without a head,
    named by `task`), θ⁰ + φ_lang and θ⁰ are."""
    from tqdm.auto import tqdm

    options, lang_sfts = options or EvalOptions(), lang_sfts or {}
    device = inference_device(options.device)
    inputs = _load_inputs(base_dir, task_sft, data, lang_sfts, task, options)
    model, tokenizer = _load_model(base_dir, inputs, task_sft, lang_sfts)
    task = get_task(inputs.task)
    encoded = {lang: task.encode_for_eval(tokenizer, records, options.encoding(), inputs.labels)
               for lang, records in inputs.examples.items()}

    runs = [(lang, TASK_ONLY) for lang in encoded] + [(lang, COMPOSED) for lang in inputs.lang_sfts]
    runner = _Runner(model.to(device), options.batch_size, device)
    runner.progress = tqdm(total=sum(len(runner.my_batches(encoded[lang].rows)) for lang, _ in runs),
                           desc="evaluating", unit="batch", disable=runner.rank != 0 or not show_progress)
    scores: dict[str, dict] = {lang: {} for lang in encoded}
    try:
        if inputs.task_sft is not None:
            inputs.task_sft.apply(model)
    except LtsftError as err:
        raise LtsftError(f"--task-sft {task_sft} does not fit a {inputs.task} model of --base {base_dir}: "
                         f"{err}") from None
    try:
        for lang, setting in runs:
            if setting == COMPOSED:
                inputs.lang_sfts[lang].apply(model, skip_missing_heads=True)  # its MLM head has no place here
            try:
                runner.progress.set_postfix_str(f"{lang} {SETTING_TITLES[setting]}")
                outputs = runner.outputs(encoded[lang].examples.tensors, task)
            finally:
                if setting == COMPOSED:
                    inputs.lang_sfts[lang].revert(model)
            if outputs is not None:
                scores[lang][setting] = task.score(encoded[lang], outputs, lang, options)
    finally:
        if inputs.task_sft is not None:
            inputs.task_sft.revert(model)
        runner.progress.close()
    if runner.rank != 0:
        return None
    return {
        "task": inputs.task,
        "metric": task.metric_title(options),
        "base": str(base_dir),
        "task_sft": str(task_sft) if task_sft else None,
        "settings": SETTINGS if task_sft else BASE_SETTINGS,
        "lang_sfts": dict(lang_sfts),
        "data": {lang: str(path) for lang, path in data.items()},
        "options": {f.name: getattr(options, f.name) for f in fields(EvalOptions)},
        "languages": {lang: {s: scores[lang][s] for s in (COMPOSED, TASK_ONLY) if s in scores[lang]}
                      for lang in encoded},
        "average": _averages(task.metrics, scores),
    }


def _averages(metrics: tuple[str, ...], scores: dict[str, dict]) -> dict:
    """Per setting, the mean of each metric over the languages evaluated in that setting."""
    averages = {}
    for setting in (COMPOSED, TASK_ONLY):
        rows = [by_setting[setting] for by_setting in scores.values() if setting in by_setting]
        if rows:
            averages[setting] = {m: sum(r[m] for r in rows) / len(rows) for m in metrics}
            averages[setting]["languages"] = len(rows)
    return averages


# ---------------------------------------------------------------------------------------------- writing


def markdown_table(results: dict) -> str:
    """Rows: languages and their average; columns: each setting's metrics (– where a setting was not run)."""
    metrics = get_task(results["task"]).metrics
    titles = SETTING_TITLES if results["task_sft"] else BASE_SETTING_TITLES
    settings = [s for s in (COMPOSED, TASK_ONLY) if s in results["average"]]
    header = ["language", "n"] + [f"{titles[s]} {METRIC_TITLES[m]}" for s in settings for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for lang, by_setting in results["languages"].items():
        n = next(iter(by_setting.values()))["examples"]
        cells = [f"{by_setting[s][m]:.2f}" if s in by_setting else "–" for s in settings for m in metrics]
        lines.append("| " + " | ".join([lang, str(n), *cells]) + " |")
    average = results["average"]
    cells = [f"{average[s][m]:.2f}" for s in settings for m in metrics]
    lines.append("| " + " | ".join(["**average**", "", *cells]) + " |")
    counts = {s: average[s]["languages"] for s in settings}
    if len(set(counts.values())) > 1:  # averages over different language sets do not compare: say so
        lines += ["", "Averages over the languages each setting ran on: "
                  + ", ".join(f"{titles[s]} {n}" for s, n in counts.items()) + "."]
    what = f"task SFT {results['task_sft']}" if results["task_sft"] else f"base {results['base']} (no task SFT)"
    title = f"Zero-shot {results['task'].upper()} ({results['metric']}), {what}"
    from ltsft_dist.report import gains_table  # (it imports this module)

    gains = gains_table(results)
    return f"{title}\n\n" + "\n".join(lines) + "\n" + (f"\n{gains}" if gains else "")


def write_results(results: dict, out_dir) -> None:
    """results.json and results.md, both replaced atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    table = markdown_table(results)
    write_atomically({out_dir / "results.json": lambda p: p.write_text(text, encoding="utf-8"),
                      out_dir / "results.md": lambda p: p.write_text(table, encoding="utf-8")})
