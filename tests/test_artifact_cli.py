"""``ltsft inspect | compose | convert`` through the argparse wiring the real CLI uses."""

from __future__ import annotations

import argparse
import json

import pytest
from sfts import assert_same_sft, random_sft, small_sft, tiny_mlm

from ltsft_dist.commands import artifact
from ltsft_dist.composable_format import SFT_FILE_NAME, load_composable_sft, save_composable_sft
from ltsft_dist.errors import LtsftError
from ltsft_dist.sft import SparseFineTuning


@pytest.fixture
def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltsft")
    artifact.register(parser.add_subparsers(dest="command"))
    return parser


def run(parser, *argv) -> int:
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture
def saved(tmp_path) -> tuple[SparseFineTuning, str]:
    sft = random_sft(tiny_mlm(), density=0.1, head_prefix="cls.", languages=("de",))
    sft.save_pretrained(tmp_path / "de")
    return sft, str(tmp_path / "de")


def test_inspect_json(parser, saved, capsys):
    sft, path = saved
    assert run(parser, "inspect", path, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "language" and out["languages"] == ["de"] and out["k"] == sft.metadata.k
    assert out["params"] == sft.param_nnz
    assert set(out["layers"]) == {"0", "1"}
    assert "attention.self.query" in out["module_types"]


def test_inspect_table(parser, saved, capsys):
    _, path = saved
    assert run(parser, "inspect", path) == 0
    out = capsys.readouterr().out
    assert "kind:        language" in out
    assert "embeddings.word_embeddings" in out and "intermediate.dense" in out
    assert "layer" in out and "density" in out


def test_inspect_reads_a_composable_file(parser, saved, tmp_path, capsys):
    sft, _ = saved
    save_composable_sft(sft, tmp_path / "c")
    assert run(parser, "inspect", tmp_path / "c" / SFT_FILE_NAME, "--json") == 0
    assert json.loads(capsys.readouterr().out)["params"] == sft.param_nnz


def test_compose_writes_sum_and_prints_overlaps(parser, tmp_path, capsys):
    small_sft({"p": ([0, 2, 5], [1.0, 2.0, 3.0])}, languages=("de",)).save_pretrained(tmp_path / "a")
    b = small_sft({"p": ([2, 3], [1.0, 1.0])}, kind="task", languages=("en",))
    save_composable_sft(b, tmp_path / "b")  # inputs may be in either format
    assert run(parser, "compose", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "ab") == 0

    out = capsys.readouterr().out
    assert "overlapping positions: 1" in out and "p: 1" in out
    composed = SparseFineTuning.from_pretrained(tmp_path / "ab")
    assert composed.diffs["p"][0].tolist() == [0, 2, 3, 5]
    assert composed.diffs["p"][1].tolist() == [1.0, 3.0, 1.0, 3.0]
    assert composed.metadata.kind == "task" and composed.metadata.languages == ["de", "en"]


def test_compose_needs_two_inputs(parser, saved, tmp_path):
    _, path = saved
    with pytest.raises(LtsftError, match="at least two"):
        run(parser, "compose", path, "-o", tmp_path / "out")


def test_convert_both_ways_is_exact(parser, saved, tmp_path):
    sft, path = saved
    assert run(parser, "convert", path, tmp_path / "c", "--to", "composable-sft") == 0
    assert_same_sft(sft, load_composable_sft(tmp_path / "c"))
    assert run(parser, "convert", tmp_path / "c", tmp_path / "n", "--to", "native") == 0
    back = SparseFineTuning.from_pretrained(tmp_path / "n")
    assert_same_sft(sft, back)
    assert back.metadata == sft.metadata


def test_convert_can_fill_in_metadata(parser, saved, tmp_path):
    _, path = saved
    argv = ["convert", path, tmp_path / "n", "--to", "native", "--kind", "task", "--language", "sw",
            "--language", "yo", "--base-model", "xlm-roberta-base"]
    assert run(parser, *argv) == 0
    meta = SparseFineTuning.from_pretrained(tmp_path / "n").metadata
    assert (meta.kind, meta.languages, meta.base_model) == ("task", ["sw", "yo"], "xlm-roberta-base")


def test_convert_errors_are_ltsft_errors(parser, tmp_path):
    with pytest.raises(LtsftError, match="not an SFT directory"):
        run(parser, "convert", tmp_path / "missing", tmp_path / "out", "--to", "native")
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "a", "b", "--to", "onnx"])


def test_every_option_has_help(parser):
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {"inspect", "compose", "convert"}
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {action.dest} has no help"
