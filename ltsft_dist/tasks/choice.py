"""Zero-shot multiple choice by log-likelihood, the way lm-evaluation-harness scores decoders: each choice's score is
Σ log p(choice tokens | context); `acc` takes the best score, `acc_norm` the best after dividing it by the choice's
length in characters (the choice's own text, without the delimiter that joins it to the context, as lm-eval counts).

Context and choice are encoded jointly and split at the length of the context's own encoding (lm-eval's rule, so a
word piece that merges across the boundary is scored as part of the choice; white space ending the context moves to
the choice first, as lm-eval moves it); the context is framed as the tokenizer frames a text (Llama's <s>). An empty
context (a task that scores whole sequences) is the beginning-of-sequence token, or the end-of-sequence token of a
tokenizer without one, as in lm-eval. Every (example, choice) pair is one right-padded row whose labels are the
choice's tokens; `forward` returns each row's summed log-probability. A task of this kind defines its reader, its
prompt (`context`), its `choices` and the `gold` one; each choice follows the context after `delimiter` (lm-eval's
target delimiter, a space).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ltsft_dist.data import Examples
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks.base import Encoded, Encoding, Task


def label_loglikelihoods(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, Σ log p(label token | the tokens before it) over the labelled positions (float64), and how many
    there are: what multiple choice and perplexity are computed from."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]  # position t predicts token t+1
    scored = labels != -100
    # Normalised over the vocabulary only at the labelled positions: a [rows × length × vocabulary] copy in fp32
    # is gigabytes for a real decoder's vocabulary.
    logprobs = torch.log_softmax(logits[:, :-1][scored].float(), dim=-1)
    picked = logprobs.gather(-1, labels[scored].unsqueeze(-1)).squeeze(-1).to(torch.float64)
    rows = torch.arange(len(labels), device=labels.device).unsqueeze(1).expand_as(labels)[scored]
    sums = torch.zeros(len(labels), dtype=torch.float64, device=labels.device).index_add_(0, rows, picked)
    return sums, scored.sum(dim=1).to(torch.float64)


@dataclass(frozen=True)
class Choices:
    """How the rows map back to examples: row i scores choice `choice[i]` of example `example[i]`."""

    example: list[int]
    choice: list[int]
    characters: list[int]  # the length of the choice's text, for acc_norm


class LogLikelihoodChoice(Task):
    """The scoring shared by log-likelihood multiple-choice tasks; subclasses set name, formats, and implement
    `context`, `choices` and `gold`."""

    decoder = True
    model_class = "AutoModelForCausalLM"
    metrics = ("acc", "acc_norm")
    output_fields = ("loglikelihood",)
    delimiter = " "  # between the context and each choice

    def context(self, record) -> str:
        raise NotImplementedError

    def choices(self, record) -> list[str]:
        """The choices' texts; their lengths in characters normalise `acc_norm`."""
        raise NotImplementedError

    def continuations(self, record) -> list[str]:
        """The choices as they follow the context."""
        return [self.delimiter + choice for choice in self.choices(record)]

    def gold(self, record) -> int:
        raise NotImplementedError

    def texts(self, records: list) -> list[str]:
        return [text for r in records for text in [self.context(r), *self.continuations(r)] if text.strip()]

    def encode(self, tokenizer, records: list, encoding: Encoding, labels=None) -> Encoded:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows, targets, example, choice, characters = [], [], [], [], []
        max_len = encoding.max_seq_length
        prefix = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        for e, record in enumerate(records):
            context = self.context(record)
            n_context = len(tokenizer(context.rstrip())["input_ids"])
            start = prefix if n_context == 0 else []  # nothing to condition on but the start of a sequence
            n_context += len(start)
            for c, (choice_text, continuation) in enumerate(zip(self.choices(record), self.continuations(record))):
                whole = start + tokenizer(context + continuation)["input_ids"]
                if len(whole) > max_len:
                    raise LtsftError(f"{getattr(record, 'where', e)}: context and choice {c + 1} take {len(whole)} "
                                     f"tokens, more than --max-seq-length {max_len}; raise it")
                if len(whole) <= n_context:
                    raise LtsftError(f"{getattr(record, 'where', e)}: choice {c + 1} ({continuation!r}) adds no "
                                     "token to the context; fix the record")
                rows.append(whole)
                targets.append([-100] * n_context + whole[n_context:])
                example.append(e)
                choice.append(c)
                characters.append(len(choice_text))
        ids = torch.full((len(rows), max_len), pad if pad is not None else 0)
        labels_t = torch.full((len(rows), max_len), -100)
        mask = torch.zeros((len(rows), max_len), dtype=torch.long)
        for r, (row, target) in enumerate(zip(rows, targets)):
            ids[r, :len(row)], labels_t[r, :len(row)], mask[r, :len(row)] = (torch.tensor(row), torch.tensor(target),
                                                                           1)
        return Encoded(Examples({"input_ids": ids, "attention_mask": mask, "labels": labels_t}), records,
                       features=Choices(example, choice, characters), report={"rows": len(rows)})

    def forward(self, model, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [label_loglikelihoods(model, batch)[0]]

    def score(self, encoded: Encoded, outputs: list[torch.Tensor], language: str, options) -> dict:
        features: Choices = encoded.features
        loglikelihood = outputs[0].tolist()
        by_example: dict[int, list[tuple[float, float]]] = {}
        for e, ll, n in zip(features.example, loglikelihood, features.characters):
            by_example.setdefault(e, []).append((ll, ll / max(n, 1)))
        acc = acc_norm = 0
        for e, scores in by_example.items():
            gold = self.gold(encoded.records[e])
            acc += max(range(len(scores)), key=lambda c: scores[c][0]) == gold
            acc_norm += max(range(len(scores)), key=lambda c: scores[c][1]) == gold
        n = len(by_example)
        return {"acc": 100.0 * acc / n, "acc_norm": 100.0 * acc_norm / n, "examples": n}
