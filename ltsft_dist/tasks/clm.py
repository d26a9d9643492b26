"""Causal language modelling of one language's text: what a language SFT of a decoder (Llama, Qwen2, ...) learns.

The text is read as for masked LM (`mlm.TEXT_FORMATS`), every line ends with the tokenizer's end-of-sequence
token (a document boundary the model learns to predict), and the token stream is cut into blocks of exactly
`max_seq_length` tokens, each starting with the tokenizer's own prefix (Llama's <s>); a last partial block is left
out. Every row is therefore full: the model's mean token loss per micro-batch averages to the global mean token
loss whatever the world size, and the held-out loss is the mean token loss of the held-out text, whose exp is the
perplexity reported beside it.
"""

from __future__ import annotations

import math

import torch

from ltsft_dist.data import Examples
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks.base import Encoded, Encoding, Task, register_task
from ltsft_dist.tasks.mlm import TEXT_FORMATS, token_rows


def causal_examples(blocks: torch.Tensor) -> Examples:
    """Full blocks of token ids as causal-LM examples. The model shifts the labels itself (position t predicts
    token t+1); the first position is never a target, and marking it -100 makes the labelled-token count equal to
    the predicted-token count the held-out loss is averaged over."""
    labels = blocks.clone()
    labels[:, 0] = -100
    return Examples({"input_ids": blocks, "attention_mask": torch.ones_like(blocks), "labels": labels})


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

    def encode(self, tokenizer, records: list[str], encoding: Encoding, labels=None) -> Encoded:
        if tokenizer.eos_token_id is None:
            raise LtsftError("clm: the tokenizer has no end-of-sequence token to end each line with; use a decoder's "
                             "tokenizer (model.tokenizer) or set tokenizer.eos_token")
        max_len = encoding.max_seq_length
        rows = token_rows(tokenizer, records, max_len, packed=True, separator=tokenizer.eos_token_id,
                          full_blocks=True)
        if not rows.rows:
            raise LtsftError(f"clm: {len(records)} lines hold {rows.dropped} tokens, fewer than one block of "
                             f"data.max_seq_length={max_len}; add text, lower max_seq_length, or raise "
                             "data.eval_fraction if this is the held-out share")
        return Encoded(causal_examples(torch.tensor(rows.rows)), records,
                       report={"rows": len(rows.rows), "empty": rows.empty, "dropped_tokens": rows.dropped})

    def held_out_scores(self, loss: float) -> dict[str, float]:
        return {"perplexity": math.exp(min(loss, 700.0))}  # exp overflows a float past ~709
