"""The eval loss on held-out examples, and keeping the best φ by it (the paper keeps the best checkpoint).

Evaluation is sharded: rank r takes rows (j·W + r)·b … of batch j. Every rank runs the same number of forward
passes (ZeRO-3 gathers parameters collectively), a rank with no rows left repeats row 0 with weight 0. The loss
is summed per labelled token (MLM) or per example (tasks) and all-reduced, so it is the same number for every
world size.
"""

from __future__ import annotations

import math

import torch

from ltsft_dist import comm
from ltsft_dist.data import Examples
from ltsft_dist.devices import engine_device, to_device


class HeldOut:
    def __init__(self, sets: dict[str, Examples], micro_batch_size: int, rank: int, world_size: int, swap=None):
        """`swap` (a `LanguageSwap`) activates each language's SFT while that language is evaluated."""
        self.sets, self.micro, self.rank, self.world, self.swap = sets, micro_batch_size, rank, world_size, swap

    def _batches(self, examples: Examples):
        n = len(examples)
        for j in range(math.ceil(n / (self.world * self.micro))):
            start = (j * self.world + self.rank) * self.micro
            rows = torch.arange(min(start, n), min(start + self.micro, n))
            weight = 1
            if rows.numel() == 0:
                rows, weight = torch.tensor([0]), 0
            yield {name: t[rows] for name, t in examples.tensors.items()}, weight

    @torch.no_grad()
    def loss(self, engine) -> dict[str, float]:
        """Mean loss per language and overall ("all")."""
        was_training = engine.training
        engine.eval()
        device = engine_device(engine)
        totals = torch.zeros(2 * len(self.sets), dtype=torch.float64)
        try:
            for i, (language, examples) in enumerate(self.sets.items()):
                if self.swap is not None:
                    self.swap.apply(language)
                try:
                    for batch, weight in self._batches(examples):
                        labels = batch.get("labels")
                        count = (int((labels != -100).sum()) if labels is not None and labels.dim() == 2
                                 else next(iter(batch.values())).shape[0]) * weight
                        loss = engine(**to_device(batch, device)).loss
                        if count:
                            totals[2 * i] += float(loss) * count
                            totals[2 * i + 1] += count
                finally:
                    if self.swap is not None:
                        self.swap.restore()
        finally:
            engine.train(was_training)
        if self.world > 1:
            comm.all_reduce(totals)
        sums, counts = totals[0::2], totals[1::2]
        result = {lang: float(s / max(c, 1)) for lang, s, c in zip(self.sets, sums, counts)}
        result["all"] = float(sums.sum() / max(counts.sum(), 1))
        return result
