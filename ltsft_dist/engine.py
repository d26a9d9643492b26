"""Wrapping a model in a DeepSpeed engine with the batch sizes and clipping of our config."""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

import torch

from ltsft_dist.errors import LtsftError

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "layernorm.weight")


def init_distributed() -> None:
    """Join the process group described by whichever launcher started us (deepspeed/torchrun, srun, mpiexec;
    none is a world of 1), with a bounded timeout so a missing rank fails the job instead of hanging it."""

    import deepspeed

    from ltsft_dist.devices import bind_accelerator
    from ltsft_dist.launch_env import discover, dist_timeout, process_group_backend
    from ltsft_dist.shards import disable_shm_allreduce

    timeout = dist_timeout()
    env = discover()
    env.export(os.environ)  # what env:// rendezvous and DeepSpeed read
    device = bind_accelerator(env.local_rank)
    disable_shm_allreduce()
    try:
        deepspeed.init_distributed(dist_backend=process_group_backend(device.type), auto_mpi_discovery=False,
                                   timeout=timeout)
    except RuntimeError as err:  # DistStoreError/DistNetworkError: someone did not show up in time
        raise LtsftError(
            f"{env.describe()}: could not form the process group within {timeout.total_seconds():g} s ({err}). "
            f"Check that all {env.world_size} ranks started (launcher logs), that {env.master_addr} resolves and "
            f"port {env.master_port} is reachable from every node; LTSFT_DIST_TIMEOUT_S sets the wait") from err
    # A clean exit. Now and then a rank that finished dies in gloo's C++ teardown (static destructors at exit;
    # destroy_process_group() first does not help): "terminate called without an active exception", SIGABRT,
    # failing a job that succeeded. `leave_cleanly` skips that teardown; the CLI calls it as soon as a command
    # succeeds (before other atexit handlers can start the teardown), and it stays registered for sys.exit(0).
    _outcome["status"] = "running"
    real_exit, real_excepthook = sys.exit, sys.excepthook

    def recording_exit(status=None):
        _outcome["status"] = 0 if status is None else status
        real_exit(status)

    def recording_excepthook(*exc_info):
        _outcome["status"] = "uncaught exception"
        real_excepthook(*exc_info)

    sys.exit, sys.excepthook = recording_exit, recording_excepthook
    atexit.register(lambda: leave_cleanly() if _outcome["status"] == 0 else None)
    if env.rank == 0:
        print(f"ltsft: {env.describe()}", file=sys.stderr, flush=True)


_outcome = {"status": "not distributed"}  # "running" once init_distributed has run, then the exit status


def leave_cleanly(status: int = 0) -> None:
    """End a distributed process now with `status`, without C++ teardown (see init_distributed) and without
    exit-time collectives, which would make a failing rank wait for peers that are still training."""
    if _outcome["status"] == "not distributed":
        return
    mpi = sys.modules.get("mpi4py.MPI")
    if status == 0 and mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():  # (collective)
        mpi.Finalize()
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def load_ds_config(path: Path, *, micro_batch_size: int, accumulation: int, world_size: int,
                   max_grad_norm: float) -> dict:
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LtsftError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    ours = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": accumulation,
            "train_batch_size": micro_batch_size * accumulation * world_size, "gradient_clipping": max_grad_norm}
    for key, value in ours.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise LtsftError(f"{path}: {key}={ds[key]!r} contradicts the training config ({value}); set it to "
                             '"auto" and let the training config decide')
        ds[key] = value
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def build_engine(model: torch.nn.Module, ds_config: dict, lr: float, weight_decay: float):
    """AdamW with the usual no-decay group (biases, LayerNorm weights), handed to DeepSpeed."""
    import deepspeed

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(NO_DECAY) else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    from ltsft_dist.devices import engine_args

    engine, *_ = deepspeed.initialize(args=engine_args(), model=model, optimizer=optimizer, config=ds_config)
    return engine
