"""Language-SFT data: raw text of one language for masked language modelling, with a held-out split.

Text comes one sentence per line (a file) or from a text column (a HF dataset), and becomes fixed-length rows
either line by line (long lines truncated, and counted) or packed into blocks of consecutive tokens.
The held-out lines are split off *before* packing, so no eval block shares text with a train block.
Eval masking is drawn once from a fixed seed and stored as `labels`: every evaluation of every checkpoint
scores the same masked positions, so eval losses are comparable across checkpoints and runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ltsft_dist.data import Examples, MLMSpec, bert_mask
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks._io import load_hf_dataset, read_text
from ltsft_dist.tasks.base import Encoded, Encoding, Format, Task, register_task


def read_text_lines(path: str | Path) -> list[str]:
    """Non-blank lines, stripped (one sentence per line, the format of the paper's Wikipedia dumps)."""
    path, text = read_text(path)
    return [line.strip() for line in text.split("\n") if line.strip()]


def lines_from_dataset(dataset, column: str = "text", source: str = "dataset") -> list[str]:
    if column not in dataset.column_names:
        raise LtsftError(f"{source}: no column {column!r} (has {dataset.column_names}); pass the text column name")
    lines = [str(t).strip() for t in dataset[column] if t is not None and str(t).strip()]
    if not lines:
        raise LtsftError(f"{source}: column {column!r} holds no text")
    return lines


def load_hf_lines(path: str, config: str | None = None, split: str = "train", column: str = "text") -> list[str]:
    """Lines from a HF dataset (hub or local cache), e.g. ("wikimedia/wikipedia", "20231101.sw")."""
    dataset, source = load_hf_dataset(path, config, split)
    return lines_from_dataset(dataset, column, source)


def split_held_out(lines: list[str], fraction: float = 0.05, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, eval): a seeded random `fraction` of the lines (at least one) held out; both keep file order."""
    if not 0 < fraction < 1:
        raise LtsftError(f"eval fraction {fraction} must be between 0 and 1 (e.g. 0.05)")
    n_eval = max(1, round(fraction * len(lines)))
    if n_eval >= len(lines):
        raise LtsftError(f"{len(lines)} lines are too few to hold out {fraction:.0%}; add text or lower the fraction")
    held = set(torch.randperm(len(lines), generator=torch.Generator().manual_seed(seed))[:n_eval].tolist())
    return [x for i, x in enumerate(lines) if i not in held], [x for i, x in enumerate(lines) if i in held]


def _special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after one sequence ([CLS] … [SEP], <s> … </s>)."""
    body, full = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    for i in range(len(full) - len(body) + 1):
        if body and full[i:i + len(body)] == body:
            return full[:i], full[i + len(body):]
    raise LtsftError("cannot find the tokenizer's special-token template; use a tokenizer with a post-processor")


def _rows(tokenizer, rows: list[list[int]], max_len: int) -> dict[str, torch.Tensor]:
    if tokenizer.pad_token_id is None:
        raise LtsftError("the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = ...)")
    ids = torch.full((len(rows), max_len), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), max_len), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@dataclass
class TokenRows:
    rows: list[list[int]]  # token ids, each row framed by the tokenizer's special tokens, at most max_len long
    truncated: int = 0  # lines cut to max_len (line-by-line mode)
    empty: int = 0  # lines with no tokens, left out
    dropped: int = 0  # tokens of a last partial block left out (full_blocks)


def token_rows(tokenizer, lines: list[str], max_len: int, packed: bool = False, separator: int | None = None,
               full_blocks: bool = False) -> TokenRows:
    """Lines as rows of at most `max_len` tokens: one per line (truncated), or `packed`: the lines' tokens
    concatenated in order (each line followed by `separator`, if given) and cut into blocks, each framed by the
    special tokens. `full_blocks`: a last partial block is left out, so every row is exactly `max_len` long."""
    prefix, suffix = _special_frame(tokenizer)
    room = max_len - len(prefix) - len(suffix)
    if room <= 0:
        raise LtsftError(f"max_len={max_len} leaves no room for text after the special tokens; raise it")
    tokens = tokenizer(lines, add_special_tokens=False)["input_ids"]
    empty = sum(1 for t in tokens if not t)
    tokens = [t for t in tokens if t]
    if not tokens:
        raise LtsftError("no tokens in the given lines: the text is empty for this tokenizer")
    truncated = dropped = 0
    if packed:
        end = [] if separator is None else [separator]
        stream = [i for t in tokens for i in t + end]
        bodies = [stream[s:s + room] for s in range(0, len(stream), room)]
        if full_blocks and len(bodies[-1]) < room:
            dropped = len(bodies.pop())
    else:
        bodies, truncated = [t[:room] for t in tokens], sum(1 for t in tokens if len(t) > room)
    return TokenRows([prefix + body + suffix for body in bodies], truncated, empty, dropped)


@dataclass
class EncodedText:
    examples: Examples
    truncated: int = 0  # lines cut to max_len (line-by-line mode)
    empty: int = 0  # lines with no tokens, left out


def encode_text(tokenizer, lines: list[str], max_len: int, packed: bool = False,
                probability: float = 0.15) -> EncodedText:
    """Fixed-length MLM rows: one per line (truncated), or `packed`: the lines' tokens concatenated in order
    and cut into blocks, each framed by the special tokens (the last block padded)."""
    rows = token_rows(tokenizer, lines, max_len, packed)
    spec = MLMSpec(tokenizer.mask_token_id, tuple(tokenizer.all_special_ids), len(tokenizer), probability)
    return EncodedText(Examples(_rows(tokenizer, rows.rows, max_len), mlm=spec), rows.truncated, rows.empty)


def fixed_masks(examples: Examples, seed: int = 0) -> Examples:
    """The same BERT masking as training (15%: 80% [MASK], 10% random, 10% kept), drawn once from `seed` and
    stored as labels. Every row with a maskable token gets at least one masked position, so no eval batch has
    an undefined (0/0) loss."""
    spec = examples.mlm
    if spec is None:
        raise LtsftError("fixed_masks needs MLM examples (from encode_text)")
    inputs, labels = bert_mask(examples.tensors["input_ids"], spec, torch.Generator().manual_seed(seed),
                               at_least_one=True)
    return Examples({**examples.tensors, "input_ids": inputs, "labels": labels})


def eval_batches(examples: Examples, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive batches in file order, the last one possibly smaller: the same batches every evaluation."""
    for start in range(0, len(examples), batch_size):
        yield {name: t[start:start + batch_size] for name, t in examples.tensors.items()}


@dataclass
class MLMData:
    train: Examples  # masks drawn per epoch by the trainer (Examples.mlm)
    eval: Examples  # fixed masks, with labels
    report: dict[str, int]


def build_mlm_data(tokenizer, lines: list[str], max_len: int, packed: bool = False, eval_fraction: float = 0.05,
                   seed: int = 0, probability: float = 0.15) -> MLMData:
    """Held-out split, encoding and fixed eval masking in one call."""
    train_lines, eval_lines = split_held_out(lines, eval_fraction, seed)
    train = encode_text(tokenizer, train_lines, max_len, packed, probability)
    held = encode_text(tokenizer, eval_lines, max_len, packed, probability)
    report = {"train_lines": len(train_lines), "eval_lines": len(eval_lines), "train_rows": len(train.examples),
              "eval_rows": len(held.examples), "truncated": train.truncated + held.truncated,
              "empty": train.empty + held.empty}
    return MLMData(train.examples, fixed_masks(held.examples, seed), report)


# Monolingual text, what every language SFT reads: a file of lines, or a HF dataset's text column.
TEXT_FORMATS = {
    "text": Format(lambda s: read_text_lines(s.train_file), suffixes=(".txt",)),
    "hf": Format(lambda s: load_hf_lines(s.hf_dataset, s.hf_config, s.split, s.column)),
}


@register_task
class MaskedLM(Task):
    """Masked language modelling of one language's text: what a language SFT learns."""

    name = "mlm"
    kind = "language"
    token_loss = True
    model_class = "AutoModelForMaskedLM"
    formats = TEXT_FORMATS

    def prepare_model(self, model) -> None:
        from ltsft_dist.models import untie_output_embeddings

        untie_output_embeddings(model)

    def texts(self, records: list[str]) -> list[str]:
        return records

    def encode(self, tokenizer, records: list[str], encoding: Encoding, labels=None) -> Encoded:
        encoded = encode_text(tokenizer, records, encoding.max_seq_length, encoding.packed, encoding.mlm_probability)
        return Encoded(encoded.examples, records,
                           report={"rows": len(encoded.examples), "truncated": encoded.truncated,
                                   "empty": encoded.empty})

    def held_out(self, encoded: Encoded, seed: int) -> Encoded:
        return Encoded(fixed_masks(encoded.examples, seed), encoded.records, report=encoded.report)
