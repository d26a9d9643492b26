"""Atomic, verifiable, resumable checkpoints of an LT-SFT run: a checkpoint directory is complete or absent.

Layout under `<output_dir>/checkpoints/`:
    latest                      the tag of the newest complete checkpoint (replaced atomically; for people)
    <tag>/params/<name>.safetensors   one file per trained parameter, full shape, whatever the layout that wrote it:
                                θ⁰, the fp32 master weights, the optimizer's per-element state (AdamW exp_avg,
                                exp_avg_sq), the mask (bool, once selected) and phase 2's best values so far
    <tag>/rng_rank<R>.pt        rank R's RNG states: torch CPU, the accelerator's, numpy, python random
    <tag>/progress.json         round, phase and the next step; the parameters' names, shapes and roles; the
                                optimizer's scalar state (AdamW's step); the run statistics; input fingerprints
    <tag>/manifest.json         size and SHA-256 of every other file: written last, it marks the checkpoint complete
Frozen parameters never move and are not stored: a resume reads them from the base model, as the start did.
Nothing in it follows the rank shards, so a run resumes at another world size or ZeRO stage: a fresh engine is
built and every rank reads its own elements of each parameter (one parameter in memory at a time), then the working
weights are synced from the masters. Saving streams the same way: each parameter is gathered onto one rank
(round-robin), never the whole model. The mask is bit-identical across layouts by construction; what a layout
change alters is only the reduction order of later steps.
A checkpoint is written into `.<tag>.tmp` and renamed once every rank has finished writing. On resume, the newest
complete checkpoint whose files match their manifest is used; a damaged one (truncated, corrupted, a file missing)
is renamed `<tag>.damaged` and the previous one is used instead, which is said on stderr. Partial `.<tag>.tmp`
directories (a save that failed or was killed) are removed then.
Tensors are written from CPU copies and read onto the device of the rank's shard, so a checkpoint names no GPU
index. A different model or eligibility (a parameter's name, shape or role) is refused, naming the parameter.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ltsft_dist import comm
from ltsft_dist.devices import accelerator_rng_state, set_accelerator_rng_state
from ltsft_dist.errors import LtsftError
from ltsft_dist.files import write_text
from ltsft_dist.shards import Fragment, Shards

KEEP = 2  # complete checkpoints kept; older ones are deleted after a newer one is complete
MANIFEST = "manifest.json"
WRITE_ERRORS = (OSError, SafetensorError)  # safetensors reports its I/O errors (a full disk) as its own type
TAG = re.compile(r"round(\d+)-phase(\d+)-step(\d+)")


@dataclass(frozen=True)
class Progress:
    round: int = 1
    phase: str = "phase1"  # the phase that `step` belongs to
    step: int = 0  # the next step to run in that phase


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2))


def save(root: Path, progress: Progress, shards: Shards, parameters: dict[str, dict],
         elements: Callable[[Fragment], dict[str, torch.Tensor]], run: dict, inputs: dict | None = None) -> Path:
    """Collective: every rank calls it at the same step. `parameters`: {name: {"shape", "role"}} of every model
    parameter in canonical order; `elements(f)`: this rank's flat tensors of fragment f by kind (θ⁰, master, ...);
    `run`: JSON-able run state (statistics, optimizer scalars). `inputs`: fingerprints of input files that a
    resume must find unchanged (e.g. the language SFTs swapped in). A failed write (a full disk) leaves the
    previous checkpoint as it was and raises `LtsftError` naming the directory."""
    rank, world_size = shards.rank, shards.world_size
    tag = f"round{progress.round}-{progress.phase}-step{progress.step:07d}"
    tmp = root / f".{tag}.tmp"
    with _writing(tmp, root):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "params").mkdir(parents=True)
    comm.barrier()
    failure = None
    try:
        _write_parameters(tmp / "params", shards, parameters, elements)
        torch.save(_rng_states(), tmp / f"rng_rank{rank}.pt")
    except WRITE_ERRORS as err:
        failure = err
    # Agreed before anyone removes the partial checkpoint: another rank may still be writing into it.
    failures = [f for f in comm.all_gather_object(failure and f"rank {rank}: {failure}") if f]
    if failures:
        with _writing(tmp, root):
            raise OSError("; ".join(failures)) from failure
    files = comm.broadcast_object(_listing(tmp) if rank == 0 else None)
    digests = {}
    for part in comm.all_gather_object({f: _digest(tmp / f) for f in files[rank::world_size]}):
        digests.update(part)
    if rank == 0:
        with _writing(tmp, root):
            info = {**asdict(progress), "world_size": world_size, "zero_stage": shards.stage, "inputs": inputs or {},
                    "parameters": parameters, "run": run}
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


def _write_parameters(directory: Path, shards: Shards, parameters: dict[str, dict],
                      elements: Callable[[Fragment], dict[str, torch.Tensor]]) -> None:
    """Parameter i is assembled on rank i mod W from every rank's fragments of it, one parameter at a time (so the
    writes are spread over the ranks and no rank holds more than one full parameter). A failed write is raised
    after the loop: every rank takes part in every gather."""
    failure = None
    mine: dict[str, list[Fragment]] = {}
    for f in shards.fragments:
        mine.setdefault(f.name, []).append(f)
    for index, (name, info) in enumerate(parameters.items()):
        if info["role"] == "frozen":  # not trained, not in any shard: it stays as the base model has it
            continue
        writer = index % shards.world_size
        pieces = [(f.param_offset, {kind: t.detach().cpu() for kind, t in elements(f).items()})
                  for f in mine.get(name, [])]
        gathered = shards.gather_object_to(pieces, writer)
        if gathered is None:
            continue
        shape = torch.Size(info["shape"])
        full: dict[str, torch.Tensor] = {}
        covered = 0
        for offset, kinds in (piece for rank_pieces in gathered for piece in rank_pieces):
            for kind, values in kinds.items():
                flat = full.setdefault(kind, torch.zeros(shape.numel(), dtype=values.dtype))
                flat[offset:offset + values.numel()] = values
            covered += next(iter(kinds.values())).numel() if kinds else 0
        if covered != shape.numel():
            raise LtsftError(f"checkpoint: the ranks hold {covered} elements of {name}, which has {shape.numel()} "
                             "(an internal error: report it with the DeepSpeed config)")
        try:
            save_file({kind: flat.view(shape) for kind, flat in full.items()}, str(directory / f"{name}.safetensors"))
        except WRITE_ERRORS as err:
            failure = failure or err
    if failure is not None:
        raise failure


def _rng_states() -> dict:
    """Every random number generator this rank draws from, as plain tensors and numbers (loadable weights-only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "accelerator": accelerator_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "words": list(words), "gauss_next": gauss_next}}


def _set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    set_accelerator_rng_state(state["accelerator"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["words"]), p["gauss_next"]))


class _writing:
    """Turns an I/O error while writing `tmp` (ENOSPC, EDQUOT, EIO) into an `LtsftError` naming the directory, after
    trying to remove the partial checkpoint (`resumable` removes what is left). `latest` and the complete
    checkpoints are untouched."""

    def __init__(self, tmp: Path, root: Path):
        self.tmp, self.root = tmp, root

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if not isinstance(err, WRITE_ERRORS):
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


def check_inputs(written: Path | str, saved: dict[str, str], now: dict[str, str]) -> None:
    """Refuse to resume from `written` when an input file (by name -> fingerprint) changed since it was written:
    resuming would silently change the run."""
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise LtsftError(
            f"{', '.join(changed)} changed since {written} was written (fingerprint "
            f"{saved.get(changed[0], 'none')[:12]} then, {now.get(changed[0], 'none')[:12]} now): resuming would "
            "mix two runs. Put the original file(s) back, or start over in a new output_dir")


def load(directory: Path, shards: Shards, parameters: dict[str, dict], inputs: dict | None = None
         ) -> tuple[Progress, dict, Callable[[Fragment], dict[str, torch.Tensor]]]:
    """Collective. Restores this rank's RNG states (a rank the saving job did not have keeps its own) and returns
    the progress, the run state given to `save`, and `elements(f)`: the saved flat tensors of my fragment f by kind,
    on my shard's device. `parameters` must match what `save` recorded (same model, same eligibility) and `inputs`
    too: an input file changed since would silently change the run."""
    info = json.loads((directory / "progress.json").read_text())
    _check_parameters(directory, info["parameters"], parameters)
    check_inputs(directory, info.get("inputs", {}), inputs or {})
    rng = directory / f"rng_rank{shards.rank}.pt"
    if rng.is_file():
        _set_rng_states(torch.load(rng, weights_only=True))
    progress = Progress(info["round"], info["phase"], info["step"])
    return progress, info["run"], _Reader(directory / "params", shards.device)


def _check_parameters(directory: Path, saved: dict[str, dict], now: dict[str, dict]) -> None:
    """The checkpoint must describe this model and eligibility; the first difference is named."""
    fix = ("resume with the base model and eligibility that wrote it, or start over in a new output_dir (or set "
           "resume: false)")
    for name in list(now) + [n for n in saved if n not in now]:
        if name not in saved:
            raise LtsftError(f"{directory} has no parameter {name}, which this model has: it was written for "
                             f"another model; {fix}")
        if name not in now:
            raise LtsftError(f"{directory} holds parameter {name}, which this model lacks: it was written for "
                             f"another model; {fix}")
        for key in ("shape", "role"):
            if saved[name][key] != now[name][key]:
                raise LtsftError(f"{directory}: parameter {name} has {key} {saved[name][key]} there but "
                                 f"{now[name][key]} in this run; {fix}")


class _Reader:
    """A rank's fragments of the saved parameters, read one parameter file at a time (the last one is kept, as
    a rank's fragments of one parameter come together)."""

    def __init__(self, directory: Path, device: torch.device):
        self.directory, self.device = directory, device
        self._name, self._tensors = None, {}

    def __call__(self, f: Fragment) -> dict[str, torch.Tensor]:
        if f.name != self._name:
            with safe_open(str(self.directory / f"{f.name}.safetensors"), framework="pt", device="cpu") as file:
                self._tensors = {kind: file.get_tensor(kind).view(-1) for kind in file.keys()}
            self._name = f.name
        return {kind: t.narrow(0, f.param_offset, f.numel).to(self.device) for kind, t in self._tensors.items()}
