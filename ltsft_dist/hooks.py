"""The recipe's step hooks: code that runs around every optimizer step without the recipe knowing what it is
(e.g. the per-step language swap of multi-source training, `ltsft_dist.swap.LanguageSwap`)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType


class StepHook:
    """Called by `LTSFTRecipe.train_step` on every rank, in `step_hooks` order; override what is needed.

    `timer`: when set, the hook's `seconds_spent()` per step is logged as `train/<timer>_seconds`.
    `sfts`: language SFTs the hook makes active during steps; the selection reports the mask's overlap with each.
    `fingerprints`: what the hook reads from disk, by name -> fingerprint; a checkpoint records them and a resume
    refuses to go on when one changed.
    """

    timer: str | None = None
    sfts: Mapping = MappingProxyType({})
    fingerprints: Mapping = MappingProxyType({})

    def before_step(self, step: int) -> None:
        """Before the step's first forward pass."""

    def before_optimizer_step(self, step: int) -> None:
        """After the step's last backward pass, before the optimizer step."""

    def restore(self) -> None:
        """At the end of every step, also one that failed: undo whatever `before_step` left in the weights."""

    def seconds_spent(self) -> float:
        """Time spent in this hook since it was made."""
        return 0.0
