"""Language-homogeneous sampling for multi-source training (`ltsft_dist.multisource`). Single process, fast."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from scenarios import classification_examples, mlm_examples
from ltsft_dist.data import Examples
from ltsft_dist.errors import LtsftError
from ltsft_dist.multisource import MultiSourceOrder, SamplingConfig, build_multisource


def tagged(n: int, tag: int, length: int = 6) -> Examples:
    """Row i of language `tag` has input_ids [tag, i, ...]: every fed row names its language and example."""
    ids = torch.zeros(n, length, dtype=torch.long)
    ids[:, 0], ids[:, 1] = tag, torch.arange(n)
    return Examples({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(n) % 3})


SOURCES = {"en": tagged(120, 0), "de": tagged(48, 1), "sw": tagged(24, 2)}
TAG = {"en": 0, "de": 1, "sw": 2}


def order(world=1, rank=0, micro=None, batch=12, seed=5, sources=SOURCES, **kw):
    return MultiSourceOrder(sources, batch, micro or batch // world, rank, world, seed, **kw)


def global_rows(o: MultiSourceOrder, step: int) -> torch.Tensor:
    """The rows one rank feeds over all micro-batches of a step."""
    return torch.cat([o.batch_at(step, m)["input_ids"] for m in range(o.accumulation)])


def test_one_language_per_step_across_micro_batches_and_ranks():
    ranks = [order(world=2, rank=r, micro=2) for r in range(2)]  # accumulation 3
    assert ranks[0].accumulation == 3
    for step in range(60):
        language = ranks[0].language_at(step)
        for o in ranks:
            assert o.language_at(step) == language
            assert (global_rows(o, step)[:, 0] == TAG[language]).all()


@pytest.mark.parametrize("world,micro", [(2, 6), (3, 2), (4, 1)])
def test_global_batch_is_independent_of_world_size(world, micro):
    single = order()
    ranks = [order(world=world, rank=r, micro=micro) for r in range(world)]
    for step in range(40):
        expected = single.batch_at(step, 0)["input_ids"]
        got = torch.cat([o.batch_at(step, m)["input_ids"] for m in range(ranks[0].accumulation) for o in ranks])
        assert torch.equal(got, expected)


def test_deterministic_and_seeded():
    a, b, other = order(), order(), order(seed=6)
    steps = range(300)
    assert [a.language_at(s) for s in steps] == [b.language_at(s) for s in steps]
    assert all(torch.equal(a.batch_at(s, 0)["input_ids"], b.batch_at(s, 0)["input_ids"]) for s in steps)
    assert [a.language_at(s) for s in steps] != [other.language_at(s) for s in steps]
    # dict order does not matter
    shuffled = order(sources={k: SOURCES[k] for k in ("sw", "en", "de")})
    assert [a.language_at(s) for s in steps] == [shuffled.language_at(s) for s in steps]


def test_resumable_order_is_a_pure_function_of_the_step():
    iterated = order()
    sequence = [iterated.batch_at(s, 0)["input_ids"] for s in range(2500)]  # crosses language draw blocks
    for s in (0, 1, 1023, 1024, 1500, 2048, 2499, 700):  # fresh objects, and out of order on one object
        assert torch.equal(order().batch_at(s, 0)["input_ids"], sequence[s])
    jumpy = order()
    for s in (2499, 3, 1800, 1024, 17):
        assert torch.equal(jumpy.batch_at(s, 0)["input_ids"], sequence[s])


def test_each_language_is_a_seeded_permutation_per_epoch():
    o = order()
    seen: dict[str, list[torch.Tensor]] = {k: [] for k in SOURCES}
    for step in range(600):
        rows = o.batch_at(step, 0)["input_ids"]
        seen[o.language_at(step)].append(rows[:, 1])
    for language, batches in seen.items():
        per_epoch = o.steps_per_epoch[language]
        assert per_epoch == len(SOURCES[language]) // 12
        epochs = [torch.cat(batches[i:i + per_epoch]) for i in range(0, len(batches) - per_epoch + 1, per_epoch)]
        assert len(epochs) >= 2
        for e in epochs:  # each example at most once per epoch (drop-last), and all of them when 12 | n
            assert len(set(e.tolist())) == len(e) == per_epoch * 12
        assert not torch.equal(epochs[0], epochs[1])  # reshuffled


def _frequencies(o: MultiSourceOrder, steps: int = 40_000) -> dict[str, float]:
    ids = o.language_ids(0, steps)
    return {lang: float((ids == i).sum()) / steps for i, lang in enumerate(o.languages)}


@pytest.mark.parametrize("policy,temperature,expected", [
    ("proportional", 1.0, {"en": 120 / 192, "de": 48 / 192, "sw": 24 / 192}),
    ("uniform", 1.0, {"en": 1 / 3, "de": 1 / 3, "sw": 1 / 3}),
    ("temperature", 2.0, {k: n ** 0.5 / (120 ** 0.5 + 48 ** 0.5 + 24 ** 0.5) for k, n in
                          (("en", 120), ("de", 48), ("sw", 24))}),
])
def test_policy_frequencies(policy, temperature, expected):
    o = order(policy=policy, temperature=temperature)
    assert o.probabilities == pytest.approx(expected)
    assert _frequencies(o) == pytest.approx(expected, abs=0.01)  # 40k draws: σ ≤ 0.0025
    assert [o.language_at(s) for s in range(50)] == [o.languages[i] for i in o.language_ids(0, 50)]


def test_cap_and_upsampling():
    o = order(cap={"en": 36}, upsample={"sw": 2.0})
    assert o.sizes == {"en": 36, "de": 48, "sw": 48}
    assert o.probabilities == pytest.approx({"en": 36 / 132, "de": 48 / 132, "sw": 48 / 132})
    en, sw = Counter(), Counter()
    n_sw_steps = 0
    for step in range(800):
        rows = o.batch_at(step, 0)["input_ids"]
        lang = o.language_at(step)
        if lang == "en":
            en.update(rows[:, 1].tolist())
        elif lang == "sw" and n_sw_steps < 4:  # exactly the first sw epoch (48 slots = 4 batches)
            sw.update(rows[:, 1].tolist())
            n_sw_steps += 1
    assert len(en) == 36  # the cap keeps a fixed subset of 36 of the 120 examples
    assert set(en) == set(o.pools["en"].tolist()) and set(en) != set(range(36))  # a seeded random subset
    assert sorted(sw.values()) == [2] * 24  # upsampled ×2: every example twice per epoch
    assert order(cap=30).sizes == {"en": 30, "de": 30, "sw": 24}


def test_fractional_upsampling():
    o = order(upsample={"sw": 1.5})
    assert o.sizes["sw"] == 36 and o.steps_per_epoch["sw"] == 3


def test_mlm_sources_get_seeded_masks_independent_of_world_size():
    sources = {"aa": mlm_examples(n=24, seed=1), "bb": mlm_examples(n=36, seed=2)}
    single = MultiSourceOrder(sources, 12, 12, 0, 1, seed=4)
    ranks = [MultiSourceOrder(sources, 12, 3, r, 2, seed=4) for r in range(2)]
    for step in range(10):
        expected = single.batch_at(step, 0)
        assert (expected["labels"] != -100).any()
        for key in ("input_ids", "labels"):
            got = torch.cat([o.batch_at(step, m)[key] for m in range(2) for o in ranks])
            assert torch.equal(got, expected[key])


def test_single_language_is_the_one_source_case():
    o = order(sources={"en": SOURCES["en"]})
    assert {o.language_at(s) for s in range(100)} == {"en"}
    assert o.probabilities == {"en": 1.0}


@pytest.mark.parametrize("kwargs,message", [
    (dict(sources={}), "at least one source"),
    (dict(policy="size"), "unknown sampling policy 'size'"),
    (dict(policy="temperature", temperature=0.0), "temperature must be positive"),
    (dict(batch=12, micro=5), "multiple of micro_batch_size"),
    (dict(batch=30), "'sw' has 24 examples"),
    (dict(cap=10), "'de' has 48 examples (10 after cap 10"),
    (dict(upsample={"sw": 0.25}), "'sw' has 24 examples (6 after"),
    (dict(upsample={"xx": 2.0}), "upsample: 'xx' is not a source language"),
    (dict(cap={"xx": 5}), "cap: 'xx' is not a source language"),
    (dict(upsample={"sw": -1}), "upsample factor for 'sw' must be a positive number"),
    (dict(cap=0), "cap for 'de' must be a positive integer"),
    (dict(rank=2, world=2, micro=6), "rank 2 is outside a world of 2"),
    (dict(sources={"en": SOURCES["en"], "xx": classification_examples()}), None),  # fine: same keys
    (dict(sources={"en": SOURCES["en"], "mlm": mlm_examples()}), "mixing masked-LM"),
    (dict(sources={"en": SOURCES["en"], "bad": Examples({"input_ids": torch.zeros(20, 3)})}), "same model inputs"),
])
def test_errors(kwargs, message):
    if message is None:
        order(**kwargs)
        return
    with pytest.raises(LtsftError, match=message.replace("(", r"\(").replace(")", r"\)")):
        order(**kwargs)


def test_build_multisource_ta_only_and_missing_sft():
    from scenarios import task_config, tiny_model

    cfg = task_config(batch_size=12, micro_batch_size=12)
    o, swap = build_multisource(tiny_model(), SOURCES, None, cfg,
                                sampling=SamplingConfig(policy="uniform"))
    assert swap is None and o.policy == "uniform" and o.accumulation == 1
    with pytest.raises(LtsftError, match=r"no language SFT for source language\(s\) 'de', 'en', 'sw' \(have: none\)"):
        build_multisource(tiny_model(), SOURCES, {}, cfg)
