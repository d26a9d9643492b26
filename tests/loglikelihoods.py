"""Hand computations of what decoder evaluation scores, one unpadded sequence at a time with plain transformers
(for test_tasks_xcopa and test_tasks_decoder_eval)."""

from __future__ import annotations

import torch


def by_hand(model, tokenizer, context: str, continuation: str) -> float:
    """Σ log p(continuation tokens | context), context and continuation encoded jointly and split at the context's
    own length, as lm-evaluation-harness splits them."""
    n_context = len(tokenizer(context)["input_ids"])
    whole = tokenizer(context + continuation)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(float(logprobs[t - 1, whole[t]]) for t in range(n_context, len(whole)))


def acc_and_acc_norm(scores: list[list[float]], choices: list[list[str]], gold: list[int]) -> tuple[float, float]:
    """lm-eval's acc (best log-likelihood) and acc_norm (best per character of the choice), in percent."""
    def best(values):
        return max(range(len(values)), key=values.__getitem__)

    acc = sum(best(s) == g for s, g in zip(scores, gold))
    acc_norm = sum(best([v / len(c) for v, c in zip(s, cs)]) == g for s, cs, g in zip(scores, choices, gold))
    return 100 * acc / len(gold), 100 * acc_norm / len(gold)
