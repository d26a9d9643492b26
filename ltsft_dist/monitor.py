"""Training metrics: TensorBoard scalars and a one-line `key=value` log, written by rank 0 only.

Every rank makes the same calls (so the recipe needs no rank checks around them); a `Monitor` without a log
directory (ranks other than 0, or runs without logging) writes nothing. Reducing values over ranks is the
caller's job: this module only counts on this rank's shard, formats and writes.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from ltsft_dist.sft import SparseFineTuning, density_tables


class Monitor:
    def __init__(self, log_dir: Path | str | None, print_lines: bool = True):
        """`log_dir`: TensorBoard event files go there (None: no TensorBoard); `print_lines`: print `line()`s."""
        self.writer = None
        self.print_lines = print_lines
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def line(self, event: str, **fields) -> None:
        """One structured log line, e.g. `ltsft step phase=phase2 step=40 loss=2.3170 ...` (tqdm-safe)."""
        if not self.print_lines:
            return
        from tqdm import tqdm

        parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()]
        tqdm.write(" ".join(["ltsft", event, *parts]), file=sys.stdout)
        sys.stdout.flush()  # seen at once in a batch job's log, whose stdout is not a terminal

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def peak_memory_mb() -> float:
    """This process's peak memory: the accelerator's peak allocation when there is one, else the peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _device_of(selected: list[torch.Tensor]) -> torch.device:
    """The device of my mask (that of my shard), where the counts below are made; the CPU without fragments."""
    return selected[0].device if selected else torch.device("cpu")


def selected_per_parameter(fragments, selected: list[torch.Tensor], names: list[str]) -> torch.Tensor:
    """Selected elements per parameter of `names` in my fragments (sum over ranks for the global counts)."""
    position = {name: i for i, name in enumerate(names)}
    counts = torch.zeros(len(names), dtype=torch.float64, device=_device_of(selected))
    for f, sel in zip(fragments, selected):
        counts[position[f.name]] += sel.sum()
    return counts


def mask_overlap(fragments, selected: list[torch.Tensor], sfts: Mapping[str, SparseFineTuning]) -> torch.Tensor:
    """Per language SFT (in `sfts` order), how many of its positions my fragments' mask also selects.
    Sum over ranks for the global count. O(K_L) per language: its sorted indices are cut to each fragment."""
    counts = torch.zeros(len(sfts), dtype=torch.float64, device=_device_of(selected))
    for j, sft in enumerate(sfts.values()):
        for f, sel in zip(fragments, selected):
            diff = sft.diffs.get(f.name)
            if diff is None:
                continue
            indices = diff[0]
            lo = int(torch.searchsorted(indices, f.param_offset))
            hi = int(torch.searchsorted(indices, f.param_offset + f.numel))
            if lo < hi:
                counts[j] += sel[(indices[lo:hi] - f.param_offset).to(sel.device)].sum()
    return counts


def density_scalars(counts: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, float]:
    """TensorBoard tags `mask/type/<module type>` and `mask/layer/<n>`: the selected fraction of each."""
    tables = density_tables(dict(counts), dict(shapes))
    return {**{f"mask/type/{k}": v["density"] for k, v in tables["module_types"].items()},
            **{f"mask/layer/{k}": v["density"] for k, v in tables["layers"].items()}}
