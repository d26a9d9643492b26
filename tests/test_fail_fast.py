"""A rank that raises in a 2-rank `ltsft train` (under launch/local.sh, the DeepSpeed launcher, and
launch/mpirun.sh): the whole job exits non-zero within seconds, not after the collective timeout, and stderr names
the rank and the error. The failure is injected by a sitecustomize module on the job's PYTHONPATH that patches the
recipe's step in rank 1 only; the product code is unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
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


@pytest.mark.parametrize("launcher", ["local.sh", "mpirun.sh"])
def test_a_failing_rank_ends_the_whole_job_at_once(tmp_path, launcher):
    """Rank 0 is waiting in a collective of the step when rank 1 fails: it must not wait for the collective
    timeout (set to 300 s here); the job ends within seconds with the failing rank's error on stderr. (Under
    mpiexec, rank 1 used to hang in mpi4py's exit-time MPI_Finalize, which waits for rank 0.)"""
    from slurm_cluster import write_tiny_run
    from conftest import mpiexec_available

    if launcher == "mpirun.sh" and not mpiexec_available():
        pytest.skip(f"no mpiexec in {sys.prefix}/bin or on PATH: pip install mpich")

    config = write_tiny_run(tmp_path / "run", steps=6)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAIL_ON_RANK_1)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(VENV=sys.prefix, OMP_NUM_THREADS="1", LTSFT_DIST_TIMEOUT_S="300",
               PYTHONPATH=os.pathsep.join([str(inject), str(REPO), env.get("PYTHONPATH", "")]))
    start = time.monotonic()
    res = subprocess.run(["bash", str(REPO / "launch" / launcher), "2", str(config), "--set", "log_every=1"],
                         capture_output=True, text=True, timeout=290, env=env)
    took = time.monotonic() - start
    assert res.returncode != 0
    assert "ltsft train: rank 1/2: error:" in res.stderr and "RuntimeError: injected failure" in res.stderr, \
        res.stderr[-3000:]
    # The run got as far as phase 2 (the one-line log of rank 0), then ended long before any timeout.
    assert "ltsft step phase=phase2 step=1 " in res.stdout, res.stdout[-3000:]
    assert took < 60, f"the job took {took:.0f} s to end"
