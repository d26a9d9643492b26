"""`ltsft pipeline`: the stages run in order and write the results table; a rerun skips finished stages, a changed
input reruns exactly the stages downstream of it, an interrupted stage resumes; the paper's configs plan."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pipelines import pipeline, tiny_pipeline

from ltsft_dist.errors import LtsftError
from ltsft_dist.pipeline import load_pipeline, plan, stage_argv
from ltsft_dist.sft import SparseFineTuning

pytestmark = [pytest.mark.slow, pytest.mark.multirank]
CONFIGS = Path(__file__).resolve().parents[1] / "ltsft_dist" / "configs"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    config = tiny_pipeline(tmp_path_factory.mktemp("pipeline"))
    return config, pipeline(config)


def test_the_stages_run_in_order_and_write_the_table(finished):
    config, result = finished
    stages = plan(load_pipeline(config))
    assert [s.name for s in stages] == ["base", "lang:src1", "lang:src2", "task", "eval"]
    assert all(s.done for s in stages)
    starts = [result.stdout.index(f"== stage {s.name}:") for s in stages]
    assert starts == sorted(starts)
    root = config.parent
    table = (root / "results.md").read_text()
    assert "| src1 | 40 |" in table and "| src2 | 40 |" in table and "TA-only" in table
    assert f"results: {root / 'results.md'}" in result.stdout
    task = SparseFineTuning.from_pretrained(stages[3].directory / "sft")
    assert task.metadata.training_config["language_sfts"] == {"src1": str(stages[1].directory / "sft"),
                                                               "src2": str(stages[2].directory / "sft")}


def test_a_rerun_skips_finished_stages_and_a_change_reruns_what_depends_on_it(finished):
    config, _ = finished
    before = {s.name: (s.directory, (s.directory / "DONE").stat().st_mtime_ns) for s in plan(load_pipeline(config))}
    result = pipeline(config)
    assert "== stage" not in result.stdout and result.stdout.count("done, skipped") == 5
    assert {s.name: (s.directory, (s.directory / "DONE").stat().st_mtime_ns)
            for s in plan(load_pipeline(config))} == before
    # a different task density: the base and the language SFTs are reused, the task and evaluation are new
    data = yaml.safe_load(config.read_text())
    data["task_sft"]["density"] = 0.02
    changed = config.with_name("changed.yaml")  # beside it: the same data and output directory
    changed.write_text(yaml.safe_dump(data, sort_keys=False))
    dry = pipeline(changed, "--dry-run")
    after = {s.name: s for s in plan(load_pipeline(changed))}
    assert [n for n, s in after.items() if s.directory == before[n][0]] == ["base", "lang:src1", "lang:src2"]
    assert not after["task"].done and "to run" in dry.stdout
    assert not after["task"].directory.exists()  # --dry-run runs nothing


def test_an_interrupted_stage_resumes_from_its_checkpoints(finished):
    """The multi-source task stage, checkpointed in phase 2, resumes to a bit-identical φ (language schedule,
    swap and data position included)."""
    config, _ = finished
    task = {s.name: s for s in plan(load_pipeline(config))}["task"]
    first = SparseFineTuning.from_pretrained(task.directory / "sft")
    (task.directory / "DONE").unlink()  # as if the job had been killed after its last checkpoint
    assert "interrupted, resumes" in pipeline(config, "--dry-run").stdout
    result = pipeline(config, "--stage", "task")
    assert "resumed from" in result.stdout
    again = SparseFineTuning.from_pretrained(task.directory / "sft")
    for name, (indices, values) in first.diffs.items():
        assert (again.diffs[name][0] == indices).all() and (again.diffs[name][1] == values).all(), name


@pytest.mark.parametrize("name", ["paper_nli_americasnli.yaml", "paper_qa_xquad.yaml", "demo_pipeline.yaml",
                                  "decoder_instruct_xcopa.yaml"])
def test_the_shipped_pipeline_configs_plan(name):
    stages = plan(load_pipeline(CONFIGS / name))
    assert stages[-2].name == "task" and stages[-1].name == "eval"
    task = stages[-2].config
    assert set(task["language_sfts"]) <= {s.name.split(":")[1] for s in stages if s.name.startswith("lang:")}


def test_the_decoder_pipeline_trains_clm_language_sfts_an_instruct_task_sft_and_scores_xcopa():
    """A real-run config for a hub decoder: every stage's task follows from the config, the evaluation's task is
    another than the task SFT's, and the eval stage gets every target language's language SFT."""
    stages = {s.name: s for s in plan(load_pipeline(CONFIGS / "decoder_instruct_xcopa.yaml"))}
    languages = [name for name in stages if name.startswith("lang:")]
    assert all(stages[name].config["task"] == "clm" for name in languages)
    assert stages["task"].config["task"] == "instruct" and set(stages["task"].config["language_sfts"]) == {
        "en", "es", "de"}
    ev = stages["eval"].config
    assert ev["task"] == "xcopa" and set(ev["lang_sfts"]) == set(ev["data"]) == {"et", "ht", "id", "sw"}
    assert ev["base"] == "Qwen/Qwen2.5-0.5B" and "--task" in stage_argv(stages["eval"])


def test_pipeline_config_errors(tmp_path):
    config = tiny_pipeline(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["task_sft"]["output_dir"] = "x"
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(LtsftError, match="task_sft.output_dir is set by the pipeline"):
        load_pipeline(config)
    del data["task_sft"]["output_dir"]
    data["task_sft"]["phase1"]["lr"] = "fast"
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(LtsftError, match="task_sft: phase1.lr: expected float"):
        load_pipeline(config)


def test_the_demo_command_writes_its_data_and_plans_every_stage(tmp_path, capsys):
    """`ltsft demo` (the README's first command) reaches the pipeline: --dry-run plans it without running it."""
    from ltsft_dist.cli import main

    assert main(["demo", "--dry-run", "--output-dir", str(tmp_path / "demo")]) == 0
    plan = capsys.readouterr().out
    for stage in ("base", "lang:src1", "lang:src2", "lang:tgt", "task", "eval"):
        assert stage in plan, plan
    assert (tmp_path / "demo" / "data" / "task_test.tgt.jsonl").is_file()
