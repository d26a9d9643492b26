"""Atomic, resumable checkpoints of an LT-SFT run: a checkpoint directory is complete or absent.

Layout under `<output_dir>/checkpoints/`:
    latest                      the tag of the newest complete checkpoint (replaced atomically)
    <tag>/engine/...            DeepSpeed's own engine state (weights, fp32 master shards, optimizer state)
    <tag>/ltsft_rank<R>.pt      rank R's θ⁰ shard, mask shard and RNG state
    <tag>/progress.json         round, phase and the next step, world size and ZeRO stage
A checkpoint is written into `.<tag>.tmp` and renamed once every rank has finished writing. Rank states are written
from CPU copies and loaded onto the device of the rank's shard, so a checkpoint names no GPU index.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ltsft_dist import comm
from ltsft_dist.devices import move
from ltsft_dist.errors import LtsftError

KEEP = 2  # complete checkpoints kept; older ones are deleted after a newer one is complete


@dataclass(frozen=True)
class Progress:
    round: int = 1
    phase: str = "phase1"  # the phase that `step` belongs to
    step: int = 0  # the next step to run in that phase


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def save(root: Path, progress: Progress, engine, rank: int, world_size: int, stage: int, rank_state: dict) -> Path:
    """Collective: every rank calls it at the same step."""
    tag = f"round{progress.round}-{progress.phase}-step{progress.step:07d}"
    tmp = root / f".{tag}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    comm.barrier()
    engine.save_checkpoint(str(tmp), tag="engine")
    mine = tmp / f"ltsft_rank{rank}.pt"
    torch.save(move({**rank_state, "rng": torch.get_rng_state()}, "cpu"), mine.with_suffix(".tmp"))
    os.replace(mine.with_suffix(".tmp"), mine)
    comm.barrier()
    if rank == 0:
        _write_json(tmp / "progress.json", {**asdict(progress), "world_size": world_size, "zero_stage": stage})
        final = root / tag
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (root / "latest.tmp").write_text(tag)
        os.replace(root / "latest.tmp", root / "latest")
        complete = sorted((p for p in root.iterdir() if p.is_dir() and (p / "progress.json").is_file()),
                          key=lambda p: p.stat().st_mtime)
        for old in complete[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return root / tag


def latest(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    directory = root / pointer.read_text().strip()
    if not (directory / "progress.json").is_file():
        raise LtsftError(f"{pointer} names {directory.name}, which is incomplete or missing: delete {pointer} to "
                         "start over, or point it at a complete checkpoint directory")
    return directory


def load(directory: Path, engine, rank: int, world_size: int, stage: int,
         device: torch.device | str = "cpu") -> tuple[Progress, dict]:
    """Collective. Restores the engine and this rank's RNG; returns the progress and this rank's own state, its
    tensors on `device` (that of my shard)."""
    info = json.loads((directory / "progress.json").read_text())
    if info["world_size"] != world_size or info["zero_stage"] != stage:
        raise LtsftError(
            f"{directory} was written by {info['world_size']} ranks with ZeRO stage {info['zero_stage']}, but this "
            f"job has {world_size} ranks with stage {stage}: θ⁰ and mask shards follow that layout. Resume with "
            f"{info['world_size']} ranks and the same DeepSpeed config, or start over in a new output_dir")
    engine.load_checkpoint(str(directory), tag="engine")
    state = torch.load(directory / f"ltsft_rank{rank}.pt", weights_only=True, map_location="cpu")
    torch.set_rng_state(state.pop("rng"))
    progress = Progress(info["round"], info["phase"], info["step"])
    return progress, move(state, device)

