"""Named-entity recognition (WikiANN, CoNLL-2003): BIO tags per word, scored by conlleval's entity F1."""

from __future__ import annotations

from ltsft_dist.tasks.base import register_task
from ltsft_dist.tasks.metrics import entity_f1
from ltsft_dist.tasks.tokens import TokenTagging


@register_task
class NER(TokenTagging):
    name = "ner"
    metrics = ("f1",)

    def tag_scores(self, gold: list[list[str]], predicted: list[list[str]]) -> dict:
        return entity_f1(gold, predicted)

    def metric_title(self, options) -> str:
        return "entity f1"
