"""Wrapping a model in a DeepSpeed engine with the batch sizes and clipping of our config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ltsft_dist.errors import LtsftError

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "layernorm.weight")


def init_distributed() -> None:
    """Join the process group the launcher set up (one process alone is a world of 1)."""
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    deepspeed.init_distributed()


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
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine
