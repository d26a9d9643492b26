"""Zero-shot cross-lingual evaluation per target language: θ⁰ + φ_task + φ_lang, and TA-only θ⁰ + φ_task.

One model is loaded and the SFTs are applied and reverted in place (revert restores the saved values exactly), so
every setting sees exactly θ⁰ underneath. Under a launcher the batches are dealt round-robin to the ranks; every
batch has the same rows whatever the world size, so the gathered logits, and hence the scores, do not depend on it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ltsft_dist import comm
from ltsft_dist.devices import inference_device, to_device
from ltsft_dist.errors import LtsftError
from ltsft_dist.sft import SparseFineTuning, base_fingerprint, write_atomically
from ltsft_dist.tasks import nli, qa, tokens
from ltsft_dist.tasks.metrics import MLQA_LANGUAGES, accuracy, entity_f1, qa_scores, token_accuracy

log = logging.getLogger(__name__)

TASKS = ("qa", "nli", "ner", "pos")
TOKEN_TASKS = ("ner", "pos")
FORMATS = ("squad", "xnli-tsv", "americasnli-tsv", "multinli-jsonl", "conll")
QA_METRICS = ("squad", "mlqa")
COMPOSED, TASK_ONLY = "task+lang", "task-only"
SETTING_TITLES = {COMPOSED: "task+lang", TASK_ONLY: "TA-only"}
METRICS = {"qa": ("exact_match", "f1"), "nli": ("accuracy",), "ner": ("f1",), "pos": ("accuracy",)}
METRIC_TITLES = {"exact_match": "EM", "f1": "F1", "accuracy": "acc"}


@dataclass
class EvalOptions:
    max_seq_length: int = 384
    stride: int = 128  # QA: context tokens shared by consecutive windows
    max_query_length: int = 64  # QA
    batch_size: int = 32
    limit: int | None = None  # first N questions / pairs per language, for quick runs
    qa_metric: str = "squad"  # squad: XQuAD's official (SQuAD v1.1) script; mlqa: MLQA's per-language one
    data_format: str | None = None  # None: chosen from the file extension and header
    device: str | None = None  # None: this rank's accelerator when there is one, else the CPU


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
    """Parameters outside the shared body: what a task SFT must carry for this model."""
    prefix = model.base_model_prefix
    return {name for name, _ in model.named_parameters() if not name.startswith(prefix + ".")}


def infer_task(sft: SparseFineTuning, base_dir) -> str:
    """The task the SFT was trained for (recorded in its training config), else the task whose head (built on the
    meta device, so nothing is allocated) has exactly the SFT's head names."""
    from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    recorded = sft.metadata.training_config.get("task")
    if recorded in TASKS:
        return recorded

    config = AutoConfig.from_pretrained(base_dir)
    autos = {"qa": AutoModelForQuestionAnswering, "nli": AutoModelForSequenceClassification}
    matches = []
    for task, auto in autos.items():
        with torch.device("meta"):
            skeleton = auto.from_config(config)
        if sft.heads and set(sft.heads) == head_names(skeleton):
            matches.append(task)
    if len(matches) != 1:
        raise LtsftError(f"--task-sft: cannot tell the task from its heads {sorted(sft.heads) or '(none)'}; "
                         f"pass --task {' or --task '.join(TASKS)}")
    return matches[0]


def _nli_format(path: Path) -> str:
    if path.suffix == ".jsonl":
        return "multinli-jsonl"
    if path.suffix == ".tsv":
        with open(path, encoding="utf-8-sig") as f:
            header = f.readline().rstrip("\r\n").split("\t")
        if "sentence1" in header:
            return "xnli-tsv"
        if "premise" in header:
            return "americasnli-tsv"
    raise LtsftError(f"--data {path}: cannot tell the NLI format from the name and header; pass --format "
                     f"({', '.join(FORMATS[1:])})")


def read_eval_data(task: str, language: str, path, data_format: str | None = None, limit: int | None = None):
    """The labelled examples of one target language, with the reader the format (or the file) calls for."""
    path = Path(path)
    if not path.is_file():
        raise LtsftError(f"--data {language}={path}: file not found; check the path")
    if task == "qa":
        if data_format not in (None, "squad"):
            raise LtsftError(f"--format {data_format} is an NLI format; QA data is SQuAD-format JSON (--format squad)")
        examples = qa.read_squad_json(path, language)
    elif task in TOKEN_TASKS:
        if data_format not in (None, "conll"):
            raise LtsftError(f"--format {data_format}: {task} data is CoNLL (CoNLL-U or word ... tag columns)")
        examples = tokens.read_conll(path, language)
    else:
        data_format = data_format or _nli_format(path)
        readers = {"xnli-tsv": lambda: nli.read_xnli_tsv(path, [language]),
                   "americasnli-tsv": lambda: nli.read_americasnli_tsv(path, [language]),
                   "multinli-jsonl": lambda: nli.read_multinli_jsonl(path, language)}
        if data_format not in readers:
            raise LtsftError(f"--format {data_format} is not an NLI format; use one of {', '.join(readers)}")
        examples = readers[data_format]().by_language[language]
    return examples[:limit] if limit else examples


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
    def outputs(self, inputs: dict[str, torch.Tensor], fields: tuple[str, ...]) -> list[torch.Tensor] | None:
        n = len(inputs["input_ids"])
        mine = {}
        for start in self.my_batches(n):
            batch = to_device({name: t[start:start + self.batch_size] for name, t in inputs.items()}, self.device)
            out = self.model(**batch)
            mine[start] = [getattr(out, f).float() for f in fields]
            self.progress.update()
        parts = comm.gather_object(mine, dst=0)  # on the CPU
        if self.rank != 0:
            return None
        merged = {start: out for part in parts for start, out in part.items()}
        return [torch.cat([merged[s][i] for s in sorted(merged)]) for i in range(len(fields))]


@dataclass
class _Encoded:
    """One language's data, encoded once and scored under every setting."""

    examples: list
    inputs: dict[str, torch.Tensor]
    features: qa.QAFeatures | tokens.TokenFeatures | None = None  # QA, NER/POS
    labels: torch.Tensor | list[str] | None = None  # NLI: label ids; NER/POS: the label names
    task: str = ""

    @property
    def rows(self) -> int:  # model inputs: QA windows or NLI pairs
        return len(self.inputs["input_ids"])

    def score(self, outputs: list[torch.Tensor], language: str, qa_metric: str) -> dict:
        if self.features is None:
            return {"accuracy": 100.0 * accuracy(outputs[0], self.labels), "examples": len(self.examples)}
        if isinstance(self.features, tokens.TokenFeatures):
            predicted = tokens.predicted_tags(self.features, outputs[0], self.labels)
            gold = [s.tags for s in self.examples]
            scores = entity_f1(gold, predicted) if self.task == "ner" else {"accuracy": token_accuracy(gold,
                                                                                                       predicted)}
            return {**scores, "examples": len(self.examples),
                    "words_lost_to_truncation": self.features.truncated_words}
        predictions = qa.predict_answers(self.features, self.examples, *outputs)
        scores = qa_scores(qa.gold_answers(self.examples), predictions, language if qa_metric == "mlqa" else None)
        return {"exact_match": scores["exact_match"], "f1": scores["f1"], "examples": scores["total"],
                "lost_to_truncation": len(self.features.report.lost)}


def _encode(task: str, tokenizer, examples: list, options: EvalOptions, labels: list[str] | None) -> _Encoded:
    if task in TOKEN_TASKS:
        features = tokens.encode_tokens(tokenizer, examples, options.max_seq_length, labels)
        return _Encoded(examples, _model_inputs(tokenizer, features.examples.tensors), features=features,
                        labels=labels, task=task)
    if task == "qa":
        features = qa.encode_qa(tokenizer, examples, options.max_seq_length, options.stride, options.max_query_length)
        tensors = features.examples.tensors
        return _Encoded(examples, _model_inputs(tokenizer, tensors), features=features)
    tensors = nli.encode_nli(tokenizer, examples, options.max_seq_length).tensors
    return _Encoded(examples, _model_inputs(tokenizer, tensors), labels=tensors["labels"])


def _model_inputs(tokenizer, tensors: dict) -> dict[str, torch.Tensor]:
    return {name: tensors[name] for name in tokenizer.model_input_names if name in tensors}


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
    task_sft: SparseFineTuning
    lang_sfts: dict[str, SparseFineTuning]
    examples: dict[str, list]
    labels: list[str] | None = None  # NER/POS: the tag names, in the head's output order


def _load_inputs(base_dir, task_sft: str, data: dict[str, str], lang_sfts: dict[str, str], task: str | None,
                 options: EvalOptions) -> _Inputs:
    if not data:
        raise LtsftError("no evaluation data: pass --data LANG=PATH for every target language")
    no_data = sorted(set(lang_sfts) - set(data))
    if no_data:
        raise LtsftError(f"--lang-sft {no_data[0]}=... has no --data {no_data[0]}=PATH; add the evaluation file of "
                         "that language or drop its language SFT")
    if not (Path(base_dir) / "config.json").is_file():
        raise LtsftError(f"--base {base_dir}: no config.json there; pass a directory written by save_pretrained "
                         "(model and tokenizer)")
    sft = load_sft_flag(task_sft, "--task-sft", "task")
    task = task or infer_task(sft, base_dir)
    if task not in TASKS:
        raise LtsftError(f"--task {task}: not an evaluation task; use one of {', '.join(TASKS)}")
    if options.qa_metric not in QA_METRICS:
        raise LtsftError(f"--qa-metric {options.qa_metric}: use one of {', '.join(QA_METRICS)}")
    outside_mlqa = sorted(set(data) - set(MLQA_LANGUAGES))
    if task == "qa" and options.qa_metric == "mlqa" and outside_mlqa:
        raise LtsftError(f"--qa-metric mlqa has no rules for {outside_mlqa} (MLQA covers {list(MLQA_LANGUAGES)}); "
                         "use --qa-metric squad, XQuAD's official metric")
    languages = {}
    for lang, path in lang_sfts.items():
        languages[lang] = load_sft_flag(path, f"--lang-sft {lang}", "language")
        if languages[lang].metadata.languages and lang not in languages[lang].metadata.languages:
            raise LtsftError(f"--lang-sft {lang}={path}: that SFT is for {languages[lang].metadata.languages}, "
                             f"not {lang}; check the language code")
    labels = None
    if task in TOKEN_TASKS:
        labels = (sft.metadata.training_config.get("data") or {}).get("labels")
        if not labels:
            raise LtsftError(f"--task-sft {task_sft}: no tag names in its training config (data.labels); retrain it "
                             "with this version of ltsft, which records them")
    examples = {lang: read_eval_data(task, lang, path, options.data_format, options.limit)
                for lang, path in data.items()}
    return _Inputs(task, sft, languages, examples, labels)


def _load_model(base_dir, inputs: _Inputs, task_sft: str, lang_sfts: dict[str, str]):
    """The task model and tokenizer of the base, refusing SFTs of another base or without this task's head."""
    from transformers import AutoTokenizer

    from ltsft_dist.models import load_task_model

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError) as err:
        raise LtsftError(f"--base {base_dir}: no usable tokenizer there ({err}); save the base's tokenizer "
                         "into it (tokenizer.save_pretrained)") from None
    model = load_task_model(base_dir, inputs.task, len(inputs.labels) if inputs.labels else None)
    require_same_base(inputs.task_sft, model, f"--task-sft {task_sft}", base_dir)
    for lang, lang_sft in inputs.lang_sfts.items():
        require_same_base(lang_sft, model, f"--lang-sft {lang}={lang_sfts[lang]}", base_dir)
    missing = sorted(head_names(model) - set(inputs.task_sft.heads))
    if missing:
        raise LtsftError(f"--task-sft {task_sft} carries no {inputs.task} head ({missing[0]!r} is missing; it has "
                         f"{sorted(inputs.task_sft.heads) or 'no heads'}): pass the --task it was trained for")
    return model, tokenizer


def evaluate(base_dir, task_sft: str, data: dict[str, str], lang_sfts: dict[str, str] | None = None,
             task: str | None = None, options: EvalOptions | None = None, show_progress: bool = True) -> dict | None:
    """Scores per target language and setting; the result on rank 0, None on the other ranks.

    `data` maps each target language to its evaluation file, `lang_sfts` (a subset of those languages) to its
    language SFT; languages without one are evaluated TA-only only."""
    from tqdm.auto import tqdm

    options, lang_sfts = options or EvalOptions(), lang_sfts or {}
    device = inference_device(options.device)
    inputs = _load_inputs(base_dir, task_sft, data, lang_sfts, task, options)
    model, tokenizer = _load_model(base_dir, inputs, task_sft, lang_sfts)
    encoded = {lang: _encode(inputs.task, tokenizer, exs, options, inputs.labels)
               for lang, exs in inputs.examples.items()}

    runs = [(lang, TASK_ONLY) for lang in encoded] + [(lang, COMPOSED) for lang in inputs.lang_sfts]
    runner = _Runner(model.to(device), options.batch_size, device)
    runner.progress = tqdm(total=sum(len(runner.my_batches(encoded[lang].rows)) for lang, _ in runs),
                           desc="evaluating", unit="batch", disable=runner.rank != 0 or not show_progress)
    fields = ("start_logits", "end_logits") if inputs.task == "qa" else ("logits",)
    scores: dict[str, dict] = {lang: {} for lang in encoded}
    try:
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
                outputs = runner.outputs(encoded[lang].inputs, fields)
            finally:
                if setting == COMPOSED:
                    inputs.lang_sfts[lang].revert(model)
            if outputs is not None:
                scores[lang][setting] = encoded[lang].score(outputs, lang, options.qa_metric)
    finally:
        inputs.task_sft.revert(model)
        runner.progress.close()
    if runner.rank != 0:
        return None
    return {
        "task": inputs.task,
        "metric": {"qa": options.qa_metric, "ner": "entity f1"}.get(inputs.task, "accuracy"),
        "base": str(base_dir),
        "task_sft": str(task_sft),
        "lang_sfts": dict(lang_sfts),
        "data": {lang: str(path) for lang, path in data.items()},
        "options": asdict(options),
        "languages": {lang: {s: scores[lang][s] for s in (COMPOSED, TASK_ONLY) if s in scores[lang]}
                      for lang in encoded},
        "average": _averages(inputs.task, scores),
    }


def _averages(task: str, scores: dict[str, dict]) -> dict:
    """Per setting, the mean of each metric over the languages evaluated in that setting."""
    averages = {}
    for setting in (COMPOSED, TASK_ONLY):
        rows = [by_setting[setting] for by_setting in scores.values() if setting in by_setting]
        if rows:
            averages[setting] = {m: sum(r[m] for r in rows) / len(rows) for m in METRICS[task]}
            averages[setting]["languages"] = len(rows)
    return averages


# ---------------------------------------------------------------------------------------------- writing


def markdown_table(results: dict) -> str:
    """Rows: languages and their average; columns: each setting's metrics (– where a setting was not run)."""
    metrics = METRICS[results["task"]]
    settings = [s for s in (COMPOSED, TASK_ONLY) if s in results["average"]]
    header = ["language", "n"] + [f"{SETTING_TITLES[s]} {METRIC_TITLES[m]}" for s in settings for m in metrics]
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
                  + ", ".join(f"{SETTING_TITLES[s]} {n}" for s, n in counts.items()) + "."]
    title = f"Zero-shot {results['task'].upper()} ({results['metric']}), task SFT {results['task_sft']}"
    return f"{title}\n\n" + "\n".join(lines) + "\n"


def write_results(results: dict, out_dir) -> None:
    """results.json and results.md, both replaced atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    table = markdown_table(results)
    write_atomically({out_dir / "results.json": lambda p: p.write_text(text, encoding="utf-8"),
                      out_dir / "results.md": lambda p: p.write_text(table, encoding="utf-8")})
