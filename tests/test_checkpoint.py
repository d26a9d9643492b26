"""Preemption-safe resume: stopping (on one rank's request) and resuming gives the same φ, bit for bit."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from distributed import run_ranks
from scenarios import classification_examples, run_cases, run_interrupted, task_config

STOPS = [(2, False), (3, True)]  # stop in phase 1 before step 3, then in phase 2 before step 4


def _resume_runs(configs: dict, world_size: int) -> dict:
    return {name: (run_interrupted(cfg, classification_examples(), world_size, STOPS), cfg.output_dir)
            for name, cfg in configs.items()}


def launch_resumed():
    # Configs are made here, once: every rank must see the same output_dir (a shared file system).
    configs = {f"z{s}": task_config(f"zero{s}.json", checkpoint_every=4) for s in (2, 3)}
    return run_ranks(_resume_runs, 2, configs, 2)[0]


@pytest.fixture(scope="session")
def resumed(launches):
    return functools.partial(launches, launch_resumed)


def launch_uninterrupted():
    cases = [(f"z{s}", task_config(f"zero{s}.json"), classification_examples(), 1) for s in (2, 3)]
    return run_ranks(run_cases, 2, cases, 2)[0]


@pytest.fixture(scope="session")
def uninterrupted(launches):
    return functools.partial(launches, launch_uninterrupted)


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_is_bit_identical(stage, resumed, uninterrupted):
    got, _ = resumed()[f"z{stage}"]
    assert got["stopped_at"] == ["round1-phase1-step0000003", "round1-phase2-step0000004"]
    want = uninterrupted()[f"z{stage}"]
    assert got["diffs"].keys() == want["diffs"].keys()
    for name, (idx, values) in want["diffs"].items():
        assert torch.equal(got["diffs"][name][0], idx)
        assert torch.equal(got["diffs"][name][1], values), name
    for name, value in want["heads"].items():
        assert torch.equal(got["heads"][name], value)


def test_results_after_a_resume_equal_those_of_an_uninterrupted_run(resumed, uninterrupted):
    """results.json is written from these statistics: the losses of every step, the selection's threshold and ties,
    the checks; only the timings (seconds) differ."""
    for stage in (2, 3):
        got, _ = resumed()[f"z{stage}"]
        want = uninterrupted()[f"z{stage}"]["stats"]
        assert got["stats"]["seconds"].keys() == want["seconds"].keys() == {"phase1", "select", "phase2"}
        assert [len(v) for v in got["stats"]["losses"].values()] == [6, 6]
        assert {k: v for k, v in got["stats"].items() if k != "seconds"} == \
            {k: v for k, v in want.items() if k != "seconds"}, stage


def _resume_elsewhere(output_dir: str) -> tuple:
    """Resume a W=2 ZeRO-2 checkpoint (phase 2, step 4 of 6) at W=1: first with a model of another shape (refused),
    then with the right one (runs to the end)."""
    from transformers import BertConfig, BertForSequenceClassification

    from ltsft_dist.errors import LtsftError
    from ltsft_dist.recipe import LTSFTRecipe
    from scenarios import TINY, ds_config_for

    cfg = task_config("zero2.json")
    cfg.output_dir, cfg.micro_batch_size = output_dir, cfg.batch_size
    torch.manual_seed(0)
    other = BertForSequenceClassification(BertConfig(**TINY, num_labels=4))
    try:
        LTSFTRecipe(other, classification_examples(), cfg, ds_config_for(cfg, 1), show_progress=False).run()
        message = "no error"
    except LtsftError as err:
        message = str(err)
    sft = run_cases([("again", cfg, classification_examples(), 1)], 1)["again"]
    return message, sft


def test_resume_at_another_world_size_works_and_another_model_is_refused(resumed, uninterrupted):
    _, output_dir = resumed()["z2"]
    message, got = run_ranks(_resume_elsewhere, 1, output_dir)[0]
    assert "parameter classifier.weight has shape [3, 16] there but [4, 16] in this run" in message, message
    assert "resume with the base model and eligibility that wrote it" in message, message
    _assert_close_sft(got, uninterrupted()["z2"])


# After a change of world size or ZeRO stage the gradients of the remaining steps are summed in another order
# (another partition of the batch and of the all-reduce), which changes them by a few fp32 ulps; Adam divides by
# √v, so a difference of relative size 1e-7 in a gradient moves an update of size lr = 3e-3 by about 3e-10, and
# the few remaining steps of the tiny run stay far below 1e-6. A wrong restore (a missing moment, a shifted slice,
# the wrong θ⁰) changes φ by the size of an update, 1e-3.
ATOL = 1e-6


def _assert_close_sft(got: dict, want: dict, atol: float = ATOL):
    """The same mask bit for bit; values equal within fp32 rounding of a different reduction order (see ATOL)."""
    assert got["diffs"].keys() == want["diffs"].keys()
    for name, (idx, values) in want["diffs"].items():
        assert torch.equal(got["diffs"][name][0], idx), name
        torch.testing.assert_close(got["diffs"][name][1], values, rtol=0, atol=atol, msg=name)
    for name, value in want["heads"].items():
        torch.testing.assert_close(got["heads"][name], value, rtol=0, atol=atol, msg=name)


def _stop(cfg, world_size: int, stop_step: int, in_phase2: bool) -> str:
    """Run until rank W-1 asks for a stop before `stop_step` of the given phase; returns the checkpoint's name."""
    from ltsft_dist.recipe import LTSFTRecipe, Preempted
    from scenarios import StopAt, ds_config_for, tiny_model

    cfg = copy.deepcopy(cfg)
    cfg.micro_batch_size = cfg.batch_size // world_size
    recipe = LTSFTRecipe(tiny_model(cfg.kind), classification_examples(), cfg, ds_config_for(cfg, world_size),
                         show_progress=False)
    recipe.step_hooks.append(StopAt(recipe, stop_step, in_phase2, rank=world_size - 1))
    with pytest.raises(Preempted) as stop:
        recipe.run()
    return stop.value.path.name


def _finish(cfg, world_size: int) -> dict | None:
    """Resume to the end; rank 0 returns the SFT, the statistics and how many steps this run trained."""
    from ltsft_dist.hooks import StepHook
    from ltsft_dist.recipe import LTSFTRecipe
    from scenarios import ds_config_for, tiny_model

    class Count(StepHook):
        steps = 0

        def before_step(self, step: int) -> None:
            self.steps += 1

    cfg = copy.deepcopy(cfg)
    cfg.micro_batch_size = cfg.batch_size // world_size
    recipe = LTSFTRecipe(tiny_model(cfg.kind), classification_examples(), cfg, ds_config_for(cfg, world_size),
                         show_progress=False, step_hooks=[count := Count()])
    sft = recipe.run()
    return sft and {"diffs": sft.diffs, "heads": sft.heads, "stats": dict(recipe.stats.__dict__),
                    "steps_run": count.steps}


def _interrupt_at_two_ranks(configs: dict) -> dict:
    """W=2 ZeRO-2: stopped in phase 2 (checkpoint at step 2 of 6) and in phase 1 (step 3 of 6); the phase-2
    checkpoint is copied and resumed here at ZeRO-3."""
    import shutil

    import torch.distributed as dist

    out = {"p2": _stop(configs["p2"], 2, 1, True), "p1": _stop(configs["p1"], 2, 2, False),
           "z0": _stop(configs["z0"], 2, 1, True)}
    if dist.get_rank() == 0:
        shutil.copytree(configs["p2"].output_dir, configs["z3"].output_dir, dirs_exist_ok=True)
        shutil.copytree(configs["z0"].output_dir, configs["z0_to_z2"].output_dir, dirs_exist_ok=True)
    dist.barrier()
    out["z3"] = _finish(configs["z3"], 2)
    out["z0_to_z2"] = _finish(configs["z0_to_z2"], 2)
    return out


def _resume_at_three_ranks(configs: dict) -> dict:
    return {name: _finish(configs[name], 3) for name in ("p2", "p1")}


def launch_across_layouts():
    configs = {name: task_config("zero2.json") for name in ("p2", "p1")}
    configs.update(z3=task_config("zero3.json"), z0=task_config("zero0.json"), z0_to_z2=task_config("zero2.json"))
    first = run_ranks(_interrupt_at_two_ranks, 2, configs)[0]
    return {"stopped": {k: first[k] for k in ("p2", "p1", "z0")}, "z3": first["z3"], "z0_to_z2": first["z0_to_z2"],
            **run_ranks(_resume_at_three_ranks, 3, configs)[0]}


@pytest.fixture(scope="session")
def across(launches):
    return functools.partial(launches, launch_across_layouts)


def test_a_phase2_stop_resumed_at_three_ranks_keeps_the_mask(across, uninterrupted):
    assert across()["stopped"]["p2"] == "round1-phase2-step0000002"
    assert across()["p2"]["steps_run"] == 4  # phase 2's steps 3 to 6: resumed, not started over
    _assert_close_sft(across()["p2"], uninterrupted()["z2"])


def test_a_phase2_stop_resumed_at_zero3_keeps_the_mask(across, uninterrupted):
    assert across()["z3"]["steps_run"] == 4
    _assert_close_sft(across()["z3"], uninterrupted()["z2"])


def test_a_zero0_checkpoint_resumed_at_zero2_keeps_the_mask(across, uninterrupted):
    """ZeRO 0 holds every parameter whole on every rank and keeps AdamW's state per parameter, not per flat."""
    assert across()["stopped"]["z0"] == "round1-phase2-step0000002"
    assert across()["z0_to_z2"]["steps_run"] == 4
    _assert_close_sft(across()["z0_to_z2"], uninterrupted()["z2"])


def test_a_phase1_stop_resumed_at_three_ranks_selects_the_same_mask(across, uninterrupted):
    assert across()["stopped"]["p1"] == "round1-phase1-step0000003"
    assert across()["p1"]["steps_run"] == 3 + 6
    _assert_close_sft(across()["p1"], uninterrupted()["z2"])


def test_statistics_survive_a_change_of_layout(across, uninterrupted):
    """Every step's loss is in the results (each rank's share of the mean: after the change, rank 0 of 3 holds
    other examples, so only the steps before the stop can be compared exactly)."""
    want = uninterrupted()["z2"]["stats"]
    for name, done_before in (("p2", {"phase1": 6, "phase2": 2}), ("p1", {"phase1": 3, "phase2": 0})):
        got = across()[name]["stats"]
        assert [len(v) for v in got["losses"].values()] == [6, 6], name
        for phase, steps in done_before.items():
            assert got["losses"][phase][:steps] == want["losses"][phase][:steps], (name, phase)
        assert got["seconds"].keys() == {"phase1", "select", "phase2"}
        assert got["k"] == want["k"] and got["frozen_drift"] == 0


def test_rng_states_round_trip():
    """torch, numpy and python random continue where they were saved (the accelerator's too, where there is one)."""
    import random

    import numpy as np

    from ltsft_dist import checkpoint

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # a cached gaussian in numpy's state
    saved = checkpoint._rng_states()
    drawn = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    checkpoint._set_rng_states(saved)
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn())
    assert torch.equal(drawn[0], again[0]) and np.array_equal(drawn[1], again[1])
    assert drawn[2] == again[2] and drawn[3] == again[3]


def test_rng_states_load_weights_only(tmp_path):
    from ltsft_dist import checkpoint

    torch.save(checkpoint._rng_states(), tmp_path / "rng.pt")
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    assert set(state) == {"torch", "accelerator", "numpy", "python"}


@pytest.mark.parametrize("change,expected", [
    (lambda p: p.pop("b"), "has no parameter b, which this model has"),
    (lambda p: p.update(c={"shape": [1], "role": "frozen"}), "holds parameter c, which this model lacks"),
    (lambda p: p.update(a={"shape": [2, 3], "role": "sparse"}), "parameter a has shape [2, 3] there but [2, 2]"),
    (lambda p: p.update(b={"shape": [4], "role": "frozen"}), "parameter b has role frozen there but head"),
])
def test_a_checkpoint_of_another_model_or_eligibility_is_refused(tmp_path, change, expected):
    from ltsft_dist import checkpoint
    from ltsft_dist.errors import LtsftError

    now = {"a": {"shape": [2, 2], "role": "sparse"}, "b": {"shape": [4], "role": "head"}}
    saved = copy.deepcopy(now)
    checkpoint._check_parameters(tmp_path, saved, now)  # the same: accepted
    change(saved)
    with pytest.raises(LtsftError, match="start over in a new output_dir") as err:
        checkpoint._check_parameters(tmp_path, saved, now)
    assert expected in str(err.value)


def test_checkpoints_are_complete_and_pruned(resumed):
    from pathlib import Path

    _, output_dir = resumed()["z3"]
    root = Path(output_dir) / "checkpoints"
    complete = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert not [p for p in complete if p.endswith(".tmp")]
    assert len(complete) <= 2 and (root / "latest").read_text() in complete
    latest = root / (root / "latest").read_text()
    assert (latest / "progress.json").is_file() and (latest / "rng_rank0.pt").is_file()
    assert (latest / "rng_rank1.pt").is_file() and not (latest / "engine").exists()
    from scenarios import tiny_classifier

    params = {p.name.removesuffix(".safetensors") for p in (latest / "params").iterdir()}
    assert params == {name for name, _ in tiny_classifier().named_parameters()}  # one file per parameter


def _stop_then(cfg, examples, world_size: int, stop_step: int, damage=None):
    """Run until a stop in phase 2 before `stop_step`, call `damage(checkpoint root)` on rank 0, then resume to
    the end. Returns (rank 0's final SFT or None, what rank 0 wrote to stderr while resuming, the error if any)."""
    import contextlib
    import io
    from pathlib import Path

    import torch.distributed as dist

    from ltsft_dist.errors import LtsftError
    from ltsft_dist.recipe import LTSFTRecipe, Preempted
    from scenarios import StopAt, ds_config_for, tiny_model

    def recipe():
        return LTSFTRecipe(tiny_model(cfg.kind), examples, cfg, ds_config_for(cfg, world_size), show_progress=False)

    if stop_step is not None:
        first = recipe()
        first.step_hooks.append(StopAt(first, stop_step, True, rank=0))
        with pytest.raises(Preempted):
            first.run()
    if damage is not None and dist.get_rank() == 0:
        damage(Path(cfg.output_dir) / "checkpoints")
    dist.barrier()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            sft = recipe().run()
    except LtsftError as err:
        return None, stderr.getvalue(), str(err)
    return sft, stderr.getvalue(), None


def _largest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate_latest(root):
    path = _largest_file(root / (root / "latest").read_text())
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _flip_a_byte_in_each(root):
    from ltsft_dist.checkpoint import _complete

    for directory in _complete(root):
        path = directory / "params" / "classifier.weight.safetensors"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


def _damaged_checkpoints(configs: dict) -> dict:
    """Both scenarios in one launch of 2 ranks."""
    import errno
    from unittest import mock

    from ltsft_dist import checkpoint

    examples, out = classification_examples(), {}
    # The latest checkpoint truncated: fall back to the previous one; then every checkpoint corrupted.
    cfg = configs["corrupt"]
    cfg.micro_batch_size = cfg.batch_size // 2
    sft, said, error = _stop_then(cfg, examples, 2, 3, _truncate_latest)
    out["fallback"] = (sft and {"diffs": sft.diffs, "heads": sft.heads}, said, error)
    out["none_left"] = _stop_then(cfg, examples, 2, None, _flip_a_byte_in_each)[1:]
    # The disk fills up while the phase-2 step-2 checkpoint is written (on every rank: one shared file system).
    cfg = configs["full"]
    cfg.micro_batch_size = cfg.batch_size // 2
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if "phase2-step0000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    with mock.patch.object(torch, "save", save):
        _, _, error = _stop_then(cfg, examples, 2, None)
    root = __import__("pathlib").Path(cfg.output_dir) / "checkpoints"
    latest = (root / "latest").read_text()
    intact = checkpoint.resumable(root, torch.distributed.get_rank(), 2)
    left = sorted(p.name for p in root.iterdir())
    sft, said, resume_error = _stop_then(cfg, examples, 2, None)
    out["disk_full"] = (error, (latest, left), intact and intact.name,
                        sft and {"diffs": sft.diffs, "heads": sft.heads}, said, resume_error)
    # A parameter file fails on rank 1 alone (safetensors' own error type): every rank must stop, none may hang.
    from safetensors import SafetensorError

    cfg = configs["one_rank"]
    cfg.micro_batch_size = cfg.batch_size // 2
    real_save_file = checkpoint.save_file

    def save_file(tensors, path, *args, **kwargs):
        if "phase2-step0000002" in str(path) and torch.distributed.get_rank() == 1:
            raise SafetensorError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")
        return real_save_file(tensors, path, *args, **kwargs)

    with mock.patch.object(checkpoint, "save_file", save_file):
        _, _, error = _stop_then(cfg, examples, 2, None)
    root = __import__("pathlib").Path(cfg.output_dir) / "checkpoints"
    out["one_rank"] = (error, (root / "latest").read_text(), sorted(p.name for p in root.iterdir()))
    return out


def launch_damaged():
    configs = {name: task_config("zero2.json", checkpoint_every=2) for name in ("corrupt", "full", "one_rank")}
    return run_ranks(_damaged_checkpoints, 2, configs)[0]


@pytest.fixture(scope="session")
def damaged(launches):
    return functools.partial(launches, launch_damaged)


def _assert_same_sft(got: dict, want: dict):
    assert got["diffs"].keys() == want["diffs"].keys()
    for name, (idx, values) in want["diffs"].items():
        assert torch.equal(got["diffs"][name][0], idx) and torch.equal(got["diffs"][name][1], values), name
    for name, value in want["heads"].items():
        assert torch.equal(got["heads"][name], value), name


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one_and_says_so(damaged, uninterrupted):
    got, said, error = damaged()["fallback"]
    assert error is None, error
    assert "checkpoint" in said and "round1-phase2-step0000004 is damaged" in said, said
    assert "(truncated?)" in said and "falling back to the previous complete checkpoint" in said, said
    _assert_same_sft(got, uninterrupted()["z2"])  # resumed from phase 2 step 2: the same φ, bit for bit


def test_no_intact_checkpoint_left_is_a_clear_error(damaged):
    said, error = damaged()["none_left"]
    assert error is not None and "no intact checkpoint left in" in error, error
    assert "does not match its SHA-256 (corrupted)" in error and "resume: false" in error, error


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(damaged, uninterrupted):
    error, (latest, names), intact, got, said, resume_error = damaged()["disk_full"]
    assert error is not None and "could not write checkpoint" in error, error
    assert ".round1-phase2-step0000002.tmp" in error and "No space left on device" in error, error
    assert "round1-phase1-step0000004) is intact" in error, error
    assert latest == "round1-phase1-step0000004" and intact == latest
    assert not [n for n in names if n.endswith(".tmp")], names  # the partial checkpoint is gone on resume
    assert resume_error is None, resume_error
    _assert_same_sft(got, uninterrupted()["z2"])


def test_a_write_failing_on_one_rank_stops_every_rank_and_keeps_the_previous_checkpoint(damaged):
    error, latest, names = damaged()["one_rank"]
    assert error is not None and "could not write checkpoint" in error, error
    assert "rank 1: Error while serializing" in error and "Disk quota exceeded" in error, error
    assert latest == "round1-phase1-step0000004" and ".round1-phase2-step0000002.tmp" not in names, names


def _resume_with_a_changed_language_sft(output_dir: str) -> tuple:
    """Multi-source training with the per-step language swap: stopped in phase 2, then resumed once with one
    language SFT changed on disk (one value), once with the original."""
    from ltsft_dist.errors import LtsftError
    from ltsft_dist.multisource import build_multisource
    from ltsft_dist.recipe import LTSFTRecipe, Preempted
    from ltsft_dist.sft import SparseFineTuning
    from scenarios import StopAt, ds_config_for, tiny_model
    from test_swap import language_sfts, multisource_config, sources

    cfg = multisource_config("zero2.json", output_dir=output_dir)
    on_disk = {lang: f"{output_dir}/sft-{lang}" for lang in ("de", "en", "sw")}
    for lang, sft in language_sfts().items():
        sft.save_pretrained(on_disk[lang])

    def recipe():
        model = tiny_model("task")
        sfts = {lang: SparseFineTuning.from_pretrained(path) for lang, path in on_disk.items()}
        order, swap = build_multisource(model, sources(), sfts, cfg)
        return LTSFTRecipe(model, order.examples, cfg, ds_config_for(cfg, 1), show_progress=False, order=order,
                           step_hooks=[swap])

    first = recipe()
    first.step_hooks.append(StopAt(first, 3, True, rank=0))
    with pytest.raises(Preempted):
        first.run()
    original = SparseFineTuning.from_pretrained(on_disk["en"])
    changed = {name: (idx, values.clone()) for name, (idx, values) in original.diffs.items()}
    next(iter(changed.values()))[1][0] += 1e-3
    SparseFineTuning(changed, original.shapes, original.heads, original.metadata).save_pretrained(on_disk["en"])
    try:
        recipe().run()
        error = None
    except LtsftError as err:
        error = str(err)
    original.save_pretrained(on_disk["en"])
    return error, recipe().run().nnz


def test_a_language_sft_changed_before_the_resume_is_refused():
    import tempfile

    error, nnz_with_the_original = run_ranks(_resume_with_a_changed_language_sft, 1,
                                             tempfile.mkdtemp(prefix="ltsft-"))[0]
    assert error is not None and "language SFT 'en' changed since" in error, error
    assert "Put the original file(s) back, or start over in a new output_dir" in error, error
    assert nnz_with_the_original > 0  # with the original file back, the same checkpoint resumes
