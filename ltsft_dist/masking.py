"""Phase-2 masking on the shards, and the L1 pull toward θ⁰.

Gradients are edited in DeepSpeed's own reduced-gradient buffers before `engine.step()`, so the gradient
norm and clipping DeepSpeed computes are those of the masked gradient. After each inner optimizer step,
every frozen element is projected back onto θ⁰ (AdamW weight decay moves zero-gradient elements), before
DeepSpeed copies the masters into the working weights.
"""

from __future__ import annotations

import torch

from ltsft_dist.shards import Fragment, Shards
from ltsft_dist.snapshot import Snapshot


class GradientMask:
    def __init__(self, shards: Shards, snapshot: Snapshot, sparse: list[Fragment],
                 selected: list[torch.Tensor]):
        """`sparse` are my eligible fragments and `selected[i]` their bool masks; every other element of my
        segments (the dense head) stays trainable, except ZeRO-3 padding, which is frozen too."""
        self.shards, self.snapshot = shards, snapshot
        self.frozen = [torch.zeros(s.numel(), dtype=torch.bool) for s in shards.segments]
        covered = [torch.zeros(s.numel(), dtype=torch.bool) for s in shards.segments]
        for f in shards.fragments:
            covered[f.segment].narrow(0, f.segment_offset, f.numel).fill_(True)
        for frozen, cov in zip(self.frozen, covered):
            frozen.copy_(~cov)  # padding
        for f, sel in zip(sparse, selected):
            self.frozen[f.segment].narrow(0, f.segment_offset, f.numel).copy_(~sel)
        self.grad_views = [self.frozen[f.segment].narrow(0, f.segment_offset, f.numel) for f in shards.fragments]
        self._handle = None

    @torch.no_grad()
    def mask_gradients(self, grads: list[torch.Tensor]) -> None:
        for g, frozen in zip(grads, self.grad_views):
            g.masked_fill_(frozen, 0.0)

    @torch.no_grad()
    def project(self, segment_indices: list[int]) -> None:
        for i in segment_indices:
            master = self.shards.segments[i]
            torch.where(self.frozen[i], self.snapshot.segments[i], master, out=master)

    def attach(self) -> None:
        self._handle = self.shards.on_optimizer_step(self.project)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def selected_count(self) -> int:
        return sum(int((~fz).sum()) for fz in self.frozen)


class L1Pull:
    """J = λ/N Σ|θ − θ⁰| over the N eligible elements: its gradient λ/N·sign(θ − θ⁰) is added on the shards,
    so no extra pass over the full model is needed."""

    def __init__(self, shards: Shards, snapshot: Snapshot, sparse: list[Fragment], coefficient: float,
                 n_eligible: int):
        self.shards, self.snapshot, self.sparse = shards, snapshot, sparse
        self.scale = coefficient / n_eligible
        positions = {f: i for i, f in enumerate(shards.fragments)}
        self._grad_index = [positions[f] for f in sparse]

    @torch.no_grad()
    def add_gradient(self, grads: list[torch.Tensor]) -> None:
        if self.scale == 0.0:
            return
        for f, i in zip(self.sparse, self._grad_index):
            grads[i].add_(torch.sign(self.snapshot.delta(f)), alpha=self.scale)

    @torch.no_grad()
    def penalty(self) -> float:
        """The current L1 term (collective under ZeRO 1-3: every rank must call it)."""
        local = sum(float(self.snapshot.delta(f).abs().sum(dtype=torch.float64)) for f in self.sparse)
        return float(self.shards.all_reduce(torch.tensor([local], dtype=torch.float64))) * self.scale
