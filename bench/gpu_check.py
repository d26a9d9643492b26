"""bench/gpu_check: the first check of ltsft on a GPU machine (see README, "GPUs").

    bench/gpu_check            run the GPU tier (pytest -m gpu) and the short GPU benchmark, write
                               bench/results-gpu.json; exit 1 on any failed test or mismatch, 2 without a GPU
    bench/gpu_check --dry-run  print the plan and check the prerequisites (passes on a CPU machine)

Installs nothing: run `bash launch/setup.sh` first (on a GPU machine it installs the CUDA build of torch). Aims at
under 8 minutes on one H100/H200-class GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results-gpu.json"
TESTS = REPO / "tests" / "test_gpu.py"
TEST_TIMEOUT_S, BENCH_TIMEOUT_S = 540, 300  # caps; the aim is < 8 minutes in all

PLAN = f"""bench/gpu_check plan
  1. prerequisites: python >= 3.10, torch (CUDA build), deepspeed, transformers, pytest, ltsft_dist importable;
     tests/test_gpu.py and the `gpu` pytest marker; {RESULTS.relative_to(REPO)} writable; a CUDA GPU
  2. GPU tier: {sys.executable} -m pytest -m gpu {TESTS.relative_to(REPO)}  (timeout {TEST_TIMEOUT_S} s)
     - ltsft train, 1 GPU, ZeRO 0/2/3 fp32 and ZeRO 2/3 bf16 vs the same run on the CPU: mask and φ
     - the language swap on the GPU: exact apply and restore (fp32, bf16)
     - control values over NCCL, a training run under the device audit, ltsft eval on the GPU vs the CPU
     - with 2+ GPUs: train and eval at W=2
  3. benchmark: {sys.executable} bench/gpu_bench.py  (timeout {BENCH_TIMEOUT_S} s; BERT-base shape on GPU 0)
     phase2_step_over_dense_step, topk_over_torch_topk_1e08 / _1e09 (checked against torch.topk), swap_over_step,
     control_allreduce_us
  4. write {RESULTS.relative_to(REPO)}; exit 1 on any failed test or mismatch"""


def prerequisites(need_gpu: bool) -> list[tuple[str, bool, str]]:
    """(what, ok, detail); in a dry run the GPU is reported, not required."""
    checks = [("python >= 3.10", sys.version_info >= (3, 10), sys.version.split()[0])]
    for module in ("torch", "deepspeed", "transformers", "pytest", "ltsft_dist"):
        found = importlib.util.find_spec(module) is not None
        checks.append((f"import {module}", found, "found" if found else "missing: run bash launch/setup.sh"))
    checks.append(("tests/test_gpu.py", TESTS.is_file(), str(TESTS)))
    pyproject = (REPO / "pyproject.toml").read_text()
    checks.append(("pytest marker `gpu` registered", '"gpu:' in pyproject, "pyproject.toml [tool.pytest.ini_options]"))
    checks.append((f"{RESULTS.relative_to(REPO)} writable", os.access(RESULTS.parent, os.W_OK), str(RESULTS.parent)))
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        detail = (f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'no'}, {gpus} GPU(s)"
                  + (f": {torch.cuda.get_device_name(0)}" if gpus else ""))
    except ImportError:
        gpus, detail = 0, "torch missing"
    checks.append(("CUDA GPU" + ("" if need_gpu else " (not required for --dry-run)"), gpus > 0 or not need_gpu,
                   detail))
    return checks


def run_tests(junit: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", str(TESTS), "-q", "-rs", f"--junitxml={junit}"]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TEST_TIMEOUT_S)
        output, status = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        output, status = f"timed out after {TEST_TIMEOUT_S} s\n{err.stdout or ''}", "timeout"
    print(output[-6000:])
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            counts["tests"] += 1
            for kind, key in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
                if case.find(kind) is not None:
                    counts[key] += 1
                    if kind != "skipped":
                        failed.append(f"{case.get('classname')}::{case.get('name')}")
    return {"command": " ".join(cmd), "exit_status": status, "seconds": round(time.perf_counter() - start, 1),
            **counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed}


def run_bench() -> dict:
    cmd = [sys.executable, str(REPO / "bench" / "gpu_bench.py")]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
                              env={**os.environ, "PYTHONWARNINGS": "ignore::FutureWarning"})
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd), "error": f"timed out after {BENCH_TIMEOUT_S} s", "mismatches": []}
    if done.returncode != 0:
        return {"command": " ".join(cmd), "error": done.stderr[-3000:], "mismatches": []}
    return {"command": " ".join(cmd), "seconds": round(time.perf_counter() - start, 1),
            **json.loads(done.stdout.strip().splitlines()[-1])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check the prerequisites only")
    args = parser.parse_args(argv)
    print(PLAN)
    checks = prerequisites(need_gpu=not args.dry_run)
    print("\nprerequisites")
    for what, ok, detail in checks:
        print(f"  [{'ok' if ok else 'MISSING'}] {what}: {detail}")
    missing = [what for what, ok, _ in checks if not ok]
    if args.dry_run:
        print("\ndry run: " + ("ready" if not missing else f"not ready ({', '.join(missing)})"))
        return 1 if missing else 0
    if missing:
        print(f"\ncannot run: {', '.join(missing)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tests = run_tests(Path(tmp) / "junit.xml")
    bench = run_bench()
    problems = [f"test failed: {name}" for name in tests["failed"]] + list(bench.get("mismatches", []))
    if tests["exit_status"] != 0 or tests["passed"] == 0:
        problems.append(f"pytest exit status {tests['exit_status']}, {tests['passed']} passed")
    if "error" in bench:
        problems.append(f"benchmark failed: {bench['error'][-300:]}")
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": "bench/gpu_check",
              "seconds": round(time.perf_counter() - started, 1), "tests": tests, "bench": bench,
              "problems": problems, "ok": not problems}
    tmp_path = RESULTS.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(result, indent=2) + "\n")
    tmp_path.replace(RESULTS)
    print(f"\nwrote {RESULTS} ({result['seconds']} s): " + ("all checks passed" if not problems else
                                                             "PROBLEMS:\n  " + "\n  ".join(problems)))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
