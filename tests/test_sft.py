"""The SFT artifact: exact save/load, bit-exact apply/revert, clear errors, composition and inspection."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx2
import huggingface_hub
import huggingface_hub.constants
import pytest
import safetensors
import safetensors.torch
import torch
import yaml
from sfts import (assert_bit_identical, assert_same_sft, bits, metadata, random_sft, small_sft, snapshot,
                  tiny_classifier, tiny_mlm)

import ltsft_dist.files as files_module
from ltsft_dist.errors import LtsftError
from ltsft_dist.sft import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    SparseFineTuning,
    base_fingerprint,
    compose,
    module_type_and_layer,
)

# ---------------------------------------------------------------------- save / load


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny_mlm()
    sft = random_sft(model, head_prefix="cls.", kind="task", languages=("en", "de"))
    # Values whose bits a sloppy path would lose: -0.0, a subnormal, the largest float32.
    name = "bert.embeddings.word_embeddings.weight"
    indices, values = sft.diffs[name]
    values[:3] = torch.tensor([-0.0, 1e-45, 3.4028235e38])
    sft.diffs[name] = (indices, values)
    sft.diffs["bert.pooler.dense.bias"] = (torch.zeros(0, dtype=torch.int64), torch.zeros(0))  # empty diff
    sft.shapes["bert.pooler.dense.bias"] = (32,)

    sft.save_pretrained(tmp_path / "new" / "sft")
    loaded = SparseFineTuning.from_pretrained(tmp_path / "new" / "sft")

    assert_same_sft(sft, loaded)
    assert loaded.metadata == sft.metadata
    assert loaded.metadata.head_names == [n for n, _ in model.named_parameters() if n.startswith("cls.")]
    assert sorted(os.listdir(tmp_path / "new" / "sft")) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])


def test_save_overwrites_previous_artifact(tmp_path):
    model = tiny_mlm()
    random_sft(model, seed=1).save_pretrained(tmp_path)
    second = random_sft(model, seed=2)
    second.save_pretrained(tmp_path)
    assert_same_sft(second, SparseFineTuning.from_pretrained(tmp_path))


def test_failed_save_keeps_previous_artifact_and_leaves_no_temp_files(tmp_path, monkeypatch):
    model = tiny_mlm()
    first = random_sft(model, seed=1)
    first.save_pretrained(tmp_path)

    def half_written(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        random_sft(model, seed=2).save_pretrained(tmp_path)

    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
    assert_same_sft(first, SparseFineTuning.from_pretrained(tmp_path))


def test_save_interrupted_between_the_two_files_is_detected_on_load(tmp_path, monkeypatch):
    model = tiny_mlm()
    random_sft(model, seed=1).save_pretrained(tmp_path)
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(files_module.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        random_sft(model, seed=2).save_pretrained(tmp_path)
    monkeypatch.undo()

    with pytest.raises(LtsftError, match="interrupted"):
        SparseFineTuning.from_pretrained(tmp_path)


def test_unserialisable_training_config_is_refused_before_writing(tmp_path):
    sft = small_sft({"w": ([1], [0.5])}, training_config={"bad": object()})
    with pytest.raises(LtsftError, match="JSON"):
        sft.save_pretrained(tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def _rewrite_weights(directory, edit):
    """Re-save the tensor file with edit(tensors) applied, keeping the save_id so that only the edit is wrong."""
    path = directory / WEIGHTS_NAME
    with safetensors.safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        file_meta = f.metadata()
    edit(tensors)
    safetensors.torch.save_file(tensors, str(path), metadata=file_meta)


def _set_values(tensors, values):
    tensors["values:w"] = torch.tensor(values, dtype=torch.float32)


def _set_indices(tensors, indices):
    tensors["indices:w"] = torch.tensor(indices, dtype=torch.int64)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: _set_values(t, [0.1, float("nan"), 0.3]), "NaN or Inf"),
        (lambda t: _set_values(t, [0.1, float("inf"), 0.3]), "NaN or Inf"),
        (lambda t: _set_indices(t, [1, 7, 20]), "index 20 out of range for 20"),
        (lambda t: _set_indices(t, [1, 7, 7]), "duplicate index 7"),
        (lambda t: _set_indices(t, [7, 1, 9]), "unsorted index 1"),
        (lambda t: t.pop("values:w"), "'values:w' is missing"),
        (lambda t: t.update({"values:w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}), "float32"),
    ],
)
def test_load_rejects_bad_tensors_naming_file_and_parameter(tmp_path, edit, message):
    small_sft({"w": ([1, 7, 9], [0.1, 0.2, 0.3])}).save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, edit)
    with pytest.raises(LtsftError, match=message) as err:
        SparseFineTuning.from_pretrained(tmp_path)
    assert WEIGHTS_NAME in str(err.value)
    assert "values:w" in str(err.value) or "'w'" in str(err.value)


def test_load_rejects_truncated_tensor_file(tmp_path):
    small_sft({"w": ([1, 7, 9], [0.1, 0.2, 0.3])}).save_pretrained(tmp_path)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) - 5])
    with pytest.raises(LtsftError, match=f"{WEIGHTS_NAME}: corrupt or truncated"):
        SparseFineTuning.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda text: text[: len(text) // 2], "corrupt JSON"),
        (lambda text: text.replace('"format_version": 1', '"format_version": 2'), "unknown format_version 2"),
        (lambda text: text.replace('"kind": "language"', '"kind": "dialect"'), "kind must be one of"),
        (lambda text: text.replace('"save_id"', '"saveid"'), "'save_id'"),
    ],
)
def test_load_rejects_bad_config(tmp_path, edit, message):
    small_sft({"w": ([1], [0.1])}).save_pretrained(tmp_path)
    config = tmp_path / CONFIG_NAME
    config.write_text(edit(config.read_text()))
    with pytest.raises(LtsftError, match=message) as err:
        SparseFineTuning.from_pretrained(tmp_path)
    assert CONFIG_NAME in str(err.value)


def test_load_of_missing_directory_or_file_is_clear(tmp_path):
    with pytest.raises(LtsftError, match="nope: not an SFT directory"):
        SparseFineTuning.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LtsftError, match=f"{CONFIG_NAME}: missing"):
        SparseFineTuning.from_pretrained(tmp_path / "empty")


def test_hub_download_failure_is_one_clear_error(monkeypatch):
    calls = []

    def offline(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the hub and nothing cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(LtsftError, match="downloading it from the Hugging Face hub failed") as err:
        SparseFineTuning.from_pretrained("someone/some-sft", revision="v1")
    assert "LocalEntryNotFoundError" in str(err.value)
    assert calls[0][0] == "someone/some-sft" and calls[0][1]["revision"] == "v1"
    assert WEIGHTS_NAME in calls[0][1]["allow_patterns"]  # never downloads a whole model repo


def test_a_hub_id_loads_offline_from_the_local_cache(tmp_path, monkeypatch):
    """`from_pretrained("org/name")` with HF_HUB_OFFLINE=1 resolves through huggingface_hub to the snapshot that
    refs/main names in the cache (the layout `snapshot_download` leaves), asking no server."""
    sft = random_sft(tiny_mlm(), seed=4, head_prefix="cls.", kind="task")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--name"
    sft.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    loaded = SparseFineTuning.from_pretrained("org/name")
    assert_same_sft(sft, loaded)
    assert loaded.metadata == sft.metadata
    with pytest.raises(LtsftError, match="the hub cannot be reached and it is not in the local cache"):
        SparseFineTuning.from_pretrained("org/other")


class _RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records what push_to_hub asks for and keeps a copy of the folder it
    would upload (the temporary folder is gone after the call)."""

    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", {"repo_id": repo_id, **kwargs}))
        self.uploaded = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        _RecordingHfApi.last_upload = self.uploaded
        return "commit-info"


def test_push_to_hub_creates_the_repository_and_uploads_the_saved_artifact(tmp_path, monkeypatch):
    _RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _RecordingHfApi)
    training_config = {"task": "clm", "model": {"name_or_path": "Qwen/Qwen2.5-0.5B", "tiny": None},
                       "data": {"sources": [{"language": "et", "hf_dataset": "wikimedia/wikipedia",
                                             "hf_config": "20231101.et", "split": "train"},
                                            {"language": "sw", "train_file": "/home/me/corpora/sw.txt"}]}}
    sft = random_sft(tiny_mlm(), seed=5, languages=("et", "sw"), base_model="Qwen/Qwen2.5-0.5B",
                     training_config=training_config)

    assert sft.push_to_hub("me/et-sft", private=True, token="tok", commit_message="first") == "commit-info"
    names = [name for name, _ in _RecordingHfApi.calls]
    assert names == ["init", "create_repo", "upload_folder"]
    assert _RecordingHfApi.calls[0][1] == {"token": "tok"}
    assert _RecordingHfApi.calls[1][1] == {"repo_id": "me/et-sft", "private": True, "exist_ok": True}
    upload = _RecordingHfApi.calls[2][1]
    assert upload["repo_id"] == "me/et-sft" and upload["commit_message"] == "first" and upload["create_pr"] is False
    files = _RecordingHfApi.last_upload
    assert sorted(files) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
    for name, content in files.items():  # what was uploaded is the artifact itself
        (tmp_path / "pushed").mkdir(exist_ok=True)
        (tmp_path / "pushed" / name).write_bytes(content)
    assert_same_sft(sft, SparseFineTuning.from_pretrained(tmp_path / "pushed"))

    card = files[CARD_NAME].decode()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "Qwen/Qwen2.5-0.5B" and front["language"] == ["et", "sw"]
    assert front["library_name"] == "ltsft-dist" and front["datasets"] == ["wikimedia/wikipedia"]
    assert {"ltsft", "sparse-fine-tuning", "language-sft", "clm"} <= set(front["tags"])
    assert front["sft"] == {"kind": "language", "k": sft.metadata.k, "density": 0.1}
    assert f"| K (selected parameters) | {sft.metadata.k:,} |" in card and "| density | 10.00% |" in card
    assert "et: wikimedia/wikipedia/20231101.et/train; sw: sw.txt" in card
    assert "/home/me" not in card  # local paths stay on the machine that trained


def test_model_card_of_a_local_or_tiny_base_names_no_hub_base_model(tmp_path):
    local = random_sft(tiny_mlm(), base_model=str(tmp_path), training_config={})
    tiny = random_sft(tiny_mlm(), base_model="tiny", training_config={"model": {"tiny": {"hidden_size": 8}}})
    for sft in (local, tiny):
        sft.save_pretrained(tmp_path / "out")
        front = yaml.safe_load((tmp_path / "out" / CARD_NAME).read_text().split("---\n")[1])
        assert "base_model" not in front and front["library_name"] == "ltsft-dist" and "datasets" not in front


def test_push_to_hub_failure_is_one_clear_error(monkeypatch):
    class Denied(_RecordingHfApi):
        def create_repo(self, repo_id, **kwargs):
            request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
            raise huggingface_hub.errors.HfHubHTTPError("403 Forbidden", response=httpx2.Response(403, request=request))

    monkeypatch.setattr(huggingface_hub, "HfApi", Denied)
    with pytest.raises(LtsftError, match=r"push_to_hub\('me/x'\): access denied .*log in"):
        random_sft(tiny_mlm()).push_to_hub("me/x")


# ---------------------------------------------------------------------- construction checks


@pytest.mark.parametrize(
    "indices, values, message",
    [
        ([3, 3], [0.1, 0.2], "duplicate index 3"),
        ([4, 2], [0.1, 0.2], "unsorted index 2"),
        ([2, 20], [0.1, 0.2], "index 20 out of range"),
        ([-1, 2], [0.1, 0.2], "index -1 out of range"),
        ([1, 2], [0.1, float("nan")], "NaN or Inf"),
        ([1, 2], [0.1, float("-inf")], "NaN or Inf"),
        ([1, 2], [0.1], "equal length"),
    ],
)
def test_constructor_validates_diffs(indices, values, message):
    with pytest.raises(LtsftError, match=message) as err:
        small_sft({"enc.w": (indices, values)})
    assert "'enc.w'" in str(err.value)


def test_constructor_rejects_wrong_dtypes_and_inconsistent_names():
    with pytest.raises(LtsftError, match="float32, got torch.float64"):
        small_sft({"w": ([1], torch.tensor([0.5], dtype=torch.float64))})
    with pytest.raises(LtsftError, match="must be integers"):
        SparseFineTuning({"w": (torch.tensor([1.0]), torch.tensor([0.5]))}, {"w": (3,)}, {}, metadata())
    with pytest.raises(LtsftError, match="no shape given"):
        SparseFineTuning({"w": (torch.tensor([1]), torch.tensor([0.5]))}, {}, {}, metadata())
    with pytest.raises(LtsftError, match="both a sparse diff and a dense head"):
        small_sft({"w": ([1], [0.5])}, heads={"w": torch.zeros(4, 5)})
    with pytest.raises(LtsftError, match="NaN or Inf"):
        small_sft({"w": ([1], [0.5])}, heads={"h": torch.tensor([float("nan")])})


def test_sft_owns_copies_of_its_tensors():
    indices, values = torch.tensor([1, 2]), torch.tensor([0.1, 0.2])
    sft = SparseFineTuning({"w": (indices, values)}, {"w": (3,)}, {}, metadata())
    values[0] = 9.0
    assert sft.diffs["w"][1][0] == pytest.approx(0.1)


# ---------------------------------------------------------------------- apply / revert


def test_apply_adds_in_float32_and_revert_restores_every_bit():
    model = tiny_mlm()
    before = snapshot(model)
    sft = random_sft(model, density=0.2, head_prefix="cls.")

    assert sft.apply(model) == []

    params = dict(model.named_parameters())
    for name, (indices, values) in sft.diffs.items():
        flat = params[name].detach().reshape(-1)
        assert torch.equal(flat[indices], before[name].reshape(-1)[indices] + values), name
        untouched = torch.ones(flat.numel(), dtype=torch.bool)
        untouched[indices] = False
        assert torch.equal(flat[untouched], before[name].reshape(-1)[untouched]), name
    for name, head in sft.heads.items():
        assert torch.equal(params[name].detach(), head)

    sft.revert(model)
    assert_bit_identical(model, before)
    assert all(p.requires_grad for p in model.parameters())


def test_row_major_offsets_address_the_right_element():
    model = torch.nn.Linear(5, 4, bias=False)  # weight shape (4, 5); no base_model_prefix
    before = model.weight.detach().clone()
    sft = SparseFineTuning({"weight": (torch.tensor([7]), torch.tensor([1.0]))}, {"weight": (4, 5)}, {}, metadata())
    sft.apply(model)
    assert model.weight[1, 2] == before[1, 2] + 1.0  # 7 = 1 * 5 + 2
    assert (model.weight != before).sum() == 1


def test_apply_revert_on_bf16_model_is_bit_identical():
    model = tiny_mlm().to(torch.bfloat16)
    before = snapshot(model)
    sft = random_sft(model, density=0.3, head_prefix="cls.")
    sft.apply(model)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    indices, values = sft.diffs[name]
    expected = (before[name].reshape(-1)[indices].float() + values).to(torch.bfloat16)
    assert torch.equal(bits(dict(model.named_parameters())[name].reshape(-1)[indices]), bits(expected))
    sft.revert(model)
    assert_bit_identical(model, before)


def test_overlapping_applies_revert_in_reverse_order_bit_identically():
    model = tiny_mlm()
    before = snapshot(model)
    language = random_sft(model, density=0.5, seed=1)
    task = random_sft(model, density=0.5, seed=2, head_prefix="cls.", kind="task")
    language.apply(model)
    task.apply(model)
    with pytest.raises(LtsftError, match="reverse order"):
        language.revert(model)
    task.revert(model)
    language.revert(model)
    assert_bit_identical(model, before)


def test_composed_apply_revert_bit_identical_and_sums_overlaps():
    model = tiny_mlm()
    before = snapshot(model)
    a, b = random_sft(model, density=0.5, seed=1), random_sft(model, density=0.5, seed=2)
    composed, report = compose(a, b)
    assert report.total > 0

    composed.apply(model)
    name = "bert.embeddings.word_embeddings.weight"
    dense = torch.zeros(before[name].numel())
    for sft in (a, b):
        dense.index_add_(0, *sft.diffs[name])
    expected = before[name].reshape(-1) + dense
    assert torch.equal(dict(model.named_parameters())[name].detach().reshape(-1), expected)
    composed.revert(model)
    assert_bit_identical(model, before)


def test_apply_twice_and_revert_unapplied_are_errors():
    model = tiny_mlm()
    sft = random_sft(model)
    with pytest.raises(LtsftError, match="not applied"):
        sft.revert(model)
    sft.apply(model)
    with pytest.raises(LtsftError, match="already applied"):
        sft.apply(model)
    sft.revert(model)
    sft.apply(model)  # fine again after a revert
    sft.revert(model)


def test_shape_mismatch_names_first_parameter_and_both_shapes_and_leaves_model_unchanged():
    sft = random_sft(tiny_mlm())
    other = tiny_mlm(vocab_size=90)
    before = snapshot(other)
    with pytest.raises(LtsftError) as err:
        sft.apply(other)
    message = str(err.value)
    assert "'bert.embeddings.word_embeddings.weight'" in message
    assert "(100, 32)" in message and "(90, 32)" in message
    assert_bit_identical(other, before)
    with pytest.raises(LtsftError, match="not applied"):  # the failed apply left no trace
        sft.revert(other)


def test_language_sft_on_classifier_needs_skip_missing_heads():
    language = random_sft(tiny_mlm(), head_prefix="cls.")
    classifier = tiny_classifier()
    before = snapshot(classifier)

    with pytest.raises(LtsftError, match="no parameter 'cls.predictions.bias'.*skip_missing_heads"):
        language.apply(classifier)
    assert_bit_identical(classifier, before)

    skipped = language.apply(classifier, skip_missing_heads=True)
    assert skipped == list(language.heads) and all(name.startswith("cls.") for name in skipped)
    name = "bert.encoder.layer.1.output.dense.weight"
    assert not torch.equal(dict(classifier.named_parameters())[name], before[name])
    language.revert(classifier)
    assert_bit_identical(classifier, before)


def test_missing_body_parameter_is_an_error_even_with_skip_missing_heads():
    task = random_sft(tiny_classifier(), head_prefix="classifier.", kind="task")  # has bert.pooler.* diffs
    mlm = tiny_mlm()
    with pytest.raises(LtsftError, match="no parameter 'bert.pooler.dense.weight'"):
        task.apply(mlm, skip_missing_heads=True)


def test_base_fingerprint_ignores_heads_and_pooler_but_not_the_body():
    assert base_fingerprint(tiny_mlm()) == base_fingerprint(tiny_classifier(seed=3))
    assert base_fingerprint(tiny_mlm()) == base_fingerprint(tiny_mlm().bert)
    assert base_fingerprint(tiny_mlm()) != base_fingerprint(tiny_mlm(intermediate_size=38))
    plain = torch.nn.Sequential(torch.nn.Linear(2, 3))
    assert base_fingerprint(plain) != base_fingerprint(torch.nn.Sequential(torch.nn.Linear(2, 4)))


# ---------------------------------------------------------------------- compose


def test_compose_counts_overlaps_per_parameter_and_sums_values():
    a = small_sft({"p": ([0, 2, 5], [1.0, 2.0, 3.0]), "q": ([1], [1.0])}, languages=("de",), k=4, density=0.1)
    b = small_sft({"p": ([2, 3, 5], [10.0, 20.0, 30.0]), "r": ([4], [4.0])}, languages=("en",), k=4, density=0.1)
    c = small_sft({"p": ([5], [100.0])}, kind="task", languages=("en",), k=1, density=0.1)
    composed, report = compose(a, b, c)

    assert composed.diffs["p"][0].tolist() == [0, 2, 3, 5]
    assert composed.diffs["p"][1].tolist() == [1.0, 12.0, 20.0, 133.0]
    assert report.per_param == {"p": 2} and report.total == 2
    assert report.input_nnz == [4, 4, 1]
    assert "overlapping positions: 2" in str(report)
    assert composed.metadata.kind == "task"
    assert composed.metadata.languages == ["de", "en"]
    assert composed.metadata.k == composed.nnz == 6
    assert composed.metadata.density == pytest.approx(6 / 40)


def test_compose_heads_union_and_conflicts():
    head = torch.arange(3.0)
    a = small_sft({"p": ([0], [1.0])}, heads={"h": head, "g": torch.ones(2)})
    same = small_sft({"p": ([1], [1.0])}, heads={"h": head.clone()})
    composed, _ = compose(a, same)
    assert sorted(composed.heads) == ["g", "h"] and sorted(composed.metadata.head_names) == ["g", "h"]

    different = small_sft({"p": ([1], [1.0])}, heads={"h": head + 1})
    with pytest.raises(LtsftError, match="different values for head 'h'"):
        compose(a, different)
    with pytest.raises(LtsftError, match="'p' is a dense head in one SFT"):
        compose(a, small_sft({"q": ([1], [1.0])}, heads={"p": torch.zeros(4, 5)}))
    with pytest.raises(LtsftError, match=r"'p' has shape \(4, 5\) and \(20,\)"):
        compose(a, small_sft({"p": ([1], [1.0])}, shapes={"p": (20,)}))


def test_compose_refuses_different_bases():
    a = small_sft({"p": ([0], [1.0])}, base_fingerprint="aaa", base_model="m1")
    b = small_sft({"p": ([0], [1.0])}, base_fingerprint="bbb", base_model="m2")
    with pytest.raises(LtsftError, match="different base models"):
        compose(a, b)
    assert SparseFineTuning.compose(a, small_sft({"p": ([1], [1.0])}))[1].total == 0


# ---------------------------------------------------------------------- summary


@pytest.mark.parametrize(
    "name, expected",
    [
        ("bert.encoder.layer.3.attention.self.query.weight", ("attention.self.query", 3)),
        ("bert.encoder.layer.11.intermediate.dense.bias", ("intermediate.dense", 11)),
        ("bert.embeddings.word_embeddings.weight", ("bert.embeddings.word_embeddings", None)),
        ("model.layers.0.mlp.up_proj.weight", ("mlp.up_proj", 0)),
        ("transformer.h.2.attn.c_attn.weight", ("attn.c_attn", 2)),
    ],
)
def test_module_type_and_layer(name, expected):
    assert module_type_and_layer(name) == expected


def test_summary_reports_densities_per_module_type_and_layer():
    sft = small_sft(
        {
            "bert.encoder.layer.0.attention.self.query.weight": ([0, 1], [1.0, 1.0]),
            "bert.encoder.layer.1.attention.self.query.weight": ([0, 1, 2, 3], [1.0] * 4),
            "bert.encoder.layer.1.attention.self.query.bias": ([0], [1.0]),
            "bert.embeddings.word_embeddings.weight": ([0], [1.0]),
        },
        shapes={
            "bert.encoder.layer.0.attention.self.query.weight": (4, 5),
            "bert.encoder.layer.1.attention.self.query.weight": (4, 5),
            "bert.encoder.layer.1.attention.self.query.bias": (5,),
            "bert.embeddings.word_embeddings.weight": (10, 10),
        },
        heads={"cls.bias": torch.zeros(7)},
        k=8,
    )
    summary = sft.summary()
    json.dumps(summary)  # JSON-ready
    assert summary["nnz"] == 8 and summary["k"] == 8 and summary["kind"] == "language"
    assert summary["params"]["bert.encoder.layer.1.attention.self.query.weight"] == 4
    assert summary["module_types"]["attention.self.query"] == {"nnz": 7, "numel": 45, "density": 7 / 45}
    assert summary["module_types"]["embeddings.word_embeddings"]["density"] == pytest.approx(0.01)
    assert summary["layers"]["0"]["density"] == pytest.approx(2 / 20)
    assert summary["layers"]["1"] == {"nnz": 5, "numel": 25, "density": 0.2}
    assert summary["heads"] == {"cls.bias": [7]}
