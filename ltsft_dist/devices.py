"""Where ltsft's tensors live: the one place that knows the device of the engine, of each shard and of evaluation.

- Training: DeepSpeed puts the model on `engine.device` (this rank's accelerator, chosen by `bind_accelerator`
  before the process group starts) and moves no inputs (`DeepSpeedEngine.forward` calls the module as is), so
  every batch goes through `to_device`. A shard's tensors (fp32 masters, θ⁰, mask, scores, histograms) live on
  the device of its segments (`shard_device`): the engine's, or the CPU under ZeRO-Offload.
- Inference (`ltsft eval`, `ltsft export`): the accelerator when there is one, unless `--device` says otherwise
  (`inference_device`).
- Files and object collectives: the SFT artifact, checkpoints and pickled objects hold CPU tensors (`move`), so
  reading them never needs the GPU index that wrote them.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from ltsft_dist.errors import LtsftError
from ltsft_dist.launch_env import device_index


def accelerator_type() -> str | None:
    """"cuda" when a CUDA device is usable, else None. `DS_ACCELERATOR=cpu`, DeepSpeed's switch to its CPU
    accelerator, keeps ltsft on the CPU too (the DeepSpeed launcher may expose GPUs to the ranks anyway)."""
    if os.environ.get("DS_ACCELERATOR", "").strip().lower() == "cpu":
        return None
    return "cuda" if torch.cuda.is_available() else None


def local_accelerator(local_rank: int) -> torch.device:
    """This rank's device: its GPU among the visible ones, or the CPU without one."""
    if accelerator_type() is None:
        return torch.device("cpu")
    return torch.device("cuda", device_index(local_rank, torch.cuda.device_count()))


def bind_accelerator(local_rank: int) -> torch.device:
    """Make this rank's GPU the current CUDA device (before the process group starts, so NCCL's communicator and
    every later `cuda` allocation use it); returns the device."""
    device = local_accelerator(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def engine_args() -> SimpleNamespace | None:
    """The `args` for `deepspeed.initialize` that put the engine on the current CUDA device (DeepSpeed would take
    LOCAL_RANK as the device index); None on the CPU."""
    if accelerator_type() is None:
        return None
    return SimpleNamespace(device_rank=torch.cuda.current_device())


def accelerator_rng_state() -> list[torch.Tensor]:
    """The random number generator states of the visible accelerators (none on the CPU), for checkpoints."""
    return torch.cuda.get_rng_state_all() if accelerator_type() == "cuda" else []


def set_accelerator_rng_state(states: list[torch.Tensor]) -> None:
    """Restore `accelerator_rng_state()`'s states; a job on other hardware (no GPU now, or none then) keeps its own."""
    if accelerator_type() == "cuda" and len(states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states)


def engine_device(engine) -> torch.device:
    """Where the engine's forward pass wants its inputs."""
    return torch.device(engine.device)


def shard_device(segments: list[torch.Tensor], engine=None) -> torch.device:
    """The device of my shard's fp32 segments (a rank without segments: the engine's, else the CPU)."""
    if segments:
        return segments[0].device
    return engine_device(engine) if engine is not None else torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`. From the CPU to a GPU they are copied from pinned memory without blocking,
    so the copies of a step's later micro-batches overlap the compute of its first ones."""
    if device.type == "cpu":
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return {k: _to_accelerator(v, device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _to_accelerator(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def inference_device(requested: str | None = None) -> torch.device:
    """The device for `ltsft eval`/`export`: `requested` ("cpu", "cuda", "cuda:1"), else this rank's accelerator
    (LOCAL_RANK under a launcher), else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if requested in (None, "", "auto"):
        return local_accelerator(local_rank)
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise LtsftError(f"--device {requested!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise LtsftError(f"--device {requested}: only cpu and cuda are supported")
    if accelerator_type() is None:
        raise LtsftError(f"--device {requested}: CUDA is not available here (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
    if device.index is None:
        return local_accelerator(local_rank)
    if device.index >= torch.cuda.device_count():
        raise LtsftError(f"--device {requested}: only {torch.cuda.device_count()} GPU(s) visible")
    return device


def move(obj, device: torch.device | str):
    """`obj` with every tensor in it (through lists, tuples, named tuples and dicts) on `device`."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        moved = [move(v, device) for v in obj]
        return type(obj)(moved) if type(obj) in (list, tuple) else type(obj)(*moved)
    return obj
