"""Who am I in the job? Rank, world size, local rank, node count and rendezvous address from the launcher's environment.

The same `ltsft train CONFIG` runs unchanged under three kinds of launcher, which describe the job differently:

- torch/DeepSpeed launchers (`deepspeed`, `torchrun`): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- SLURM (`srun`): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NNODES, SLURM_JOB_NODELIST;
- MPI (`mpiexec`): OMPI_COMM_WORLD_* (Open MPI), PMI_RANK/PMI_SIZE (MPICH, Intel MPI), and mpi4py when present.

`discover()` reads them all, checks that the ones present agree, and returns one `LaunchEnv`; `export()` writes it
back as the RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT that `torch.distributed` reads. A disagreement (a
stale WORLD_SIZE exported into an srun job, a rank past the world size) is an `LtsftError` naming the variables,
because the alternative is a job that hangs in the rendezvous or, worse, ranks that silently train alone.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable, Mapping, MutableMapping

from ltsft_dist.errors import LtsftError

DEFAULT_PORT = 29500
# Two waits, bounded separately: the rendezvous (every rank started and reached rank 0's address; nodes of one job
# can start minutes apart) and each collective after it (a rank may legitimately sit in a barrier while rank 0
# downloads a model or writes a checkpoint, so this one is longer).
RENDEZVOUS_TIMEOUT_VAR, DEFAULT_RENDEZVOUS_TIMEOUT_S = "LTSFT_RENDEZVOUS_TIMEOUT_S", 600.0
COLLECTIVE_TIMEOUT_VAR, DEFAULT_COLLECTIVE_TIMEOUT_S = "LTSFT_COLLECTIVE_TIMEOUT_S", 1800.0
LEGACY_TIMEOUT_VAR = "LTSFT_DIST_TIMEOUT_S"  # the older single setting: the default of both
_FIX_STALE = ("unset RANK WORLD_SIZE LOCAL_RANK in the job script or shell that starts the ranks (launch/srun.sh and "
              "launch/mpirun.sh do), or start as many tasks as WORLD_SIZE says")


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_size: int  # ranks on this node
    num_nodes: int
    master_addr: str
    master_port: int
    source: str  # which launcher described the job: launcher | slurm | mpi | single

    def export(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Write the variables `torch.distributed` (env://) and DeepSpeed read."""
        environ = os.environ if environ is None else environ
        environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                       LOCAL_SIZE=str(self.local_size), MASTER_ADDR=self.master_addr,
                       MASTER_PORT=str(self.master_port))

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} (local {self.local_rank}/{self.local_size}, {self.num_nodes} "
                f"node{'s' if self.num_nodes != 1 else ''}) via {self.source}, rendezvous "
                f"{self.master_addr}:{self.master_port}")


@dataclass(frozen=True)
class _View:
    """One launcher's account of this process (None where it says nothing)."""
    name: str  # e.g. "SLURM_PROCID/SLURM_NTASKS", used in error messages
    rank: int
    world: int
    local_rank: int | None
    local_size: int | None
    nodes: int | None


# ---------------------------------------------------------------------------------------------------------------------
# reading variables

def _int(env: Mapping[str, str], *names: str) -> tuple[str, int] | None:
    """The first of `names` that is set, as (name, int value); a non-integer value is an error naming it."""
    for name in names:
        raw = env.get(name, "").strip()
        if raw:
            try:
                return name, int(raw)
            except ValueError:
                raise LtsftError(f"{name}={raw!r} is not an integer; fix or unset it") from None
    return None


def _launcher_view(env: Mapping[str, str]) -> _View | None:
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if rank is None and world is None:
        return None
    if rank is None or world is None:
        have, missing = ("RANK", "WORLD_SIZE") if world is None else ("WORLD_SIZE", "RANK")
        raise LtsftError(f"{have} is set but {missing} is not: set both (a launcher such as deepspeed or torchrun "
                         f"sets both), or unset {have} to let SLURM/MPI or a single process decide")
    local = _int(env, "LOCAL_RANK")
    local_size = _int(env, "LOCAL_SIZE", "LOCAL_WORLD_SIZE")  # deepspeed, torchrun
    nodes = _int(env, "CROSS_SIZE", "GROUP_WORLD_SIZE")
    return _View("RANK/WORLD_SIZE", rank[1], world[1], local and local[1], local_size and local_size[1],
                 nodes and nodes[1])


def in_slurm_step(env: Mapping[str, str]) -> bool:
    """True for a task started by srun; False for the batch script itself (its SLURM_NTASKS is the allocation's)."""
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
    return bool(env.get("SLURM_PROCID")) and step not in ("", "batch", "extern") and not step.startswith("4294967")


def _slurm_view(env: Mapping[str, str]) -> _View | None:
    if not in_slurm_step(env):
        return None
    rank = _int(env, "SLURM_PROCID")
    world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    if world is None:
        raise LtsftError("SLURM_PROCID is set but SLURM_NTASKS is not: start the ranks with srun inside an "
                         "allocation (sbatch/salloc)")
    local = _int(env, "SLURM_LOCALID")
    nodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    local_size = _tasks_on_my_node(env)
    return _View(f"SLURM_PROCID/{world[0]}", rank[1], world[1], local and local[1], local_size, nodes and nodes[1])


def _tasks_on_my_node(env: Mapping[str, str]) -> int | None:
    """SLURM_STEP_TASKS_PER_NODE is like "2(x3),1": node i's count, for i = SLURM_NODEID."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node_id = env.get("SLURM_NODEID")
    if not spec or node_id is None or not node_id.isdigit():
        return None
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[int(node_id)] if int(node_id) < len(counts) else None


def _mpi_view(env: Mapping[str, str]) -> _View | None:
    for rank_var, size_var, local_var, local_size_var in (
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
             "OMPI_COMM_WORLD_LOCAL_SIZE"),
            ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # MPICH/Intel MPI (hydra)
            ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
            ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE")):
        rank = _int(env, rank_var)
        if rank is None:
            continue
        world = _int(env, size_var)
        if world is None:
            return None  # e.g. PMIx without a size variable: leave it to mpi4py if the caller allows
        local, local_size = _int(env, local_var), _int(env, local_size_var)
        return _View(f"{rank_var}/{size_var}", rank[1], world[1], local and local[1], local_size and local_size[1],
                     None)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# consistency

def _check_range(v: _View) -> None:
    rank_var, world_var = v.name.split("/")
    if v.world < 1:
        raise LtsftError(f"{world_var}={v.world}: a world needs at least one rank")
    if not 0 <= v.rank < v.world:
        raise LtsftError(f"{rank_var}={v.rank} is not a valid rank of {world_var}={v.world} (ranks are 0.."
                         f"{v.world - 1}): the variables come from different jobs or were set by hand; {_FIX_STALE}")
    if v.local_rank is not None and v.local_size is not None and not 0 <= v.local_rank < v.local_size:
        raise LtsftError(f"local rank {v.local_rank} is not below the {v.local_size} ranks on this node "
                         f"({v.name.split('/')[0]} family of variables); fix or unset them")


def _check_agree(primary: _View, other: _View) -> None:
    """`other` describes the same processes as `primary`, or (a launcher per task) each of its tasks runs
    LOCAL_SIZE of primary's ranks."""
    if primary.world == other.world:
        if primary.rank != other.rank:
            raise LtsftError(f"{primary.name.split('/')[0]}={primary.rank} but {other.name.split('/')[0]}="
                             f"{other.rank} in a world of {primary.world}: the rank variables disagree; {_FIX_STALE}")
        return
    per_task = primary.local_size
    if other.world == 1 or (per_task and primary.world == other.world * per_task):
        return  # e.g. `srun -N2 --ntasks-per-node=1 torchrun --nproc-per-node 4`, or deepspeed inside one task
    world_var = primary.name.split("/")[1]
    raise LtsftError(f"{world_var}={primary.world} disagrees with {other.name.split('/')[1]}={other.world}: the "
                     f"job started {other.world} processes but the launcher variables describe {primary.world} "
                     f"ranks; {_FIX_STALE}")


# ---------------------------------------------------------------------------------------------------------------------
# the rendezvous address

def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist such as "n[01-04,7],gpu1" (-> "n01"); rank 0 runs there."""
    top = re.match(r"[^,\[]*(?:\[[^\]]*\][^,\[]*)*", nodelist.strip()).group(0)
    first = re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", top)  # each bracket group -> its first number, padding kept
    if not first or "[" in first or "]" in first:
        raise LtsftError(f"cannot read the node list {nodelist!r}; set MASTER_ADDR to rank 0's host")
    return first


def resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
        return True
    except (socket.gaierror, UnicodeError):
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def slurm_node_addr(node: str, run: Callable[[list[str]], str] | None = None) -> str | None:
    """The NodeAddr SLURM knows for `node` (`scontrol show node`), for node names that DNS does not know."""
    if run is None:
        if shutil.which("scontrol") is None:
            return None

        def run(cmd):
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout

    try:
        out = run(["scontrol", "show", "node", node])
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\bNodeAddr=(\S+)", out)
    return m.group(1) if m else None


def _slurm_master(env: Mapping[str, str], nodes: int, node_addr: Callable[[str], str | None]) -> str:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodes <= 1 or not nodelist:
        return "127.0.0.1"
    host = first_host(nodelist)
    if resolves(host):
        return host
    # The trap: a node name that does not resolve makes the rendezvous hang for minutes. SLURM knows its address.
    addr = node_addr(host)
    if addr and (_is_ip(addr) or resolves(addr)):
        return addr
    raise LtsftError(f"rank 0's node {host!r} (first of SLURM_JOB_NODELIST={nodelist}) does not resolve and "
                     f"`scontrol show node {host}` gave no usable NodeAddr ({addr!r}); set MASTER_ADDR to its "
                     f"address, or add the node names to DNS or /etc/hosts")


def _slurm_port(env: Mapping[str, str]) -> int:
    """Derived from the job id, so every task agrees without talking and concurrent jobs (array tasks sharing
    a node) differ. Range 15000-29999 stays below Linux's ephemeral ports."""
    job = env.get("SLURM_JOB_ID", "0")
    step = env.get("SLURM_STEP_ID", "0")
    job_n = int(job) if job.isdigit() else 0
    step_n = int(step) if step.isdigit() else 0
    return 15000 + (job_n * 7 + step_n) % 15000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class _NoMpi4py(Exception):
    pass


def _mpi4py_rendezvous(view: _View | None) -> tuple[_View, str, int]:
    """Ask MPI itself: rank 0 shares its address and a free port. Only called under an MPI launcher (importing
    mpi4py initialises MPI)."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError) as err:  # not installed, or its MPI library is missing
        raise _NoMpi4py(str(err)) from None
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    if view is not None and (view.world, view.rank) != (world, rank):
        raise LtsftError(f"mpi4py sees rank {rank} of {world} but the launcher set {view.name}={view.rank}/"
                         f"{view.world}: mpi4py is linked to a different MPI library than the mpiexec that started "
                         f"the job; use the mpiexec of that library (e.g. the venv's mpiexec from `pip install mpich`)")
    host = socket.gethostname()
    hosts = comm.allgather(host)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    nodes = len(set(hosts))
    if rank == 0:
        addr = "127.0.0.1" if nodes == 1 else _my_routable_addr()
        info = (addr, free_port())
    else:
        info = None
    addr, port = comm.bcast(info, root=0)
    return _View("mpi4py rank/size", rank, world, local_rank, local_size, nodes), addr, port


def _my_routable_addr() -> str:
    host = socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        addr = ""
    if addr and not addr.startswith("127."):
        return addr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # no packet is sent: the kernel picks a route
        try:
            s.connect(("10.255.255.255", 1))
            addr = s.getsockname()[0]
        except OSError:
            addr = ""
    if not addr or addr.startswith("127."):
        raise LtsftError(f"cannot find a routable address of rank 0's host {host!r}; set MASTER_ADDR")
    return addr


# ---------------------------------------------------------------------------------------------------------------------

def discover(environ: Mapping[str, str] | None = None, *, use_mpi4py: bool = True,
             node_addr: Callable[[str], str | None] = slurm_node_addr) -> LaunchEnv:
    """This process's place in the job. Precedence: launcher variables, then MPI, then an srun step (mpiexec
    inside an allocation starts its ranks from one srun task per node, so there MPI knows the ranks and SLURM
    only the proxies); the sources present must agree. No launcher at all is a world of one."""
    env = os.environ if environ is None else environ
    launcher, slurm, mpi = _launcher_view(env), _slurm_view(env), _mpi_view(env)
    under_mpi = mpi is not None or any(k.startswith(("OMPI_COMM_WORLD_", "PMIX_RANK", "PMI_RANK")) for k in env)
    views = [v for v in (launcher, slurm, mpi) if v is not None]
    for v in views:
        _check_range(v)
    if slurm and mpi and slurm.world == mpi.world:  # srun --mpi=pmi2: both describe the same processes
        _check_agree(mpi, slurm)
    # (different worlds: mpiexec inside an allocation, whose srun started one MPI proxy per node: MPI is right)
    if launcher:
        for other in (mpi, slurm):
            if other:
                _check_agree(launcher, other)

    addr, port = env.get("MASTER_ADDR", "").strip(), _int(env, "MASTER_PORT")
    port = port and port[1]
    if launcher:
        primary, source = launcher, "launcher"
    elif slurm and (mpi is None or mpi.world == slurm.world):  # plain srun, or srun --mpi=pmi2/pmix
        primary, source = slurm, "slurm"
    elif under_mpi:
        primary, source = mpi, "mpi"
        if use_mpi4py and (mpi is None or mpi.world > 1) and not (addr and port):
            try:
                primary, mpi_addr, mpi_port = _mpi4py_rendezvous(mpi)
                addr, port = addr or mpi_addr, port or mpi_port
            except _NoMpi4py as err:
                if mpi is None or mpi.local_size != mpi.world:  # without mpi4py only one node can meet (loopback)
                    raise LtsftError(f"an MPI launcher started this process but mpi4py cannot load ({err}), so the "
                                     "ranks cannot agree on a rendezvous address: pip install mpi4py and the MPI "
                                     "library of your mpiexec (e.g. `pip install mpich` and use the venv's "
                                     "mpiexec), or set MASTER_ADDR and MASTER_PORT") from None
        if primary is None:
            raise LtsftError("an MPI launcher started this process but set no rank/size variables this code reads "
                             "(OMPI_COMM_WORLD_*, PMI_RANK/PMI_SIZE) and mpi4py is not used: set RANK and "
                             "WORLD_SIZE")
    else:
        primary, source = _View("RANK/WORLD_SIZE", 0, 1, 0, 1, 1), "single"

    local_size = primary.local_size
    nodes = primary.nodes or (-(-primary.world // local_size) if local_size else 1)
    local_rank = primary.local_rank
    if local_rank is None:
        if nodes != 1:
            raise LtsftError(f"no local rank ({primary.name} gave none) in a job on {nodes} nodes: set LOCAL_RANK")
        local_rank = primary.rank
    if local_size is None:
        local_size = primary.world if nodes == 1 else 1

    if not addr:
        if source == "slurm":
            addr = _slurm_master(env, nodes, node_addr)
        elif nodes == 1:
            addr = "127.0.0.1"
        else:
            raise LtsftError(f"a job on {nodes} nodes needs MASTER_ADDR (rank 0's host); the {source} launcher did "
                             f"not set it")
    elif not _is_ip(addr) and not resolves(addr):
        raise LtsftError(f"MASTER_ADDR={addr} does not resolve on this host, so the rendezvous would hang: set it "
                         f"to rank 0's IP address or a name every node can resolve")
    if not port:
        port = (_slurm_port(env) if source == "slurm" else free_port() if primary.world == 1 else DEFAULT_PORT)
    if not 0 < port < 65536:
        raise LtsftError(f"MASTER_PORT={port} is not a TCP port")
    return LaunchEnv(rank=primary.rank, world_size=primary.world, local_rank=local_rank, local_size=local_size,
                     num_nodes=nodes, master_addr=addr, master_port=port, source=source)


def timeouts_help() -> str:
    """The timeout variables, for the commands' --help."""
    return (f"environment: {RENDEZVOUS_TIMEOUT_VAR} (default {DEFAULT_RENDEZVOUS_TIMEOUT_S:g} s): how long ranks wait "
            f"for each other to start; {COLLECTIVE_TIMEOUT_VAR} (default {DEFAULT_COLLECTIVE_TIMEOUT_S:g} s): how long "
            f"one collective waits for a rank that stopped answering ({LEGACY_TIMEOUT_VAR}: the default of both)")


def rendezvous_timeout(environ: Mapping[str, str] | None = None) -> datetime.timedelta:
    """How long a rank waits for the others to join the process group before the job fails with the missing
    ranks named (torch's own default is 30 minutes)."""
    return _timeout(os.environ if environ is None else environ, RENDEZVOUS_TIMEOUT_VAR, DEFAULT_RENDEZVOUS_TIMEOUT_S)


def collective_timeout(environ: Mapping[str, str] | None = None) -> datetime.timedelta:
    """How long one collective (a barrier, an all-reduce) waits for a rank that stopped answering, e.g. one that
    died, before the job fails instead of hanging."""
    return _timeout(os.environ if environ is None else environ, COLLECTIVE_TIMEOUT_VAR, DEFAULT_COLLECTIVE_TIMEOUT_S)


def _timeout(env: Mapping[str, str], var: str, default_s: float) -> datetime.timedelta:
    name = var if env.get(var, "").strip() else LEGACY_TIMEOUT_VAR
    raw = env.get(name, "").strip()
    if not raw:
        return datetime.timedelta(seconds=default_s)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise LtsftError(f"{name}={raw!r}: expected a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


# ---------------------------------------------------------------------------------------------------------------------
# the accelerator and the process group's backend

def device_index(local_rank: int, visible: int) -> int:
    """This rank's accelerator among the `visible` ones (`torch.cuda.device_count()`). With one GPU bound per task
    (`srun --gpus-per-task=1`, `--gpu-bind`) every task sees only index 0, so LOCAL_RANK is the wrong index
    (DESIGN.md §7); with all of a node's GPUs visible, local rank r takes GPU r."""
    if visible < 1:
        raise LtsftError("no accelerator visible to this rank (CUDA_VISIBLE_DEVICES empty?); run on the CPU or "
                         "give the task a GPU")
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise LtsftError(f"local rank {local_rank} but only {visible} GPUs are visible on this node: start at most "
                     f"{visible} ranks per node, or bind one GPU per task (srun --gpus-per-task=1)")


def allocated_gpus(environ: Mapping[str, str] | None = None) -> str | None:
    """The GPUs a SLURM allocation gave this process, as its variable says them ("SLURM_STEP_GPUS=0,1"), or None.
    CUDA_VISIBLE_DEVICES is no evidence: the DeepSpeed launcher sets it on CPU-only machines too."""
    env = os.environ if environ is None else environ
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE"):
        value = env.get(name, "").strip()
        if value and value not in ("0", "none", "(null)"):
            return f"{name}={value}"
    return None


def process_group_backend(device_type: str) -> str:
    """The backend of our process group for the device our tensors live on: NCCL on CUDA, gloo on the CPU
    (control values under NCCL travel on the accelerator: see `comm`)."""
    return "nccl" if device_type == "cuda" else "gloo"
