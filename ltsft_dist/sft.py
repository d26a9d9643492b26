"""The SFT artifact: a sparse difference per body parameter plus dense head tensors.

``apply`` keeps the exact values it overwrites, so ``revert`` restores a model bit-identically; the reference
code subtracts instead, which is not bit-exact and drifts over the many apply/revert pairs of multi-source training
(the per-step swap of `ltsft_dist.swap` restores saved values for the same reason).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import tempfile
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import safetensors
import safetensors.torch
import torch

from ltsft_dist.errors import LtsftError
from ltsft_dist.files import write_atomically
from ltsft_dist.hub import resolve
from ltsft_dist.naming import body_prefix, module_type_and_layer

FORMAT_VERSION = 1
CONFIG_NAME = "sft_config.json"
WEIGHTS_NAME = "sft.safetensors"
CARD_NAME = "README.md"  # the Hugging Face model card
LIBRARY_NAME = "ltsft-dist"
KINDS = ("language", "task")

logger = logging.getLogger(__name__)


@dataclass
class SFTMetadata:
    """What an SFT was trained for and on which base; saved as JSON beside the tensors."""

    kind: str  # "language" | "task"
    languages: list[str]  # language code(s)
    base_model: str  # name or path of the base model
    base_fingerprint: str  # base_fingerprint(model) of the base model; "" when unknown
    k: int  # number of selected positions (mask size)
    density: float  # k / number of eligible parameters; 0.0 when unknown
    training_config: dict  # free-form, JSON-serialisable
    format_version: int = FORMAT_VERSION
    head_names: list[str] = field(default_factory=list)  # filled by SparseFineTuning

    def __post_init__(self):
        if self.kind not in KINDS:
            raise LtsftError(f"SFT kind must be one of {KINDS}, got {self.kind!r}")
        if self.format_version != FORMAT_VERSION:
            raise LtsftError(
                f"unknown SFT format_version {self.format_version}; this ltsft reads version {FORMAT_VERSION}"
            )


def base_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the body's parameter names and shapes, to tell SFTs of different bases apart.

    Names are taken relative to ``base_model_prefix`` and the pooler is left out, because masked-LM models build
    the same body without it: a language SFT (MLM) and a task SFT (classification) of one base then agree.
    """
    lines = sorted(f"{name}:{shape}" for name, shape in _body_shapes(model).items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _body_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    prefix = body_prefix(model)
    body = {n[len(prefix) :]: p for n, p in model.named_parameters() if n.startswith(prefix)}
    from ltsft_dist.shards import param_shape  # (the real shape also under ZeRO-3)

    return {n: param_shape(p) for n, p in body.items() if not n.startswith("pooler.")}


class _Saved(NamedTuple):
    diffs: dict[str, torch.Tensor]  # original values at the touched positions
    heads: dict[str, torch.Tensor]  # original head tensors


# model -> stack of (sft, saved originals); weak so that applying never keeps a model alive.
_APPLIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class SparseFineTuning:
    """Sparse differences phi (flat row-major offsets, float32 values) plus dense heads."""

    def __init__(
        self,
        diffs: dict[str, tuple[torch.Tensor, torch.Tensor]],
        shapes: dict[str, tuple[int, ...]],
        heads: dict[str, torch.Tensor],
        metadata: SFTMetadata,
    ):
        extra = sorted(set(shapes) - set(diffs))
        if extra:
            raise LtsftError(f"shape given for parameter {extra[0]!r} which has no diff")
        clash = sorted(set(diffs) & set(heads))
        if clash:
            raise LtsftError(f"parameter {clash[0]!r} is both a sparse diff and a dense head")
        self.shapes = {name: _checked_shape(name, shapes.get(name)) for name in diffs}
        self.diffs = {name: _checked_diff(name, *pair, self.shapes[name]) for name, pair in diffs.items()}
        self.heads = {name: _checked_head(name, tensor) for name, tensor in heads.items()}
        self.metadata = dataclasses.replace(metadata, head_names=list(self.heads))

    @property
    def nnz(self) -> int:
        return sum(self.param_nnz.values())

    @property
    def param_nnz(self) -> dict[str, int]:
        return {name: len(indices) for name, (indices, _) in self.diffs.items()}

    def fingerprint(self) -> str:
        """SHA-256 of the content (diffs, shapes, heads; not the metadata): equal iff the SFT would act the same."""
        h = hashlib.sha256()
        for name in sorted(self.diffs):
            indices, values = self.diffs[name]
            h.update(f"diff {name} {self.shapes[name]} {len(indices)}\n".encode())
            h.update(indices.numpy().tobytes())
            h.update(values.numpy().tobytes())
        for name in sorted(self.heads):
            h.update(f"head {name} {tuple(self.heads[name].shape)}\n".encode())
            h.update(self.heads[name].contiguous().numpy().tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        m = self.metadata
        return f"SparseFineTuning(kind={m.kind!r}, languages={m.languages}, nnz={self.nnz}, heads={len(self.heads)})"

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(self, directory) -> None:
        """Write ``sft.safetensors``, ``sft_config.json`` and the model card ``README.md`` (replacing one already
        there); an interrupted save leaves the old artifact intact."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_id = uuid.uuid4().hex
        config = {**dataclasses.asdict(self.metadata), "shapes": self.shapes, "save_id": save_id}
        try:
            config_text = json.dumps(config, indent=2, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise LtsftError(f"SFT metadata is not JSON-serialisable (check training_config): {err}") from None
        tensors = {}
        for name, (indices, values) in self.diffs.items():
            tensors[f"indices:{name}"] = indices
            tensors[f"values:{name}"] = values
        tensors.update({f"head:{name}": tensor for name, tensor in self.heads.items()})
        write_atomically(
            {
                # The tensors are replaced first; load notices (save_id) if we stop before the config follows.
                directory / WEIGHTS_NAME: lambda p: safetensors.torch.save_file(
                    tensors, str(p), metadata={"format": "ltsft-sft", "save_id": save_id}
                ),
                directory / CONFIG_NAME: lambda p: p.write_text(config_text),
                directory / CARD_NAME: lambda p: p.write_text(model_card(self.metadata), encoding="utf-8"),
            }
        )

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, revision: str | None = None, create_pr: bool = False):
        """Upload the artifact (``save_pretrained``'s files) to the hub repository ``repo_id``, creating it when
        missing, as peft's ``push_to_hub`` does; returns huggingface_hub's ``CommitInfo``."""
        from huggingface_hub import HfApi

        from ltsft_dist.hub import explain

        api = HfApi(token=token)
        message = commit_message or f"Upload {self.metadata.kind} SFT ({', '.join(self.metadata.languages)})"
        try:
            repo = api.create_repo(repo_id, private=private, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="ltsft-push-") as folder:
                self.save_pretrained(folder)
                return api.upload_folder(repo_id=repo.repo_id, folder_path=folder, commit_message=message,
                                         revision=revision, create_pr=create_pr)
        except Exception as err:  # the hub raises many types; each becomes one message with its fix
            raise LtsftError(explain(err, f"push_to_hub({repo_id!r})")) from None

    @classmethod
    def from_pretrained(cls, dir_or_hub_id, **hub_kwargs) -> "SparseFineTuning":
        """Load from a directory or the Hugging Face hub (``hub_kwargs`` go to ``snapshot_download``).

        Also reads composable-sft directories (``pytorch_diff.bin``), so the reference code's published SFTs load.
        """
        from ltsft_dist import composable_format  # it imports this module

        hub_kwargs.setdefault(
            "allow_patterns", [CONFIG_NAME, WEIGHTS_NAME, composable_format.SFT_FILE_NAME, "config.json"]
        )
        directory = resolve(dir_or_hub_id, kind="an SFT directory", **hub_kwargs)
        if not (directory / CONFIG_NAME).exists() and (directory / composable_format.SFT_FILE_NAME).exists():
            return composable_format.load_composable_sft(directory)
        return cls._load_native(directory)

    @classmethod
    def _load_native(cls, directory: Path) -> "SparseFineTuning":
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        config = _read_config(config_path)
        shapes, save_id = config.pop("shapes"), config.pop("save_id")
        try:
            metadata = SFTMetadata(**config)
        except TypeError as err:
            raise LtsftError(f"{config_path}: unexpected metadata fields ({err})") from None
        except LtsftError as err:
            raise LtsftError(f"{config_path}: {err}") from None
        tensors, file_meta = _read_weights(weights_path)
        if file_meta.get("save_id") != save_id:
            raise LtsftError(
                f"{weights_path} does not belong to {config_path} (a save was interrupted?); save the SFT again"
            )
        try:
            diffs = {name: (_take(tensors, f"indices:{name}"), _take(tensors, f"values:{name}")) for name in shapes}
            heads = {name: _take(tensors, f"head:{name}") for name in metadata.head_names}
            if tensors:
                raise LtsftError(f"unexpected tensor {sorted(tensors)[0]!r}")
            return cls(diffs, shapes, heads, metadata)
        except LtsftError as err:
            raise LtsftError(f"{weights_path}: {err}") from None

    # ------------------------------------------------------------------ applying to a model

    def apply(self, model: torch.nn.Module, *, skip_missing_heads: bool = False) -> list[str]:
        """theta += phi (in float32) and copy the heads in; returns the non-body names skipped.

        Checks every parameter before touching any, so a failed apply leaves the model unchanged.
        """
        stack = _APPLIED.setdefault(model, [])
        if any(sft is self for sft, _ in stack):
            raise LtsftError("this SFT is already applied to the model; revert() it before applying it again")
        params = dict(model.named_parameters())
        skipped = self._check_fits(params, model, skip_missing_heads)
        self._warn_on_other_base(model)
        with torch.no_grad():
            saved = _Saved(
                {name: _add_diff(params[name], *diff) for name, diff in self.diffs.items() if name not in skipped},
                {name: _swap_head(params[name], head) for name, head in self.heads.items() if name not in skipped},
            )
        stack.append((self, saved))
        if skipped:
            logger.info("SFT parameters absent from the model, skipped: %s", ", ".join(skipped))
        return skipped

    def revert(self, model: torch.nn.Module) -> None:
        """Write back the saved original values (never subtracts, so the model is restored bit for bit)."""
        stack = _APPLIED.get(model, [])
        if not any(sft is self for sft, _ in stack):
            raise LtsftError("this SFT is not applied to the model, so there is nothing to revert")
        if stack[-1][0] is not self:
            raise LtsftError(f"revert SFTs in reverse order of apply(): {stack[-1][0]!r} was applied after this one")
        _, saved = stack.pop()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, original in saved.diffs.items():
                indices = self.diffs[name][0].to(original.device)
                params[name][torch.unravel_index(indices, params[name].shape)] = original
            for name, original in saved.heads.items():
                params[name].copy_(original)

    def _check_fits(self, params: dict, model: torch.nn.Module, skip_missing_heads: bool) -> list[str]:
        expected = {**self.shapes, **{name: tuple(t.shape) for name, t in self.heads.items()}}
        body, skipped = body_prefix(model), []
        for name, shape in expected.items():
            param = params.get(name)
            if param is None and skip_missing_heads and not name.startswith(body):
                skipped.append(name)
            elif param is None:
                hint = "" if name.startswith(body) else "; pass skip_missing_heads=True to apply without it"
                raise LtsftError(f"the model has no parameter {name!r} (SFT shape {shape}){hint}")
            elif tuple(param.shape) != shape:
                raise LtsftError(f"shape mismatch for {name!r}: SFT {shape}, model {tuple(param.shape)}")
        return skipped

    def _warn_on_other_base(self, model: torch.nn.Module) -> None:
        expected = self.metadata.base_fingerprint
        if expected and expected != base_fingerprint(model):
            logger.warning(
                "SFT was trained on %r whose body differs from this model's (fingerprint mismatch)",
                self.metadata.base_model,
            )

    # ------------------------------------------------------------------ composition and inspection

    @classmethod
    def compose(cls, *sfts: "SparseFineTuning") -> tuple["SparseFineTuning", "OverlapReport"]:
        return compose(*sfts)

    def summary(self) -> dict:
        """Everything ``ltsft inspect`` shows, as JSON-ready data."""
        m = self.metadata
        return {
            "kind": m.kind,
            "languages": m.languages,
            "k": m.k,
            "nnz": self.nnz,
            "density": m.density,
            "base_model": m.base_model,
            "base_fingerprint": m.base_fingerprint,
            "format_version": m.format_version,
            "training_config": m.training_config,
            "params": self.param_nnz,
            "heads": {name: list(t.shape) for name, t in self.heads.items()},
            **density_tables(self.param_nnz, self.shapes),
        }


# ---------------------------------------------------------------------- the model card


def model_card(metadata: SFTMetadata) -> str:
    """The hub's model card: YAML front matter (base model, languages, datasets, library, tags and the SFT's K and
    density) the hub indexes, and a short text saying what the SFT is and how to apply it."""
    from huggingface_hub import ModelCardData

    m = metadata
    config = m.training_config if isinstance(m.training_config, dict) else {}
    task = config.get("task")
    data = _training_data(config)
    base = _hub_base_model(m.base_model, config)
    card = ModelCardData(
        base_model=base, language=list(m.languages) or None, library_name=LIBRARY_NAME,
        datasets=sorted({d for d, _ in data if d}) or None,
        tags=["ltsft", "sparse-fine-tuning", "lt-sft", f"{m.kind}-sft", *([task] if isinstance(task, str) else [])],
        sft={"kind": m.kind, "k": m.k, "density": m.density},
    )
    rows = [("kind", m.kind), ("languages", ", ".join(m.languages) or "–"), ("base model", f"`{m.base_model}`"),
            ("task", task or "–"), ("K (selected parameters)", f"{m.k:,}"),
            ("density", f"{m.density:.2%}" if m.density else "unknown"),
            ("training data", "; ".join(text for _, text in data) or "–"), ("dense heads", len(m.head_names))]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    title = f"{m.kind.capitalize()} SFT ({', '.join(m.languages) or 'no language recorded'})"
    return f"""---
{card.to_yaml()}
---

# {title}

A sparse fine-tuning (Lottery-Ticket Sparse Fine-Tuning, Ansell et al., ACL 2022) of `{m.base_model}`, trained
with {LIBRARY_NAME}: a difference φ on {m.k:,} of the base's parameters, plus any dense task head. Composed with
other SFTs by summation (θ⁰ + φ_task + φ_language).

| | |
|---|---|
{table}

```python
from ltsft_dist.sft import SparseFineTuning

sft = SparseFineTuning.from_pretrained("<this repository or directory>")
sft.apply(model)   # θ ← θ + φ (and the dense head); sft.revert(model) restores θ bit for bit
```
"""


def _training_data(config: dict) -> list[tuple[str | None, str]]:
    """(hub dataset id or None, description) of each training source recorded in a training config; local files
    by name only, so a card never shows the paths of the machine it was trained on."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    sources = [s for s in data.get("sources") or [] if isinstance(s, dict)] or [data]
    found = []
    for source in sources:
        language = f"{source['language']}: " if source.get("language") else ""
        if source.get("hf_dataset"):
            parts = [source["hf_dataset"], source.get("hf_config"), source.get("split")]
            found.append((source["hf_dataset"], language + "/".join(str(p) for p in parts if p)))
        elif source.get("train_file"):
            found.append((None, language + Path(str(source["train_file"])).name))
    return found


def _hub_base_model(name: str, config: dict) -> str | None:
    """The base as a hub id for the card's `base_model`, None for a local directory or a random tiny model."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    if not name or model.get("tiny") or name == "tiny" or name.startswith((".", "/", "~")) or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


# ---------------------------------------------------------------------- validation


def _checked_shape(name: str, shape) -> tuple[int, ...]:
    if shape is None:
        raise LtsftError(f"no shape given for parameter {name!r}")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise LtsftError(f"parameter {name!r} has a negative dimension in shape {shape}")
    return shape


def _checked_diff(name: str, indices, values, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(indices, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise LtsftError(f"parameter {name!r}: indices and values must be tensors")
    if indices.dim() != 1 or values.dim() != 1 or len(indices) != len(values):
        raise LtsftError(
            f"parameter {name!r}: indices and values must be 1-D of equal length, "
            f"got shapes {tuple(indices.shape)} and {tuple(values.shape)}"
        )
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise LtsftError(f"parameter {name!r}: indices must be integers, got {indices.dtype}")
    if values.dtype != torch.float32:
        raise LtsftError(f"parameter {name!r}: values must be float32, got {values.dtype}")
    indices = indices.detach().to("cpu", torch.int64).clone()
    values = values.detach().cpu().clone()
    _check_indices(name, indices, math.prod(shape))
    _check_finite(name, values)
    return indices, values


def _check_indices(name: str, indices: torch.Tensor, numel: int) -> None:
    steps = indices[1:] - indices[:-1]
    if (steps <= 0).any():
        i = int(torch.nonzero(steps <= 0)[0]) + 1
        problem = "duplicate" if steps[i - 1] == 0 else "unsorted"
        raise LtsftError(
            f"parameter {name!r}: {problem} index {int(indices[i])} at position {i} "
            f"(indices must be strictly increasing)"
        )
    if len(indices) and (indices[0] < 0 or indices[-1] >= numel):
        bad = int(indices[0]) if indices[0] < 0 else int(indices[-1])
        raise LtsftError(f"parameter {name!r}: index {bad} out of range for {numel} elements")


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise LtsftError(f"parameter {name!r} has NaN or Inf values")


def _checked_head(name: str, tensor) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise LtsftError(f"head {name!r} must be a tensor, got {type(tensor).__name__}")
    _check_finite(name, tensor)
    return tensor.detach().cpu().clone()


# ---------------------------------------------------------------------- apply helpers


def _add_diff(param: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    coords = torch.unravel_index(indices.to(param.device), param.shape)
    original = param[coords]  # advanced indexing copies
    param[coords] = (original.float() + values.to(param.device)).to(param.dtype)
    return original


def _swap_head(param: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    original = param.detach().clone()
    param.copy_(head)
    return original


# ---------------------------------------------------------------------- files


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise LtsftError(f"{path}: missing; is this an SFT directory?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LtsftError(f"{path}: unreadable or corrupt JSON ({err})") from None
    if not isinstance(config, dict):
        raise LtsftError(f"{path}: expected a JSON object")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise LtsftError(f"{path}: unknown format_version {version!r}; this ltsft reads version {FORMAT_VERSION}")
    for key, kind in (("shapes", dict), ("save_id", str), ("head_names", list)):
        if not isinstance(config.get(key), kind):
            raise LtsftError(f"{path}: missing or malformed {key!r}")
    return config


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except FileNotFoundError:
        raise LtsftError(f"{path}: missing; is this an SFT directory?") from None
    except (OSError, safetensors.SafetensorError) as err:
        raise LtsftError(f"{path}: corrupt or truncated safetensors file ({err})") from None


def _take(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise LtsftError(f"tensor {key!r} is missing")
    return tensors.pop(key)


# ---------------------------------------------------------------------- composition


@dataclass
class OverlapReport:
    """Positions set by more than one input SFT: where composed SFTs may interfere."""

    per_param: dict[str, int]  # only parameters with overlaps
    total: int
    input_nnz: list[int]

    def __str__(self) -> str:
        lines = [f"overlapping positions: {self.total} (input nnz: {', '.join(map(str, self.input_nnz))})"]
        lines += [f"  {name}: {count}" for name, count in self.per_param.items()]
        return "\n".join(lines)


def compose(*sfts: SparseFineTuning) -> tuple[SparseFineTuning, OverlapReport]:
    """Sum the diffs (union of positions) and take the union of the heads."""
    if not sfts:
        raise LtsftError("compose needs at least one SFT")
    _check_same_base(sfts)
    shapes = _merged_shapes(sfts)
    heads = _merged_heads(sfts, shapes)
    diffs, overlaps = {}, {}
    for name in shapes:
        diffs[name], overlaps[name] = _sum_sparse([s.diffs[name] for s in sfts if name in s.diffs])
    nnz = sum(len(indices) for indices, _ in diffs.values())
    composed = SparseFineTuning(diffs, shapes, heads, _composed_metadata(sfts, nnz))
    report = OverlapReport(
        per_param={name: count for name, count in overlaps.items() if count},
        total=sum(overlaps.values()),
        input_nnz=[s.nnz for s in sfts],
    )
    return composed, report


def _check_same_base(sfts) -> None:
    fingerprints = {s.metadata.base_fingerprint: s.metadata.base_model for s in sfts if s.metadata.base_fingerprint}
    if len(fingerprints) > 1:
        raise LtsftError(f"cannot compose SFTs of different base models: {sorted(set(fingerprints.values()))}")


def _merged_shapes(sfts) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for sft in sfts:
        for name, shape in sft.shapes.items():
            if shapes.setdefault(name, shape) != shape:
                raise LtsftError(f"cannot compose: parameter {name!r} has shape {shapes[name]} and {shape}")
    return shapes


def _merged_heads(sfts, shapes: dict) -> dict[str, torch.Tensor]:
    heads = {}
    for sft in sfts:
        for name, tensor in sft.heads.items():
            if name in shapes:
                raise LtsftError(f"cannot compose: {name!r} is a dense head in one SFT and a sparse diff in another")
            if name in heads and not _identical(heads[name], tensor):
                raise LtsftError(f"cannot compose: two SFTs carry different values for head {name!r}")
            heads[name] = tensor
    return heads


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _sum_sparse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
    if len(parts) == 1:
        return parts[0], 0
    indices, inverse, counts = torch.unique(
        torch.cat([i for i, _ in parts]), sorted=True, return_inverse=True, return_counts=True
    )
    values = torch.zeros(len(indices), dtype=torch.float32).index_add_(0, inverse, torch.cat([v for _, v in parts]))
    return (indices, values), int((counts > 1).sum())


def _composed_metadata(sfts, nnz: int) -> SFTMetadata:
    metas = [s.metadata for s in sfts]
    languages = list(dict.fromkeys(lang for m in metas for lang in m.languages))
    # Density relative to the largest eligible set among the inputs (language and task sets can differ).
    eligible = max((round(m.k / m.density) for m in metas if m.density > 0), default=0)
    return SFTMetadata(
        kind="task" if any(m.kind == "task" for m in metas) else "language",
        languages=languages,
        base_model=metas[0].base_model,
        base_fingerprint=next((m.base_fingerprint for m in metas if m.base_fingerprint), ""),
        k=nnz,
        density=nnz / eligible if eligible else 0.0,
        training_config={
            "composed_from": [{"kind": m.kind, "languages": m.languages, "k": m.k} for m in metas],
        },
    )


# ---------------------------------------------------------------------- inspection



def density_tables(param_nnz: dict[str, int], shapes: dict[str, tuple[int, ...]]) -> dict:
    """Non-zeros and density per module type and per layer (for `inspect` and the training monitor)."""
    roots = {name.split(".", 1)[0] for name in param_nnz}
    strip = len(roots.pop()) + 1 if len(roots) == 1 else 0  # drop the shared "bert." for readability
    by_type: dict[str, list[int]] = {}
    by_layer: dict[str, list[int]] = {}
    for name, nnz in param_nnz.items():
        module_type, layer = module_type_and_layer(name)
        module_type = module_type if layer is not None else module_type[strip:] or module_type
        numel = math.prod(shapes[name])
        _accumulate(by_type, module_type, nnz, numel)
        if layer is not None:
            _accumulate(by_layer, str(layer), nnz, numel)
    return {"module_types": _densities(by_type), "layers": _densities(by_layer)}


def _accumulate(table: dict[str, list[int]], key: str, nnz: int, numel: int) -> None:
    counts = table.setdefault(key, [0, 0])
    counts[0] += nnz
    counts[1] += numel


def _densities(table: dict[str, list[int]]) -> dict[str, dict]:
    return {
        key: {"nnz": nnz, "numel": numel, "density": nnz / numel if numel else 0.0}
        for key, (nnz, numel) in table.items()
    }
