"""Extractive QA (SQuAD v1.1, MLQA, XQuAD): reading, windowing long contexts, and spans back to answer text.

Contexts longer than a model input are split into overlapping windows (the fast tokenizer's
`return_overflowing_tokens` + `stride`); `return_offsets_mapping` ties every context token to its characters,
which gives the start/end token of the gold answer in each window and, after prediction, the answer text.
A window that does not contain the answer is labelled at index 0 ([CLS]), as in BERT's SQuAD v1 recipe;
questions whose answer fits in *no* window are counted and listed in the report, never dropped silently.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ltsft_dist.data import Examples
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks._io import load_hf_dataset, read_json, require_keys
from ltsft_dist.tasks.base import Encoded, Encoding, Format, Task, register_task
from ltsft_dist.tasks.metrics import MLQA_LANGUAGES, qa_scores

log = logging.getLogger(__name__)

QA_METRICS = ("squad", "mlqa")  # squad: the SQuAD v1.1 script, XQuAD's official one; mlqa: MLQA's per language


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[dict]  # [{"text", "answer_start"}], checked against the context
    language: str


# ----------------------------------------------------------------------------------------------- reading


def infer_language(path: str | Path) -> str | None:
    """The answer language from the official file names: xquad.<lang>.json, MLQA's *-context-<lang>-question-*."""
    name = Path(path).name
    match = re.search(r"xquad\.([a-z]{2,3})\.json$", name) or re.search(r"context-([a-z]{2,3})-question-", name)
    return match.group(1) if match else None


def _check_answer(context: str, answer, where: str) -> dict:
    if not isinstance(answer, dict):
        raise LtsftError(f"{where}: each answer must be an object with text and answer_start")
    require_keys(answer, ("text", "answer_start"), where, "each answer needs text and answer_start")
    text, start = answer["text"], answer["answer_start"]
    if not isinstance(start, int) or not isinstance(text, str) or not text.strip():
        raise LtsftError(f"{where}: answer_start must be an integer and text a non-empty string, "
                         f"got {start!r} and {text!r}")
    if context[start:start + len(text)] != text:
        found = context.find(text)
        hint = (f"the text occurs at offset {found}: set answer_start to {found}" if found >= 0
                else "the text does not occur in the context: fix the answer or the context")
        raise LtsftError(f"{where}: answer_start {start} does not match the answer {text!r} "
                         f"(the context there reads {context[start:start + len(text)]!r}); {hint}")
    return {"text": text, "answer_start": start}


def _example(qa: dict, context: str, language: str, where: str, seen: set) -> QAExample:
    require_keys(qa, ("id", "question", "answers"), where, "each question needs id, question and answers")
    qid = str(qa["id"])
    if qid in seen:
        raise LtsftError(f"{where}: duplicate question id {qid!r}; ids must be unique (predictions are keyed by id)")
    seen.add(qid)
    if not qa["answers"]:
        raise LtsftError(f"{where}: no answers; SQuAD v1.1 format needs at least one (unanswerable SQuAD 2.0 "
                         "questions are not supported: remove them)")
    answers = [_check_answer(context, a, f"{where}, answer {n}") for n, a in enumerate(qa["answers"])]
    return QAExample(qid, qa["question"], context, answers, language)


def read_squad_json(path: str | Path, language: str | None = None) -> list[QAExample]:
    """A SQuAD v1.1-format file (SQuAD, MLQA, XQuAD). `language` defaults to the one in the file name."""
    path, doc = read_json(path)
    language = language or infer_language(path)
    if language is None:
        raise LtsftError(f"{path}: cannot tell the language from the file name; pass language= (e.g. 'en')")
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise LtsftError(f'{path}: not SQuAD v1.1 format; expected {{"version": ..., "data": [{{"paragraphs": '
                         '[{"context", "qas": [...]}]}]}')
    examples, seen = [], set()
    for a, article in enumerate(doc["data"]):
        require_keys(article, ("paragraphs",), f"{path}: data[{a}]", "each article needs paragraphs")
        for p, paragraph in enumerate(article["paragraphs"]):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            require_keys(paragraph, ("context", "qas"), where, "each paragraph needs context and qas")
            for q, qa in enumerate(paragraph["qas"]):
                qa_where = f"{path}: question {qa.get('id', f'data[{a}].paragraphs[{p}].qas[{q}]')}"
                examples.append(_example(qa, paragraph["context"], language, qa_where, seen))
    if not examples:
        raise LtsftError(f"{path}: no questions; the file has no data")
    return examples


def examples_from_dataset(dataset, language: str, source: str) -> list[QAExample]:
    """A HF squad-like `datasets.Dataset` (id, question, context, answers={text: [...], answer_start: [...]})."""
    missing = [c for c in ("id", "question", "context", "answers") if c not in dataset.column_names]
    if missing:
        raise LtsftError(f"{source}: missing column(s) {missing} (has {dataset.column_names}); "
                         "a squad-like dataset needs id, question, context and answers")
    examples, seen = [], set()
    for row in dataset:
        answers = [{"text": t, "answer_start": s}
                   for t, s in zip(row["answers"]["text"], row["answers"]["answer_start"])]
        qa = {"id": row["id"], "question": row["question"], "answers": answers}
        examples.append(_example(qa, row["context"], language, f"{source}: question {row['id']}", seen))
    if not examples:
        raise LtsftError(f"{source}: the dataset is empty")
    return examples


def load_squad_hf(path: str, language: str, config: str | None = None, split: str = "validation") -> list[QAExample]:
    """E.g. ("rajpurkar/squad", "en"), ("google/xquad", "de", "xquad.de"), ("facebook/mlqa", "de", "mlqa.de.de")."""
    dataset, source = load_hf_dataset(path, config, split)
    return examples_from_dataset(dataset, language, source)


def gold_answers(examples: list[QAExample]) -> dict[str, list[str]]:
    return {ex.id: [a["text"] for a in ex.answers] for ex in examples}


# ----------------------------------------------------------------------------------------------- windows


@dataclass
class WindowReport:
    """What windowing did to the answers: nothing here is dropped, but a user should see these numbers."""

    examples: int = 0
    features: int = 0
    windows_without_answer: int = 0  # labelled at index 0, as in SQuAD v1 BERT training
    questions_truncated: int = 0  # cut to max_query_len tokens
    lost: list[str] = field(default_factory=list)  # ids whose first answer lies in no window
    inexact: list[str] = field(default_factory=list)  # ids whose answer tokens cover more text than the answer

    def __str__(self) -> str:
        return (f"{self.examples} questions -> {self.features} windows ({self.windows_without_answer} without the "
                f"answer); answers lost to truncation: {len(self.lost)}; answers not on token boundaries: "
                f"{len(self.inexact)}; questions truncated: {self.questions_truncated}")


@dataclass
class QAFeatures:
    """Windows as model inputs (with start/end positions) plus what post-processing needs to map back."""

    examples: Examples  # input_ids, attention_mask[, token_type_ids], start_positions, end_positions
    example_index: list[int]  # window -> index of its question in the QAExample list
    offsets: list[list[tuple[int, int] | None]]  # window -> per token its context characters, None if not context
    report: WindowReport


def _cut_questions(tokenizer, questions: list[str], max_query_len: int) -> tuple[list[str], int]:
    """Questions cut at a token boundary to at most max_query_len tokens (re-checked: re-tokenising a cut word
    can change its pieces)."""
    truncated = None
    for _ in range(4):
        enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
        long = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > max_query_len]
        truncated = len(long) if truncated is None else truncated
        if not long:
            return questions, truncated
        for i in long:
            questions[i] = questions[i][:enc["offset_mapping"][i][max_query_len - 1][1]]
    raise LtsftError(f"could not cut {len(long)} question(s) to max_query_len={max_query_len} tokens; raise it")


def _context_offsets(context: str, offsets, sequence_ids) -> list[tuple[int, int] | None]:
    """Per token its context characters, None outside the context. A token's end is moved over following
    combining marks: a normaliser that strips accents (uncased BERT) drops them from every token, which would
    cut Hindi vowel signs and Arabic diacritics off the end of an answer."""
    spans = []
    for (start, end), sequence in zip(offsets, sequence_ids):
        if sequence != 1:
            spans.append(None)
            continue
        while end < len(context) and not context[end].isascii() and unicodedata.category(context[end])[0] == "M":
            end += 1
        spans.append((start, end))
    return spans


def _answer_tokens(offsets, start_char: int, end_char: int) -> tuple[int, int] | None:
    """First and last context token overlapping [start_char, end_char), if the window holds the whole answer."""
    context = [i for i, o in enumerate(offsets) if o is not None]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return None
    start = next(i for i in context if offsets[i][1] > start_char)
    end = next(i for i in reversed(context) if offsets[i][0] < end_char)
    return (start, end) if start <= end else None


def encode_qa(tokenizer, examples: list[QAExample], max_len: int = 384, stride: int = 128,
              max_query_len: int = 64) -> QAFeatures:
    """Question + context windows of max_len tokens, consecutive windows sharing `stride` context tokens."""
    if not examples:
        raise LtsftError("encode_qa: no questions to encode")
    if not getattr(tokenizer, "is_fast", False):
        raise LtsftError("encode_qa needs a fast tokenizer (offset mapping): load it with use_fast=True")
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise LtsftError("encode_qa expects a tokenizer with padding_side='right' (question first, then context)")
    room = max_len - max_query_len - tokenizer.num_special_tokens_to_add(pair=True)
    if room <= 0 or stride >= room:
        raise LtsftError(f"max_len={max_len} leaves {room} context tokens per window after a {max_query_len}-token "
                         f"question; stride={stride} must be smaller: lower stride or max_query_len, or raise max_len")
    questions, truncated = _cut_questions(tokenizer, [ex.question.lstrip() for ex in examples], max_query_len)
    enc = tokenizer(questions, [ex.context for ex in examples], truncation="only_second", max_length=max_len,
                    stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                    padding="max_length")
    report = WindowReport(examples=len(examples), features=len(enc["input_ids"]), questions_truncated=truncated)
    starts, ends, all_offsets = [], [], []
    found, exact = set(), set()
    for i, sample in enumerate(enc["overflow_to_sample_mapping"]):
        ex = examples[sample]
        offsets = _context_offsets(ex.context, enc["offset_mapping"][i], enc.sequence_ids(i))
        all_offsets.append(offsets)
        span = None
        if ex.answers:
            text = ex.answers[0]["text"]  # the first answer, as in SQuAD training
            start_char = ex.answers[0]["answer_start"] + len(text) - len(text.lstrip())
            end_char = ex.answers[0]["answer_start"] + len(text.rstrip())
            span = _answer_tokens(offsets, start_char, end_char)
        if span is None:
            report.windows_without_answer += 1
            span = (0, 0)
        else:
            found.add(sample)
            if ex.context[offsets[span[0]][0]:offsets[span[1]][1]] == ex.context[start_char:end_char]:
                exact.add(sample)
        starts.append(span[0])
        ends.append(span[1])
    report.lost = [ex.id for n, ex in enumerate(examples) if ex.answers and n not in found]
    report.inexact = [ex.id for n, ex in enumerate(examples) if n in found and n not in exact]
    if report.lost:
        log.warning("encode_qa: %d answers lost to truncation (e.g. %s): raise max_len or lower max_query_len",
                    len(report.lost), report.lost[:3])
    tensors = {name: torch.tensor(enc[name]) for name in tokenizer.model_input_names if name in enc}
    tensors.update(start_positions=torch.tensor(starts), end_positions=torch.tensor(ends))
    return QAFeatures(Examples(tensors), list(enc["overflow_to_sample_mapping"]), all_offsets, report)


# ----------------------------------------------------------------------------------------------- predictions


def predict_answers(features: QAFeatures, examples: list[QAExample], start_logits, end_logits,
                    n_best: int = 20, max_answer_len: int = 30) -> dict[str, str]:
    """The best-scoring valid span per question over all its windows: start and end among each window's
    n_best top logits, inside the context, end >= start, at most max_answer_len tokens. "" if none is valid."""
    start_logits, end_logits = torch.as_tensor(start_logits).float(), torch.as_tensor(end_logits).float()
    shape = features.examples.tensors["input_ids"].shape
    if start_logits.shape != shape or end_logits.shape != shape:
        raise LtsftError(f"predict_answers: logits {tuple(start_logits.shape)}/{tuple(end_logits.shape)} do not "
                         f"match the {tuple(shape)} windows; pass the model outputs for exactly these features")
    best: dict[int, tuple[float, str]] = {}
    for f, offsets in enumerate(features.offsets):
        in_context = torch.tensor([o is not None for o in offsets])
        k = min(n_best, len(offsets))
        s_idx, e_idx = start_logits[f].topk(k).indices, end_logits[f].topk(k).indices
        length = e_idx[None, :] - s_idx[:, None]
        valid = in_context[s_idx][:, None] & in_context[e_idx][None, :] & (length >= 0) & (length < max_answer_len)
        if not valid.any():
            continue
        scores = (start_logits[f][s_idx][:, None] + end_logits[f][e_idx][None, :]).masked_fill(~valid, float("-inf"))
        flat = int(scores.argmax())
        s, e = int(s_idx[flat // k]), int(e_idx[flat % k])
        n = features.example_index[f]
        if n not in best or float(scores.max()) > best[n][0]:
            best[n] = (float(scores.max()), examples[n].context[offsets[s][0]:offsets[e][1]])
    return {ex.id: best[n][1] if n in best else "" for n, ex in enumerate(examples)}


@register_task
class QA(Task):
    """Extractive QA: answer spans in windows of the context; scored by the official exact match and F1."""

    name = "qa"
    model_class = "AutoModelForQuestionAnswering"
    formats = {
        "squad": Format(lambda s: read_squad_json(s.train_file, s.language or None), suffixes=(".json",)),
        "hf": Format(lambda s: load_squad_hf(s.hf_dataset, s.language, s.hf_config, s.split)),
    }
    metrics = ("exact_match", "f1")
    output_fields = ("start_logits", "end_logits")

    def texts(self, records: list[QAExample]) -> list[str]:
        return list(dict.fromkeys(r.context for r in records)) + [r.question for r in records]

    def encode(self, tokenizer, records: list[QAExample], encoding: Encoding, labels=None) -> Encoded:
        features = encode_qa(tokenizer, records, encoding.max_seq_length, encoding.stride, encoding.max_query_length)
        return Encoded(features.examples, records, features, {"windows": str(features.report)})

    def score(self, encoded: Encoded, outputs: list[torch.Tensor], language: str, options) -> dict:
        predictions = predict_answers(encoded.features, encoded.records, *outputs)
        scores = qa_scores(gold_answers(encoded.records), predictions,
                           language if options.qa_metric == "mlqa" else None)
        return {"exact_match": scores["exact_match"], "f1": scores["f1"], "examples": scores["total"],
                "lost_to_truncation": len(encoded.features.report.lost)}

    def metric_title(self, options) -> str:
        return options.qa_metric

    def check_eval(self, options, languages: list[str]) -> None:
        outside_mlqa = sorted(set(languages) - set(MLQA_LANGUAGES))
        if options.qa_metric == "mlqa" and outside_mlqa:
            raise LtsftError(f"--qa-metric mlqa has no rules for {outside_mlqa} (MLQA covers {list(MLQA_LANGUAGES)}); "
                             "use --qa-metric squad, XQuAD's official metric")
