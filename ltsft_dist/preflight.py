"""Checks that run before anything is downloaded, launched or trained; each problem names the file, the key in it
and what to set, and all of them are reported at once.

- `check_training(config, world_size)`: the batch split at that world size, and the precision / ZeRO / optimizer
  combination of its DeepSpeed config (the ones ltsft supports);
- `check_model_kind(config)`: a base named by `model.name_or_path` is a decoder or an encoder as the task needs,
  told by its config.json alone (fetched from the hub without the weights);
- `check_environment()`: the GPUs the job was given are usable by this torch, and the installed dependencies lie in
  the ranges pyproject.toml pins (the versions tested: `shards.py` reads DeepSpeed 0.19 internals);
- `check_pipeline(...)`: all three for every training stage of a pipeline (`ltsft pipeline --check`, and before
  any stage of `ltsft pipeline` runs);
- `before_training(config, world_size)`: the start of every training run, collective: every rank's problems and
  whether it can read a file rank 0 wrote into the run directory (ranks share it: a shared file system is
  required), gathered so that every rank stops with the same list.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ltsft_dist import comm
from ltsft_dist.config import TrainConfig
from ltsft_dist.errors import LtsftError

SHARED_FS_WAIT_S = 10.0  # NFS clients may cache "no such file" for a few seconds (acdirmin)
ENVIRONMENT = "environment"  # the `where` of problems fixed by installing or allocating something
_FP32 = ("fp32", "float32", "float", "torch.float32")  # DeepSpeed's spellings of fp32 in data_types


@dataclass(frozen=True)
class Problem:
    where: str  # the file to edit, or ENVIRONMENT
    key: str  # the key in it (or the package, the variable)
    fix: str  # what is wrong and what to set

    def __str__(self) -> str:
        return f"{self.where}: {self.key}: {self.fix}"


def describe(problems: list[Problem]) -> str:
    return "\n".join(f"  - {p}" for p in problems)


def require(problems: list[Problem]) -> None:
    """Raise one `LtsftError` listing every problem, if there are any."""
    if problems:
        _fail([str(p) for p in problems])


def _fail(lines: list[str]):
    raise LtsftError(f"preflight found {len(lines)} problem{'s' if len(lines) > 1 else ''}:\n"
                     + "\n".join(f"  - {line}" for line in lines))


# ------------------------------------------------------------------------------------------------- training config

def check_training(config: TrainConfig, world_size: int, where: str = "training config",
                   prefix: str = "") -> list[Problem]:
    """The problems of one training config at `world_size` ranks; `prefix` is the config's section in `where`
    (a pipeline's `language_sft.`)."""
    return check_batch(config, world_size, where, prefix) + check_precision(config, where, prefix)


def check_batch(config: TrainConfig, world_size: int, where: str, prefix: str = "") -> list[Problem]:
    """batch_size must split into micro_batch_size × ranks × accumulation steps (`data.accumulation_steps`)."""
    b, m, w = config.batch_size, config.micro_batch_size, world_size
    if b % (m * w) == 0:
        return []
    what = f"batch_size={b} is not a multiple of micro_batch_size × ranks = {m} × {w}"
    if b % w == 0:
        micro = max(d for d in range(1, min(m, b // w) + 1) if (b // w) % d == 0)
        steps = b // (micro * w)
        return [Problem(where, f"{prefix}micro_batch_size",
                        f"{what}: set {prefix}micro_batch_size: {micro} (the same batch of {b}: {micro} per rank × "
                        f"{w} ranks × {steps} accumulation step{'s' if steps > 1 else ''})")]
    ranks = [r for r in range(1, w) if b % (m * r) == 0]
    other = f", or run on {ranks[-1]} ranks" if ranks else ""
    return [Problem(where, f"{prefix}batch_size",
                    f"{what}, and {b} examples cannot be split evenly over {w} ranks: set {prefix}batch_size to a "
                    f"multiple of {m * w} (e.g. {-(-b // (m * w)) * m * w}){other}")]


def check_precision(config: TrainConfig, where: str, prefix: str = "") -> list[Problem]:
    """The combinations of bf16/fp16, ZeRO stage, offload and optimizer that ltsft supports, read from the DeepSpeed
    config file before DeepSpeed sees it."""
    from ltsft_dist.engine import read_ds_config

    path = config.deepspeed_path()
    return check_ds_config(read_ds_config(path), str(path), config.model.dtype, where, prefix)


def check_ds_config(ds: dict, at: str, model_dtype: str = "fp32", where: str = "training config",
                    prefix: str = "") -> list[Problem]:
    """`check_precision` on a DeepSpeed config mapping `ds` read from `at` (also the Trainer integration's)."""
    fp16 = _enabled(ds, "fp16")
    bf16 = _enabled(ds, "bf16") or _enabled(ds, "bfloat16")
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    offload = str((zero.get("offload_optimizer") or {}).get("device", "none")).lower()
    problems = []
    if (fp16 or bf16) and stage == 0:
        problems.append(Problem(at, "zero_optimization.stage", (
            f"{'fp16' if fp16 else 'bf16'} needs ZeRO stage 1, 2 or 3 here (ltsft masks and snapshots the fp32 master "
            f"weights, which DeepSpeed keeps only under ZeRO): set it to 1, 2 or 3, or set {prefix}deepspeed: "
            "zero2_bf16.json in the training config")))
    trains_in = "fp16" if fp16 else "bf16" if bf16 else "fp32"
    if model_dtype not in ("fp32", trains_in):
        problems.append(Problem(where, f"{prefix}model.dtype", (
            f"the model is loaded in {model_dtype} but {at} trains in {trains_in}: set {prefix}model.dtype: "
            f"fp32 (the default), or give {prefix}deepspeed a config with \"{model_dtype}\": "
            '{"enabled": true} at ZeRO stage 1-3' + (" (zero2_bf16.json)" if model_dtype == "bf16" else ""))))
    accumulate = str((ds.get("data_types") or {}).get("grad_accum_dtype", "")).lower()
    if bf16 and stage == 1 and offload != "cpu" and accumulate in _FP32:
        problems.append(Problem(at, "data_types.grad_accum_dtype", (
            "bf16 at ZeRO stage 1 with fp32 gradient accumulation makes DeepSpeed use its BF16_Optimizer, whose "
            "master-weight layout ltsft does not read: remove data_types.grad_accum_dtype (ZeRO-1 then keeps fp32 "
            f"masters with bf16 gradients), or use ZeRO-2 ({prefix}deepspeed: zero2_bf16.json)")))
    if offload != "none" and ds.get("zero_force_ds_cpu_optimizer", True) is not False:
        problems.append(Problem(at, "zero_force_ds_cpu_optimizer", (
            f"ZeRO-Offload (zero_optimization.offload_optimizer.device: {offload}) refuses ltsft's torch AdamW "
            'unless this is false: add "zero_force_ds_cpu_optimizer": false')))
    for section in ("optimizer", "scheduler"):
        if section in ds:
            problems.append(Problem(at, section, (
                "ltsft builds AdamW and the learning-rate schedule itself, from the training config "
                f"({prefix}phase1/{prefix}phase2: lr, warmup_steps; {prefix}weight_decay): remove this section")))
    return problems


def _enabled(ds: dict, section: str) -> bool:
    value = ds.get(section)
    return isinstance(value, dict) and value.get("enabled") is True


def check_model_kind(config: TrainConfig, where: str, prefix: str = "",
                     base_key: str = "model.name_or_path") -> list[Problem]:
    """A base named by `model.name_or_path` (`base_key` where the file names it) must be of the kind its task
    trains (a decoder for clm/instruct, an encoder for mlm/nli/...), as its config.json's model_type says: only that
    file is fetched from the hub, so a wrong base stops before its weights are downloaded. Collective under a
    launcher (rank 0 fetches it first). A config.json that cannot be had, or a model_type transformers does not
    know, is left to the model's loading, which says what is wrong."""
    from ltsft_dist.hub import resolve
    from ltsft_dist.tasks import get_task, task_names

    name = config.model.name_or_path
    if config.model.tiny is not None or not name:
        return []  # a tiny model's architecture is checked with the config (ModelConfig.check_architecture)
    task = get_task(config.complete().task)
    try:
        decoder, model_type = base_kind(resolve(name, base_key, allow_patterns=["config.json"]))
    except LtsftError:
        return []
    if decoder is None or decoder == task.decoder:
        return []
    have, need = ("a decoder", "an encoder") if decoder else ("an encoder", "a decoder")
    other = [n for n in task_names(kind=task.kind) if get_task(n).decoder == decoder]
    fix = f"set {prefix}task: {other[0]} to train this base, or " if other else ""
    return [Problem(where, base_key, (
        f"{name!r} is {have} (model_type {model_type!r} in its config.json), and task {task.name} trains "
        f"{need.split()[1]} models only: {fix}name {need} base here"))]


def base_kind(directory: Path) -> tuple[bool | None, str | None]:
    """Whether the model whose config.json is in `directory` is a decoder (None: cannot be told: no readable
    config.json, or a model_type transformers does not know), and its model_type."""
    try:
        model_type = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None, None
    return _is_decoder_type(model_type), model_type


def _is_decoder_type(model_type) -> bool | None:
    """True for a causal LM without a masked-LM head (Llama, Qwen2, ...), False for a model with one (BERT,
    XLM-R, ...), None for a model_type transformers does not know."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return False
    return True if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else None


# ------------------------------------------------------------------------------------------------- environment

def check_environment(local_ranks: int = 1, environ: Mapping[str, str] | None = None) -> list[Problem]:
    """This machine for `local_ranks` ranks on it: the GPUs, the dependency versions."""
    return check_gpus(local_ranks, environ) + check_dependencies()


def check_gpus(local_ranks: int = 1, environ: Mapping[str, str] | None = None) -> list[Problem]:
    """GPUs given to the job must be usable by this torch (a CPU build of torch under a GPU allocation trains on the
    CPU without a word), and a node must not run more ranks than it has GPUs. `DS_ACCELERATOR=cpu` runs on the CPU
    on purpose."""
    import torch

    from ltsft_dist.devices import accelerator_type
    from ltsft_dist.launch_env import allocated_gpus, device_index

    env = os.environ if environ is None else environ
    if accelerator_type() == "cuda":
        try:
            device_index(local_ranks - 1, torch.cuda.device_count())
        except LtsftError as err:
            return [Problem(ENVIRONMENT, "ranks per node", str(err))]
        return []
    given = allocated_gpus(env) or ", ".join(sorted(glob.glob("/dev/nvidia[0-9]*")))
    if not given or env.get("DS_ACCELERATOR", "").strip().lower() == "cpu":
        return []
    cpu_instead = "or run on the CPUs on purpose with DS_ACCELERATOR=cpu (and sbatch --gres=none)"
    if torch.version.cuda is None:
        return [Problem(ENVIRONMENT, "torch", (
            f"torch {torch.__version__} is a CPU build, but this job has GPUs ({given}): install a CUDA build of "
            f"torch (bash launch/setup.sh on a GPU node does; or your site's CUDA wheel), {cpu_instead}"))]
    return [Problem(ENVIRONMENT, "torch", (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU although this job has GPUs "
        f"({given}): check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, {cpu_instead}"))]


def check_dependencies() -> list[Problem]:
    """The installed version of every dependency pyproject.toml pins to a tested range (an upper bound)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        requirements = [Requirement(r) for r in metadata.requires("ltsft-dist") or []]
    except metadata.PackageNotFoundError:  # not installed (run from a source tree): nothing to compare against
        return []
    problems = []
    for req in requirements:
        if not any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier):
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra's or another platform's
        wanted = f"pip install '{req.name}{req.specifier}'"
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(Problem(ENVIRONMENT, req.name, f"not installed: {wanted}"))
            continue
        if not req.specifier.contains(installed, prereleases=True):
            problems.append(Problem(ENVIRONMENT, req.name, (
                f"{installed} is installed, but ltsft is tested with {req.name}{req.specifier}: {wanted}")))
    return problems


# ------------------------------------------------------------------------------------------------- pipelines

def check_pipeline(stages: list, world_size: int, where: str, local_ranks: int | None = None) -> list[Problem]:
    """Every training stage of a pipeline plan (`ltsft_dist.pipeline.plan`) at `world_size` ranks, and this machine
    for `local_ranks` of them (default: all); problems shared by the language stages are listed once."""
    from ltsft_dist.pipeline import train_stage_config

    problems = []
    for stage in stages:
        if stage.config is None or stage.name == "eval":
            continue
        section = "language_sft." if stage.name.startswith("lang:") else "task_sft."
        config = train_stage_config(stage)
        found = check_training(config, world_size, where, section)
        found += check_model_kind(config, where, section, base_key="base.name_or_path")
        for p in found:
            if p not in problems:
                problems.append(p)
    return problems + check_environment(local_ranks=local_ranks or world_size)


# ------------------------------------------------------------------------------------------------- at the start

def before_training(config: TrainConfig, world_size: int, where: str = "training config") -> None:
    """Every check, on every rank of a run that has joined its process group (collective). Raises on every rank
    the same `LtsftError`, naming the ranks and hosts where a problem is not everyone's."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    mine = [str(p) for p in check_training(config, world_size, where) + check_model_kind(config, where)
            + check_environment(local_ranks=local_rank + 1)]
    directory = Path(config.output_dir)
    token = _leave_token(directory) if comm.rank() == 0 and world_size > 1 else None
    token = comm.broadcast_object(token)
    sees = token is None or "error" in token or _sees(directory / token["name"], token["text"])
    everyone = comm.all_gather_object((socket.gethostname(), mine, sees))
    if token is not None and "name" in token and comm.rank() == 0:
        (directory / token["name"]).unlink(missing_ok=True)
    lines = []
    for problem in dict.fromkeys(p for _, found, _ in everyone for p in found):
        ranks = [r for r, (_, found, _) in enumerate(everyone) if problem in found]
        lines.append(problem if len(ranks) == len(everyone) else f"{problem} [{_ranks_on_hosts(ranks, everyone)}]")
    if token is not None and "error" in token:
        lines.append(f"{where}: output_dir: rank 0 cannot write the run directory {config.output_dir}: "
                     f"{token['error']}")
    blind = [r for r, (_, _, saw) in enumerate(everyone) if not saw]
    if blind:
        lines.append(
            f"{where}: output_dir: the run directory {token['directory']} is not shared by all ranks: rank 0 (host "
            f"{everyone[0][0]}) wrote a file there that {_ranks_on_hosts(blind, everyone)} cannot read within "
            f"{SHARED_FS_WAIT_S:g} s. Every rank reads and writes it (tokenizer, checkpoints, the SFT): put "
            "output_dir on a file system every node mounts at the same path (shared scratch or home)")
    if lines:
        _fail(lines)


def _leave_token(directory: Path) -> dict:
    """Rank 0's file for the others to read in their own view of the run directory: {"name", "text"}, or
    {"error"} when it cannot be written."""
    from ltsft_dist.files import write_text

    text = uuid.uuid4().hex
    name = f".ltsft-shared-check-{text}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_text(directory / name, text)
    except OSError as err:
        return {"error": str(err)}
    return {"name": name, "text": text, "directory": str(directory)}


def _sees(path: Path, text: str) -> bool:
    deadline = time.monotonic() + SHARED_FS_WAIT_S
    while True:
        try:
            if path.read_text(encoding="utf-8") == text:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _ranks_on_hosts(ranks: list[int], everyone: list) -> str:
    hosts: dict[str, list[int]] = {}
    for r in ranks:
        hosts.setdefault(everyone[r][0], []).append(r)
    return "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} on host {host}"
                     for host, rs in hosts.items())
