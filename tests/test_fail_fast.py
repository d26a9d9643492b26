"""A rank that raises in a 2-rank `ltsft train` (under launch/local.sh, the DeepSpeed launcher, and
launch/mpirun.sh): the whole job exits non-zero within seconds, not after the collective timeout, and stderr names
the rank and the error. The failure is injected by a sitecustomize module on the job's PYTHONPATH that patches the
recipe's step in rank 1 only; the product code is unchanged.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multirank]
REPO = Path(__file__).resolve().parents[1]

FAIL_ON_RANK_1 = textwrap.dedent("""
    # Loaded at start-up by every python of the test's job (PYTHONPATH): rank 1 fails in phase-2 step 2.
    import os

    if os.environ.get("RANK", os.environ.get("PMI_RANK")) == "1":  # deepspeed launcher | mpiexec
        from ltsft_dist import recipe

        real_train_step = recipe.LTSFTRecipe.train_step

        def failing_train_step(self, step, mask, l1):
            if mask is not None and step == 1:
                raise RuntimeError("injected failure for the test")
            return real_train_step(self, step, mask, l1)

        recipe.LTSFTRecipe.train_step = failing_train_step
""")


def injected_job(tmp_path: Path, launcher: str, injection: str, steps: int) -> tuple[Path, dict]:
    """A tiny run's config and the environment of a 2-rank job whose pythons load `injection` at start-up."""
    from slurm_cluster import write_tiny_run
    from conftest import mpiexec_available

    if launcher == "mpirun.sh" and not mpiexec_available():
        pytest.skip(f"no mpiexec in {sys.prefix}/bin or on PATH: pip install mpich")
    config = write_tiny_run(tmp_path / "run", steps=steps)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(injection)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(VENV=sys.prefix, OMP_NUM_THREADS="1", LTSFT_DIST_TIMEOUT_S="900",
               PYTHONPATH=os.pathsep.join([str(inject), str(REPO), env.get("PYTHONPATH", "")]))
    return config, env


@pytest.mark.parametrize("launcher", ["local.sh", "mpirun.sh"])
def test_a_failing_rank_ends_the_whole_job_at_once(tmp_path, launcher):
    """Rank 0 is waiting in a collective of the step when rank 1 fails: it must not wait for the collective
    timeout (set to 900 s here); the job ends long before with the failing rank's error on stderr. (Under
    mpiexec, rank 1 used to hang in mpi4py's exit-time MPI_Finalize, which waits for rank 0.)"""
    config, env = injected_job(tmp_path, launcher, FAIL_ON_RANK_1, steps=6)
    # Bounded, not fast: however busy the machine, the job must end well before the collective timeout (900 s).
    res = subprocess.run(["bash", str(REPO / "launch" / launcher), "2", str(config), "--set", "log_every=1"],
                         capture_output=True, text=True, timeout=450, env=env)
    assert res.returncode != 0
    assert "ltsft train: rank 1/2: error:" in res.stderr and "RuntimeError: injected failure" in res.stderr, \
        res.stderr[-3000:]
    # The run got as far as phase 2 (the one-line log of rank 0), then ended long before any timeout.
    assert "ltsft step phase=phase2 step=1 " in res.stdout, res.stdout[-3000:]


KILL_RANK_1 = textwrap.dedent("""
    # Loaded at start-up by every python of the test's job (PYTHONPATH): with LTSFT_TEST_KILL_AT=S set, rank 1
    # kills itself (SIGKILL: no handler, no message, no cleanup) at the start of phase-2 step index S.
    import os
    import signal

    rank = os.environ.get("RANK", os.environ.get("PMI_RANK", os.environ.get("SLURM_PROCID")))
    if rank == "1" and os.environ.get("LTSFT_TEST_KILL_AT"):
        from ltsft_dist import recipe

        real_train_step = recipe.LTSFTRecipe.train_step

        def killed_train_step(self, step, mask, l1):
            if mask is not None and step == int(os.environ["LTSFT_TEST_KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_train_step(self, step, mask, l1)

        recipe.LTSFTRecipe.train_step = killed_train_step
""")


def _mpich_segments_left(since: float) -> list[str]:
    """MPICH shared-memory files created since `since` that no process maps any more."""
    maps = ""
    for m in Path("/proc").glob("[0-9]*/maps"):
        try:
            maps += m.read_text()
        except OSError:
            pass
    return [str(f) for f in Path("/dev/shm").glob("mpich_shm_*") if f.stat().st_mtime >= since and str(f) not in maps]


def assert_names_the_killed_rank(output: str, launcher: str) -> None:
    """The job's output says which rank ended. Under the deepspeed launcher, which polls its ranks once a second,
    rank 0 (waiting for rank 1 in a collective) names it. MPICH's mpiexec kills every other rank the moment one
    dies, usually before rank 0 has said anything, and reports one of the ranks it killed by PID: whichever it
    names, the PID must be one of the job's ranks."""
    pids = re.search(r"ltsft: process ids by rank: 0=(\d+) 1=(\d+)", output)
    assert pids, output[-3000:]
    named_by_rank_0 = f"rank 1 (pid {pids.group(2)})" in output and "ended while this rank was waiting for it" in output
    if launcher == "mpirun.sh":
        reported = re.search(r"BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES\s*=\s*PID (\d+) RUNNING AT", output)
        assert named_by_rank_0 or (reported and reported.group(1) in pids.groups()), output[-3000:]
    else:
        assert named_by_rank_0, output[-3000:]


def assert_same_sft(got_dir: Path, want_dir: Path) -> None:
    import torch

    from ltsft_dist.sft import SparseFineTuning

    got, want = SparseFineTuning.from_pretrained(got_dir), SparseFineTuning.from_pretrained(want_dir)
    assert got.nnz == want.nnz > 0 and set(got.diffs) == set(want.diffs) and set(got.heads) == set(want.heads)
    for name, (idx, values) in want.diffs.items():
        assert torch.equal(got.diffs[name][0], idx) and torch.equal(got.diffs[name][1], values), name
    for name, values in want.heads.items():
        assert torch.equal(got.heads[name], values), name


@pytest.mark.parametrize("launcher", ["local.sh", "mpirun.sh"])
def test_a_rank_killed_mid_phase_2_ends_the_job_and_the_same_command_resumes_it(tmp_path, launcher):
    """kill -9 of rank 1 in phase 2 (after the checkpoint at phase-2 step 4): the job ends long before the
    collective timeout, naming the rank; the same command again resumes from that checkpoint and writes the φ of
    an uninterrupted run, bit for bit."""
    import time

    config, env = injected_job(tmp_path, launcher, KILL_RANK_1, steps=8)

    def train(out: Path, tokenizer: Path | None = None, **extra: str) -> subprocess.CompletedProcess:
        sets = ["--set", f"output_dir={out}", "--set", "checkpoint_every=2", "--set", "log_every=1"]
        if tokenizer is not None:  # training a tokenizer is not deterministic: both runs must use the same one
            sets += ["--set", f"model.tokenizer={tokenizer}"]
        # Bounded, not fast: well before the collective timeout (900 s), however busy the machine.
        return subprocess.run(["bash", str(REPO / "launch" / launcher), "2", str(config), *sets],
                              capture_output=True, text=True, timeout=600, env={**env, **extra})

    plain = train(tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-3000:]
    start = time.time()
    killed = train(tmp_path / "killed", tmp_path / "plain" / "tokenizer", LTSFT_TEST_KILL_AT="5")
    assert killed.returncode != 0
    assert_names_the_killed_rank(killed.stdout + killed.stderr, launcher)
    assert "ltsft step phase=phase2 step=5 " in killed.stdout and not (tmp_path / "killed" / "sft").exists()
    if launcher == "mpirun.sh":
        assert _mpich_segments_left(start) == []
    resumed = train(tmp_path / "killed", tmp_path / "plain" / "tokenizer")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(round 1, phase2, step 4)" in resumed.stdout + resumed.stderr, resumed.stdout[-3000:]
    assert_same_sft(tmp_path / "killed" / "sft", tmp_path / "plain" / "sft")
