"""Instruction tuning of decoders: a task SFT that learns to answer, with the loss on the response tokens only.

Three JSONL record shapes are read (one object per line), and the same fields from a Hugging Face dataset:
- `{"prompt": ..., "response": ...}`: the prompt and the response, joined by a newline unless the prompt ends
  with whitespace;
- Alpaca's `{"instruction": ..., "input": ..., "output": ...}` (`input` optional), rendered with Alpaca's prompt;
- chat `{"messages": [{"role": ..., "content": ...}, ...]}`, rendered with the tokenizer's chat template; every
  assistant turn is learnt.
Every record becomes one row: its text tokenised once, right-padded to `max_seq_length`, labels -100 except on
response tokens (and the end-of-sequence token that closes a plain response). The first position is never a
target, so the labelled-token count is the count a causal LM predicts, and the trainer's token-mean loss is the
mean over all response tokens of the global batch (`Task.token_loss`), whatever the world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ltsft_dist.data import Examples
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks._io import load_hf_dataset, read_jsonl
from ltsft_dist.tasks.base import Encoded, Encoding, Format, Task, register_task

ALPACA_PROMPT = ("Below is an instruction that describes a task{context}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")
SHAPES = "{prompt, response}, {instruction, input (optional), output} or {messages: [{role, content}, ...]}"


@dataclass(frozen=True)
class Instruction:
    """One example: plain (`prompt` and `response`) or a chat (`messages`); `where` is its file:line or row."""

    where: str
    prompt: str = ""
    response: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # (role, content)


def _text(value, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise LtsftError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def parse_record(row: dict, where: str) -> Instruction:
    """A JSON object (or dataset row) in one of the three shapes as an `Instruction`."""
    if "messages" in row:
        turns = row["messages"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) and {"role", "content"} <= set(t)
                                                  for t in turns):
            raise LtsftError(f"{where}: 'messages' must be a list of {{\"role\": ..., \"content\": ...}} objects")
        messages = tuple((_text(t["role"], "role", where), _text(t["content"], "content", where)) for t in turns)
        if not any(role == "assistant" for role, _ in messages):
            raise LtsftError(f"{where}: no assistant message to learn; add a {{\"role\": \"assistant\", ...}} turn")
        return Instruction(where, messages=messages)
    if "prompt" in row and "response" in row:
        return Instruction(where, _text(row["prompt"], "prompt", where), _text(row["response"], "response", where))
    if "instruction" in row and "output" in row:
        extra = _text(row.get("input") or "", "input", where)
        prompt = ALPACA_PROMPT.format(
            context=", paired with an input that provides further context" if extra else "",
            instruction=_text(row["instruction"], "instruction", where),
            input=f"### Input:\n{extra}\n\n" if extra else "")
        return Instruction(where, prompt, _text(row["output"], "output", where))
    missing = "no response field ('response' or 'output')" if ("prompt" in row or "instruction" in row) else \
        f"fields {sorted(row)}"
    raise LtsftError(f"{where}: {missing}; each record needs one of {SHAPES}")


def read_jsonl_instructions(source) -> list[Instruction]:
    path, rows = read_jsonl(source.train_file)
    return [parse_record(row, f"{path}:{number}") for number, row in rows]


def read_hf_instructions(source) -> list[Instruction]:
    dataset, name = load_hf_dataset(source.hf_dataset, source.hf_config, source.split)
    return [parse_record(dict(row), f"{name} row {i}") for i, row in enumerate(dataset)]


def render(tokenizer, record: Instruction) -> tuple[str, list[tuple[int, int]], bool]:
    """(text, character spans learnt, whether the tokenizer's special tokens frame the text). A chat is rendered
    by its template, each assistant turn's span the difference between the conversation rendered up to it with
    a generation prompt and rendered through it, so what the template adds after the answer (an end-of-turn
    token) is learnt too."""
    if not record.messages:
        glue = "" if not record.prompt or record.prompt[-1].isspace() else "\n"
        prompt = record.prompt + glue
        return prompt + record.response, [(len(prompt), len(prompt) + len(record.response))], True
    if not getattr(tokenizer, "chat_template", None):
        raise LtsftError(f"{record.where}: a chat ('messages'), but the tokenizer has no chat template; use a "
                         "tokenizer with one (model.tokenizer), or give the data as prompt/response records")
    turns = [{"role": role, "content": content} for role, content in record.messages]
    spans = []
    for i, (role, _) in enumerate(record.messages):
        if role != "assistant":
            continue
        before = tokenizer.apply_chat_template(turns[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(turns[:i + 1], tokenize=False)
        if not through.startswith(before):
            raise LtsftError(f"{record.where}: the chat template renders turn {i} differently with and without "
                             "the turns after it, so the answer's tokens cannot be found; use a template that "
                             "renders conversations incrementally, or prompt/response records")
        spans.append((len(before), len(through)))
    return tokenizer.apply_chat_template(turns, tokenize=False), spans, False


@register_task
class Instruct(Task):
    """Instruction tuning (a task SFT of a decoder): next-token loss on the responses only."""

    name = "instruct"
    decoder = True
    token_loss = True
    model_class = "AutoModelForCausalLM"
    formats = {"jsonl": Format(read_jsonl_instructions, suffixes=(".jsonl",)), "hf": Format(read_hf_instructions)}

    def texts(self, records: list[Instruction]) -> list[str]:
        return [text for r in records for text in ([r.prompt, r.response] if not r.messages
                                                   else [content for _, content in r.messages])]

    def encode(self, tokenizer, records: list[Instruction], encoding: Encoding, labels=None) -> Encoded:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None or tokenizer.eos_token_id is None:
            raise LtsftError("instruct: the tokenizer has no end-of-sequence token to end each response with (nor "
                             "a pad token); use a decoder's tokenizer (model.tokenizer) or set tokenizer.eos_token")
        if not getattr(tokenizer, "is_fast", False):
            raise LtsftError("instruct: finding the response tokens needs a fast tokenizer (character offsets); "
                             "load one with use_fast=True or point model.tokenizer at one with a tokenizer.json")
        max_len = encoding.max_seq_length
        ids = torch.full((len(records), max_len), pad)
        targets = torch.full((len(records), max_len), -100)
        lengths = torch.zeros(len(records), dtype=torch.long)
        too_long, truncated = [], 0
        for r, record in enumerate(records):
            text, spans, framed = render(tokenizer, record)
            tokens = tokenizer(text, add_special_tokens=framed, return_offsets_mapping=True)
            row, offsets = list(tokens["input_ids"]), list(tokens["offset_mapping"])
            learnt = [any(s <= start < e for s, e in spans) and end > start for start, end in offsets]
            if framed:  # a plain response ends with the end-of-sequence token, which is learnt too
                row.append(tokenizer.eos_token_id)
                learnt.append(True)
            learnt[0] = False  # nothing predicts the first token
            first = learnt.index(True) if True in learnt else len(row)
            if first >= max_len:
                too_long.append(f"{record.where} ({first} prompt tokens)")
                continue
            truncated += len(row) > max_len
            row, learnt = row[:max_len], learnt[:max_len]
            ids[r, :len(row)] = torch.tensor(row)
            lengths[r] = len(row)
            targets[r, :len(row)] = torch.where(torch.tensor(learnt), torch.tensor(row), -100)
        if too_long:
            raise LtsftError(f"{too_long[0]}: the prompt fills data.max_seq_length={max_len} and leaves no room "
                             f"for the response ({len(too_long)} record(s) like it); raise data.max_seq_length or "
                             "shorten the prompts")
        mask = (torch.arange(max_len) < lengths.unsqueeze(1)).long()
        return Encoded(Examples({"input_ids": ids, "attention_mask": mask, "labels": targets}), records,
                       report={"rows": len(records), "truncated_responses": truncated,
                               "response_tokens": int((targets != -100).sum())})
