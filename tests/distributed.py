"""Run a function on W local ranks (spawned processes, gloo) and collect what each returns: the benchmarks'
launcher (bench/_launch.py), with every rank joining through `ltsft_dist.engine.init_distributed` as real ranks do.

One launch should run many scenarios: importing DeepSpeed costs seconds per process.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _launch import run_ranks as _run_ranks  # noqa: E402


def run_ranks(fn, world_size: int, *args, timeout: float = 900) -> list:
    """`fn(*args)` on every rank; returns the results ordered by rank, or raises AssertionError with the first
    failing rank's traceback."""
    try:
        return _run_ranks(fn, world_size, *args, deepspeed=True, timeout=timeout)
    except RuntimeError as err:
        raise AssertionError(str(err)) from None
