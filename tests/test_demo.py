"""The embedded demo: generated languages that share no surface form, a base that never sees the target, and the
gain table's statistics."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import yaml

from ltsft_dist.commands.demo import write_demo
from ltsft_dist.demo_text import CLASSES, SCRIPTS, generated_text, lexicon, object_class_examples
from ltsft_dist.pipeline import build_base, load_pipeline, plan
from ltsft_dist.report import gains, gains_table, paired_bootstrap, verdict


def test_generated_languages_share_no_character_and_follow_the_seed():
    letters = {lang: set("".join(generated_text(lang, 300, seed=0)).replace(" ", "")) for lang in SCRIPTS}
    for a in SCRIPTS:
        for b in SCRIPTS:
            assert a == b or not letters[a] & letters[b], (a, b)
    assert generated_text("tgt", 50, seed=0) == generated_text("tgt", 50, seed=0)
    assert lexicon("tgt", seed=0) != lexicon("tgt", seed=1)
    assert object_class_examples("src1", 50, seed=0) != object_class_examples("src1", 50, seed=1)
    assert len(set(lexicon("src2", seed=3).values())) == len(lexicon("src2", seed=3))  # a 1-to-1 cipher


def test_task_labels_are_balanced_and_no_length_tells_them():
    examples = object_class_examples("src1", 3000, seed=0)
    assert Counter(label for _, label in examples) == {c: 1000 for c in CLASSES}
    lengths = {c: [len(t.split()) for t, label in examples if label == c] for c in CLASSES}
    means = [sum(v) / len(v) for v in lengths.values()]
    assert max(means) - min(means) < 0.2, means


def test_the_base_never_trains_the_rows_of_a_language_left_out_of_pretraining(tmp_path):
    """Pretrained on src1 only: src1's embedding rows move, tgt's stay bit-identical to the initialisation."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    path = write_demo(tmp_path, seed=0)
    data = yaml.safe_load(path.read_text())
    data["base"].update(pretrain_languages=["src1"], pretrain_steps=3, pretrain_batch_size=8)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    config = load_pipeline(path)
    base = plan(config)[0]
    build_base(config, base)
    trained = AutoModelForMaskedLM.from_pretrained(str(base.directory / "model"))
    config.base.pretrain_steps = 0
    build_base(config, base)
    initial = AutoModelForMaskedLM.from_pretrained(str(base.directory / "model"))
    tokenizer = AutoTokenizer.from_pretrained(str(base.directory / "model"))

    def rows(lang):
        return sorted({i for ids in tokenizer(generated_text(lang, 200, 0), add_special_tokens=False)["input_ids"]
                       for i in ids})

    before, after = initial.get_input_embeddings().weight, trained.get_input_embeddings().weight
    assert torch.equal(before[rows("tgt")], after[rows("tgt")])
    assert not torch.equal(before[rows("src1")], after[rows("src1")])


def _results(composed: list[int], task_only: list[int]) -> dict:
    return {"languages": {"xx": {"task+lang": {"correct": composed}, "task-only": {"correct": task_only}},
                          "yy": {"task-only": {"correct": task_only}}}}


def test_paired_bootstrap_intervals_and_the_verdict():
    g = torch.Generator().manual_seed(0)
    task_only = (torch.rand(600, generator=g) < 0.33).int().tolist()
    composed = (torch.rand(600, generator=g) < 0.8).int().tolist()
    stats = paired_bootstrap(composed, task_only)
    diff, low, high = stats["difference"]
    assert stats["n"] == 600 and low < diff < high and low > 30
    assert diff == pytest.approx(100 * (sum(composed) - sum(task_only)) / 600)
    assert paired_bootstrap(composed, task_only) == stats  # seeded
    assert paired_bootstrap([1] * 50, [0] * 50)["difference"] == (100.0, 100.0, 100.0)
    assert "significant: the 95 % interval is above 0" in verdict(_results(composed, task_only), "xx")
    same = paired_bootstrap(task_only, task_only[::-1])
    assert same["difference"][1] < 0 < same["difference"][2]
    assert "not significant" in verdict(_results(task_only, task_only[::-1]), "xx")
    assert set(gains(_results(composed, task_only))) == {"xx"}  # yy ran TA-only only
    assert "| xx | 600 |" in gains_table(_results(composed, task_only))
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap([1, 0], [1])
