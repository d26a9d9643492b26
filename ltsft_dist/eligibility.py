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


def _outside_body(model) -> str:
    prefix = body_prefix(model)
    return rf"^(?!{re.escape(prefix)})" if prefix else r"$^"  # a model that is all body has no head


def default_rules(kind: str, model) -> EligibilityConfig:
    # A language SFT (the paper; for decoders as its authors advise): everything is eligible, input embeddings
    # included, except the norms and the output embeddings (untied from the input ones by the task's model).
    # Kept tied (eligibility.tie_output_embeddings), the output matrix IS the input one and stays eligible; the
    # rest of the prediction head, outside the body, is frozen instead.
    if kind == "language":
        excluded = [LAYER_NORM]
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out is not None and out.weight is model.get_input_embeddings().weight:
            excluded.append(_outside_body(model))
        elif out is not None:
            name = next(n for n, p in model.named_parameters() if p is out.weight)
            excluded.append("^" + re.escape(name) + "$")
        return EligibilityConfig(include=[".*"], exclude=excluded, head=[])
    # The pooler is part of the task head (BERT's two-layer head on [CLS], as in the paper's NLI setup): stored
    # densely, so a task SFT does not depend on the pooler a masked-LM base checkpoint lacks.
    if kind == "task":
        return EligibilityConfig(include=[".*"], exclude=[], head=[_outside_body(model), POOLER])
    if kind == "bitfit":
        return EligibilityConfig(include=[r"\.bias$"], exclude=[], head=[_outside_body(model), POOLER])
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
