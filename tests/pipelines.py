"""A tiny pipeline config for the pipeline tests (test_pipeline, test_slurm)."""

from __future__ import annotations

from pathlib import Path

import yaml

from ltsft_dist.commands.demo import write_demo


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
