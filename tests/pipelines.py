"""A tiny pipeline config for the pipeline tests (test_pipeline, test_slurm), and `ltsft pipeline` run on one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from ltsft_dist.commands.demo import write_demo
from ltsft_dist.launch_env import free_port


def tiny_pipeline(directory: Path, **changes) -> Path:
    """The demo pipeline cut down to seconds: its two source languages only, a few steps per phase, no pretraining."""
    path = write_demo(directory)
    config = yaml.safe_load(path.read_text())
    config["ranks"] = 1
    config["base"].update(pretrain_steps=0, pretrain_languages=None, tiny={**config["base"]["tiny"], "hidden_size": 32,
                                                  "intermediate_size": 64})
    config["languages"].pop("tgt")
    for key in ("language_sft", "task_sft"):
        config[key].update(phase1={"steps": 4, "lr": 1e-3}, phase2={"steps": 4, "lr": 1e-3}, checkpoint_every=2)
    config["language_sft"]["data"].update(eval_every=0)
    config["evaluation"].update(data={"src1": "data/task_test.src1.jsonl", "src2": "data/task_test.src2.jsonl"},
                                limit=40)
    for key, value in changes.items():
        config[key] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def pipeline(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", LTSFT_DIST_TIMEOUT_S="120")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, "-m", "ltsft_dist.cli", "pipeline", str(config), "--master-port",
                             str(free_port()), *args], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
