"""Read and write the SFT format of the paper's reference code (cambridgeltl/composable-sft, ``src/sft/sft.py``).

A directory holds one file, ``pytorch_diff.bin``: ``torch.save`` of
``{'diffs': {name: {'size': torch.Size, 'index_steps': [int, ...], 'values': tensor}}, 'abs': {name: tensor}}``.
Their ``encode_sparse_tensor`` flattens indices column-major (i0 + i1*size0 + i2*size0*size1 ...), sorts them
and stores the first index followed by the differences between neighbours (the first is a NumPy int64 scalar,
the rest Python ints); 'abs' holds the dense (head) tensors. Ours are row-major: we convert both ways in int64.

Writing is limited to what their decoder reads back correctly: it uses int32 cumulative sums (so at most
2**31 - 1 elements per tensor) and maps only 1-D and 2-D tensors back to the right coordinates, so larger or
higher-dimensional parameters are refused with an LtsftError instead of producing a file it would misread.
Reading accepts any number of dimensions, since their encoder itself is correct for all of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from pathlib import Path

import numpy as np
import torch

from ltsft_dist.errors import LtsftError
from ltsft_dist.files import write_atomically
from ltsft_dist.sft import SFTMetadata, SparseFineTuning

SFT_FILE_NAME = "pytorch_diff.bin"
# composable-sft reads only 'diffs' and 'abs'; our metadata rides along in this extra key (a JSON string).
METADATA_KEY = "ltsft_metadata"
_INT32_MAX = 2**31 - 1


def load_composable_sft(path_or_dir, metadata: SFTMetadata | None = None) -> SparseFineTuning:
    """Load a composable-sft ``pytorch_diff.bin`` (or its directory) without executing pickled code.

    The file carries no metadata of its own: ``metadata`` overrides, else the copy we embed when writing, else
    an inferred one (kind "task" when it has dense heads, base model from a ``config.json`` beside it).
    """
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / SFT_FILE_NAME
    raw = _safe_load(path)
    encoded_diffs, heads = _components(raw, path)
    try:
        diffs, shapes = {}, {}
        for name, encoding in encoded_diffs.items():
            shapes[name], diffs[name] = _decode(name, encoding)
        nnz = sum(len(indices) for indices, _ in diffs.values())
        metadata = metadata or _embedded_metadata(raw) or _inferred_metadata(path.parent, nnz, bool(heads))
        return SparseFineTuning(diffs, shapes, heads, metadata)
    except LtsftError as err:
        raise LtsftError(f"{path}: {err}") from None


def save_composable_sft(sft: SparseFineTuning, directory) -> None:
    """Write ``directory/pytorch_diff.bin`` that composable-sft's ``SFT(directory)`` loads to the same values."""
    for name, shape in sft.shapes.items():
        _check_writable(name, shape)
    payload = {
        "diffs": {name: _encode(*sft.diffs[name], shape) for name, shape in sft.shapes.items()},
        "abs": dict(sft.heads),
        METADATA_KEY: json.dumps(dataclasses.asdict(sft.metadata)),
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically({directory / SFT_FILE_NAME: lambda p: torch.save(payload, p)})


# ---------------------------------------------------------------------- index order


def _strides(shape: tuple[int, ...], column_major: bool) -> list[int]:
    dims = list(shape) if column_major else list(reversed(shape))
    strides = [math.prod(dims[:i]) for i in range(len(dims))]
    return strides if column_major else list(reversed(strides))


def _reorder(flat: torch.Tensor, shape: tuple[int, ...], *, to_column_major: bool) -> torch.Tensor:
    """Map flat offsets between row-major and column-major order of the same tensor."""
    source = _strides(shape, column_major=not to_column_major)
    target = _strides(shape, column_major=to_column_major)
    out = torch.zeros_like(flat)
    for size, src, dst in zip(shape, source, target):
        out += (flat // src) % size * dst
    return out


def _encode(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> dict:
    columns = _reorder(indices, shape, to_column_major=True)
    order = torch.argsort(columns)
    columns = columns[order]
    steps = torch.diff(columns, prepend=torch.zeros(1, dtype=torch.int64))
    # Python ints (theirs pickle a NumPy scalar first): their decoder takes either, and anyone can unpickle ints.
    return {"size": torch.Size(shape), "index_steps": steps.tolist(), "values": values[order].clone()}


def _decode(name: str, encoding) -> tuple[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]]:
    if not isinstance(encoding, dict) or not {"size", "index_steps", "values"} <= set(encoding):
        raise LtsftError(f"parameter {name!r}: expected a dict with 'size', 'index_steps' and 'values'")
    shape = _shape(name, encoding["size"])
    steps = _steps(name, encoding["index_steps"])
    values = _values(name, encoding["values"])
    numel = math.prod(shape)
    if len(steps) != len(values):
        raise LtsftError(f"parameter {name!r}: {len(steps)} index steps but {len(values)} values")
    if len(steps) and (steps[0] < 0 or (steps[1:] <= 0).any()):
        raise LtsftError(f"parameter {name!r}: indices are not strictly increasing (duplicate or unsorted)")
    if (steps >= numel).any():  # checked before the sum, which could otherwise overflow
        raise LtsftError(f"parameter {name!r}: index out of range for shape {shape}")
    columns = torch.cumsum(steps, 0)
    if len(columns) and columns[-1] >= numel:
        raise LtsftError(f"parameter {name!r}: index {int(columns[-1])} out of range for shape {shape}")
    rows = _reorder(columns, shape, to_column_major=False)
    order = torch.argsort(rows)
    return shape, (rows[order], values[order])


def _shape(name: str, size) -> tuple[int, ...]:
    if not isinstance(size, (torch.Size, tuple, list)) or not all(_is_int(s) and s >= 0 for s in size):
        raise LtsftError(f"parameter {name!r}: malformed size {size!r}")
    if len(size) == 0:
        raise LtsftError(f"parameter {name!r}: 0-dimensional tensors are not part of this format")
    return tuple(int(s) for s in size)


def _steps(name: str, steps) -> torch.Tensor:
    if isinstance(steps, torch.Tensor):
        steps = steps.tolist()
    if not isinstance(steps, (list, tuple)):
        raise LtsftError(f"parameter {name!r}: index_steps must be a list of integers")
    try:
        array = np.asarray(steps) if steps else np.zeros(0, dtype=np.int64)
    except (OverflowError, ValueError):
        array = None
    # NumPy infers int64 for a mix of NumPy and Python ints; anything else (floats, huge ints) is not an index.
    if array is None or array.ndim != 1 or array.dtype.kind != "i":
        raise LtsftError(f"parameter {name!r}: index_steps must be a list of int64-range integers")
    return torch.from_numpy(array.astype(np.int64))


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _values(name: str, values) -> torch.Tensor:
    # Only dtypes that convert to our float32 exactly.
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise LtsftError(f"parameter {name!r}: values must be a 1-D tensor")
    if values.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise LtsftError(f"parameter {name!r}: values of dtype {values.dtype} do not convert exactly to float32")
    return values.float()


def _check_writable(name: str, shape: tuple[int, ...]) -> None:
    if len(shape) not in (1, 2):
        raise LtsftError(
            f"parameter {name!r} has shape {shape}: composable-sft's decoder restores only 1-D and 2-D tensors "
            f"correctly; keep this SFT in the native format"
        )
    if math.prod(shape) > _INT32_MAX:
        raise LtsftError(
            f"parameter {name!r} has {math.prod(shape)} elements: composable-sft's decoder uses int32 indices; "
            f"keep this SFT in the native format"
        )


# ---------------------------------------------------------------------- the pickle


def _allowed_globals() -> list:
    """Exactly what a pickled NumPy int64 scalar needs, under its NumPy 1 and NumPy 2 module names."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import scalar
    return [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        type(np.dtype(np.int64)),  # the scalar's dtype is rebuilt with BUILD, which needs its class
    ]


def _safe_load(path: Path):
    if not path.is_file():
        raise LtsftError(f"{path}: missing; expected a composable-sft {SFT_FILE_NAME}")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise LtsftError(
            f"{path}: refused: it holds Python objects other than tensors, numbers and NumPy int64 scalars "
            f"({_unpickling_reason(err)})"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise LtsftError(f"{path}: corrupt or truncated torch file ({str(err).splitlines()[0]})") from None


def _unpickling_reason(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines()]
    return next((line for line in lines if "GLOBAL" in line or "Can only build" in line), "unsupported content")


def _components(raw, path: Path) -> tuple[dict, dict]:
    if not isinstance(raw, dict):
        raise LtsftError(f"{path}: expected a dict with 'diffs' and 'abs', got {type(raw).__name__}")
    # Early composable-sft releases named the same two parts 'body' and 'head'.
    if not {"diffs", "abs", "body", "head"} & set(raw):
        raise LtsftError(f"{path}: no 'diffs' or 'abs' entry; not a composable-sft file")
    diffs = raw.get("diffs", raw.get("body")) or {}
    heads = raw.get("abs", raw.get("head")) or {}
    for part in (diffs, heads):
        if not isinstance(part, dict) or not all(isinstance(name, str) for name in part):
            raise LtsftError(f"{path}: 'diffs' and 'abs' must map parameter names to entries")
    return diffs, heads


def _embedded_metadata(raw: dict) -> SFTMetadata | None:
    if METADATA_KEY not in raw:
        return None
    try:
        fields = json.loads(raw[METADATA_KEY])
        return SFTMetadata(**fields)
    except (TypeError, ValueError) as err:
        raise LtsftError(f"malformed {METADATA_KEY!r} entry ({err})") from None


def _inferred_metadata(directory: Path, nnz: int, has_heads: bool) -> SFTMetadata:
    return SFTMetadata(
        kind="task" if has_heads else "language",
        languages=[],
        base_model=_base_model_name(directory),
        base_fingerprint="",
        k=nnz,
        density=0.0,
        training_config={"source": "composable-sft"},
    )


def _base_model_name(directory: Path) -> str:
    """composable-sft saves the fine-tuned model's config.json beside the SFT; it names the base."""
    try:
        return str(json.loads((directory / "config.json").read_text()).get("_name_or_path", ""))
    except (OSError, ValueError, AttributeError):
        return ""
