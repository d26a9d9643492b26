"""A regular (not editable) install works: the wheel carries the DeepSpeed and example configs, and `ltsft train`
with the default `deepspeed: zero2.json` runs from a directory that is not the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from ltsft_dist.launch_env import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, text=True, timeout=600)
    (path,) = out.glob("ltsft_dist-*.whl")
    return path


def test_the_wheel_carries_the_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for stage in ("zero0", "zero1", "zero2", "zero3", "zero2_bf16", "zero3_bf16"):
        assert f"ltsft_dist/ds_configs/{stage}.json" in names
    assert "ltsft_dist/configs/demo_language.yaml" in names
    assert not any(n.startswith(("tests/", "bench/", "ds_configs/")) for n in names)


def test_installed_wheel_trains_from_another_directory(wheel, tmp_path):
    """A fresh venv gets the wheel only (--no-deps); its dependencies (torch, DeepSpeed, ...) come from this
    environment's site-packages through a .pth line, so nothing is downloaded and no other torch build appears."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # A plain path line: this environment's packages, without running its .pth files (the editable install's
    # finder stays out, so `ltsft_dist` can only come from the wheel).
    Path(site, "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   capture_output=True, text=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    from ltsft_dist.demo_text import sentences

    (elsewhere / "en.txt").write_text("\n".join(sentences("en", 32)))
    config = yaml.safe_load((REPO / "ltsft_dist" / "configs" / "demo_language.yaml").read_text())
    config.update(output_dir="out", density=0.02, batch_size=8, micro_batch_size=8)
    config.pop("deepspeed", None)  # the default, zero2.json, from the installed package
    config["data"]["train_file"] = "en.txt"
    config["phase1"]["steps"] = config["phase2"]["steps"] = 2
    config["model"]["tiny"].update(hidden_size=32, intermediate_size=64)
    (elsewhere / "run.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import ltsft_dist; print(ltsft_dist.__file__)"],
                           capture_output=True, text=True, cwd=elsewhere, env=env, check=True).stdout
    assert where.startswith(site), where  # the installed copy, not the repository
    result = subprocess.run([str(venv / "bin" / "ltsft"), "train", "run.yaml"], capture_output=True, text=True,
                            cwd=elsewhere, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (elsewhere / "out" / "sft").is_dir() and (elsewhere / "out" / "results.json").is_file()
