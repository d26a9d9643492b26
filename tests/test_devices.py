"""Device discipline, checked on a CPU machine: device selection and backend logic given CUDA and NCCL, batch
movement, and a training run whose every model input and collective argument is audited (tests/device_audit.py)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from device_audit import DeviceAudit, audited_runs
from distributed import run_ranks
from scenarios import classification_examples, mlm_examples, task_config
from ltsft_dist import devices
from ltsft_dist.config import PhaseConfig
from ltsft_dist.errors import LtsftError
from ltsft_dist.launch_env import device_index, process_group_backend


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend this process sees `count` GPUs (for the selection logic only: nothing is allocated on them)."""

    def install(count: int, current: int = 0):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        bound = []
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: bound.append(torch.device(d)))
        return bound

    return install


@pytest.mark.parametrize("local_rank, visible, expected", [(0, 1, 0), (3, 1, 0), (3, 8, 3), (0, 8, 0)])
def test_device_index(local_rank, visible, expected):
    """One GPU bound per task (srun --gpus-per-task=1): every task's GPU is index 0, whatever its LOCAL_RANK."""
    assert device_index(local_rank, visible) == expected


def test_device_index_errors():
    with pytest.raises(LtsftError, match="only 4 GPUs are visible"):
        device_index(5, 4)
    with pytest.raises(LtsftError, match="no accelerator visible"):
        device_index(0, 0)


def test_process_group_backend():
    assert process_group_backend("cuda") == "nccl"
    assert process_group_backend("cpu") == "gloo"


def test_bind_accelerator_and_engine_args(fake_cuda):
    bound = fake_cuda(count=4, current=2)
    assert devices.bind_accelerator(2) == torch.device("cuda", 2) and bound == [torch.device("cuda", 2)]
    assert devices.engine_args().device_rank == 2  # DeepSpeed would otherwise take LOCAL_RANK
    bound = fake_cuda(count=1)
    assert devices.bind_accelerator(5) == torch.device("cuda", 0)


def test_deepspeeds_cpu_switch_keeps_ltsft_on_the_cpu(fake_cuda, monkeypatch):
    fake_cuda(count=2)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert devices.bind_accelerator(1) == torch.device("cpu") and devices.inference_device() == torch.device("cpu")
    monkeypatch.delenv("DS_ACCELERATOR")
    assert devices.bind_accelerator(1) == torch.device("cuda", 1)


def test_cpu_machine_binds_nothing():
    assert devices.bind_accelerator(1) == torch.device("cpu")
    assert devices.engine_args() is None
    assert devices.inference_device() == torch.device("cpu")


def test_init_distributed_given_cuda_uses_nccl_on_the_bound_gpu(fake_cuda, monkeypatch):
    """Given a CUDA device, the process group is NCCL's and the GPU is bound before it starts."""
    import deepspeed

    from ltsft_dist import engine

    bound = fake_cuda(count=2)
    calls = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.append((list(bound), kw["dist_backend"])))
    for var, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29999").items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(sys, "exit", sys.exit)  # init_distributed wraps these: restored after the test
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setitem(engine._outcome, "status", engine._outcome["status"])
    engine.init_distributed()
    assert calls == [([torch.device("cuda", 1)], "nccl")]


def test_inference_device(fake_cuda, monkeypatch):
    with pytest.raises(LtsftError, match="CUDA is not available here"):
        devices.inference_device("cuda")
    assert devices.inference_device("cpu") == torch.device("cpu")
    with pytest.raises(LtsftError, match="not a device"):
        devices.inference_device("gpu0")
    with pytest.raises(LtsftError, match="only cpu and cuda"):
        devices.inference_device("meta")
    fake_cuda(count=2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert devices.inference_device() == torch.device("cuda", 1)  # this rank's GPU under a launcher
    assert devices.inference_device("cuda") == torch.device("cuda", 1)
    assert devices.inference_device("cuda:0") == torch.device("cuda", 0)
    assert devices.inference_device("cpu") == torch.device("cpu")
    with pytest.raises(LtsftError, match="only 2 GPU"):
        devices.inference_device("cuda:2")


def test_to_device_to_a_gpu_pins_and_does_not_block(monkeypatch):
    """From the CPU to a GPU: pinned memory, non-blocking copies (recorded, not executed: there is no GPU)."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, device, non_blocking=False: calls.append(
        (str(device), non_blocking)) or t)
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.zeros(2), "note": "kept"}
    moved = devices.to_device(batch, torch.device("cuda", 1))
    assert moved["note"] == "kept" and set(moved) == set(batch)
    assert calls == ["pin", ("cuda:1", True)] * 2


def test_to_device_on_cpu_and_move():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "n": 3}
    assert devices.to_device(batch, torch.device("cpu"))["input_ids"].device.type == "cpu"
    assert devices.move({"a": [torch.ones(1)]}, "cpu")["a"][0].device.type == "cpu"


def test_audit_catches_unmoved_inputs_and_collectives_outside_comm():
    model = torch.nn.Linear(2, 2)
    with DeviceAudit(model) as audit:
        audit.engine_device = torch.device("cpu")
        model(torch.ones(1, 2))  # not through devices.to_device
        audit.check_collective("ltsft_dist.recipe", "all_reduce", (torch.ones(1),), {})
        audit.check_collective("ltsft_dist.comm", "all_gather_object", ([None], {"x": torch.ones(1)}), {})
    assert len(audit.violations) == 2, audit.violations
    assert "did not go through devices.to_device" in audit.violations[0]
    assert "ltsft_dist.recipe calls torch.distributed.all_reduce" in audit.violations[1]
    model(torch.ones(1, 2))  # the audit has let go
    assert audit.forwards == 1


def _audit_cases():
    classify = task_config("zero2.json", checkpoint_every=3,
                           phase1=PhaseConfig(steps=4, lr=3e-3), phase2=PhaseConfig(steps=4, lr=3e-3))
    language = task_config("zero3.json", kind="language", phase1=PhaseConfig(steps=3, lr=3e-3, l1=0.1),
                           phase2=PhaseConfig(steps=3, lr=3e-3, l1=0.1))
    return [("classification-z2", classify, classification_examples()),
            ("language-z3", language, mlm_examples())]


def launch_audited(world_size: int) -> dict:
    return run_ranks(audited_runs, world_size, _audit_cases(), world_size)[0]


@pytest.fixture(scope="session")
def audited(launches):
    return functools.partial(launches, launch_audited)


@pytest.mark.parametrize("case", ["classification-z2", "language-z3"])
def test_training_run_audit(case, audited):
    """Two ranks train (phase 1, selection, phase 2, held-out loss, a checkpoint): every model input came through
    devices.to_device onto the engine's device, every collective of ours through comm on a device the backend
    serves, object collectives carried CPU tensors only, θ⁰ and the mask live on the shard's device, and the SFT
    is on the CPU with exactly K entries."""
    r = audited(2)[case]
    assert r["violations"] == [] and r["misplaced"] == []
    assert r["forwards"] > 0 and r["nnz"] == r["k"] and r["sft_devices"] == ["cpu"]
    callers = {caller for caller, _ in r["ours"]}
    ops = {op for _, op in r["ours"]}
    assert callers == {"ltsft_dist.comm"}
    assert {"all_reduce", "all_gather_object", "gather_object"} <= ops  # step flags, top-K, extraction
    if case == "classification-z2":
        assert "barrier" in ops  # the checkpoint


# --- the GPU tier's CPU-side logic -------------------------------------------------------------------------------


def _sft(diffs: dict, heads: dict | None = None):
    from ltsft_dist.sft import SFTMetadata, SparseFineTuning

    shapes = {n: (10,) for n in diffs}
    meta = SFTMetadata(kind="task", languages=["xx"], base_model="t", base_fingerprint="", k=0, density=0.1,
                       training_config={})
    return SparseFineTuning({n: (torch.tensor(i), torch.tensor(v)) for n, (i, v) in diffs.items()}, shapes,
                            heads or {}, meta)


def test_compare_sfts():
    from sft_compare import compare_sfts

    a = _sft({"w": ([1, 4, 7], [0.5, -1.0, 2.0])}, {"h": torch.tensor([1.0, 2.0])})
    same = compare_sfts(a, _sft({"w": ([1, 4, 7], [0.5, -1.0, 2.0 + 1e-7])}, {"h": torch.tensor([1.0, 2.0])}),
                        rtol=1e-3, atol=1e-5)
    assert same["same_mask"] and same["overlap"] == 1.0 and same["phi_outside_tolerance"] == 0
    moved = compare_sfts(a, _sft({"w": ([1, 4, 8], [0.5, -1.1, 2.0])}, {"h": torch.tensor([1.0, 2.5])}),
                         rtol=1e-3, atol=1e-5)
    assert not moved["same_mask"] and moved["overlap"] == 2 / 4
    assert moved["only_reference"] == moved["only_other"] == 1
    assert moved["phi_outside_tolerance"] == 2 and moved["phi_max_abs"] == pytest.approx(0.5)


def test_gpu_tier_training_helper_on_the_cpu(tmp_path):
    """The GPU tier's `ltsft train` helper, run twice with its CPU environment: identical SFTs pass its check."""
    from test_gpu import CPU_ENV, _check_same, _train

    first = _train(tmp_path, "zero2.json", "a", 1, CPU_ENV)
    second = _train(tmp_path, "zero2.json", "b", 1, CPU_ENV)
    assert first.nnz > 0
    _check_same(first, second, "zero2.json")


def test_gpu_check_dry_run_passes_here():
    """`bench/gpu_check --dry-run` prints the plan, checks its prerequisites and passes on a CPU machine."""
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check"
    done = subprocess.run([str(script), "--dry-run"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pytest -m gpu tests/test_gpu.py" in done.stdout and "dry run: ready" in done.stdout
    assert "MISSING" not in done.stdout and "[ok] import deepspeed" in done.stdout


def test_gpu_check_dry_run_names_what_is_missing(tmp_path):
    """With an interpreter that lacks the packages, the dry run fails and says what is missing."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check"
    done = subprocess.run([str(script), "--dry-run"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": str(bare / "bin" / "python")})
    assert done.returncode == 1
    assert "[MISSING] import torch" in done.stdout and "not ready" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would run the whole check")
def test_gpu_check_without_a_gpu_refuses_to_run():
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check"
    done = subprocess.run([str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2 and "[MISSING] CUDA GPU" in done.stdout and "cannot run: CUDA GPU" in done.stderr
    assert not (script.parent / "results-gpu.json").exists()
