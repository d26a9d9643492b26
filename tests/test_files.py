"""Atomic writes: every rank of a launch may write the same record at once (a CI run once failed when two ranks of
a pipeline stage renamed one shared `config.tmp`: the second rename found no file)."""

import multiprocessing as mp

import pytest

from ltsft_dist.files import write_atomically, write_text


def _write_many(path, writer: int, times: int) -> None:
    for i in range(times):
        write_text(path, f"writer {writer} write {i}\n" * 50)


def test_processes_writing_one_file_at_once_never_collide(tmp_path):
    target = tmp_path / "config.yaml"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(target, w, 300)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    lines = set(target.read_text().splitlines())
    assert len(lines) == 1 and next(iter(lines)).startswith("writer ")  # one whole write, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_a_failed_write_replaces_nothing(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_text(a, "old a")
    write_text(b, "old b")

    def fail(path):
        path.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomically({a: lambda p: p.write_text("new a"), b: fail})
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]
