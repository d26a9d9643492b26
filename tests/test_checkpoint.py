"""Preemption-safe resume: stopping (on one rank's request) and resuming gives the same φ, bit for bit."""

from __future__ import annotations

import functools

import pytest
import torch

from distributed import run_ranks
from scenarios import classification_examples, run_cases, run_interrupted, task_config

STOPS = [(2, False), (3, True)]  # stop in phase 1 before step 3, then in phase 2 before step 4


def _resume_runs(configs: dict, world_size: int) -> dict:
    return {name: (run_interrupted(cfg, classification_examples(), world_size, STOPS), cfg.output_dir)
            for name, cfg in configs.items()}


def launch_resumed():
    # Configs are made here, once: every rank must see the same output_dir (a shared file system).
    configs = {f"z{s}": task_config(f"zero{s}.json", checkpoint_every=4) for s in (2, 3)}
    return run_ranks(_resume_runs, 2, configs, 2)[0]


@pytest.fixture(scope="session")
def resumed(launches):
    return functools.partial(launches, launch_resumed)


def launch_uninterrupted():
    cases = [(f"z{s}", task_config(f"zero{s}.json"), classification_examples(), 1) for s in (2, 3)]
    return run_ranks(run_cases, 2, cases, 2)[0]


@pytest.fixture(scope="session")
def uninterrupted(launches):
    return functools.partial(launches, launch_uninterrupted)


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_is_bit_identical(stage, resumed, uninterrupted):
    got, _ = resumed()[f"z{stage}"]
    assert got["stopped_at"] == ["round1-phase1-step0000003", "round1-phase2-step0000004"]
    want = uninterrupted()[f"z{stage}"]
    assert got["diffs"].keys() == want["diffs"].keys()
    for name, (idx, values) in want["diffs"].items():
        assert torch.equal(got["diffs"][name][0], idx)
        assert torch.equal(got["diffs"][name][1], values), name
    for name, value in want["heads"].items():
        assert torch.equal(got["heads"][name], value)


def _resume_elsewhere(output_dir: str) -> str:
    from ltsft_dist.errors import LtsftError

    cfg = task_config("zero2.json")
    cfg.output_dir = output_dir
    try:
        run_cases([("again", cfg, classification_examples(), 1)], 1)
    except LtsftError as err:
        return str(err)
    return "no error"


def test_resume_at_another_world_size_fails_clearly(resumed):
    _, output_dir = resumed()["z2"]
    message = run_ranks(_resume_elsewhere, 1, output_dir)[0]
    assert "written by 2 ranks with ZeRO stage 2, but this job has 1 ranks" in message
    assert "Resume with 2 ranks" in message


def test_checkpoints_are_complete_and_pruned(resumed):
    from pathlib import Path

    _, output_dir = resumed()["z3"]
    root = Path(output_dir) / "checkpoints"
    complete = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert not [p for p in complete if p.endswith(".tmp")]
    assert len(complete) <= 2 and (root / "latest").read_text() in complete
    latest = root / (root / "latest").read_text()
    assert (latest / "progress.json").is_file() and (latest / "ltsft_rank0.pt").is_file()
    assert (latest / "ltsft_rank1.pt").is_file() and (latest / "engine").is_dir()
