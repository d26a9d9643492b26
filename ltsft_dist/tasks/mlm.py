"""Language-SFT data: raw text of one language for masked language modelling, with a held-out split.

Text comes one sentence per line (a file) or from a text column (a HF dataset), read lazily (`TextSource`), and
becomes fixed-length rows (`ltsft_dist.token_cache`): packed into blocks of consecutive tokens, or line by line
(long lines truncated, and counted). In training the rows come from the on-disk token cache, memory-mapped;
small lists of lines (tests, a tiny base's pretraining text) are encoded in memory by the same packing.
The held-out lines are split off *before* packing, so no eval block shares text with a train block.
Eval masking is drawn once from a fixed seed and stored as `labels`: every evaluation of every checkpoint
scores the same masked positions, so eval losses are comparable across checkpoints and runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ltsft_dist.data import Examples, MLMSpec, among_own, bert_mask, over_outputs, own_tokens_mask
from ltsft_dist.devices import move
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks._io import load_hf_dataset
from ltsft_dist.tasks.base import Encoded, Encoding, Format, Task, register_task
from ltsft_dist.token_cache import (Layout, Rows, TextSource, cached_rows, columns, dataset_text, pack_lines,
                                     text_file)


def load_hf_text(path: str, config: str | None = None, split: str = "train", column: str = "text") -> TextSource:
    """A HF dataset's text column (hub or local cache), e.g. ("wikimedia/wikipedia", "20231101.sw")."""
    dataset, source = load_hf_dataset(path, config, split)
    return dataset_text(dataset, column, source)


def split_held_out(lines: list[str] | TextSource, fraction: float = 0.05,
                   seed: int = 0) -> tuple[list[str], list[str]] | tuple[TextSource, TextSource]:
    """(train, eval): a seeded random `fraction` of the lines (at least one) held out; both keep file order. A
    `TextSource` is split lazily, each line held out with probability `fraction` (`TextSource.split`)."""
    if not 0 < fraction < 1:
        raise LtsftError(f"eval fraction {fraction} must be between 0 and 1 (e.g. 0.05)")
    if isinstance(lines, TextSource):
        return lines.split(fraction, seed)
    n_eval = max(1, round(fraction * len(lines)))
    if n_eval >= len(lines):
        raise LtsftError(f"{len(lines)} lines are too few to hold out {fraction:.0%}; add text or lower the fraction")
    held = set(torch.randperm(len(lines), generator=torch.Generator().manual_seed(seed))[:n_eval].tolist())
    return [x for i, x in enumerate(lines) if i not in held], [x for i, x in enumerate(lines) if i in held]


def text_rows(tokenizer, lines: list[str] | TextSource, layout: Layout, cache_dir: str | None = None) -> Rows:
    """The rows of `lines`: from the token cache under `cache_dir` (a `TextSource`; collective under a
    launcher), else packed in memory."""
    if isinstance(lines, TextSource) and cache_dir:
        return cached_rows(lines, tokenizer, layout, cache_dir)
    return pack_lines(tokenizer, lines, layout)


@dataclass
class EncodedText:
    examples: Examples
    truncated: int = 0  # lines cut to max_len (line-by-line mode)
    empty: int = 0  # lines with no tokens, left out
    report: dict | None = None  # the token accounting (`TokenCount.report`)


def encode_text(tokenizer, lines: list[str] | TextSource, max_len: int, packed: bool = False,
                probability: float = 0.15, cache_dir: str | None = None, own_tokens: bool = False) -> EncodedText:
    """MLM rows: one per line (truncated), or `packed`: the lines' tokens concatenated in order and cut into
    blocks, each framed by the special tokens (the last block padded). Rows from the token cache stay on disk
    (lazy `token_cache.Column`s); rows packed in memory are tensors. `own_tokens`: the rows' tokens are recorded
    in `mlm.own`, and masking keeps random replacements inside them."""
    rows = text_rows(tokenizer, lines, Layout(max_len, packed), cache_dir)
    spec = MLMSpec(tokenizer.mask_token_id, tuple(tokenizer.all_special_ids), len(tokenizer), probability)
    examples = Examples(columns(rows, dense=not isinstance(rows.ids, np.memmap)), mlm=spec)
    if own_tokens:
        spec.own = own_tokens_mask([examples.tensors["input_ids"]], spec.mask_token_id, spec.vocab_size)
    return EncodedText(examples, rows.count.truncated, rows.count.empty, rows.count.report())


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
    "text": Format(lambda s: text_file(s.train_file), suffixes=(".txt",)),
    "hf": Format(lambda s: load_hf_text(s.hf_dataset, s.hf_config, s.split, s.column)),
}


@register_task
class MaskedLM(Task):
    """Masked language modelling of one language's text: what a language SFT learns."""

    name = "mlm"
    kind = "language"
    token_loss = True
    own_tokens = True
    model_class = "AutoModelForMaskedLM"
    formats = TEXT_FORMATS

    def prepare_model(self, model, tie_output_embeddings: bool = False) -> None:
        from ltsft_dist.models import untie_output_embeddings

        if not tie_output_embeddings:
            untie_output_embeddings(model)

    def score_among_own_tokens(self, model: torch.nn.Module, own: torch.Tensor) -> None:
        """Every forward of `model` scores masked tokens among `own` only (`among_own` on its output embedding's
        logits, so `model(**batch).loss` is that softmax's). `own` is kept as a buffer of that module (not saved:
        the SFT holds no such state)."""
        head = model.get_output_embeddings()
        head.register_buffer("own_tokens", over_outputs(own, head.out_features), persistent=False)
        head.register_forward_hook(_among_own_tokens)

    def texts(self, records: list[str]) -> list[str]:
        return records

    def encode(self, tokenizer, records: list[str] | TextSource, encoding: Encoding, labels=None) -> Encoded:
        encoded = encode_text(tokenizer, records, encoding.max_seq_length, encoding.packed, encoding.mlm_probability,
                              getattr(records, "cache_dir", None), encoding.own_tokens)
        return Encoded(encoded.examples, records, report=encoded.report)

    def held_out(self, encoded: Encoded, seed: int) -> Encoded:
        return Encoded(fixed_masks(encoded.examples, seed), encoded.records, report=encoded.report)


def _among_own_tokens(head: torch.nn.Module, args, logits: torch.Tensor) -> torch.Tensor:
    """DeepSpeed moves the buffer with the model, except a model built under ZeRO-3's partitioned construction
    (its `module.to` is skipped): then it moves to the logits' device once, here."""
    if head.own_tokens.device != logits.device:
        head.own_tokens = move(head.own_tokens, logits.device)
    return among_own(logits, head.own_tokens)
