"""Preemption-safe resume: stopping (on one rank's request) and resuming gives the same φ, bit for bit."""

from __future__ import annotations

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


def _resume_elsewhere(output_dir: str) -> str:
    from ltsft_dist.errors import LtsftError

    cfg = task_config("zero2.json")
    cfg.output_dir = output_dir
    try:
        run_cases([("again", cfg, classification_examples(), 1)], 1)
    except LtsftError as err:
        return str(err)
    return "no error"


def test_resume_at_another_world_size_fails_clearly(resumed):
    _, output_dir = resumed()["z2"]
    message = run_ranks(_resume_elsewhere, 1, output_dir)[0]
    assert "written by 2 ranks with ZeRO stage 2, but this job has 1 ranks" in message
    assert "Resume with 2 ranks" in message


def test_checkpoints_are_complete_and_pruned(resumed):
    from pathlib import Path

    _, output_dir = resumed()["z3"]
    root = Path(output_dir) / "checkpoints"
    complete = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert not [p for p in complete if p.endswith(".tmp")]
    assert len(complete) <= 2 and (root / "latest").read_text() in complete
    latest = root / (root / "latest").read_text()
    assert (latest / "progress.json").is_file() and (latest / "ltsft_rank0.pt").is_file()
    assert (latest / "ltsft_rank1.pt").is_file() and (latest / "engine").is_dir()


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
        path = directory / "ltsft_rank0.pt"
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
    return out


def launch_damaged():
    configs = {name: task_config("zero2.json", checkpoint_every=2) for name in ("corrupt", "full")}
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
