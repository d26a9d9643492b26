"""The `ltsft` entry point, config validation, and a real (single-rank) `ltsft train` run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ltsft_dist import __version__
from ltsft_dist.cli import main
from ltsft_dist.config import load_config
from ltsft_dist.errors import LtsftError

DEMO = Path(__file__).resolve().parents[1] / "ltsft_dist" / "configs" / "demo_language.yaml"


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and __version__ in capsys.readouterr().out
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("train", "demo", "inspect", "compose", "convert"):
        assert command in out


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def demo_config() -> dict:
    return yaml.safe_load(DEMO.read_text())


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(kind="dense"), "kind: 'dense' is not one of"),
    (lambda c: c.update(k=100), "give exactly one of k"),
    (lambda c: c["phase1"].update(lr="fast"), "phase1.lr: expected float, got 'fast'"),
    (lambda c: c.update(colour="blue"), "unknown key 'colour'; valid keys here:"),
    (lambda c: c["model"].update(tyni={}), "unknown key 'model.tyni'"),
    (lambda c: c.update(density=1.5), "density: must lie in (0, 1]"),
    (lambda c: c["model"].update(name_or_path="x"), "give exactly one of model.name_or_path or model.tiny"),
])
def test_config_errors_name_file_and_key(tmp_path, change, message):
    config = demo_config()
    change(config)
    path = write(tmp_path, config)
    with pytest.raises(LtsftError) as err:
        load_config(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_config_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, "kind: language\nphase1: {steps: 3\n")
    with pytest.raises(LtsftError, match=r"run.yaml: line \d+ is not valid YAML"):
        load_config(path)


def test_overrides_and_k_resolution(tmp_path):
    config = load_config(write(tmp_path, demo_config()), ["phase1.lr=0.5", "density=0.25"])
    assert config.phase1.lr == 0.5 and config.k_for(1000) == 250
    with pytest.raises(LtsftError, match="k=2000 exceeds the 1000 eligible"):
        load_config(write(tmp_path, demo_config()), ["density=null", "k=2000"]).k_for(1000)


def test_cli_reports_config_errors_without_traceback(tmp_path):
    config = demo_config()
    config["kind"] = "dense"
    result = subprocess.run([sys.executable, "-m", "ltsft_dist.cli", "train", str(write(tmp_path, config))],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "ltsft train: error:" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_train_single_rank_end_to_end(tmp_path):
    """`ltsft train` alone is a 1-rank run: it writes an SFT with exactly K entries, results and TensorBoard logs."""
    from ltsft_dist.demo_text import sentences
    from ltsft_dist.sft import SparseFineTuning

    text = tmp_path / "en.txt"
    text.write_text("\n".join(sentences("en", 64)))
    config = demo_config()
    config.update(output_dir=str(tmp_path / "out"), density=0.02, batch_size=8, micro_batch_size=8)
    config["data"]["train_file"] = str(text)
    config["phase1"]["steps"] = config["phase2"]["steps"] = 4
    config["model"]["tiny"].update(hidden_size=32, intermediate_size=64)
    env = dict(os.environ, MASTER_PORT="29631")
    result = subprocess.run([sys.executable, "-m", "ltsft_dist.cli", "train", str(write(tmp_path, config))],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    assert f"SFT written to {out / 'sft'}" in result.stdout
    sft = SparseFineTuning.from_pretrained(out / "sft")
    results = json.loads((out / "results.json").read_text())
    assert sft.nnz == results["k"] == round(0.02 * results["n_eligible"])
    assert results["frozen_drift"] == 0
    assert sft.metadata.kind == "language" and sft.metadata.languages == ["en"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_every_config_key_has_help(capsys):
    import dataclasses
    import typing

    from ltsft_dist.config import TrainConfig
    from ltsft_dist.pipeline import PipelineConfig

    def keys(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            yield prefix + f.name
            inner = (typing.get_args(hints[f.name]) or [None])[0] if typing.get_origin(hints[f.name]) is list else None
            for nested, dotted in ((hints[f.name], "."), (inner, "[].")):
                if dataclasses.is_dataclass(nested):
                    yield from keys(nested, prefix + f.name + dotted)

    for command, cls in (("train", TrainConfig), ("pipeline", PipelineConfig)):
        assert main([command, "--help-config"]) == 0
        listed = capsys.readouterr().out
        for key in keys(cls):
            assert f"\n{key} (" in "\n" + listed or f"\n{key}:" in "\n" + listed, key
    assert main(["train", "--help-config"]) == 0
    assert "\nphase1.lr (float, default 5e-05):  peak learning rate" in capsys.readouterr().out


def test_validate_leaves_the_config_as_it_was():
    from ltsft_dist.config import TrainConfig

    config = TrainConfig(kind="bitfit")
    config.model.tiny = {}
    config.validate()
    assert config.task is None and config.selection == "magnitude"  # unchanged
    full = config.complete()
    assert (full.task, full.selection) == ("classification", "all") and full.model is not config.model


@pytest.mark.slow
def test_train_as_a_library_call(tmp_path):
    """`ltsft_dist.train(config)` from a program of one's own: returns the SFT and the stats, leaves the caller's
    config as it was."""
    from ltsft_dist.demo_text import sentences

    (tmp_path / "en.txt").write_text("\n".join(sentences("en", 200)))  # enough for 8 packed blocks
    program = f"""
import ltsft_dist
from ltsft_dist.config import DataConfig, ModelConfig, PhaseConfig, TrainConfig
config = TrainConfig(kind="language", output_dir={str(tmp_path / 'out')!r}, density=0.02, batch_size=8,
                     micro_batch_size=8, phase1=PhaseConfig(steps=2), phase2=PhaseConfig(steps=2),
                     model=ModelConfig(tiny=dict(vocab_size=200, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32)),
                     data=DataConfig(train_file={str(tmp_path / 'en.txt')!r}))
result = ltsft_dist.train(config, show_progress=False)
assert config.task is None and config.data.labels is None and config.languages == []  # the caller's, unchanged
print("RESULT", result.rank, result.sft.nnz == result.stats.k, result.sft_dir.is_dir(), result.preempted)
"""
    env = dict(os.environ, MASTER_PORT="29632", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RESULT 0 True True None" in result.stdout
