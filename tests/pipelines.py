"""A tiny pipeline config for the pipeline tests (test_pipeline, test_slurm)."""

from __future__ import annotations

from pathlib import Path

import yaml

from ltsft_dist.commands.demo import write_demo


def tiny_pipeline(directory: Path, **changes) -> Path:
    """The demo pipeline cut down to seconds: en and de, a few steps per phase, both as task sources."""
    path = write_demo(directory)
    config = yaml.safe_load(path.read_text())
    config["ranks"] = 1
    config["base"].update(pretrain_steps=0, tiny={**config["base"]["tiny"], "hidden_size": 32,
                                                  "intermediate_size": 64})
    config["languages"].pop("es")
    for key in ("language_sft", "task_sft"):
        config[key].update(phase1={"steps": 4, "lr": 1e-3}, phase2={"steps": 4, "lr": 1e-3}, checkpoint_every=2)
    config["language_sft"]["data"].update(eval_every=0)
    config["evaluation"].update(data={"en": "data/nli_test.en.tsv", "de": "data/nli_test.de.tsv"}, limit=40)
    for key, value in changes.items():
        config[key] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
