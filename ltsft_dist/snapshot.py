"""θ⁰ for my shard only: a clone of each fp32 master segment I own (4·N/W bytes under ZeRO 1-3)."""

from __future__ import annotations

import torch

from ltsft_dist.shards import Fragment, Shards


class Snapshot:
    def __init__(self, shards: Shards):
        self.shards = shards
        self.segments = [s.detach().clone() for s in shards.segments]

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.segments)

    def theta0(self, f: Fragment) -> torch.Tensor:
        return self.segments[f.segment].narrow(0, f.segment_offset, f.numel)

    def delta(self, f: Fragment) -> torch.Tensor:
        """θ − θ⁰ on one fragment (a new tensor)."""
        return self.shards.master(f) - self.theta0(f)

    @torch.no_grad()
    def rewind(self) -> None:
        """Reset every master element, head included, to θ⁰ and refresh the working weights."""
        for master, saved in zip(self.shards.segments, self.segments):
            master.copy_(saved)
        self.shards.sync_working_weights()
