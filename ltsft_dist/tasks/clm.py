"""Causal language modelling of one language's text: what a language SFT of a decoder (Llama, Qwen2, ...) learns.

The text is read as for masked LM (`mlm.TEXT_FORMATS`, cached by `ltsft_dist.token_cache`), every line ends with
the tokenizer's end-of-sequence token (a document boundary the model learns to predict), and the token stream is
cut into blocks of exactly `max_seq_length` tokens, each starting with the tokenizer's own prefix (Llama's <s>); the
last partial block is completed with the tokens before it (it overlaps the previous block), so every token is
trained on and every row is full: the model's mean token loss per micro-batch averages to the global mean token
loss whatever the world size, and the held-out loss is the mean token loss of the held-out text, whose exp is the
perplexity reported beside it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ltsft_dist.data import Examples
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks.base import Encoded, Encoding, Task, register_task
from ltsft_dist.tasks.mlm import TEXT_FORMATS, text_rows
from ltsft_dist.token_cache import Layout, TextSource, columns


def causal_labels(ids: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
    """The model shifts the labels itself (position t predicts token t+1); the first position is never a target,
    and marking it -100 makes the labelled-token count equal to the predicted-token count the held-out loss is
    averaged over."""
    labels = ids.astype(np.int64)
    labels[..., 0] = -100
    return torch.from_numpy(labels)


def causal_examples(blocks: torch.Tensor) -> Examples:
    """Full blocks of token ids (a tensor) as causal-LM examples."""
    return Examples({"input_ids": blocks, "attention_mask": torch.ones_like(blocks),
                     "labels": causal_labels(blocks.numpy(), np.full(len(blocks), blocks.shape[-1]))})


@register_task
class CausalLM(Task):
    """Next-token prediction over packed blocks of one language's text (a language SFT of a decoder)."""

    name = "clm"
    kind = "language"
    decoder = True
    model_class = "AutoModelForCausalLM"
    formats = TEXT_FORMATS

    def texts(self, records: list[str]) -> list[str]:
        return records

    def encode(self, tokenizer, records: list[str] | TextSource, encoding: Encoding, labels=None) -> Encoded:
        if tokenizer.eos_token_id is None:
            raise LtsftError("clm: the tokenizer has no end-of-sequence token to end each line with; use a decoder's "
                             "tokenizer (model.tokenizer) or set tokenizer.eos_token")
        max_len = encoding.max_seq_length
        layout = Layout(max_len, packed=True, separator=tokenizer.eos_token_id, last_block="overlap")
        rows = text_rows(tokenizer, records, layout, getattr(records, "cache_dir", None))
        if not len(rows):
            raise LtsftError(f"clm: {rows.count.lines} lines hold {rows.count.tokens} tokens, fewer than one block "
                             f"of data.max_seq_length={max_len}; add text, lower max_seq_length, or raise "
                             "data.eval_fraction if this is the held-out share")
        tensors = columns(rows, dense=not isinstance(rows.ids, np.memmap), labels=causal_labels)
        return Encoded(Examples(tensors), records, report=rows.count.report())

    def held_out_scores(self, loss: float) -> dict[str, float]:
        return {"perplexity": math.exp(min(loss, 700.0))}  # exp overflows a float past ~709
