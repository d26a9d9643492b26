"""Causal language modelling of one language's text: what a language SFT of a decoder (Llama, Qwen2, ...) learns.

The text is read as for masked LM (`mlm.TEXT_FORMATS`, cached by `ltsft_dist.token_cache`), every line ends with
the tokenizer's end-of-sequence token (a document boundary the model learns to predict), and the token stream is
cut into blocks of exactly `max_seq_length` tokens, each starting with the tokenizer's own prefix (Llama's <s>); the
last partial block is completed with the tokens before it (it overlaps the previous block), so every token is
trained on and every row is full: the model's mean token loss per micro-batch averages to the global mean token
loss whatever the world size, and the held-out loss is the mean token loss of the held-out text, whose exp is the
perplexity reported beside it.

`ltsft eval --task clm` scores held-out text of each target language by perplexity, exp of the mean negative
log-likelihood over its tokens: there every token is counted once (the last block is padded, not overlapping), and
each block is scored from its own start (no context carried across blocks).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ltsft_dist.data import Examples
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks.base import Encoded, Encoding, Task, register_task
from ltsft_dist.tasks.choice import label_loglikelihoods
from ltsft_dist.tasks.mlm import TEXT_FORMATS, text_rows
from ltsft_dist.token_cache import Layout, TextSource, columns, pack_lines


def causal_labels(ids: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
    """The model shifts the labels itself (position t predicts token t+1); the first position is never a target,
    and marking it -100 makes the labelled-token count equal to the predicted-token count the held-out loss is
    averaged over."""
    labels = ids.astype(np.int64)
    labels[..., 0] = -100
    return torch.from_numpy(labels)


def scored_labels(ids: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
    """`causal_labels` without the padding after each row's length (evaluation's padded last block)."""
    labels = causal_labels(ids, lengths)
    labels[torch.from_numpy(np.arange(ids.shape[-1]) >= lengths[..., None])] = -100
    return labels


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
    metrics = ("perplexity",)
    output_fields = ("nll", "tokens")  # per row: summed negative log-likelihood, tokens predicted

    def texts(self, records: list[str]) -> list[str]:
        return records

    def encode(self, tokenizer, records: list[str] | TextSource, encoding: Encoding, labels=None) -> Encoded:
        _require_eos(tokenizer)
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
        return {"perplexity": _perplexity(loss)}

    # --- evaluation --------------------------------------------------------------------------------------------

    def encode_for_eval(self, tokenizer, records: list[str], encoding: Encoding, labels=None) -> Encoded:
        """Packed blocks as in training, but the last one padded: every token of the text is scored once."""
        _require_eos(tokenizer)
        rows = pack_lines(tokenizer, records, Layout(encoding.max_seq_length, packed=True,
                                                     separator=tokenizer.eos_token_id, last_block="pad"))
        if not len(rows) or int(rows.lengths.max()) < 2:
            raise LtsftError("clm: the evaluation text has no token to predict; give a file with text")
        return Encoded(Examples(columns(rows, dense=True, labels=scored_labels)), records, report=rows.count.report())

    def forward(self, model, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        loglikelihood, tokens = label_loglikelihoods(model, batch)
        return [-loglikelihood, tokens]

    def score(self, encoded: Encoded, outputs: list[torch.Tensor], language: str, options) -> dict:
        nll, tokens = float(outputs[0].sum()), int(outputs[1].sum())
        return {"perplexity": _perplexity(nll / tokens), "nll_per_token": nll / tokens, "tokens": tokens,
                "examples": encoded.report["lines"]}

    def metric_title(self, options) -> str:
        return "perplexity, lower is better"


def _require_eos(tokenizer) -> None:
    if tokenizer.eos_token_id is None:
        raise LtsftError("clm: the tokenizer has no end-of-sequence token to end each line with; use a decoder's "
                         "tokenizer (model.tokenizer) or set tokenizer.eos_token")


def _perplexity(mean_nll: float) -> float:
    return math.exp(min(mean_nll, 700.0))  # exp overflows a float past ~709
