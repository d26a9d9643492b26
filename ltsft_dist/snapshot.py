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

    def changed(self, f: Fragment) -> torch.Tensor:
        """Which master elements of a fragment are not bit-identical to θ⁰ (NaN == NaN, -0.0 != 0.0 here)."""
        return _bits(self.shards.master(f)) != _bits(self.theta0(f))

    def delta(self, f: Fragment) -> torch.Tensor:
        """θ − θ⁰ on one fragment (a new tensor)."""
        return self.shards.master(f) - self.theta0(f)

    @torch.no_grad()
    def restore(self, saved: list[tuple[Fragment, torch.Tensor]]) -> None:
        """θ⁰ from a checkpoint, per fragment (whatever layout wrote it), after the masters were restored: the
        padding of both is zeroed again, as at setup."""
        for f, values in saved:
            self.theta0(f).copy_(values)
        self.shards.zero_padding(self.segments)
        self.shards.zero_padding()

    @torch.no_grad()
    def rewind(self) -> None:
        """Reset every master element, head included, to θ⁰ and refresh the working weights."""
        for master, saved in zip(self.shards.segments, self.segments):
            master.copy_(saved)
        self.shards.sync_working_weights()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The same bytes as integers, for bit-identity comparisons."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
