"""Every collective ltsft makes goes through here (a test keeps it so); outside a process group they are no-ops.

A collective's backend decides which devices its tensors may live on: NCCL takes CUDA tensors only, gloo CPU
(and CUDA) tensors. Two ways to carry our few small control values (step agreement flags, token counts, loss
totals, the L1 term, per-parameter counts) under NCCL: a process group with a backend per device type
(`"cpu:gloo,cuda:nccl"`), or the control values travelling on the accelerator. We use the second:

- DeepSpeed creates the group with the accelerator's backend alone, and so do users who create it themselves;
  a mixed group adds gloo's TCP rendezvous between every pair of nodes (its own interface selection,
  GLOO_SOCKET_IFNAME, a second network to go wrong on a cluster) for a handful of values per step.
- The large payload, the top-K's two 65,536-bin histograms, is built on the device that holds the scores, so it
  is on the accelerator anyway (no transfer at all); only a few scalars per step make the trip.
- Cost of the trip: a control value is O(world size) bytes, once or twice per optimizer step: one host-to-device
  copy, the all-reduce, one device-to-host copy (a synchronisation the caller makes anyway, since it reads the
  value). `bench/gpu_check` measures it on a GPU (`control_allreduce_us`) beside a phase-2 step. Measured here,
  gloo at W=2 on 2 shared CPU cores (load ~18, so only the ratios mean anything): a 3-value control all-reduce
  took 0.72 ms through `all_reduce` against 0.70 ms for a bare `dist.all_reduce` (the routing costs ~2 %), a
  65,536-bin histogram 11 ms; a phase-2 step there takes hundreds of ms.

So `all_reduce` works on any tensor under any backend: when the group has no backend for the tensor's device it
runs on a device the group does serve (`collective_device`) and the result is copied back into the tensor.
Object collectives pickle tensors with their device (DESIGN.md §7: rank 0 would unpickle another rank's GPU
index), so `gather_object` / `all_gather_object` move every tensor in the object to the CPU first.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ltsft_dist.devices import move


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def backend_devices(config: str | None = None) -> dict[str, str]:
    """{device type: backend} of a backend configuration string such as torch's `get_backend_config()` gives
    ("cuda:nccl", "cpu:gloo,cuda:gloo", "cpu:gloo,cuda:nccl"); a bare backend name is expanded as torch does."""
    return dict(_parse_backend_config(dist.get_backend_config() if config is None else config))


@functools.lru_cache(maxsize=8)
def _parse_backend_config(config: str) -> tuple[tuple[str, str], ...]:
    """Parsed once per configuration string: `all_reduce` asks on every call."""
    if ":" not in config:
        config = str(dist.BackendConfig(dist.Backend(config)))
    pairs = (part.split(":", 1) for part in config.split(",") if part.strip())
    return tuple((device.strip(), backend.strip()) for device, backend in pairs)


def collective_device(device: torch.device, backends: dict[str, str]) -> torch.device:
    """Where a collective on a tensor that lives on `device` runs: there, if the group has a backend for that device
    type; else on the accelerator the group serves (this process's current CUDA device), else on the CPU."""
    if device.type in backends:
        return device
    for kind in backends:
        if kind != "cpu":
            return torch.device(kind, getattr(torch, kind).current_device())
    return torch.device("cpu")


def set_collective_timeout(timeout) -> None:
    """Bound every later collective of the group by `timeout` (a `datetime.timedelta`), apart from the rendezvous
    that formed it. torch has one timeout for both at `init_process_group`; `_set_pg_timeout` (torch >= 2.3, the
    versions pyproject.toml allows) changes it afterwards for the gloo and NCCL backends."""
    if is_distributed():
        dist.distributed_c10d._set_pg_timeout(timeout)


def _runs_on(tensor: torch.Tensor) -> torch.device:
    return collective_device(tensor.device, backend_devices())


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place, on any device; returns it."""
    if world_size() == 1:
        return tensor
    device = _runs_on(tensor)
    if device == tensor.device:
        dist.all_reduce(tensor)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved)
    tensor.copy_(moved)
    return tensor


def barrier() -> None:
    """Every rank waits for all the others. Under NCCL on this rank's own device (torch would otherwise guess
    one from the rank number, wrong when a node's ranks do not own GPUs 0..n-1 in order)."""
    if world_size() == 1:
        return
    device = collective_device(torch.device("cpu"), backend_devices())
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` (its tensors moved to the CPU) on every rank."""
    box = [move(obj, "cpu")]
    if world_size() > 1:
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj` (its tensors moved to the CPU), in rank order."""
    obj = move(obj, "cpu")
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj, dst: int = 0) -> list | None:
    """Every rank's `obj` (its tensors moved to the CPU) on rank `dst`, in rank order; None on the others."""
    obj = move(obj, "cpu")
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out
