"""Merging SFTs into their base: a plain Hugging Face model directory that needs no ltsft to load or serve."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ltsft_dist.devices import inference_device
from ltsft_dist.errors import LtsftError
from ltsft_dist.evaluation import head_names, load_sft_flag, require_same_base
from ltsft_dist.hub import resolve
from ltsft_dist.sft import SparseFineTuning, compose
from ltsft_dist.tasks import get_task

PROVENANCE = "ltsft_export.json"


@dataclass
class Merged:
    model: torch.nn.Module  # θ⁰ + Σφ, on the device the SFTs were applied on
    base: Path  # the base's local directory (with its tokenizer)
    nnz: int  # positions the composed SFTs change
    overlap: int  # positions more than one SFT changes
    skipped: list[str]  # SFT heads foreign to the task's model (a language SFT's MLM head)


def load_sfts(sft_locations: list[str]) -> list[SparseFineTuning]:
    """The `--sft` SFTs to merge, at least one."""
    if not sft_locations:
        raise LtsftError("no SFT to merge: pass --sft DIR (repeatable)")
    return [load_sft_flag(location, "--sft") for location in sft_locations]


def merged_model(base_dir, sft_locations: list[str], sfts: list[SparseFineTuning], task: str,
                 device: str | None = None) -> Merged:
    """The task's model of the base with the SFTs (`load_sfts` of `sft_locations`) composed and applied (on
    `device`, default the accelerator when there is one), refusing SFTs of another base and a task model without
    its head."""
    from ltsft_dist.models import load_task_model

    spec = get_task(task, "--task")
    base = resolve(base_dir, "--base", collective=False)  # one process loads it (rank 0 of a group, if any)
    if not (base / "config.json").is_file():
        raise LtsftError(f"--base {base_dir}: no config.json in {base}; pass a hub model or a directory written by "
                         "save_pretrained")
    task_sft = next((s for s in sfts if s.metadata.kind == "task"), None)  # it records the label names
    labels = spec.head_labels(task_sft.metadata.training_config if task_sft else {}, f"--task {task}: the task SFT")
    model = load_task_model(base, task, len(labels) if labels else None)
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    for location, sft in zip(sft_locations, sfts):
        require_same_base(sft, model, f"--sft {location}", base_dir)
    composed, overlap = compose(*sfts)
    skipped = composed.apply(model.to(inference_device(device)), skip_missing_heads=True)  # e.g. an MLM head
    if spec.kind == "task":  # a task SFT carries its head; a language task's head is the base's
        missing = sorted(head_names(model) - set(composed.heads))
        if missing:
            raise LtsftError(f"no --sft carries the {task} head ({missing[0]!r} is missing; skipped as foreign to "
                             f"a {task} model: {skipped or 'nothing'}): add the task SFT or pass the --task it "
                             "was trained for")
    return Merged(model, base, composed.nnz, overlap.total, skipped)


def export_merged(base_dir, sft_locations: list[str], task: str, out, overwrite: bool = False,
                  device: str | None = None) -> Path:
    """θ⁰ + Σφ (the SFTs composed) with the task head, written by save_pretrained beside the base's tokenizer.

    The SFTs are applied on `device` and the model is saved from the CPU. The directory appears complete or not at
    all: it is written under a temporary name and renamed."""
    from transformers import AutoTokenizer

    out = Path(out)
    if out.exists() and not overwrite:
        raise LtsftError(f"-o {out}: already exists; choose another directory or pass --overwrite")
    merged = merged_model(base_dir, sft_locations, load_sfts(sft_locations), task, device)
    model = merged.model.to("cpu")
    _separate_shared_parameters(model)
    tokenizer = AutoTokenizer.from_pretrained(merged.base)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        provenance = {"base": str(base_dir), "task": task, "sfts": list(map(str, sft_locations)),
                      "nnz": merged.nnz, "overlapping_positions": merged.overlap, "skipped": merged.skipped}
        (temp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        _replace_dir(temp, out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return out


def _separate_shared_parameters(model) -> None:
    """Give every parameter that is shared between modules its own copy, so each is saved under its own name.

    The MLM model has untied output embeddings (tie_word_embeddings=False), and then transformers no longer ties
    the decoder bias to `cls.predictions.bias` on load either: a checkpoint holding only one of them would reload
    with the other freshly initialised."""
    seen = set()
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) in seen:
                setattr(module, name, torch.nn.Parameter(param.detach().clone()))
            seen.add(id(param))


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing target is moved aside first and removed only once `new` is in place."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        target.rename(old / target.name)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old)
