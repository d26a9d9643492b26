"""composable-sft's pytorch_diff.bin: files written by their encoder load exactly, ours load in their decoder,
round trips are exact, and nothing but tensors, numbers and NumPy int64 scalars is ever unpickled."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sfts import assert_same_sft, bits, metadata, random_sft, small_sft, tiny_mlm

from ltsft_dist.composable_format import METADATA_KEY, SFT_FILE_NAME, load_composable_sft, save_composable_sft
from ltsft_dist.errors import LtsftError
from ltsft_dist.sft import SparseFineTuning

# Both come from their code reproduced below (written for NumPy 1 and an older torch).
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
]

# ---------------------------------------------------------------------- their code, as in cambridgeltl/composable-sft
# src/sft/sft.py: encode_sparse_tensor / decode_sparse_tensor / SFT.save, reproduced to write and read real files.


def reference_encode(tensor):
    multipliers = np.cumprod([1] + list(tensor.size())[:-1], dtype=np.int64)
    coordinates = np.array(tensor.indices().to("cpu"), dtype=np.int64)
    indices = np.matmul(multipliers, coordinates)
    perm = list(range(len(indices)))
    perm.sort(key=lambda x: indices[x])
    indices = indices[perm]
    index_steps = indices[1:] - indices[:-1]
    index_steps = index_steps.tolist()
    if len(indices) > 0:
        index_steps = [indices[0]] + index_steps
    values = tensor.values().to("cpu")[perm]
    return {"size": tensor.size(), "index_steps": index_steps, "values": values}


def reference_decode(encoding):
    size = encoding["size"]
    index_steps = encoding["index_steps"]
    values = encoding["values"]
    indices = np.cumsum(index_steps, dtype=np.int32)
    modulos = np.cumprod(list(size), dtype=np.int32)
    divisors = np.concatenate([[1], modulos[:-1]], dtype=np.int32)
    coordinates = np.expand_dims(indices, 0) // np.expand_dims(divisors, 1)
    coordinates = coordinates % np.expand_dims(modulos, 1)
    # check_invariants: their decoder gets 3-D coordinates wrong, and an unchecked out-of-range index makes
    # to_dense() write outside its buffer (heap corruption that crashed a later test).
    return torch.sparse_coo_tensor(coordinates, values, size=size, check_invariants=True).coalesce()


def reference_save(directory: Path, dense_diffs: dict, abs_params: dict) -> Path:
    """What their SFT.add_param(...); SFT.save(directory) writes."""
    tensors = {
        "diffs": {n: reference_encode(t.to_sparse().coalesce()) for n, t in dense_diffs.items()},
        "abs": {n: t.to("cpu") for n, t in abs_params.items()},
    }
    torch.save(tensors, directory / SFT_FILE_NAME)
    return directory / SFT_FILE_NAME


# ---------------------------------------------------------------------- helpers


def sparse_dense(shape, density, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g)
    return torch.where(torch.rand(shape, generator=g) < density, values, 0.0)


def to_dense(sft: SparseFineTuning, name: str) -> torch.Tensor:
    indices, values = sft.diffs[name]
    dense = torch.zeros(sft.shapes[name]).reshape(-1)
    dense[indices] = values
    return dense.reshape(sft.shapes[name])


def pickle_bytes(path: Path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


def their_dir(tmp_path) -> tuple[Path, dict, dict]:
    dense = {
        "bert.embeddings.word_embeddings.weight": sparse_dense((100, 32), 0.05, 1),
        "bert.encoder.layer.0.intermediate.dense.weight": sparse_dense((37, 32), 0.05, 2),
        "bert.encoder.layer.0.intermediate.dense.bias": sparse_dense((37,), 0.3, 3),
    }
    heads = {"cls.predictions.bias": torch.randn(100), "cls.predictions.transform.dense.weight": torch.randn(32, 32)}
    reference_save(tmp_path, dense, heads)
    return tmp_path, dense, heads


# ---------------------------------------------------------------------- reading their files


def test_loads_a_file_written_by_composable_sft_exactly(tmp_path):
    directory, dense, heads = their_dir(tmp_path)
    (directory / "config.json").write_text(json.dumps({"_name_or_path": "bert-base-multilingual-cased"}))
    assert b"numpy._core.multiarray\nscalar" in pickle_bytes(directory / SFT_FILE_NAME)  # NumPy 2 scalar inside

    sft = load_composable_sft(directory)

    assert sft.shapes == {n: tuple(t.shape) for n, t in dense.items()}
    for name, expected in dense.items():
        assert torch.equal(bits(to_dense(sft, name)), bits(expected)), name
        indices = sft.diffs[name][0]
        assert indices.dtype == torch.int64 and torch.all(indices[1:] > indices[:-1])
    assert list(sft.heads) == list(heads)
    assert all(torch.equal(sft.heads[n], heads[n]) for n in heads)
    assert sft.metadata.kind == "task"  # it has dense heads
    assert sft.metadata.base_model == "bert-base-multilingual-cased"
    assert sft.metadata.k == sft.nnz == sum(int((t != 0).sum()) for t in dense.values())


def test_loads_numpy1_scalar_pickles(tmp_path, monkeypatch):
    """NumPy 1 pickled the scalar as numpy.core.multiarray.scalar; write such a file by renaming the function."""
    from numpy._core.multiarray import scalar

    monkeypatch.setattr(scalar, "__module__", "numpy.core.multiarray")
    dense = {"w": sparse_dense((6, 7), 0.3, 4)}
    path = reference_save(tmp_path, dense, {})
    monkeypatch.undo()
    raw = pickle_bytes(path)
    assert b"numpy.core.multiarray\nscalar" in raw and b"numpy._core" not in raw

    sft = load_composable_sft(path)
    assert torch.equal(to_dense(sft, "w"), dense["w"])


def test_loads_the_early_body_head_layout(tmp_path):
    dense = sparse_dense((5, 3), 0.5, 5)
    torch.save({"body": {"w": reference_encode(dense.to_sparse().coalesce())}, "head": {"h": torch.ones(2)}},
               tmp_path / SFT_FILE_NAME)
    sft = load_composable_sft(tmp_path)
    assert torch.equal(to_dense(sft, "w"), dense) and list(sft.heads) == ["h"]


def test_reads_3d_tensors_their_encoder_wrote_although_their_decoder_cannot(tmp_path):
    dense = sparse_dense((3, 4, 5), 0.3, 6)
    encoding = reference_encode(dense.to_sparse().coalesce())
    with pytest.raises(RuntimeError, match="index"):  # why we refuse to write them
        reference_decode(encoding)
    torch.save({"diffs": {"w": encoding}, "abs": {}}, tmp_path / SFT_FILE_NAME)
    assert torch.equal(to_dense(load_composable_sft(tmp_path), "w"), dense)


def test_fp16_values_convert_exactly(tmp_path):
    dense = sparse_dense((4, 4), 0.5, 7).half()
    reference_save(tmp_path, {"w": dense}, {})
    sft = load_composable_sft(tmp_path)
    assert sft.diffs["w"][1].dtype == torch.float32
    assert torch.equal(to_dense(sft, "w"), dense.float())


# ---------------------------------------------------------------------- never executing pickled code


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_refuses_pickled_code_without_running_it(tmp_path):
    sentinel = tmp_path / "pwned"
    torch.save({"diffs": {}, "abs": {"h": _Touch(sentinel)}}, tmp_path / SFT_FILE_NAME)
    with pytest.raises(LtsftError, match="refused.*GLOBAL") as err:
        load_composable_sft(tmp_path)
    assert not sentinel.exists()
    assert SFT_FILE_NAME in str(err.value) and "\n" not in str(err.value)


def test_refuses_numpy_scalars_other_than_int64(tmp_path):
    encoding = reference_encode(sparse_dense((4, 4), 0.5, 8).to_sparse().coalesce())
    encoding["index_steps"][0] = np.float64(encoding["index_steps"][0])
    torch.save({"diffs": {"w": encoding}, "abs": {}}, tmp_path / SFT_FILE_NAME)
    with pytest.raises(LtsftError, match="refused"):
        load_composable_sft(tmp_path)


# ---------------------------------------------------------------------- corrupt files


def _write_encoding(tmp_path, **changes):
    encoding = {"size": torch.Size([4, 5]), "index_steps": [np.int64(2), 3, 4], "values": torch.tensor([1.0, 2.0, 3.0])}
    torch.save({"diffs": {"enc.w": {**encoding, **changes}}, "abs": {}}, tmp_path / SFT_FILE_NAME)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"index_steps": [np.int64(2), 0, 4]}, "not strictly increasing"),
        ({"index_steps": [np.int64(2), -1, 4]}, "not strictly increasing"),
        ({"index_steps": [np.int64(2), 3, 15]}, "index 20 out of range"),
        ({"index_steps": [np.int64(2), 3, 2**62]}, "out of range"),
        ({"index_steps": [2.0, 3, 4]}, "list of int64-range integers"),
        ({"index_steps": [2, 3]}, "2 index steps but 3 values"),
        ({"values": torch.tensor([1.0, float("nan"), 3.0])}, "NaN or Inf"),
        ({"values": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}, "do not convert exactly"),
        ({"size": (4, -5)}, "malformed size"),
    ],
)
def test_rejects_bad_entries_naming_file_and_parameter(tmp_path, changes, message):
    _write_encoding(tmp_path, **changes)
    with pytest.raises(LtsftError, match=message) as err:
        load_composable_sft(tmp_path)
    assert SFT_FILE_NAME in str(err.value) and "'enc.w'" in str(err.value)


def test_rejects_truncated_and_foreign_files(tmp_path):
    _write_encoding(tmp_path)
    path = tmp_path / SFT_FILE_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LtsftError, match="corrupt or truncated"):
        load_composable_sft(path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(LtsftError, match="not a composable-sft file"):
        load_composable_sft(path)
    with pytest.raises(LtsftError, match="missing"):
        load_composable_sft(tmp_path / "nowhere")


# ---------------------------------------------------------------------- writing


def test_written_file_matches_their_layout_and_decoder(tmp_path):
    sft = random_sft(tiny_mlm(), density=0.1, head_prefix="cls.")
    save_composable_sft(sft, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == [SFT_FILE_NAME]

    # Python ints only: it loads without allowing any NumPy global.
    raw = torch.load(tmp_path / "out" / SFT_FILE_NAME, weights_only=True)
    assert set(raw) == {"diffs", "abs", METADATA_KEY}
    name = "bert.encoder.layer.1.intermediate.dense.weight"
    entry = raw["diffs"][name]
    assert isinstance(entry["size"], torch.Size) and entry["values"].dtype == torch.float32
    for name, entry in raw["diffs"].items():
        assert torch.equal(bits(reference_decode(entry).to_dense()), bits(to_dense(sft, name))), name
    assert all(torch.equal(raw["abs"][n], sft.heads[n]) for n in sft.heads)


def test_native_composable_native_round_trip_is_exact(tmp_path):
    sft = random_sft(tiny_mlm(), density=0.2, head_prefix="cls.", kind="task", languages=("sw",))
    save_composable_sft(sft, tmp_path / "c")
    back = load_composable_sft(tmp_path / "c")
    assert_same_sft(sft, back)
    assert back.metadata == sft.metadata
    back.save_pretrained(tmp_path / "n")
    assert_same_sft(sft, SparseFineTuning.from_pretrained(tmp_path / "n"))


def test_their_file_round_trips_through_ours_exactly(tmp_path):
    (tmp_path / "theirs").mkdir()
    directory, _, _ = their_dir(tmp_path / "theirs")
    ours = load_composable_sft(directory)
    save_composable_sft(ours, tmp_path / "again")
    assert_same_sft(ours, load_composable_sft(tmp_path / "again"))


def test_from_pretrained_detects_composable_directories(tmp_path):
    directory, dense, _ = their_dir(tmp_path)
    sft = SparseFineTuning.from_pretrained(directory)
    assert torch.equal(to_dense(sft, "bert.encoder.layer.0.intermediate.dense.bias"),
                       dense["bert.encoder.layer.0.intermediate.dense.bias"])


@pytest.mark.parametrize("shape, message", [((2, 3, 4), "only 1-D and 2-D"), ((2**31,), "int32 indices")])
def test_refuses_to_write_what_their_decoder_would_misread(tmp_path, shape, message):
    sft = SparseFineTuning({"w": (torch.tensor([1]), torch.tensor([0.5]))}, {"w": shape}, {}, metadata())
    with pytest.raises(LtsftError, match=message):
        save_composable_sft(sft, tmp_path)
    assert not (tmp_path / SFT_FILE_NAME).exists()


def test_explicit_metadata_overrides_the_embedded_one(tmp_path):
    save_composable_sft(small_sft({"w": ([1, 2], [0.5, 0.25])}), tmp_path)
    sft = load_composable_sft(tmp_path, metadata=metadata(languages=("yo",)))
    assert sft.metadata.languages == ["yo"]
