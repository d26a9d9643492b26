"""The embedded demo: generated languages that share no surface form, a base that never sees the target, and the
gain table's statistics."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import yaml
from pipelines import pipeline

from ltsft_dist.commands.demo import TARGET, write_demo
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


def test_the_classes_are_used_differently_in_running_text():
    """No two classes are interchangeable in the text (a grammar symmetric under swapping them would leave a cipher
    language no way to tell which of its classes is which): they differ in frequency, and only animals are subjects."""
    words = lexicon("tgt", seed=0)
    concept = {w: c for c, w in words.items()}
    counts, first = Counter(), Counter()
    for line in generated_text("tgt", 3000, seed=0):
        concepts = [concept[w] for w in line.split()]
        counts.update(c.split(".")[1].rstrip("0123456789") for c in concepts if c.startswith("noun."))
        first.update(c.split(".")[1].rstrip("0123456789") for c in concepts[1:2] if c.startswith("noun."))
    assert counts["animal"] > 1.3 * counts["tool"] > 1.3 * 1.3 * counts["food"], counts
    assert set(first) == {"animal"} and first["animal"] > 300, first


def test_the_base_never_trains_the_rows_of_a_language_left_out_of_pretraining(tmp_path):
    """Pretrained on src1 only (embeddings tied): src1's embedding rows move, tgt's stay bit-identical to the
    initialisation."""
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
    assert trained.get_output_embeddings().weight is after  # pretrained with one word matrix, as BERT is
    assert torch.equal(before[rows("tgt")], after[rows("tgt")])
    assert not torch.equal(before[rows("src1")], after[rows("src1")])


@pytest.mark.parametrize("packed", [False, True])
def test_the_base_is_pretrained_on_rows_encoded_as_its_language_sfts_read_them(tmp_path, monkeypatch, packed):
    """A base pretrained on one sentence per row and then given packed blocks has never seen their later positions
    (measured on the demo's base: held-out MLM loss 2.8 on single sentences, 7.5 on packed blocks)."""
    import ltsft_dist.tasks.mlm as mlm

    path = write_demo(tmp_path, seed=0)
    data = yaml.safe_load(path.read_text())
    data["base"].update(pretrain_steps=1, pretrain_batch_size=4)
    data["language_sft"]["data"].update(packed=packed, max_seq_length=24)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    config = load_pipeline(path)
    seen, encode = [], mlm.encode_text

    def recording(tokenizer, lines, max_len, packed=False, *args, **kwargs):
        seen.append((max_len, packed))
        return encode(tokenizer, lines, max_len, packed, *args, **kwargs)

    monkeypatch.setattr(mlm, "encode_text", recording)
    build_base(config, plan(config)[0])
    assert seen == [(24, packed)] * len(config.base.pretrain_languages)
    flipped = load_pipeline(path)
    flipped.language_sft["data"]["packed"] = not packed
    assert plan(flipped)[0].directory != plan(config)[0].directory  # another base: a stage of its own


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


TINY = {"vocab_size": 60, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 16}


def test_tie_output_embeddings_keeps_one_word_matrix_eligible_and_freezes_the_rest_of_the_head(tmp_path):
    """The demo's language SFTs: tied, the MLM loss reaches the word embeddings from both sides; untied (the
    default, the paper's) the output copy is frozen."""
    from ltsft_dist.config import ModelConfig, TrainConfig
    from ltsft_dist.eligibility import EligibilityConfig, resolve
    from ltsft_dist.errors import LtsftError
    from ltsft_dist.models import build_model

    cfg = ModelConfig(tiny=TINY)
    tied = build_model(cfg, "mlm", tie_output_embeddings=True)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    roles = resolve(tied, "language", EligibilityConfig(tie_output_embeddings=True)).roles
    assert roles["bert.embeddings.word_embeddings.weight"] == "sparse"
    head = {n: r for n, r in roles.items() if n.startswith("cls.")}
    assert head and set(head.values()) == {"frozen"}, head
    loss = tied(input_ids=torch.tensor([[2, 7, 9, 3]]), labels=torch.tensor([[-100, 7, -100, -100]])).loss
    loss.backward()  # the label's row gets gradient from the prediction side even where it is not an input
    assert tied.get_input_embeddings().weight.grad[7].abs().sum() > 0

    untied = build_model(cfg, "mlm")
    assert untied.get_output_embeddings().weight is not untied.get_input_embeddings().weight
    roles = resolve(untied, "language").roles
    assert roles["cls.predictions.decoder.weight"] == "frozen"
    assert roles["cls.predictions.transform.dense.weight"] == "sparse"

    untied.save_pretrained(tmp_path / "untied")  # a base whose config says its output matrix is its own
    with pytest.raises(LtsftError, match="eligibility.tie_output_embeddings: .*set it to false"):
        build_model(ModelConfig(name_or_path=str(tmp_path / "untied")), "mlm", tie_output_embeddings=True)
    task = TrainConfig(kind="task", density=0.1, model=cfg, eligibility=EligibilityConfig(tie_output_embeddings=True))
    with pytest.raises(LtsftError, match="eligibility.tie_output_embeddings: .*remove it"):
        task.validate()


def test_freeze_word_embeddings_adds_the_input_word_matrix_to_the_exclude_rules_in_force():
    """The demo's task SFT: the task is learned in the body every language shares, not in the source words' rows.
    The key adds to the exclude rules (default or given) and leaves every other role as it was."""
    from ltsft_dist.config import ModelConfig
    from ltsft_dist.eligibility import EligibilityConfig, resolve
    from ltsft_dist.models import build_model

    model = build_model(ModelConfig(tiny=TINY), "classification", num_labels=3)
    words = "bert.embeddings.word_embeddings.weight"
    plain = resolve(model, "task").roles
    frozen = resolve(model, "task", EligibilityConfig(freeze_word_embeddings=True)).roles
    assert plain[words] == "sparse" and frozen[words] == "frozen"
    assert {n: r for n, r in frozen.items() if n != words} == {n: r for n, r in plain.items() if n != words}
    assert frozen["bert.embeddings.position_embeddings.weight"] == "sparse"
    query = "bert.encoder.layer.0.attention.self.query.weight"
    given = resolve(model, "task", EligibilityConfig(exclude=[r"\.layer\.0\."], freeze_word_embeddings=True)).roles
    assert plain[query] == "sparse" and given[query] == "frozen" and given[words] == "frozen"


@pytest.mark.parametrize("threads", [None, "", "0"])
def test_the_demo_process_pretrains_with_the_thread_count_its_ranks_use(tmp_path, monkeypatch, threads):
    """`ltsft demo` builds the base in its own process, where torch was imported before OMP_NUM_THREADS was set: it
    must still use one thread, or its float sums (and so the whole run) differ from a process started with it. An
    empty value or 0 counts as unset."""
    import argparse

    from ltsft_dist.commands import demo

    if threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what an imported torch takes on this 2-core machine
    try:
        args = argparse.Namespace(output_dir=str(tmp_path), seed=0, ranks=2, master_port=None, dry_run=True)
        assert demo.demo_command(args) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# The demo's configuration at reduced size (half its pretraining and language SFT steps, 150 task steps per phase,
# 400 test examples per language), seed 0: measured +27.8 [+21.5, +34.2] points on the target.
REDUCED = {"pretrain_steps": 300, "language_steps": 150, "task_steps": 150, "limit": 400}


@pytest.mark.slow
@pytest.mark.multirank
def test_the_demos_configuration_at_reduced_size_lifts_the_unseen_target(tmp_path):
    """The paper's effect, end to end on 2 ranks: the target the base never saw gains from its language SFT,
    significantly (the 95 % interval of the difference above 0), while without it the task stays near chance there."""
    import json

    from ltsft_dist.report import gains

    path = write_demo(tmp_path, seed=0)
    config = yaml.safe_load(path.read_text())
    config["base"]["pretrain_steps"] = REDUCED["pretrain_steps"]
    for key, steps in (("language_sft", REDUCED["language_steps"]), ("task_sft", REDUCED["task_steps"])):
        for phase in ("phase1", "phase2"):
            config[key][phase]["steps"] = steps
        config[key]["checkpoint_every"] = steps
    config["evaluation"]["limit"] = REDUCED["limit"]
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    pipeline(path)
    target = gains(json.loads((tmp_path / "results.json").read_text()))[TARGET]
    difference, low, _ = target["difference"]
    assert target["n"] == REDUCED["limit"]
    assert difference > 0 and low > 0, target
    assert target["task_only"][0] < 45, target  # chance is 33.3: the task alone cannot read the target's words
