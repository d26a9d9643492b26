"""The GPU tier (`pytest -m gpu`, run by bench/gpu_check): the same runs on CUDA/NCCL and on the CPU agree.

Skipped, with the reason, where there is no CUDA (never counted as passed). What each test requires:
- `ltsft train` on 1 GPU at ZeRO 0, 2, 3, fp32 and bf16, against the CPU run of the same config (CUDA hidden,
  DeepSpeed's CPU accelerator): fp32 gives the same mask and φ within 1e-3 relative; bf16 (whose CPU and GPU
  kernels round differently in phase 1, moving scores near the threshold) shares ≥ 98 % of the mask and φ on the
  common positions within bf16 tolerance. With 2+ GPUs the same at W=2 against 2 CPU ranks.
- The per-step language swap on CUDA: the applied weights equal `SparseFineTuning.apply`'s on the CPU bit for bit,
  and the restore is exact.
- A training run under the device audit (tests/device_audit.py) on the GPU: every input on the engine's device,
  every collective on a device NCCL serves, object collectives with CPU tensors.
- `ltsft eval` on the GPU gives the CPU's numbers (W=1, and W=2 with 2+ GPUs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from device_audit import audited_runs
from distributed import run_ranks
from scenarios import classification_examples, task_config, tiny_classifier
from sft_compare import compare_sfts
from test_eval import _two_rank_eval, cli, qa_argv, world  # noqa: F401  (world: the evaluation fixture)

REPO = Path(__file__).resolve().parents[1]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(GPUS == 0, reason=f"needs CUDA (torch {torch.__version__}, CUDA build: "
                                                   f"{torch.version.cuda or 'no'}, GPUs visible: {GPUS})")]
two_gpus = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 GPUs, {GPUS} visible")
CPU_ENV = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}  # the same run on the CPU of this machine
VARIANTS = ["zero0.json", "zero2.json", "zero2_bf16.json", "zero3.json", "zero3_bf16.json"]


def _config(tmp: Path, ds: str, out: Path) -> Path:
    from ltsft_dist.demo_text import sentences

    text = tmp / "en.txt"
    text.write_text("\n".join(sentences("en", 64)))
    config = yaml.safe_load((REPO / "ltsft_dist" / "configs" / "demo_language.yaml").read_text())
    config.update(output_dir=str(out), density=0.02, batch_size=8, micro_batch_size=4, deepspeed=ds)
    config["data"]["train_file"] = str(text)
    config["phase1"]["steps"] = config["phase2"]["steps"] = 4
    config["model"]["tiny"].update(hidden_size=32, intermediate_size=64)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train(tmp: Path, ds: str, name: str, ranks: int, env: dict) -> Path:
    from ltsft_dist.sft import SparseFineTuning

    out = tmp / name
    config = _config(tmp, ds, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    if ranks == 1:
        cmd = [sys.executable, "-m", "ltsft_dist.cli", "train", str(config)]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--no_local_rank",
               "--master_port", str(29600 + hash(name) % 300), "--module", "ltsft_dist.cli", "train", str(config)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["frozen_drift"] == 0
    return SparseFineTuning.from_pretrained(out / "sft")


def _check_same(cpu, gpu, ds: str) -> None:
    if "bf16" in ds:
        report = compare_sfts(cpu, gpu, rtol=5e-2, atol=2e-3)
        assert report["overlap"] >= 0.98 and report["phi_outside_tolerance"] <= 0.01 * cpu.nnz, report
    else:
        report = compare_sfts(cpu, gpu, rtol=1e-3, atol=1e-5)
        assert report["same_mask"] and report["phi_outside_tolerance"] == 0, report
    assert gpu.nnz == cpu.nnz


@pytest.mark.parametrize("ds", VARIANTS)
def test_train_on_one_gpu_matches_the_cpu(ds, tmp_path):
    cpu = _train(tmp_path, ds, "cpu", 1, CPU_ENV)
    gpu = _train(tmp_path, ds, "gpu", 1, {})
    _check_same(cpu, gpu, ds)


@two_gpus
@pytest.mark.parametrize("ds", ["zero2.json", "zero3.json", "zero3_bf16.json"])
def test_train_on_two_gpus_matches_two_cpu_ranks(ds, tmp_path):
    cpu = _train(tmp_path, ds, "cpu2", 2, CPU_ENV)
    gpu = _train(tmp_path, ds, "gpu2", 2, {})
    _check_same(cpu, gpu, ds)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_language_swap_is_exact_on_the_gpu(dtype):
    from ltsft_dist.sft import SFTMetadata, SparseFineTuning, base_fingerprint
    from ltsft_dist.swap import LanguageSwap

    model = tiny_classifier().to(dtype)
    g = torch.Generator().manual_seed(0)
    diffs = {}
    for name, p in model.named_parameters():
        if name.startswith("bert."):
            idx = torch.randperm(p.numel(), generator=g)[:max(1, p.numel() // 20)].sort().values
            diffs[name] = (idx, torch.randn(len(idx), generator=g) * 1e-2)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in diffs}
    sft = SparseFineTuning(diffs, shapes, {}, SFTMetadata(kind="language", languages=["de"], base_model="tiny",
                                                          base_fingerprint=base_fingerprint(model), k=0,
                                                          density=0.05, training_config={}))
    expected = tiny_classifier().to(dtype)
    sft.apply(expected)  # on the CPU
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.cuda()
    swap = LanguageSwap(model, {"de": sft}, lambda step: "de")
    for step in range(3):
        swap.before_step(step)
        for (name, p), (_, q) in zip(model.named_parameters(), expected.named_parameters()):
            assert torch.equal(p.detach().cpu().view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                               q.detach().view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), name
        swap.before_optimizer_step(step)
        for name, p in model.named_parameters():
            assert torch.equal(p.detach().cpu(), original[name]), name


def _comm_on_nccl() -> dict:
    """On 1 GPU with NCCL: a CPU control value's all-reduce runs on the GPU and comes back; object collectives
    return CPU tensors."""
    import torch.distributed as dist

    from ltsft_dist import comm

    gathered = comm.all_gather_object({"x": torch.ones(2, device="cuda")})
    seen = []
    real = dist.all_reduce
    comm.world_size = lambda: 2  # take the multi-rank path in a group of one (the sum over one rank is the value)
    dist.all_reduce = lambda t: seen.append(str(t.device)) or real(t)
    t = torch.tensor([3, 4], dtype=torch.int64)
    comm.all_reduce(t)
    return {"backend": dist.get_backend(), "seen": seen, "value": t.tolist(), "device": str(t.device),
            "gathered": str(gathered[0]["x"].device)}


def test_control_values_travel_on_the_gpu_under_nccl():
    r = run_ranks(_comm_on_nccl, 1)[0]
    assert r["backend"] == "nccl" and r["seen"] == ["cuda:0"]
    assert r["value"] == [3, 4] and r["device"] == "cpu" and r["gathered"] == "cpu"


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=two_gpus)])
def test_training_run_audit_on_gpus(ranks):
    cases = [("classification-z2", task_config("zero2.json", checkpoint_every=3), classification_examples()),
             ("classification-z3", task_config("zero3.json"), classification_examples())]
    for name, r in run_ranks(audited_runs, ranks, cases, ranks)[0].items():
        assert r["engine_device"].startswith("cuda") and r["violations"] == [] and r["misplaced"] == [], name
        assert r["forwards"] > 0 and r["nnz"] == r["k"] and r["sft_devices"] == ["cpu"], name


def test_eval_on_the_gpu_gives_the_cpus_numbers(world, tmp_path):  # noqa: F811
    assert cli(*qa_argv(world, tmp_path / "cpu", "--device", "cpu")) == 0
    assert cli(*qa_argv(world, tmp_path / "gpu", "--device", "cuda")) == 0
    cpu, gpu = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("cpu", "gpu"))
    assert gpu["options"]["device"] == "cuda" and gpu["languages"] == cpu["languages"]
    assert gpu["average"] == cpu["average"]


@two_gpus
def test_eval_on_two_gpus_gives_the_cpus_numbers(world, tmp_path):  # noqa: F811
    assert cli(*qa_argv(world, tmp_path / "cpu", "--device", "cpu")) == 0
    run_ranks(_two_rank_eval, 2, qa_argv(world, tmp_path / "gpu2"))  # each rank on its own GPU (the default)
    cpu, gpu = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("cpu", "gpu2"))
    assert gpu["languages"] == cpu["languages"] and gpu["average"] == cpu["average"]
