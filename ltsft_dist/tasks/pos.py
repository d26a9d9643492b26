"""Part-of-speech tagging (Universal Dependencies' UPOS): a tag per word, scored by per-word accuracy."""

from __future__ import annotations

from ltsft_dist.tasks.base import register_task
from ltsft_dist.tasks.metrics import token_accuracy
from ltsft_dist.tasks.tokens import TokenTagging


@register_task
class POS(TokenTagging):
    name = "pos"
    metrics = ("accuracy",)

    def tag_scores(self, gold: list[list[str]], predicted: list[list[str]]) -> dict:
        return {"accuracy": token_accuracy(gold, predicted)}
