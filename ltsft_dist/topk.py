"""Exact global top-K over sharded scores, with communication independent of N.

Non-negative float32 values order like their int32 bit patterns, so the K-th largest score is found
by a two-pass radix select (high 16 bits, then low 16 bits) on all-reduced 65,536-bin histograms.
Ties at the threshold are broken by the canonical (parameter index, flat offset) order: ranks exchange
only a (fragment key, tie count) table. The mask is therefore the same for every world size and ZeRO
stage, and it holds exactly K elements. The histograms are built, and all-reduced, on the device of the scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ltsft_dist.errors import LtsftError

BINS = 1 << 16
CHUNK = 1 << 22  # elements per bincount: bounds the temporary memory to O(CHUNK), not O(partition)


@dataclass
class Selection:
    masks: list[torch.Tensor]  # one bool tensor per input fragment
    threshold: float  # the K-th largest score
    ties_at_threshold: int  # how many elements equal the threshold over all ranks
    ties_taken: int


def _histogram(scores: list[torch.Tensor], digit: Callable[[torch.Tensor], torch.Tensor],
               keep: Callable[[torch.Tensor], torch.Tensor] | None, device: torch.device) -> torch.Tensor:
    hist = torch.zeros(BINS, dtype=torch.int64, device=device)
    for s in scores:
        for chunk in torch.split(s.view(torch.int32), CHUNK):
            if keep is not None:
                chunk = chunk[keep(chunk)]
            hist += torch.bincount(digit(chunk).long(), minlength=BINS)
    return hist


def _pick_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element, and how many elements lie in higher bins."""
    above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # above[b] = count in bins >= b
    b = int(torch.nonzero(above >= k).max())
    higher = int(above[b + 1]) if b + 1 < BINS else 0
    return b, higher


def select_topk(scores: list[torch.Tensor], keys: list[tuple[int, int]], k: int,
                all_reduce: Callable[[torch.Tensor], torch.Tensor],
                all_gather_object: Callable[[object], list]) -> Selection:
    """Select the k largest of all ranks' `scores` (non-negative float32, one tensor per fragment).

    `keys[i]` is the canonical (parameter index, offset) of `scores[i]`'s first element.
    `all_reduce` sums a tensor over ranks; `all_gather_object` gathers a picklable object from every rank.
    Everything that meets the scores is made on their device (a rank without scores: the CPU).
    """
    device = scores[0].device if scores else torch.device("cpu")
    total = all_reduce(torch.tensor([sum(s.numel() for s in scores)], dtype=torch.int64, device=device)).item()
    if not 0 < k <= total:
        raise LtsftError(f"K={k} must lie in 1..{total} (the number of eligible parameters)")
    for s in scores:
        if s.dtype != torch.float32:
            raise TypeError("scores must be float32")
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise LtsftError("selection scores must be finite and non-negative: the run diverged (NaN/Inf weights)")

    hist_hi = all_reduce(_histogram(scores, lambda c: c >> 16, None, device))
    hi, higher = _pick_bin(hist_hi, k)
    hist_lo = all_reduce(_histogram(scores, lambda c: c & 0xFFFF, lambda c: (c >> 16) == hi, device))
    lo, higher_lo = _pick_bin(hist_lo, k - higher)
    threshold_bits = (hi << 16) | lo
    above = higher + higher_lo
    needed = k - above
    ties_total = int(hist_lo[lo])

    # Canonical tie-break: the first `needed` tied elements in (parameter, offset) order win.
    local_ties = [(key, int(torch.count_nonzero(s.view(torch.int32) == threshold_bits)))
                  for key, s in zip(keys, scores)]
    table = sorted(t for rank_table in all_gather_object(local_ties) for t in rank_table)
    allotted, remaining = {}, needed
    for key, count in table:
        take = min(count, remaining)
        allotted[key] = take
        remaining -= take

    masks = []
    for key, s in zip(keys, scores):
        bits = s.view(torch.int32)
        mask = bits > threshold_bits
        take = allotted.get(key, 0)
        if take:
            tied = torch.nonzero(bits == threshold_bits).view(-1)[:take]
            mask[tied] = True
        masks.append(mask)
    threshold = torch.tensor([threshold_bits], dtype=torch.int32).view(torch.float32).item()
    return Selection(masks, threshold, ties_total, needed)


def random_scores(keys: list[tuple[int, int]], numels: list[int], seed: int,
                  device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Seeded pseudo-random scores that depend only on (parameter, offset): RAND-SFT masks are then
    identical for every world size, stage and device. A splitmix64-style integer hash, 24 bits kept."""
    out = []
    for (param_index, offset), n in zip(keys, numels):
        x = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
        x = x + (param_index + 1) * 0x9E3779B97F4A7C15 % (1 << 62) + seed * 0xBF58476D1CE4E5B9 % (1 << 62)
        for mult, shift in ((0xBF58476D1CE4E5B9 % (1 << 62), 30), (0x94D049BB133111EB % (1 << 62), 27)):
            x = (x ^ (x >> shift)) * mult
        x = x ^ (x >> 31)
        out.append(((x >> 8) & 0xFFFFFF).to(torch.float32))
    return out
