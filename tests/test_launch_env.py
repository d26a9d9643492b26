"""Rank discovery from launcher environments (no processes), its consistency errors, and real launches of one
tiny config through launch/local.sh (deepspeed) and launch/mpirun.sh (mpiexec)."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import IN_CI, mpiexec_available
from distributed import run_ranks
from slurm_cluster import write_tiny_run

from ltsft_dist import launch_env
from ltsft_dist.errors import LtsftError
from ltsft_dist.launch_env import LaunchEnv, discover, first_host, slurm_node_addr
from ltsft_dist.sft import SparseFineTuning

REPO = Path(__file__).resolve().parents[1]
UNRESOLVABLE = "ltsft-nores-[07-08]"  # .invalid-style names that no resolver knows


def no_node_addr(node):
    raise AssertionError(f"scontrol asked about {node} although it resolves")


def slurm_step(procid: int, ntasks: int = 4, nodes: int = 2, job_id: str = "4242", nodelist: str = UNRESOLVABLE,
               **extra: str) -> dict:
    """What srun puts in each task's environment (block distribution, equal tasks per node)."""
    per_node = ntasks // nodes
    env = {"SLURM_JOB_ID": job_id, "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks),
           "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_LOCALID": str(procid % per_node),
           "SLURM_NODEID": str(procid // per_node), "SLURM_NNODES": str(nodes), "SLURM_STEP_NUM_NODES": str(nodes),
           "SLURM_JOB_NODELIST": nodelist, "SLURM_STEP_NODELIST": nodelist,
           "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})" if nodes > 1 else str(per_node)}
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------- the three launchers

def test_no_launcher_is_a_world_of_one_on_a_free_port():
    env = discover({})
    assert (env.rank, env.world_size, env.local_rank, env.num_nodes, env.source) == (0, 1, 0, 1, "single")
    assert env.master_addr == "127.0.0.1" and 0 < env.master_port < 65536


def test_deepspeed_launcher_variables_are_taken_as_given():
    env = discover({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4", "CROSS_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29611"})
    assert env == LaunchEnv(rank=5, world_size=8, local_rank=1, local_size=4, num_nodes=2, master_addr="127.0.0.1",
                            master_port=29611, source="launcher")


def test_srun_tasks_become_ranks_and_meet_at_the_first_nodes_address():
    asked = []

    def node_addr(node):
        asked.append(node)
        return "10.0.0.7"

    envs = [discover(slurm_step(p), node_addr=node_addr) for p in range(4)]
    assert [(e.rank, e.world_size, e.local_rank, e.local_size, e.num_nodes) for e in envs] == [
        (0, 4, 0, 2, 2), (1, 4, 1, 2, 2), (2, 4, 0, 2, 2), (3, 4, 1, 2, 2)]
    assert {e.source for e in envs} == {"slurm"}
    # The node name does not resolve (the DESIGN §4 trap): SLURM's NodeAddr of node 07 is used instead.
    assert {e.master_addr for e in envs} == {"10.0.0.7"} and set(asked) == {"ltsft-nores-07"}
    assert len({e.master_port for e in envs}) == 1 and 15000 <= envs[0].master_port < 30000


def test_a_resolvable_first_node_is_used_by_name():
    env = discover(slurm_step(1, nodelist="localhost,ltsft-nores-2"), node_addr=no_node_addr)
    assert env.master_addr == "localhost"


def test_a_first_node_without_any_address_is_an_error_not_a_hang():
    with pytest.raises(LtsftError, match=r"ltsft-nores-07.*does not resolve.*set MASTER_ADDR"):
        discover(slurm_step(0), node_addr=lambda node: None)


def test_a_one_node_step_meets_on_loopback_and_jobs_get_different_ports():
    a = discover(slurm_step(1, ntasks=2, nodes=1, job_id="100"), node_addr=no_node_addr)
    b = discover(slurm_step(1, ntasks=2, nodes=1, job_id="101"), node_addr=no_node_addr)
    assert (a.rank, a.world_size, a.local_size, a.master_addr) == (1, 2, 2, "127.0.0.1")
    assert a.master_port != b.master_port  # array tasks sharing a node must not share a port


def test_uneven_tasks_per_node_give_this_nodes_count():
    env = discover(slurm_step(6, ntasks=7, nodes=4, SLURM_NODEID="3", SLURM_LOCALID="0",
                              SLURM_STEP_TASKS_PER_NODE="2(x3),1", MASTER_ADDR="127.0.0.1"))
    assert (env.rank, env.world_size, env.local_rank, env.local_size, env.num_nodes) == (6, 7, 0, 1, 4)


def test_the_batch_script_itself_is_not_one_of_the_ranks():
    """sbatch's shell has SLURM_PROCID=0 and the allocation's SLURM_NTASKS but no step: it is one process."""
    env = discover({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_NNODES": "2",
                    "SLURM_JOB_NODELIST": UNRESOLVABLE})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")


@pytest.mark.parametrize("launcher", [
    {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1"},
    {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "4", "MASTER_ADDR": "127.0.0.1"},
], ids=["torchrun-per-task", "deepspeed-in-one-task"])
def test_a_launcher_inside_srun_tasks_is_consistent(launcher):
    ntasks = 2 if launcher["WORLD_SIZE"] == "8" else 1
    env = discover(slurm_step(ntasks - 1, ntasks=ntasks, nodes=ntasks, **launcher))
    assert (env.rank, env.world_size, env.source) == (int(launcher["RANK"]), int(launcher["WORLD_SIZE"]), "launcher")


def test_open_mpi_and_mpich_variables_without_mpi4py_meet_on_loopback():
    ompi = discover({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                     "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, use_mpi4py=False)
    hydra = discover({"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3",
                      "MASTER_PORT": "29700"}, use_mpi4py=False)
    assert (ompi.rank, ompi.world_size, ompi.local_rank, ompi.source, ompi.master_addr, ompi.master_port) == (
        1, 2, 1, "mpi", "127.0.0.1", launch_env.DEFAULT_PORT)
    assert (hydra.rank, hydra.world_size, hydra.local_rank, hydra.master_port) == (2, 3, 2, 29700)


def test_mpiexec_inside_an_allocation_trusts_mpi_over_the_proxy_step():
    """mpiexec in an sbatch script starts one proxy per node with srun: SLURM sees 2 tasks, MPI 4 ranks."""
    env = discover(slurm_step(1, ntasks=2, nodes=2, PMI_RANK="3", PMI_SIZE="4", MPI_LOCALRANKID="1",
                              MPI_LOCALNRANKS="2", MASTER_ADDR="127.0.0.1"), use_mpi4py=False)
    assert (env.rank, env.world_size, env.local_rank, env.num_nodes, env.source) == (3, 4, 1, 2, "mpi")


def test_without_mpi4py_only_a_one_node_mpi_job_can_meet(monkeypatch):
    def broken(view):
        raise launch_env._NoMpi4py("libmpi.so.12: cannot open shared object file")

    monkeypatch.setattr(launch_env, "_mpi4py_rendezvous", broken)
    one_node = {"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}
    assert discover(one_node).master_addr == "127.0.0.1"
    with pytest.raises(LtsftError, match=r"mpi4py cannot load \(libmpi.so.12.*set MASTER_ADDR and MASTER_PORT"):
        discover(dict(one_node, MPI_LOCALNRANKS="1"))


# --------------------------------------------------------------------------------------------- what must be refused

@pytest.mark.parametrize("env, message", [
    (slurm_step(0, RANK="0", WORLD_SIZE="2"),
     r"WORLD_SIZE=2 disagrees with SLURM_STEP_NUM_TASKS=4: the job started 4 processes.*unset RANK WORLD_SIZE"),
    (slurm_step(3, RANK="0", WORLD_SIZE="4"), r"RANK=0 but SLURM_PROCID=3 in a world of 4.*unset RANK"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK=2 is not a valid rank of WORLD_SIZE=2 \(ranks are 0\.\.1\)"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, r"WORLD_SIZE=0: a world needs at least one rank"),
    ({"RANK": "1"}, r"RANK is set but WORLD_SIZE is not"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, r"WORLD_SIZE='two' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_SIZE": "2"}, r"local rank 2 is not below the 2 ranks"),
    (slurm_step(0, ntasks=2, nodes=1, OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2"),
     r"OMPI_COMM_WORLD_RANK=1 but SLURM_PROCID=0"),
    ({"PMI_RANK": "4", "PMI_SIZE": "4"}, r"PMI_RANK=4 is not a valid rank of PMI_SIZE=4"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "ltsft-nores-1"},
     r"MASTER_ADDR=ltsft-nores-1 does not resolve"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, r"MASTER_PORT=70000 is not a TCP port"),
    ({"PMI_RANK": "0", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"},
     r"a job on 2 nodes needs MASTER_ADDR"),
], ids=["stale-world-size-under-srun", "stale-rank-under-srun", "rank-past-world", "empty-world", "rank-alone",
        "not-an-integer", "local-rank-past-local-size", "mpi-and-slurm-disagree", "mpi-rank-past-world",
        "unresolvable-master", "bad-port", "multinode-mpi-without-address"])
def test_inconsistent_environments_are_refused_with_the_variables_named(env, message):
    with pytest.raises(LtsftError, match=message):
        discover(env, use_mpi4py=False, node_addr=lambda node: "10.0.0.7")


# --------------------------------------------------------------------------------------------- pieces

@pytest.mark.parametrize("nodelist, first", [
    ("n[1-2]", "n1"), ("gpu[007-010,020],cpu1", "gpu007"), ("a,b", "a"), ("single", "single"),
    ("rack[2-3]-n[01-02]", "rack2-n01"), ("n[5,1-3]", "n5"),
])
def test_first_host_of_a_slurm_hostlist(nodelist, first):
    assert first_host(nodelist) == first


def test_node_addr_is_read_from_scontrol():
    out = ("NodeName=n1 Arch=x86_64 CoresPerSocket=1\n   CPUAlloc=0 CPUTot=1 CPULoad=0.00\n"
           "   NodeAddr=10.1.2.3 NodeHostName=vm Version=22.05.8\n")
    assert slurm_node_addr("n1", run=lambda cmd: out if cmd == ["scontrol", "show", "node", "n1"] else "") == \
        "10.1.2.3"
    assert slurm_node_addr("n1", run=lambda cmd: "Node n1 not found\n") is None


def test_export_writes_what_torch_distributed_reads():
    environ = {}
    LaunchEnv(3, 4, 1, 2, 2, "10.0.0.7", 15007, "slurm").export(environ)
    assert environ == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
                       "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "15007"}


def test_rendezvous_and_collective_timeouts_are_bounded_and_set_separately():
    rendezvous, collective = launch_env.rendezvous_timeout, launch_env.collective_timeout
    assert rendezvous({}) == datetime.timedelta(minutes=10) < collective({}) == datetime.timedelta(minutes=30)
    env = {"LTSFT_RENDEZVOUS_TIMEOUT_S": "7.5", "LTSFT_COLLECTIVE_TIMEOUT_S": "90"}
    assert (rendezvous(env), collective(env)) == (datetime.timedelta(seconds=7.5), datetime.timedelta(seconds=90))
    # the older single variable is the default of both; a specific one wins over it
    legacy = {"LTSFT_DIST_TIMEOUT_S": "120", "LTSFT_COLLECTIVE_TIMEOUT_S": "3000"}
    assert (rendezvous(legacy), collective(legacy)) == (datetime.timedelta(seconds=120),
                                                        datetime.timedelta(seconds=3000))
    for var, read in (("LTSFT_RENDEZVOUS_TIMEOUT_S", rendezvous), ("LTSFT_COLLECTIVE_TIMEOUT_S", collective),
                      ("LTSFT_DIST_TIMEOUT_S", collective)):
        for bad in ("0", "-3", "soon"):
            with pytest.raises(LtsftError, match=f"{var}='{bad}': expected a positive number of seconds"):
                read({var: bad})


@pytest.mark.parametrize("command", ["train", "pipeline"])
def test_help_names_both_timeouts(command, capsys):
    from ltsft_dist.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "LTSFT_RENDEZVOUS_TIMEOUT_S (default 600 s)" in text
    assert "LTSFT_COLLECTIVE_TIMEOUT_S (default 1800 s)" in text


def test_sbatch_scripts_request_a_gpu_per_rank_by_default_and_say_how_to_run_on_cpus():
    scripts = sorted((REPO / "slurm").glob("*.sbatch"))
    assert len(scripts) == 5
    for script in scripts:
        text = script.read_text()
        options = dict(line.split()[1].lstrip("-").partition("=")[::2] for line in text.splitlines()
                       if line.startswith("#SBATCH "))
        assert options.get("gres") == f"gpu:{options['ntasks-per-node']}", script.name
        assert "sbatch --gres=none" in text and "SBATCH_GRES=none" in text, script.name
    assert "SBATCH_GRES=none" in (REPO / "slurm" / "pipeline.sh").read_text()


# --------------------------------------------------------------------------------------------- real processes

def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_")) and k not in (
               "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"VENV": sys.prefix, "OMP_NUM_THREADS": "1", "LTSFT_RENDEZVOUS_TIMEOUT_S": "120", **extra})
    return env


@pytest.mark.slow
@pytest.mark.multirank
def test_a_missing_rank_fails_fast_with_a_clear_error(tmp_path):
    config = write_tiny_run(tmp_path)
    res = subprocess.run([sys.executable, "-m", "ltsft_dist.cli", "train", str(config)], capture_output=True,
                         text=True, timeout=120, env=clean_env(RANK="0", WORLD_SIZE="2",
                                                               LTSFT_RENDEZVOUS_TIMEOUT_S="3",
                                                               MASTER_PORT=str(launch_env.free_port())))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "could not form the process group within 3 s" in res.stderr
    assert "Check that all 2 ranks started" in res.stderr


def _barrier_without_rank_1() -> tuple[str, float]:
    """Rank 0 waits in a barrier that rank 1 never enters (it is busy for longer than the collective timeout)."""
    import time

    from ltsft_dist import comm

    start = time.monotonic()
    if comm.rank() == 1:
        time.sleep(20)
        return "slept", time.monotonic() - start
    try:
        comm.barrier()
        outcome = "passed"
    except RuntimeError as err:
        outcome = f"failed: {err}"
    return outcome, time.monotonic() - start


@pytest.mark.slow
@pytest.mark.multirank
def test_the_collective_timeout_bounds_a_barrier_separately_from_the_rendezvous(monkeypatch):
    monkeypatch.setenv("LTSFT_COLLECTIVE_TIMEOUT_S", "3")
    monkeypatch.setenv("LTSFT_RENDEZVOUS_TIMEOUT_S", "300")  # start-up may take long; the barrier may not
    (outcome, waited), (slept, _) = run_ranks(_barrier_without_rank_1, 2, timeout=300)
    assert slept == "slept" and outcome.startswith("failed"), outcome
    assert 2.5 < waited < 15, waited  # the 3 s collective timeout, not the rendezvous' 300 s nor rank 1's 20 s


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    """The tiny config trained on 2 ranks by launch/local.sh, once for the module."""
    d = tmp_path_factory.mktemp("local")
    config = write_tiny_run(d)
    res = subprocess.run(["bash", str(REPO / "launch" / "local.sh"), "2", str(config), "--set",
                          f"output_dir={d / 'out'}"], capture_output=True, text=True, timeout=300, env=clean_env())
    return config, d / "out", res


@pytest.mark.slow
@pytest.mark.multirank
def test_local_sh_trains_on_two_deepspeed_ranks(deepspeed_run):
    _, out, res = deepspeed_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "ltsft: rank 0/2 (local 0/2, 1 node) via launcher" in res.stderr + res.stdout
    assert SparseFineTuning.from_pretrained(out / "sft").nnz > 0


@pytest.mark.slow
@pytest.mark.multirank
def test_mpirun_sh_trains_the_same_sft_as_the_deepspeed_launcher(deepspeed_run, tmp_path):
    if not mpiexec_available():
        reason = f"no mpiexec in {sys.prefix}/bin or on PATH: pip install mpich"
        if IN_CI:
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    config, ds_out, ds_res = deepspeed_run
    # Reuse the first run's tokenizer: training one is not deterministic (the tokenizers library orders equal
    # counts by hash), and different token ids would make different SFTs whatever the launcher.
    res = subprocess.run(["bash", str(REPO / "launch" / "mpirun.sh"), "2", str(config), "--set",
                          f"output_dir={tmp_path / 'out'}", "--set", f"model.tokenizer={ds_out / 'tokenizer'}"],
                         capture_output=True, text=True, timeout=300, env=clean_env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "ltsft: rank 0/2 (local 0/2, 1 node) via mpi" in res.stderr + res.stdout
    mpi, ds = SparseFineTuning.from_pretrained(tmp_path / "out" / "sft"), SparseFineTuning.from_pretrained(
        ds_out / "sft")
    # Same config, same world size, other launcher: the same mask and (up to float rounding) the same values.
    assert ds_res.returncode == 0 and mpi.nnz == ds.nnz > 0
    for name, (idx, val) in ds.diffs.items():
        assert torch.equal(mpi.diffs[name][0], idx), name
        torch.testing.assert_close(mpi.diffs[name][1], val, rtol=1e-4, atol=1e-6)
