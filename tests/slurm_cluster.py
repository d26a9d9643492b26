"""A private, real SLURM cluster on this machine for tests: Debian's slurm-wlm + munge, two emulated nodes.

munged (as the munge user, own key and socket), slurmctld -D and one `slurmd -D -N nK` per node run from a temp
directory with their own ports; the node names get /etc/hosts entries (127.0.0.1) so `MASTER_ADDR=n1` resolves.
Nothing outside the temp dir is touched except those /etc/hosts lines, which `stop()` removes again. Daemons are
stopped by PID. Needs root (slurmd runs jobs as any user) and the binaries: otherwise the tests skip, or fail
when CI=true.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "scancel")
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# ltsft-test-slurm-cluster"
# Job credential lifetime. SLURM also holds a requeued job back for this long (plus 1 s): its new launch
# credential must be newer than the revocation of the old one, in whole seconds, or slurmd refuses the launch
# ("Job credential revoked") and the job ends FAILED without restarting. The default, 120 s, would make each
# requeue test wait two minutes; starting the job earlier by hand (StartTime=now) reintroduces that race.
CRED_EXPIRE_S = 5
NEVER_RUNS = {"PartitionConfig", "PartitionNodeLimit", "BadConstraints", "DependencyNeverSatisfied",
              "ReqNodeNotAvail", "PartitionTimeLimit", "InvalidAccount", "InvalidQOS"}


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return f"SLURM/munge binaries missing ({', '.join(missing)}): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "a private SLURM cluster needs root (slurmd runs job steps as their owner)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (munged refuses to run as root): apt-get install munge"
    return None


def _free_ports(n: int) -> list[int]:
    """n free TCP ports, consecutive for the node ports (NodeName=n[1-2] Port=P-Q)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65536:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return list(range(base, base + n))
    raise RuntimeError("no free consecutive ports")


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 1):
        self.root = Path(root).resolve()
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.cpus = cpus_per_node
        self.conf = self.root / "slurm.conf"
        # Our cluster only: no variables of an allocation this process may itself be running in.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_"))}
        self.env["SLURM_CONF"] = str(self.conf)
        self.env["SBATCH_GRES"] = "none"  # no GPUs here: what slurm/*.sbatch (which request GPUs) say for CPUs
        self.procs: dict[str, subprocess.Popen] = {}
        self._hosts_added = False
        self._mark = f"{HOSTS_MARK} {self.root}"

    # ----------------------------------------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 60) -> "SlurmCluster":
        try:
            self._start_munge()
            self._write_conf()
            self._add_hosts()
            self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-f", str(self.conf)])
            for n in self.nodes:
                (self.root / "spool" / n).mkdir(parents=True, exist_ok=True)
                self._spawn(f"slurmd-{n}", [_sbin("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel what is still queued, let job steps end, stop the daemons by PID (slurmd before slurmctld,
        munged last), end any process of ours they left behind, and remove our /etc/hosts lines."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", "root")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.queue():
                time.sleep(0.5)
        for name in sorted(self.procs, key=lambda k: (k.startswith("munged"), k == "slurmctld")):
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
        self.procs.clear()
        for pid in self.leftover_pids():  # slurmstepd and job processes outlive a stopped slurmd
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._remove_hosts()

    def leftover_pids(self) -> list[int]:
        """Processes of this cluster: daemons and everything started for its jobs carry our SLURM_CONF."""
        mark = f"SLURM_CONF={self.conf}".encode() + b"\0"
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                try:
                    if mark in (proc / "environ").read_bytes():
                        pids.append(int(proc.name))
                except OSError:
                    pass
        return pids

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ----------------------------------------------------------------------------------------------- set-up
    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.root / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, **kw)
        log.close()

    def _start_munge(self) -> None:
        """munged refuses to run as root and checks its directories' ownership: a private dir owned by munge."""
        munge = pwd.getpwnam("munge")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        d = self.root / "munge"
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o755)  # munged: the socket directory must be searchable by all
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        for path in (d, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o400)
        self.munge_socket = d / "munge.socket"
        self._spawn("munged", [_sbin("munged"), "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
                               f"--seed-file={d / 'munged.seed'}"], user=munge.pw_uid, group=munge.pw_gid)
        deadline = time.monotonic() + 15
        while not self.munge_socket.exists():
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start:\n{self._tail('munged.stdout')}"
                                   f"{self._tail('munge/munged.log')}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        # Job ids (and the rendezvous ports srun jobs derive from them) must differ from those of another test
        # cluster running on this machine at the same time.
        first_job_id = random.randrange(1000, 1_000_000)
        host = socket.gethostname().split(".")[0]
        r = self.root
        (r / "state").mkdir(exist_ok=True)
        names = f"n[1-{len(self.nodes)}]" if len(self.nodes) > 1 else "n1"
        ports = f"{node_ports[0]}-{node_ports[-1]}" if len(node_ports) > 1 else str(node_ports[0])
        self.conf.write_text(f"""\
ClusterName=ltsfttest
FirstJobId={first_job_id}
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=5
SchedulerParameters=sched_interval=1
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
NodeName={names} NodeHostname={host} NodeAddr=127.0.0.1 Port={ports} CPUs={self.cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _add_hosts(self) -> None:
        """Our own line, even if another cluster's (another test run on this machine) names the same nodes: each
        removes only its own, so one cluster stopping cannot unresolve the nodes of one still running."""
        text = HOSTS_FILE.read_text()
        with HOSTS_FILE.open("a") as f:  # append in place: /etc/hosts may be a bind mount
            f.write(("" if text.endswith("\n") else "\n") + f"127.0.0.1 {' '.join(self.nodes)} {self._mark}\n")
        self._hosts_added = True

    def _remove_hosts(self) -> None:
        if not self._hosts_added:
            return
        lines = HOSTS_FILE.read_text().splitlines(keepends=True)
        with HOSTS_FILE.open("w") as f:
            f.writelines(line for line in lines if not line.rstrip("\n").endswith(self._mark))
        self._hosts_added = False

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    log = "munge/munged.log" if name == "munged" else name + ".log"
                    raise RuntimeError(f"{name} exited with {p.returncode}:\n{self._tail(name + '.stdout')}"
                                       f"{self._tail(log)}")
            res = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True,
                                 timeout=30)
            out = res.stdout + res.stderr
            states = dict(line.split()[:2] for line in res.stdout.splitlines() if len(line.split()) >= 2)
            if all(states.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout} s: {out}\n{self._tail('slurmctld.log')}")

    def _tail(self, name: str, lines: int = 30) -> str:
        path = self.root / name
        if not path.exists():
            return ""
        return f"--- {name}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"

    # ----------------------------------------------------------------------------------------------- jobs
    def run(self, *args: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """A client command; one that hangs (a controller starved of CPU) comes back as exit code 124."""
        try:
            return subprocess.run(list(args), env=kw.pop("env", self.env), capture_output=True, text=True,
                                  timeout=timeout, **kw)
        except subprocess.TimeoutExpired as err:
            return subprocess.CompletedProcess(list(args), 124, err.stdout or "", f"timed out after {timeout} s")

    def sbatch(self, script: str | Path, *args: str, options=(), env: dict | None = None,
               cwd: str | Path | None = None) -> str:
        """`sbatch [options] script [args]`; returns the job id."""
        res = self.run("sbatch", "--parsable", *options, str(script), *args, env=env or self.env, cwd=cwd)
        if res.returncode:
            raise RuntimeError(f"sbatch failed ({res.returncode}): {res.stderr}{res.stdout}")
        return res.stdout.strip().split(";")[0]

    def queue(self, job_id: str | None = None) -> list[tuple[str, str, str]]:
        """(job id, state, reason) of what squeue still lists (array tasks as ID_INDEX); when squeue fails, a
        placeholder entry, so that callers keep waiting (within their own deadline)."""
        cmd = ["squeue", "-h", "-o", "%i %T %r"] + (["-j", job_id] if job_id else [])
        res = self.run(*cmd)
        if res.returncode:
            return [(job_id or "?", "UNKNOWN", res.stderr.strip().replace(" ", "_")[:80])]
        return [tuple(line.split()[:3]) for line in res.stdout.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        """Poll squeue until the job (all array tasks) left the queue; returns {job id: final state} from
        scontrol. `sbatch --wait` polls too coarsely for tests."""
        deadline = time.monotonic() + timeout
        while queued := self.queue(job_id):
            stuck = [q for q in queued if q[1] == "PENDING" and q[2] in NEVER_RUNS]
            if stuck or time.monotonic() > deadline:
                self.run("scancel", job_id)
                raise TimeoutError(f"job {job_id} cannot run or still runs after {timeout} s: {queued}\n"
                                   f"{self._tail('slurmctld.log')}")
            time.sleep(0.5)
        return {(f"{job_id}_{j['ArrayTaskId']}" if "ArrayTaskId" in j else j["JobId"]): j["JobState"]
                for j in self.jobs(job_id)}

    def jobs(self, job_id: str | None = None) -> list[dict[str, str]]:
        """`scontrol show job` records as dicts (JobId, ArrayTaskId, JobState, StartTime, EndTime, ...)."""
        res = self.run("scontrol", "-o", "show", "job", *([job_id] if job_id else []))
        return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in res.stdout.splitlines()
                if "JobId=" in line]


def write_tiny_run(directory: Path, languages=("en",), steps: int = 3) -> Path:
    """Demo text per language (`directory/<lang>.txt`) and a tiny language-SFT config that trains in seconds on
    one or two ranks (batch 16 = micro-batch 8 × 2 ranks, or × 2 accumulation steps on one)."""
    import yaml

    from ltsft_dist.demo_text import sentences

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for lang in languages:
        (directory / f"{lang}.txt").write_text("\n".join(sentences(lang, 200, seed=1)) + "\n", encoding="utf-8")
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "ltsft_dist" / "configs" /
                             "demo_language.yaml").read_text())
    config["languages"] = [languages[0]]
    config["output_dir"] = str(directory / "out")
    config["data"]["train_file"] = str(directory / f"{languages[0]}.txt")
    config["model"]["tiny"]["num_hidden_layers"] = 1
    for phase in ("phase1", "phase2"):
        config[phase].update(steps=steps, warmup_steps=0)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
