"""Our sbatch scripts on a real (private, two-node) SLURM cluster: the rank mapping of launch_env under srun and
the multi-node rendezvous, the job array, the dependency chain, and the preemption signal path. Each job is a tiny
LT-SFT of a few steps."""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import IN_CI
from slurm_cluster import SlurmCluster, unavailable_reason, write_tiny_run

from ltsft_dist.sft import SparseFineTuning

pytestmark = [pytest.mark.slow, pytest.mark.multirank, pytest.mark.slurm]
REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 600  # bounded, not fast: a job of seconds can wait minutes on a loaded 2-core machine


@pytest.fixture(scope="module")
def cluster():
    reason = unavailable_reason()
    if reason:
        if IN_CI:
            pytest.fail(f"CI=true but the SLURM tests cannot run: {reason}")
        pytest.skip(reason)
    root = tempfile.mkdtemp(prefix="ltsft-slurm-")  # not under pytest's 0700 tmp: munged must reach its files
    c = SlurmCluster(Path(root), nodes=2, cpus_per_node=1)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def job_env(cluster: SlurmCluster, **extra: str) -> dict:
    """The submitting shell: this test's python environment as VENV, no stale rank variables."""
    env = {k: v for k, v in cluster.env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(VENV=sys.prefix, LTSFT_DIST_TIMEOUT_S="120", OMP_NUM_THREADS="1", **extra)
    return env


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"(no log at {path})"


def test_multinode_sbatch_trains_one_sft_across_two_nodes(cluster, tmp_path):
    config = write_tiny_run(tmp_path)
    out = tmp_path / "multi"
    log = tmp_path / "multi.out"
    job = cluster.sbatch(REPO / "slurm" / "train_multinode.sbatch", str(config), "--set", f"output_dir={out}",
                         options=["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", f"--output={log}"],
                         env=job_env(cluster, LTSFT_SRUN_ARGS="--label"), cwd=REPO)
    states = cluster.wait(job, JOB_TIMEOUT_S)
    text = read_log(log)
    assert states == {job: "COMPLETED"}, text
    # One world of two ranks, met on the first node (resolved through /etc/hosts), one rank per node.
    assert "ltsft: rank 0/2 (local 0/1, 2 nodes) via slurm, rendezvous n1:" in text, text
    assert any(line.startswith("1: ") for line in text.splitlines()), "task 1 printed nothing:\n" + text
    sft = SparseFineTuning.from_pretrained(out / "sft")
    results = json.loads((out / "results.json").read_text())
    assert sft.metadata.kind == "language" and sft.metadata.languages == ["en"]
    assert sft.nnz == sft.metadata.k == results["k"] > 0
    assert results["frozen_drift"] == 0


def test_job_array_trains_one_language_sft_per_index(cluster, tmp_path):
    config = write_tiny_run(tmp_path, languages=("en", "de"))
    out = tmp_path / "lang"
    job = cluster.sbatch(REPO / "slurm" / "language_sfts.sbatch", str(config),
                         options=["--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/array-%a.out"],
                         env=job_env(cluster, LANGUAGES="en de", TRAIN_FILE=f"{tmp_path}/{{lang}}.txt",
                                     OUT_DIR=str(out)), cwd=REPO)
    states = cluster.wait(job, JOB_TIMEOUT_S)
    logs = "\n".join(read_log(tmp_path / f"array-{i}.out") for i in range(2))
    assert states == {f"{job}_0": "COMPLETED", f"{job}_1": "COMPLETED"}, logs
    sfts = {lang: SparseFineTuning.from_pretrained(out / lang / "sft") for lang in ("en", "de")}
    assert {lang: s.metadata.languages for lang, s in sfts.items()} == {"en": ["en"], "de": ["de"]}
    assert all(s.nnz == s.metadata.k > 0 for s in sfts.values())
    # Each trained on its own text: the tokenizers (trained on the language's text) differ.
    vocab = {lang: json.loads((out / lang / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
             for lang in sfts}
    assert "katze" in str(vocab["de"]) and "katze" not in str(vocab["en"])


def test_job_array_rejects_an_index_past_the_language_list(cluster, tmp_path):
    config = write_tiny_run(tmp_path)
    log = tmp_path / "bad-%a.out"
    job = cluster.sbatch(REPO / "slurm" / "language_sfts.sbatch", str(config),
                         options=["--array=2", "--cpus-per-task=1", f"--output={log}"],
                         env=job_env(cluster, LANGUAGES="en de"), cwd=REPO)
    assert cluster.wait(job, 60) == {f"{job}_2": "FAILED"}
    assert "submit with --array=0-1" in read_log(tmp_path / "bad-2.out")


def test_preemptible_sbatch_forwards_usr1_to_the_ranks_and_requeues(cluster, tmp_path):
    """Stands in for SLURM's warning before the time limit (--signal=B:USR1@120): signal the batch shell
    ourselves. A run far too long to finish must end soon after, and the job must be back in the queue."""
    config = write_tiny_run(tmp_path, steps=100_000)
    log = tmp_path / "preempt.out"
    job = cluster.sbatch(REPO / "slurm" / "preemptible.sbatch", str(config), "--set", f"output_dir={tmp_path}/p",
                         options=["--ntasks-per-node=1", "--cpus-per-task=1", f"--output={log}"],
                         env=job_env(cluster), cwd=REPO)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while "ltsft: rank 0/1" not in read_log(log):  # the rank is up and training
        assert time.monotonic() < deadline and cluster.queue(job), read_log(log)
        time.sleep(0.5)
    signalled = time.monotonic()
    assert cluster.run("scancel", "--batch", "--signal=USR1", job).returncode == 0
    while "Restarts=1" not in cluster.run("scontrol", "show", "job", job).stdout:
        assert time.monotonic() - signalled < JOB_TIMEOUT_S, read_log(log)  # bounded, however busy the machine
        time.sleep(0.5)
    cluster.run("scancel", job)
    cluster.wait(job, 60)
    text = read_log(log)
    assert "USR1 at" in text and "start" in text and "restart 0" in text, text
    assert "SFT written" not in text  # stopped by the signal, not by finishing


def test_pipeline_chains_base_language_sfts_task_sft_and_evaluation(cluster, tmp_path):
    """slurm/pipeline.sh on a pipeline config: each stage a job after the ones it needs (the task SFT after every
    language SFT, on 2 nodes), ending with the same results table `ltsft pipeline` writes locally."""
    from pipelines import tiny_pipeline

    from ltsft_dist.pipeline import load_pipeline, plan

    config = tiny_pipeline(tmp_path)
    env = job_env(cluster, BASE_SBATCH_ARGS=f"--cpus-per-task=1 --output={tmp_path}/base.out",
                  LANG_SBATCH_ARGS=f"--ntasks-per-node=1 --cpus-per-task=1 --output={tmp_path}/lang-%a.out",
                  TASK_SBATCH_ARGS=f"--nodes=2 --ntasks-per-node=1 --cpus-per-task=1 --output={tmp_path}/task.out",
                  EVAL_SBATCH_ARGS=f"--ntasks-per-node=1 --cpus-per-task=1 --output={tmp_path}/eval.out")
    res = cluster.run("bash", str(REPO / "slurm" / "pipeline.sh"), str(config), env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ids = dict(line.split(":", 1)[0:2] for line in res.stdout.splitlines() if ":" in line and "job" in line)
    base_job, lang_job, task_job, eval_job = (ids[k].split()[1] for k in ("base", "language SFTs", "task SFT",
                                                                          "evaluation"))
    assert cluster.wait(base_job, JOB_TIMEOUT_S) == {base_job: "COMPLETED"}, read_log(tmp_path / "base.out")
    assert cluster.wait(lang_job, JOB_TIMEOUT_S) == {f"{lang_job}_0": "COMPLETED", f"{lang_job}_1": "COMPLETED"}
    assert cluster.wait(task_job, JOB_TIMEOUT_S) == {task_job: "COMPLETED"}, read_log(tmp_path / "task.out")
    assert cluster.wait(eval_job, JOB_TIMEOUT_S) == {eval_job: "COMPLETED"}, read_log(tmp_path / "eval.out")
    (task,), (evaluation,) = cluster.jobs(task_job), cluster.jobs(eval_job)
    assert task["StartTime"] >= max(j["EndTime"] for j in cluster.jobs(lang_job))  # ISO times sort as strings
    assert evaluation["StartTime"] >= task["EndTime"]
    stages = {s.name: s for s in plan(load_pipeline(config))}
    assert all(s.done for s in stages.values())
    results = json.loads((stages["eval"].directory / "results.json").read_text())
    assert set(results["languages"]) == {"src1", "src2"}
    assert SparseFineTuning.from_pretrained(stages["task"].directory / "sft").metadata.languages == ["src1", "src2"]


def test_preempted_job_is_requeued_resumes_mid_phase_2_and_trains_the_same_sft(cluster, tmp_path):
    """slurm/preemptible.sbatch on 2 nodes, signalled (as SLURM's warning would) in phase 2: the ranks checkpoint
    and exit 42, the job requeues itself, the restarted job resumes from that checkpoint and finishes. Its φ must
    be bit-identical to that of the same job left uninterrupted (same tokenizer, world size and config)."""
    config = write_tiny_run(tmp_path, steps=10)
    shape = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"]
    long_phase2 = ["--set", "phase2.steps=400", "--set", "log_every=5"]
    plain_log, log = tmp_path / "plain.out", tmp_path / "preempted.out"
    plain = cluster.sbatch(REPO / "slurm" / "preemptible.sbatch", str(config), *long_phase2, "--set",
                           f"output_dir={tmp_path}/plain", options=[*shape, f"--output={plain_log}"],
                           env=job_env(cluster), cwd=REPO)
    assert cluster.wait(plain, JOB_TIMEOUT_S) == {plain: "COMPLETED"}, read_log(plain_log)
    job = cluster.sbatch(REPO / "slurm" / "preemptible.sbatch", str(config), *long_phase2, "--set",
                         f"output_dir={tmp_path}/preempted", "--set", f"model.tokenizer={tmp_path}/plain/tokenizer",
                         options=[*shape, f"--output={log}"], env=job_env(cluster), cwd=REPO)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while "ltsft step phase=phase2 step=50 " not in read_log(log):  # well inside phase 2
        assert time.monotonic() < deadline and cluster.queue(job), read_log(log)
        time.sleep(0.2)
    assert cluster.run("scancel", "--batch", "--signal=USR1", job).returncode == 0
    while "Restarts=1" not in cluster.run("scontrol", "show", "job", job).stdout:
        assert time.monotonic() < deadline, read_log(log)
        time.sleep(0.5)
    # SLURM itself starts the requeued job once the old credential expired (CRED_EXPIRE_S + 1 s here).
    assert cluster.wait(job, JOB_TIMEOUT_S) == {job: "COMPLETED"}, read_log(log)
    text = read_log(log)
    assert "USR1 at" in text and "stopped on request: checkpointed to" in text and "restart 1" in text, text
    assert "requeueing at" in text and "(step exit 42)" in text, text
    resumed = re.search(r"resumed from \S+ \(round 1, phase2, step (\d+)\)", text)
    assert resumed and 50 <= int(resumed.group(1)) < 400, text
    assert text.count("SFT written") == 1
    got, want = (SparseFineTuning.from_pretrained(tmp_path / d / "sft") for d in ("preempted", "plain"))
    assert got.nnz == want.nnz > 0 and set(got.diffs) == set(want.diffs)
    for name, (idx, values) in want.diffs.items():
        assert torch.equal(got.diffs[name][0], idx) and torch.equal(got.diffs[name][1], values), name
    assert set(got.heads) == set(want.heads)
    for name, values in want.heads.items():
        assert torch.equal(got.heads[name], values), name


def test_a_rank_killed_mid_phase_2_ends_the_job_and_resubmitting_resumes(cluster, tmp_path):
    """kill -9 of rank 1 (on the second node) in phase 2, after the checkpoint at phase-2 step 4: srun names the
    task and ends the job; the same sbatch again resumes from that checkpoint and writes the φ of the same job left
    uninterrupted, bit for bit."""
    from test_fail_fast import KILL_RANK_1, assert_same_sft

    config = write_tiny_run(tmp_path, steps=8)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(KILL_RANK_1)
    shape = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"]
    sets = ["--set", "checkpoint_every=2", "--set", "log_every=1"]
    env = job_env(cluster, PYTHONPATH=f"{inject}:{REPO}")

    def submit(out: str, log: Path, **extra: str) -> str:
        tokenizer = [] if out == "plain" else ["--set", f"model.tokenizer={tmp_path}/plain/tokenizer"]
        return cluster.sbatch(REPO / "slurm" / "train_multinode.sbatch", str(config), *sets, *tokenizer, "--set",
                              f"output_dir={tmp_path}/{out}", options=[*shape, f"--output={log}"],
                              env={**env, **extra}, cwd=REPO)

    plain = submit("plain", tmp_path / "plain.out")
    assert cluster.wait(plain, JOB_TIMEOUT_S) == {plain: "COMPLETED"}, read_log(tmp_path / "plain.out")
    killed = submit("killed", tmp_path / "killed.out", LTSFT_TEST_KILL_AT="5")
    assert cluster.wait(killed, JOB_TIMEOUT_S) == {killed: "FAILED"}, read_log(tmp_path / "killed.out")
    text = read_log(tmp_path / "killed.out")
    assert "task 1: Killed" in text, text  # srun names the task
    assert "ltsft step phase=phase2 step=5 " in text and not (tmp_path / "killed" / "sft").exists(), text
    again = submit("killed", tmp_path / "again.out")
    assert cluster.wait(again, JOB_TIMEOUT_S) == {again: "COMPLETED"}, read_log(tmp_path / "again.out")
    assert "(round 1, phase2, step 4)" in read_log(tmp_path / "again.out"), read_log(tmp_path / "again.out")
    assert_same_sft(tmp_path / "killed" / "sft", tmp_path / "plain" / "sft")
