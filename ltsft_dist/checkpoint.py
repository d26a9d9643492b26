"""Atomic, verifiable, resumable checkpoints of an LT-SFT run: a checkpoint directory is complete or absent.

Layout under `<output_dir>/checkpoints/`:
    latest                      the tag of the newest complete checkpoint (replaced atomically; for people)
    <tag>/engine/...            DeepSpeed's own engine state (weights, fp32 master shards, optimizer state)
    <tag>/ltsft_rank<R>.pt      rank R's θ⁰ shard, mask shard and RNG state
    <tag>/progress.json         round, phase and the next step, world size, ZeRO stage, input fingerprints
    <tag>/manifest.json         size and SHA-256 of every other file: written last, it marks the checkpoint complete
A checkpoint is written into `.<tag>.tmp` and renamed once every rank has finished writing. On resume, the newest
complete checkpoint whose files match their manifest is used; a damaged one (truncated, corrupted, a file missing)
is renamed `<tag>.damaged` and the previous one is used instead, which is said on stderr. Partial `.<tag>.tmp`
directories (a save that failed or was killed) are removed then.
Rank states are written from CPU copies and loaded onto the device of the rank's shard, so a checkpoint names
no GPU index.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ltsft_dist import comm
from ltsft_dist.devices import move
from ltsft_dist.errors import LtsftError
from ltsft_dist.files import write_text

KEEP = 2  # complete checkpoints kept; older ones are deleted after a newer one is complete
MANIFEST = "manifest.json"
TAG = re.compile(r"round(\d+)-phase(\d+)-step(\d+)")


@dataclass(frozen=True)
class Progress:
    round: int = 1
    phase: str = "phase1"  # the phase that `step` belongs to
    step: int = 0  # the next step to run in that phase


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2))


def save(root: Path, progress: Progress, engine, rank: int, world_size: int, stage: int, rank_state: dict,
         inputs: dict | None = None) -> Path:
    """Collective: every rank calls it at the same step. `inputs`: fingerprints of input files that a resume must
    find unchanged (e.g. the language SFTs swapped in). A failed write (a full disk) leaves the previous
    checkpoint as it was and raises `LtsftError` naming the directory."""
    tag = f"round{progress.round}-{progress.phase}-step{progress.step:07d}"
    tmp = root / f".{tag}.tmp"
    with _writing(tmp, root):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    comm.barrier()
    with _writing(tmp, root):
        engine.save_checkpoint(str(tmp), tag="engine")
        mine = tmp / f"ltsft_rank{rank}.pt"
        torch.save(move({**rank_state, "rng": torch.get_rng_state()}, "cpu"), mine.with_suffix(".tmp"))
        os.replace(mine.with_suffix(".tmp"), mine)
    comm.barrier()
    files = comm.broadcast_object(_listing(tmp) if rank == 0 else None)
    digests = {}
    for part in comm.all_gather_object({f: _digest(tmp / f) for f in files[rank::world_size]}):
        digests.update(part)
    if rank == 0:
        with _writing(tmp, root):
            info = {**asdict(progress), "world_size": world_size, "zero_stage": stage, "inputs": inputs or {}}
            _write_json(tmp / "progress.json", info)
            digests["progress.json"] = _digest(tmp / "progress.json")
            _write_json(tmp / MANIFEST, {"files": dict(sorted(digests.items()))})
            final = root / tag
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            write_text(root / "latest", tag)
        for old in _complete(root)[KEEP:]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return root / tag


class _writing:
    """Turns an OSError while writing `tmp` (ENOSPC, EDQUOT, EIO) into an `LtsftError` naming the directory, after
    trying to remove the partial checkpoint (other ranks may still be writing into it: `resumable` removes what is
    left). `latest` and the complete checkpoints are untouched."""

    def __init__(self, tmp: Path, root: Path):
        self.tmp, self.root = tmp, root

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if not isinstance(err, OSError):
            return False
        shutil.rmtree(self.tmp, ignore_errors=True)
        previous = latest(self.root)
        raise LtsftError(
            f"could not write checkpoint {self.tmp}: {err}. The previous checkpoint "
            f"({previous if previous is not None else 'none yet'}) is intact. Free space in {self.root} (or set "
            "output_dir to a larger file system) and run the same command again to resume") from err


def latest(root: Path) -> Path | None:
    """The checkpoint the `latest` pointer names, unverified (for messages); None if there is none."""
    pointer = root / "latest"
    return root / pointer.read_text().strip() if pointer.is_file() else None


def resumable(root: Path, rank: int, world_size: int) -> Path | None:
    """Collective. The newest complete checkpoint under `root` whose files match their manifest; None if there
    is no complete checkpoint. Damaged ones are renamed `<tag>.damaged` (kept for inspection) and said so on
    stderr; if every complete checkpoint is damaged, raises `LtsftError`."""
    if rank == 0:  # partial checkpoints of a save that failed or was killed
        for partial in root.glob(".*.tmp") if root.is_dir() else ():
            shutil.rmtree(partial, ignore_errors=True)
    candidates = comm.broadcast_object(_complete(root) if rank == 0 else None)
    damaged = []
    for directory in candidates:
        problems = [p for part in comm.all_gather_object(_verify(directory, rank, world_size)) for p in part]
        if not problems:
            return directory
        damaged.append(f"{directory.name} ({'; '.join(problems[:3])})")
        if rank == 0:
            aside = directory.with_name(directory.name + ".damaged")
            shutil.rmtree(aside, ignore_errors=True)
            directory.rename(aside)
            following = "falling back to the previous complete checkpoint" if directory != candidates[-1] else ""
            print(f"ltsft: checkpoint {directory} is damaged: {'; '.join(problems[:3])}; renamed it to "
                  f"{directory.name}.damaged{'; ' + following if following else ''}", file=sys.stderr, flush=True)
    if damaged:
        raise LtsftError(f"no intact checkpoint left in {root}: {', '.join(damaged)} failed their manifest "
                         f"checksums. Set resume: false (or a new output_dir) to start over")
    pointer = latest(root)
    if pointer is not None:
        raise LtsftError(f"{root / 'latest'} names {pointer.name}, but {root} holds no complete checkpoint (a "
                         f"directory with {MANIFEST}): set resume: false (or a new output_dir) to start over")
    return None


def _complete(root: Path) -> list[Path]:
    """Complete checkpoints (those with a manifest), newest first by (round, phase, step)."""
    if not root.is_dir():
        return []
    found = [(tuple(map(int, m.groups())), p) for p in root.iterdir()
             if (m := TAG.fullmatch(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found, reverse=True)]


def _verify(directory: Path, rank: int, world_size: int) -> list[str]:
    """This rank's share of the manifest check: what is wrong with every world_size-th file."""
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        return [f"{MANIFEST} unreadable: {err}"] if rank == 0 else []
    problems = []
    for name in sorted(files)[rank::world_size]:
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        want = files[name]
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{name} has {size} bytes, the manifest says {want['size']} (truncated?)")
        elif _digest(path)["sha256"] != want["sha256"]:
            problems.append(f"{name} does not match its SHA-256 (corrupted)")
    return problems


def _listing(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def _digest(path: Path) -> dict:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def load(directory: Path, engine, rank: int, world_size: int, stage: int, inputs: dict | None = None,
         device: torch.device | str = "cpu") -> tuple[Progress, dict]:
    """Collective. Restores the engine and this rank's RNG; returns the progress and this rank's own state, its
    tensors on `device` (that of my shard). `inputs` must equal what `save` recorded: an input file changed since
    would silently change the run."""
    info = json.loads((directory / "progress.json").read_text())
    if info["world_size"] != world_size or info["zero_stage"] != stage:
        raise LtsftError(
            f"{directory} was written by {info['world_size']} ranks with ZeRO stage {info['zero_stage']}, but this "
            f"job has {world_size} ranks with stage {stage}: θ⁰ and mask shards follow that layout. Resume with "
            f"{info['world_size']} ranks and the same DeepSpeed config, or start over in a new output_dir")
    saved, now = info.get("inputs", {}), inputs or {}
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise LtsftError(
            f"{', '.join(changed)} changed since {directory} was written (fingerprint "
            f"{saved.get(changed[0], 'none')[:12]} then, {now.get(changed[0], 'none')[:12]} now): resuming would "
            "mix two runs. Put the original file(s) back, or start over in a new output_dir")
    engine.load_checkpoint(str(directory), tag="engine")
    state = torch.load(directory / f"ltsft_rank{rank}.pt", weights_only=True, map_location="cpu")
    torch.set_rng_state(state.pop("rng"))
    progress = Progress(info["round"], info["phase"], info["step"])
    return progress, move(state, device)

