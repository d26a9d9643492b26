"""Comparing two SFTs of the same config trained on different devices (the GPU tier's yardstick)."""

from __future__ import annotations

import torch


def positions(sft) -> set[tuple[str, int]]:
    return {(name, int(i)) for name, (idx, _) in sft.diffs.items() for i in idx}


def compare_sfts(reference, other, rtol: float, atol: float) -> dict:
    """The two masks' agreement (`same_mask`, `overlap` = |A∩B| / |A∪B|) and, on the common positions and the dense
    heads, how far φ differs (`phi_max_abs`) and how many values lie outside `atol + rtol·|reference|`."""
    a, b = positions(reference), positions(other)
    report = {"same_mask": a == b, "overlap": len(a & b) / max(1, len(a | b)), "only_reference": len(a - b),
              "only_other": len(b - a), "phi_max_abs": 0.0, "phi_outside_tolerance": 0}
    pairs = []
    for name, (idx, values) in reference.diffs.items():
        if name not in other.diffs:
            continue
        theirs = dict(zip(other.diffs[name][0].tolist(), other.diffs[name][1].float().tolist()))
        common = [(v, theirs[i]) for i, v in zip(idx.tolist(), values.float().tolist()) if i in theirs]
        pairs += common
    for name, head in reference.heads.items():
        if name in other.heads:
            pairs += list(zip(head.float().reshape(-1).tolist(), other.heads[name].float().reshape(-1).tolist()))
    if pairs:
        ref, oth = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
        report["phi_max_abs"] = float((ref - oth).abs().max())
        report["phi_outside_tolerance"] = int(((ref - oth).abs() > atol + rtol * ref.abs()).sum())
    return report
