"""The preflight: batch splits at the configured ranks, the precision/ZeRO/optimizer combinations, GPUs given vs
usable, dependency versions, a hub or directory base of the wrong kind (decoder vs encoder) for its task, `ltsft
pipeline --check` on the shipped paper pipelines, and the collective run directory check on two ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from distributed import run_ranks
from slurm_cluster import write_tiny_run

from ltsft_dist import preflight
from ltsft_dist.cli import main
from ltsft_dist.config import TrainConfig, from_dict, load_config
from ltsft_dist.errors import LtsftError
from ltsft_dist.preflight import ENVIRONMENT, Problem

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "ltsft_dist" / "configs"
PAPER = ("paper_nli_americasnli.yaml", "paper_qa_xquad.yaml")


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    """The shipped pipelines name hub bases, whose config.json the preflight reads: from the cache only, here."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def train_config(batch: int = 8, micro: int = 8, ds: str = "zero2.json", l1: float = 0.0) -> TrainConfig:
    return from_dict(TrainConfig, {"model": {"tiny": {}}, "k": 10, "batch_size": batch, "micro_batch_size": micro,
                                   "deepspeed": ds, "phase1": {"l1": l1}, "phase2": {"l1": l1}})


# ------------------------------------------------------------------------------------------------- batch split

@pytest.mark.parametrize("batch, micro, world", [(8, 8, 1), (8, 2, 4), (12, 3, 4), (32, 8, 4), (16, 2, 4)])
def test_batch_that_splits_passes(batch, micro, world):
    assert preflight.check_batch(train_config(batch, micro), world, "run.yaml") == []


def test_batch_that_does_not_split_names_the_micro_batch_that_keeps_it():
    [problem] = preflight.check_batch(train_config(8, 8), 4, "p.yaml", "language_sft.")
    assert (problem.where, problem.key) == ("p.yaml", "language_sft.micro_batch_size")
    assert "batch_size=8 is not a multiple of micro_batch_size × ranks = 8 × 4" in problem.fix
    assert "set language_sft.micro_batch_size: 2 (the same batch of 8: 2 per rank × 4 ranks × 1 accumulation step)" \
        in problem.fix
    [problem] = preflight.check_batch(train_config(12, 6), 4, "p.yaml")
    assert "set micro_batch_size: 3 " in problem.fix
    [problem] = preflight.check_batch(train_config(32, 3), 2, "p.yaml")  # 16 per rank: micro 2, 8 steps
    assert "set micro_batch_size: 2 (the same batch of 32: 2 per rank × 2 ranks × 8 accumulation steps)" \
        in problem.fix


def test_batch_that_cannot_be_split_over_the_ranks_names_batch_size_and_ranks():
    [problem] = preflight.check_batch(train_config(12, 3), 8, "p.yaml", "task_sft.")
    assert problem.key == "task_sft.batch_size"
    assert "12 examples cannot be split evenly over 8 ranks: set task_sft.batch_size to a multiple of 24 (e.g. 24), " \
           "or run on 4 ranks" in problem.fix


# ------------------------------------------------------------------------------------------------- precision

def ds_file(tmp_path: Path, **settings) -> str:
    path = tmp_path / f"ds{len(list(tmp_path.glob('ds*.json')))}.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", **settings}))
    return str(path)


def keys(problems: list[Problem]) -> list[str]:
    return [p.key for p in problems]


def test_shipped_deepspeed_configs_pass_with_and_without_l1():
    for ds in sorted(p.name for p in (REPO / "ltsft_dist" / "ds_configs").glob("*.json")):
        for l1 in (0.0, 0.1):
            assert preflight.check_precision(train_config(ds=ds, l1=l1), "run.yaml") == [], (ds, l1)


def test_fp16_with_the_l1_term_is_accepted_at_every_zero_stage(tmp_path):
    """The pull goes into the fp32 master gradients under mixed precision (masking.L1Pull, tests/test_precision.py),
    where it cannot underflow; fp16 at ZeRO-0 stays refused for its own reason (no fp32 masters to edit)."""
    for stage in (1, 2, 3):
        fp16 = ds_file(tmp_path, fp16={"enabled": True}, zero_optimization={"stage": stage})
        for l1 in (0.0, 0.1):
            assert preflight.check_precision(train_config(ds=fp16, l1=l1), "run.yaml") == [], (stage, l1)
    fp16_zero0 = ds_file(tmp_path, fp16={"enabled": True}, zero_optimization={"stage": 0})
    assert keys(preflight.check_precision(train_config(ds=fp16_zero0, l1=0.1), "run.yaml")) == [
        "zero_optimization.stage"]


def test_bf16_zero1_with_fp32_gradient_accumulation_is_refused(tmp_path):
    """DeepSpeed's BF16_Optimizer: the layout shards.py does not read."""
    refused = ["data_types.grad_accum_dtype"]
    cases = {("bf16", 1, "fp32"): refused, ("bf16", 1, "float32"): refused, ("bf16", 1, None): [],
             ("bf16", 2, "fp32"): [], ("bf16", 3, "fp32"): [], ("fp16", 1, None): []}
    for (precision, stage, accumulate), expected in cases.items():
        settings = {precision: {"enabled": True}, "zero_optimization": {"stage": stage}}
        if accumulate:
            settings["data_types"] = {"grad_accum_dtype": accumulate}
        problems = preflight.check_precision(train_config(ds=ds_file(tmp_path, **settings)), "run.yaml")
        assert keys(problems) == expected, (precision, stage, accumulate)
    problem = preflight.check_precision(train_config(ds=ds_file(tmp_path, bf16={"enabled": True}, zero_optimization={
        "stage": 1}, data_types={"grad_accum_dtype": "fp32"})), "run.yaml")[0]
    assert "BF16_Optimizer" in problem.fix and "zero2_bf16.json" in problem.fix and problem.where.endswith(".json")


def test_mixed_precision_at_zero0_offload_and_own_optimizer_sections_are_refused(tmp_path):
    zero0 = ds_file(tmp_path, bf16={"enabled": True}, zero_optimization={"stage": 0})
    assert keys(preflight.check_precision(train_config(ds=zero0), "run.yaml")) == ["zero_optimization.stage"]
    offload = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert keys(preflight.check_precision(train_config(ds=ds_file(tmp_path, zero_optimization=offload)), "r")) == [
        "zero_force_ds_cpu_optimizer"]
    allowed = ds_file(tmp_path, zero_optimization=offload, zero_force_ds_cpu_optimizer=False)
    assert preflight.check_precision(train_config(ds=allowed), "r") == []
    own = ds_file(tmp_path, optimizer={"type": "Adam"}, scheduler={"type": "WarmupLR"})
    problems = preflight.check_precision(train_config(ds=own), "r")
    assert keys(problems) == ["optimizer", "scheduler"] and "phase1/phase2: lr, warmup_steps" in problems[0].fix


# ------------------------------------------------------------------------------------------------- GPUs

@pytest.fixture
def cuda(monkeypatch):
    """Simulated CUDA facts: (usable GPUs, CUDA version of the torch build); no NVIDIA device files."""
    monkeypatch.setattr(preflight.glob, "glob", lambda pattern: [])

    def install(count: int, build: str | None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.version, "cuda", build)
    return install


def test_a_cpu_torch_under_a_gpu_allocation_is_refused(cuda, monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    cuda(0, None)
    assert preflight.check_gpus(1, {}) == []  # no GPU given: a CPU run
    [problem] = preflight.check_gpus(1, {"SLURM_STEP_GPUS": "0,1"})
    assert (problem.where, problem.key) == (ENVIRONMENT, "torch")
    assert "is a CPU build, but this job has GPUs (SLURM_STEP_GPUS=0,1): install a CUDA build" in problem.fix
    assert "DS_ACCELERATOR=cpu" in problem.fix
    assert preflight.check_gpus(1, {"SLURM_STEP_GPUS": "0,1", "DS_ACCELERATOR": "cpu"}) == []  # on purpose
    # The DeepSpeed launcher sets CUDA_VISIBLE_DEVICES on CPU machines too: no evidence of a GPU
    assert preflight.check_gpus(1, {"CUDA_VISIBLE_DEVICES": "0,1"}) == []
    cuda(0, "12.8")
    [problem] = preflight.check_gpus(1, {"SLURM_JOB_GPUS": "3"})
    assert "(CUDA 12.8) finds no usable GPU although this job has GPUs (SLURM_JOB_GPUS=3)" in problem.fix


def test_more_ranks_on_a_node_than_gpus_is_refused(cuda, monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    cuda(2, "12.8")
    assert preflight.check_gpus(2, {}) == []
    [problem] = preflight.check_gpus(4, {})
    assert problem.key == "ranks per node" and "only 2 GPUs are visible" in problem.fix
    cuda(1, "12.8")  # one GPU bound per task (srun --gpus-per-task=1): every local rank uses it
    assert preflight.check_gpus(4, {}) == []


# ------------------------------------------------------------------------------------------------- dependencies

def test_pyproject_pins_the_tested_series_and_the_install_matches_it():
    pinned = {r.name: r.specifier for r in map(Requirement, tomllib.loads(
        (REPO / "pyproject.toml").read_text())["project"]["dependencies"])}
    assert (pinned["deepspeed"], pinned["torch"], pinned["transformers"]) == (
        SpecifierSet(">=0.19,<0.20"), SpecifierSet(">=2.3,<2.14"), SpecifierSet(">=5,<5.25"))
    # the installed metadata (what the runtime check reads) is this pyproject's: launch/setup.sh reinstalls on a change
    installed = {r.name: r.specifier for r in map(Requirement, metadata.requires("ltsft-dist")) if not r.marker
                 or "extra" not in str(r.marker)}
    assert installed == pinned
    assert preflight.check_dependencies() == []  # this environment is a tested one


def test_a_dependency_outside_the_tested_range_names_the_install(monkeypatch):
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: {"deepspeed": "0.18.4", "transformers": "5.30.0"}.get(
        name, real(name)))
    problems = {p.key: p.fix for p in preflight.check_dependencies()}
    assert set(problems) == {"deepspeed", "transformers"}
    assert problems["deepspeed"].startswith("0.18.4 is installed, but ltsft is tested with deepspeed")
    assert problems["deepspeed"].endswith("pip install 'deepspeed<0.20,>=0.19'")

    def missing(name):
        if name == "deepspeed":
            raise metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(metadata, "version", missing)
    [problem] = preflight.check_dependencies()
    assert problem.fix == "not installed: pip install 'deepspeed<0.20,>=0.19'"


# ------------------------------------------------------------------------------------------------- the base's kind

def base_dir(tmp_path: Path, model_type: str) -> Path:
    """A base directory with its config.json alone: a check that read weights would fail on it otherwise."""
    directory = tmp_path / model_type
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    return directory


def hub_config(name: str, **settings) -> TrainConfig:
    return from_dict(TrainConfig, {"model": {"name_or_path": name}, "k": 10, **settings})


@pytest.mark.parametrize("model_type, settings, fix", [
    ("llama", {}, "task mlm trains encoder models only: set task: clm to train this base, or name an encoder base"),
    ("qwen2", {"kind": "task", "task": "nli"}, "set task: instruct to train this base, or name an encoder base"),
    ("xlm-roberta", {"task": "clm"}, "task clm trains decoder models only: set task: mlm to train this base, or "
                                     "name a decoder base"),
    ("bert", {"kind": "task", "task": "instruct"}, "set task: classification to train this base"),
])
def test_a_base_of_the_wrong_kind_for_its_task_is_named_with_the_fix(tmp_path, model_type, settings, fix):
    directory = base_dir(tmp_path, model_type)
    [problem] = preflight.check_model_kind(hub_config(str(directory), **settings), "run.yaml")
    assert (problem.where, problem.key) == ("run.yaml", "model.name_or_path")
    kind = "a decoder" if model_type in ("llama", "qwen2") else "an encoder"
    assert problem.fix.startswith(f"{str(directory)!r} is {kind} (model_type {model_type!r} in its config.json)")
    assert fix in problem.fix


@pytest.mark.parametrize("model_type, settings", [("llama", {"task": "clm"}), ("gemma2", {"kind": "task",
                          "task": "instruct"}), ("xlm-roberta", {}), ("bert", {"kind": "task", "task": "qa"}),
                          ("some-remote-code-model", {})])
def test_a_base_of_the_right_or_an_unknown_kind_passes(tmp_path, model_type, settings):
    assert preflight.check_model_kind(hub_config(str(base_dir(tmp_path, model_type)), **settings), "run.yaml") == []


def test_a_hub_base_is_told_by_its_config_json_alone(tmp_path, monkeypatch):
    asked = []

    def snapshot_download(repo_id, **kwargs):
        asked.append((repo_id, kwargs["allow_patterns"]))
        return str(base_dir(tmp_path, "qwen2"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    [problem] = preflight.check_model_kind(hub_config("Qwen/Qwen2.5-0.5B"), "p.yaml", "language_sft.",
                                           base_key="base.name_or_path")
    assert asked == [("Qwen/Qwen2.5-0.5B", ["config.json"])]  # no weights
    assert problem.key == "base.name_or_path" and "set language_sft.task: clm" in problem.fix
    monkeypatch.undo()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # not cached, no network: the load says so
    assert preflight.check_model_kind(hub_config("Qwen/Qwen2.5-0.5B"), "p.yaml") == []


def test_ltsft_train_with_a_decoder_base_for_mlm_stops_before_reading_the_model(tmp_path):
    path = write_tiny_run(tmp_path)
    config = yaml.safe_load(path.read_text())
    config["model"] = {"name_or_path": str(base_dir(tmp_path, "llama"))}
    path.write_text(yaml.safe_dump(config))
    res = subprocess.run([sys.executable, "-m", "ltsft_dist.cli", "train", str(path)], capture_output=True, text=True,
                         timeout=300, env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    assert res.returncode == 2, res.stderr
    assert f"{path}: model.name_or_path: " in res.stderr and "set task: clm to train this base" in res.stderr


# ------------------------------------------------------------------------------------------------- pipelines

@pytest.mark.parametrize("name", [*PAPER, "decoder_instruct_xcopa.yaml"])
def test_paper_pipelines_pass_the_check_at_their_configured_ranks(name, capsys):
    ranks = yaml.safe_load((CONFIGS / name).read_text())["ranks"]
    assert ranks == 4
    assert main(["pipeline", "--check", str(CONFIGS / name)]) == 0
    languages = len(yaml.safe_load((CONFIGS / name).read_text())["languages"])
    assert f"preflight: no problems at {ranks} ranks ({languages + 1} training stages: batch split" \
        in capsys.readouterr().out


@pytest.mark.parametrize("name", PAPER)
def test_paper_pipelines_keep_the_papers_batch_sizes(name):
    config = yaml.safe_load((CONFIGS / name).read_text())
    assert config["language_sft"]["batch_size"] == 8
    assert config["task_sft"]["batch_size"] == (12 if "qa" in name else 32)


def test_check_lists_every_stage_problem_once_and_exits_1(tmp_path, capsys):
    config = yaml.safe_load((CONFIGS / "paper_qa_xquad.yaml").read_text())
    config["language_sft"]["micro_batch_size"] = 8  # what shipped before: batch 8 at 4 ranks
    config["task_sft"]["micro_batch_size"] = 6
    path = tmp_path / "qa.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["pipeline", "--check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count(": language_sft.micro_batch_size:") == 1, err  # eight language stages, one problem
    assert f"{path}: language_sft.micro_batch_size: batch_size=8 is not a multiple of" in err
    assert "set task_sft.micro_batch_size: 3" in err
    assert main(["pipeline", "--check", str(path), "--ranks", "1"]) == 0  # both split on one rank
    # without --check the pipeline stops before running (or downloading) anything
    assert main(["pipeline", str(path)]) == 2
    assert "preflight found 2 problems" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_check_of_a_decoder_pipeline_on_an_encoder_base_names_base_and_tasks_once(tmp_path, capsys):
    config = yaml.safe_load((CONFIGS / "decoder_instruct_xcopa.yaml").read_text())
    config["base"] = {"name_or_path": str(base_dir(tmp_path, "xlm-roberta"))}
    path = tmp_path / "decoder.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["pipeline", "--check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count(": base.name_or_path: ") == 2, err  # seven language stages and the task stage: two problems
    assert "task clm trains decoder models only: set language_sft.task: mlm to train this base" in err
    assert "task instruct trains decoder models only: set task_sft.task: classification to train this base" in err


def test_a_stage_under_a_launcher_is_checked_alone_at_the_launchers_world_size(tmp_path, monkeypatch, capsys):
    config = yaml.safe_load((CONFIGS / "paper_qa_xquad.yaml").read_text())
    config["ranks"] = 1
    path = tmp_path / "qa.yaml"
    path.write_text(yaml.safe_dump(config))
    for var in [v for v in os.environ if v.startswith(("SLURM_", "OMPI_", "PMI_"))]:
        monkeypatch.delenv(var)
    for var, value in dict(RANK="0", WORLD_SIZE="8", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29999").items():
        monkeypatch.setenv(var, value)  # as srun/deepspeed would start `--stage` on 8 ranks
    assert main(["pipeline", "--check", str(path), "--stage", "lang:de"]) == 1
    err = capsys.readouterr().err
    assert "language_sft.micro_batch_size: batch_size=8 is not a multiple of micro_batch_size × ranks = 2 × 8" in err
    assert "task_sft" not in err  # not this stage's
    assert main(["pipeline", "--check", str(path), "--stage", "eval"]) == 0  # evaluation: no batch split to check


def test_ltsft_train_names_the_config_file_before_starting(tmp_path):
    config = write_tiny_run(tmp_path)
    ds = ds_file(tmp_path, bf16={"enabled": True}, zero_optimization={"stage": 1},
                 data_types={"grad_accum_dtype": "fp32"})
    res = subprocess.run([sys.executable, "-m", "ltsft_dist.cli", "train", str(config), "--set", f"deepspeed={ds}",
                          "--set", "micro_batch_size=32"], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    assert res.returncode == 2, res.stderr
    assert f"{config}: micro_batch_size: batch_size=16 is not a multiple of micro_batch_size × ranks = 32 × 1: " \
           "set micro_batch_size: 16" in res.stderr
    assert f"{ds}: data_types.grad_accum_dtype: " in res.stderr and "BF16_Optimizer" in res.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- on the ranks

def _before_training(cases: dict) -> dict:
    """Each case: (config path, output_dir per rank); what `before_training` raised on this rank, or "ok", and the
    files it left in the run directory."""
    from ltsft_dist import comm

    out = {}
    for name, (path, dirs) in cases.items():
        config = load_config(path)
        config.output_dir = dirs[comm.rank()]
        try:
            preflight.before_training(config, comm.world_size(), where=path)
            message = "ok"
        except LtsftError as err:
            message = str(err)
        comm.barrier()
        left = sorted(p.name for p in Path(config.output_dir).glob(".ltsft-shared-check-*"))
        out[name] = (message, left)
    try:  # the line in training.py: a run stops in its set-up, before reading data
        from ltsft_dist.training import train

        config = load_config(cases["shared"][0], ["micro_batch_size=16", "data.train_file=/nonexistent.txt"])
        train(config, show_progress=False)
        out["train"] = "trained"
    except LtsftError as err:
        out["train"] = str(err)
    return out


@pytest.mark.slow
@pytest.mark.multirank
def test_before_training_on_two_ranks_checks_the_shared_run_directory(tmp_path):
    config = str(write_tiny_run(tmp_path))
    shared = str(tmp_path / "shared")
    cases = {"shared": (config, [shared, shared]),
             "not shared": (config, [str(tmp_path / "node-a"), str(tmp_path / "node-b")])}
    results = run_ranks(_before_training, 2, cases, timeout=600)
    for rank, result in enumerate(results):
        assert result["shared"] == ("ok", []), result  # and rank 0 removed its file
        message, left = result["not shared"]
        assert "output_dir: the run directory" in message and "is not shared by all ranks" in message, message
        assert "that rank 1 on host " in message and "rank 0 (host " in message, message
        assert left == []
        assert "batch_size=16 is not a multiple of micro_batch_size × ranks = 16 × 2" in result["train"], result
    assert results[0]["not shared"] == results[1]["not shared"]  # every rank stops with the same list


def _shards_under_bf16_zero1(grad_accum_dtypes: list) -> dict:
    """What building ltsft's view of the shards does under bf16 ZeRO-1, per data_types.grad_accum_dtype."""
    from transformers import BertConfig, BertForMaskedLM

    from ltsft_dist.engine import build_engine
    from ltsft_dist.shards import Shards

    out = {}
    for accumulate in grad_accum_dtypes:
        model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=32))
        ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
              "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}
        if accumulate:
            ds["data_types"] = {"grad_accum_dtype": accumulate}
        try:
            engine = build_engine(model, ds, 1e-3, 0.0)
            Shards(engine, model)
            out[accumulate] = f"ok: {type(engine.optimizer).__name__}"
        except Exception as err:  # what a run would meet without the preflight
            out[accumulate] = f"{type(err).__name__}: {err}"
    return out


@pytest.mark.slow
@pytest.mark.multirank
def test_what_the_preflight_refuses_under_bf16_zero1_is_what_breaks():
    """The refusal is needed (DeepSpeed's BF16_Optimizer, unknown to shards.py) and the alternative works."""
    result = run_ranks(_shards_under_bf16_zero1, 1, ["fp32", None], timeout=600)[0]
    assert result["fp32"].startswith("AttributeError: 'BF16_Optimizer' object has no attribute"), result
    assert result[None] == "ok: DeepSpeedZeroOptimizer", result
