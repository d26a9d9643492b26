"""Wrapping a model in a DeepSpeed engine with the batch sizes and clipping of our config."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import torch

from ltsft_dist.eligibility import LAYER_NORM
from ltsft_dist.errors import LtsftError


def decays(name: str) -> bool:
    """Whether AdamW's weight decay applies to a parameter: not to biases and normalisation weights (BERT's
    LayerNorm, Llama's RMSNorms)."""
    return not (name.endswith("bias") or re.search(LAYER_NORM, name))


def init_distributed() -> None:
    """Join the process group described by whichever launcher started us (deepspeed/torchrun, srun, mpiexec;
    none is a world of 1), with bounded waits so a missing rank fails the job instead of hanging it: the
    rendezvous within LTSFT_RENDEZVOUS_TIMEOUT_S, each collective after it within LTSFT_COLLECTIVE_TIMEOUT_S.
    Does nothing in a process that has joined one already."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return

    from ltsft_dist import comm
    from ltsft_dist.devices import bind_accelerator
    from ltsft_dist.launch_env import (RENDEZVOUS_TIMEOUT_VAR, collective_timeout, discover, process_group_backend,
                                       rendezvous_timeout)
    from ltsft_dist.shards import disable_shm_allreduce

    timeout, per_collective = rendezvous_timeout(), collective_timeout()
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
            f"port {env.master_port} is reachable from every node; {RENDEZVOUS_TIMEOUT_VAR} sets the wait") from err
    comm.set_collective_timeout(per_collective)
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
    _peers[:] = comm.all_gather_object((socket.gethostname(), os.getpid()))
    if env.rank == 0:  # the pids let a launcher's "PID n ... KILLED" be read as a rank
        pids = " ".join(f"{rank}={pid}" for rank, (_, pid) in enumerate(_peers))
        print(f"ltsft: {env.describe()}\nltsft: process ids by rank: {pids}", file=sys.stderr, flush=True)


_outcome = {"status": "not distributed"}  # "running" once init_distributed has run, then the exit status
_peers: list = []  # (host, pid) of every rank, so that a rank whose collective failed can say who is gone


def gone_peers(wait_s: float = 2.0) -> list[str]:
    """The ranks on this host whose process has ended (killed, crashed): what a failed collective waited for.
    A killed process closes its sockets before it is marked dead, so a peer that saw the connection drop may be
    here first: wait up to `wait_s` for it. Ranks on other hosts cannot be checked from here."""
    deadline = time.monotonic() + wait_s
    while True:
        gone = []
        for rank, (host, pid) in enumerate(_peers):
            if host != socket.gethostname() or pid == os.getpid():
                continue
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                state = "gone"
            if state in ("gone", "Z", "X"):  # no such process, or a zombie its launcher has not reaped yet
                gone.append(f"rank {rank} (pid {pid})")
        if gone or not _peers or time.monotonic() > deadline:
            return gone
        time.sleep(0.02)


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


def join_launched_group() -> None:
    """Join the process group when a launcher started several ranks; a lone process runs by itself, without
    DeepSpeed's start-up (and can run inside another program, e.g. a test or the pipeline)."""
    import torch.distributed as dist

    from ltsft_dist.launch_env import discover

    if dist.is_initialized():
        return
    try:
        alone = discover(use_mpi4py=False).world_size == 1
    except LtsftError:  # e.g. an MPI launcher whose ranks only mpi4py can tell: let init_distributed find out
        alone = False
    if not alone:
        init_distributed()


def ds_config_for(config, world_size: int) -> dict:
    """The DeepSpeed config of a `TrainConfig`: its file, with the config's batch sizes and clipping."""
    from ltsft_dist.data import accumulation_steps

    return load_ds_config(config.deepspeed_path(), micro_batch_size=config.micro_batch_size,
                          accumulation=accumulation_steps(config.batch_size, config.micro_batch_size, world_size),
                          world_size=world_size, max_grad_norm=config.max_grad_norm)


def read_ds_config(path: Path) -> dict:
    """A DeepSpeed config file as it is, "auto" values and all."""
    try:
        ds = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise LtsftError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(ds, dict):
        raise LtsftError(f"{path}: expected a JSON object of DeepSpeed settings")
    return ds


def load_ds_config(path: Path, *, micro_batch_size: int, accumulation: int, world_size: int,
                   max_grad_norm: float) -> dict:
    ds = read_ds_config(path)
    ours = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": accumulation,
            "train_batch_size": micro_batch_size * accumulation * world_size, "gradient_clipping": max_grad_norm}
    for key, value in ours.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise LtsftError(f"{path}: {key}={ds[key]!r} contradicts the training config ({value}); set it to "
                             '"auto" and let the training config decide')
        ds[key] = value
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def zero_stage(ds_config: dict | None) -> int:
    return int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))


@contextlib.contextmanager
def partitioned_construction(ds_config: dict | None):
    """Under ZeRO-3, a model built or loaded inside goes straight into partitions, so no rank ever holds all of it:
    transformers' `HfDeepSpeedConfig`, alive while the model is made, has `from_config` and `from_pretrained`
    create it under `deepspeed.zero.Init` (initialised, or loaded from the checkpoint, into the partitions). Other
    stages: nothing changes (DeepSpeed partitions the optimizer state only)."""
    if zero_stage(ds_config) != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_config = HfDeepSpeedConfig(ds_config)  # noqa: F841  (transformers holds a weak reference to it)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()  # later loads (evaluation, export) are whole models again


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, **adam) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with the usual no-decay group (`decays`); `adam`: betas, eps. The one
    optimizer the masking supports, built the same way by `ltsft train` and the Trainer integration."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name) else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, **adam)


def build_engine(model: torch.nn.Module, ds_config: dict, lr: float, weight_decay: float):
    """`adamw`, handed to DeepSpeed."""
    import deepspeed

    optimizer = adamw(model, lr, weight_decay)
    from ltsft_dist.devices import engine_args

    engine, *_ = deepspeed.initialize(args=engine_args(), model=model, optimizer=optimizer, config=ds_config)
    return engine
