"""Which parameters an SFT may change: one rule list with a readable default per SFT kind.

Every parameter gets exactly one role, decided in this order:
- `head`: trained densely in both phases and stored densely (a task head);
- `sparse`: eligible for the top-K mask (matches an `include` rule and no `exclude` rule);
- `frozen`: never moves (requires_grad is switched off before DeepSpeed sees the model).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from ltsft_dist.errors import LtsftError
from ltsft_dist.naming import body_prefix, module_type_and_layer
from ltsft_dist.shards import param_shape

# Normalisation weights, frozen in language SFTs: BERT's LayerNorm, GPT-2's ln_*, Llama-style RMSNorms
# (input_layernorm, post_attention_layernorm, the final model.norm) and per-head q_norm/k_norm (Qwen3, Gemma 3).
LAYER_NORM = r"(LayerNorm|layer_norm|layernorm|\.ln_|(^|[._])norm\.)"
POOLER = r"\.pooler\."


@dataclass
class EligibilityConfig:
    """Regular expressions matched with `re.search` against `model.named_parameters()` names.
    Leave a list unset (null) for the default of the SFT kind."""

    include: list[str] | None = field(default=None, metadata={"help": "parameters eligible for the sparse mask"})
    exclude: list[str] | None = field(default=None, metadata={"help": "never changed, even if included"})
    head: list[str] | None = field(default=None, metadata={"help": "trained densely and stored densely (task "
                                                                   "heads)"})
    tie_output_embeddings: bool = field(default=False, metadata={"help": (
        "language SFTs: keep the output embedding tied to the input one, so the masked-word loss reaches a word's "
        "embedding row from the input and the prediction side, and freeze the rest of the prediction head (the "
        "default, false, is the paper's: untied, output embedding frozen)")})
    freeze_word_embeddings: bool = field(default=False, metadata={"help": (
        "keep the input word embeddings frozen, added to the exclude rules in force (the default ones or yours). "
        "For a task SFT whose zero-shot target language has words of its own: the task then lives in the body, "
        "which every language shares, and not in the source words' rows, which the target never reads")})


def output_embedding_name(model) -> str | None:
    """The name of a language model's output embeddings (its LM head), None for a model without them."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return None if out is None else next(n for n, p in model.named_parameters() if p is out.weight)


def _outside_body(model, lm_head: str | None) -> str:
    prefix = body_prefix(model)
    if not prefix:
        return r"$^"  # a model that is all body has no head
    return rf"^(?!{re.escape(prefix)})" + (rf"(?!{re.escape(lm_head)}$)" if lm_head else "")


def default_rules(kind: str, model) -> EligibilityConfig:
    # A language model's output embeddings (untied from the input ones by the task's model) stay frozen, as the
    # method's authors advise for generative models: language and task SFTs then compose over one shared head.
    # Kept tied (a language SFT's eligibility.tie_output_embeddings), the output matrix IS the input one and stays
    # eligible; the rest of the prediction head, outside the body, is frozen instead.
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = out is not None and out.weight is model.get_input_embeddings().weight
    lm_head = None if tied else output_embedding_name(model)
    frozen_head = [_outside_body(model, None)] if tied else ["^" + re.escape(lm_head) + "$"] if lm_head else []
    # A language SFT (the paper): everything else is eligible, input embeddings included, except the norms.
    if kind == "language":
        return EligibilityConfig(include=[".*"], exclude=[LAYER_NORM, *frozen_head], head=[])
    # The pooler is part of the task head (BERT's two-layer head on [CLS], as in the paper's NLI setup): stored
    # densely, so a task SFT does not depend on the pooler a masked-LM base checkpoint lacks.
    heads = [_outside_body(model, lm_head), POOLER]
    if kind == "task":
        return EligibilityConfig(include=[".*"], exclude=frozen_head, head=heads)
    if kind == "bitfit":
        return EligibilityConfig(include=[r"\.bias$"], exclude=frozen_head, head=heads)
    raise LtsftError(f"unknown SFT kind {kind!r}: use 'language', 'task' or 'bitfit'")


def _numel(p: torch.Tensor) -> int:
    """Elements of a parameter, also once ZeRO-3 has partitioned it (its local tensor is then empty)."""
    return math.prod(param_shape(p))


@dataclass
class Eligibility:
    rules: EligibilityConfig
    roles: dict[str, str] = field(default_factory=dict)  # name -> sparse | head | frozen

    def names(self, role: str) -> list[str]:
        return [n for n, r in self.roles.items() if r == role]

    def count(self, model, role: str) -> int:
        params = dict(model.named_parameters())
        return sum(_numel(params[n]) for n in self.names(role))

    def table(self, model) -> str:
        """Elements per module type and role: shown at start so nobody trains the wrong parameters."""
        params = dict(model.named_parameters())
        counts: Counter = Counter()
        for name, role in self.roles.items():
            counts[(module_type_and_layer(name)[0], role)] += _numel(params[name])
        types = sorted({t for t, _ in counts})
        width = max(len(t) for t in types)
        lines = [f"{'module type':<{width}}  {'sparse':>10} {'head':>10} {'frozen':>10}"]
        for t in types:
            lines.append(f"{t:<{width}}  " + " ".join(f"{counts[(t, r)]:>10}" for r in ("sparse", "head", "frozen")))
        return "\n".join(lines)


def resolve(model: torch.nn.Module, kind: str, overrides: EligibilityConfig | None = None) -> Eligibility:
    defaults = default_rules(kind, model)
    overrides = overrides or EligibilityConfig()
    rules = EligibilityConfig(*(getattr(overrides, f) if getattr(overrides, f) is not None else getattr(defaults, f)
                                for f in ("include", "exclude", "head")))
    if overrides.freeze_word_embeddings:
        words = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
        rules.exclude = [*rules.exclude, "^" + re.escape(words) + "$"]
    compiled = {}
    for fieldname in ("include", "exclude", "head"):
        try:
            compiled[fieldname] = [re.compile(p) for p in getattr(rules, fieldname)]
        except re.error as err:
            raise LtsftError(f"eligibility.{fieldname}: bad regular expression: {err}") from None
    roles = {}
    for name, _ in model.named_parameters():
        if any(r.search(name) for r in compiled["head"]):
            roles[name] = "head"
        elif any(r.search(name) for r in compiled["include"]) and not any(r.search(name) for r in compiled["exclude"]):
            roles[name] = "sparse"
        else:
            roles[name] = "frozen"
    result = Eligibility(rules, roles)
    if not result.names("sparse"):
        raise LtsftError("eligibility rules select no sparse parameter: check eligibility.include/exclude")
    return result


def apply_roles(model: torch.nn.Module, eligibility: Eligibility) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(eligibility.roles[name] != "frozen")
