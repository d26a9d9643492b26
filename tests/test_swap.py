"""The per-step language delta swap (`ltsft_dist.swap`) of multi-source task training.

Distributed runs (one W=2 launch, several scenarios: ZeRO 0, 1, 2 with gradient accumulation, 3 with every
parameter persistent, 3 with mixed persistent/partitioned parameters and accumulation, 2 in bf16, and a decoder
family: instruction tuning of a tiny Llama at ZeRO 3 mixed with accumulation; one W=1 launch: ZeRO 3 mixed, where
DeepSpeed's "gather" makes param.data a view of the partition) train a multi-source task LT-SFT on three languages whose language SFTs overlap each other and the task mask, and are
checked two ways:

- **Exact** (bit for bit), at every step, by checking hooks around the swap: between steps the working weights
  (what the forward pass reads, per `shards.working_spans`) equal the fp32 masters (cast to the working dtype:
  no drift); after `before_step` they equal the pre-step values plus φ_L (the float32 sum `SparseFineTuning.apply`
  computes) at φ_L's positions and nothing else; after the restore they equal the pre-step values again; the
  masters never change during the forward/backward passes. At the end, frozen positions are bit-identical to θ⁰
  in masters and working weights (no language delta leaked anywhere outside the task mask).
- **Within float32 rounding** against `reference_ltsft`, a naive single-process LT-SFT that, per step, applies
  the step's language SFT with `SparseFineTuning.apply`, runs forward/backward, `revert`s, then masks, clips and
  steps plain `torch.optim.AdamW` (as tests/oracle.py). Masks must be identical, φ_T and heads agree to
  rtol 1e-4 / atol 1e-6 (the tolerance of tests/test_core.py). Not bit-exact because the W=2 runs sum gradients
  in another order (each rank's half-batch mean, then DeepSpeed's all-reduce average, vs one 12-example mean)
  and DeepSpeed computes the clipping norm in its own order; the swap itself adds nothing inexact. The language
  deltas are large (σ = 0.1) on purpose: a leak of φ_L into φ_T, or a forward pass that missed it, would be
  orders of magnitude above that tolerance (`test_reference_depends_on_the_swap` shows the size of the effect).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from distributed import run_ranks
from oracle import oracle_ltsft
from scenarios import (LANGUAGES, TINY_LLAMA, classification_examples, ds_config_for, instruct_examples, language_sfts,
                       model_for, task_config, tiny_model, working_weight_drift)
from ltsft_dist.config import ModelConfig, PhaseConfig
from ltsft_dist.errors import LtsftError
from ltsft_dist.hooks import StepHook
from ltsft_dist.models import build_model
from ltsft_dist.multisource import MultiSourceOrder, build_multisource
from ltsft_dist.sft import SparseFineTuning
from ltsft_dist.swap import LanguageSwap



# ---------------------------------------------------------------------- data and language SFTs


# The model families: a tiny BERT classifier (task classification), and a tiny Llama tuned on instructions
# (task instruct) with its output head frozen.
DECODER = ModelConfig(tiny=dict(TINY_LLAMA), architecture="llama")


def sources(decoder: bool = False) -> dict:
    examples = instruct_examples if decoder else classification_examples
    return {"de": examples(n=36, seed=11), "en": examples(n=60, seed=12), "sw": examples(n=48, seed=13)}


def multisource_config(stage_file: str, decoder: bool = False, **overrides):
    family = {"task": "instruct", "model": copy.deepcopy(DECODER), "weight_decay": 0.05} if decoder else {}
    cfg = task_config(stage_file, density=0.3, batch_size=12, **family,
                      phase1=PhaseConfig(steps=10, lr=3e-3, warmup_steps=2), phase2=PhaseConfig(steps=10, lr=3e-3))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@functools.lru_cache(maxsize=None)
def family_sfts(decoder: bool = False) -> dict:
    """The family's language SFTs: of its language model (a decoder's built as a clm language SFT's base)."""
    return language_sfts(model=build_model(DECODER, "clm", seed=0)) if decoder else language_sfts()


# ---------------------------------------------------------------------- the naive reference


def reference_ltsft(config, sfts: dict | None, decoder: bool = False):
    """Single-process LT-SFT (the oracle), every step on one language with its SFT applied/reverted around
    forward/backward. Returns (mask, phi, heads) as tests/oracle.py."""
    order = MultiSourceOrder(sources(decoder), config.batch_size, config.batch_size, 0, 1, config.seed)
    return oracle_ltsft(model_for(config), None, config, order=order, sfts=sfts)


# ---------------------------------------------------------------------- exactness checks inside the run


class _Checks:
    """Two step hooks around the swap (`pre` before it, `post` after it in `step_hooks`) that compare the working
    weights and masters bit for bit at every step; mismatching elements are counted in `counts`."""

    def __init__(self, sfts, order):
        self.sfts, self.order, self.shards = sfts, order, None
        self.counts = {"between_steps": 0, "applied": 0, "restored": 0, "masters_moved": 0, "steps": 0}
        self.pre, self.post = _Pre(self), _Post(self)

    def spans(self, names=None):
        from ltsft_dist.shards import working_spans

        params = dict(self.shards.engine.module.named_parameters())
        return working_spans((n, params[n]) for n in (names or params))

    def working_equals_masters(self) -> int:
        """Elements of my master fragments whose working copies differ from the master (cast to their dtype)."""
        spans = {}
        for s in self.spans():
            spans.setdefault(s.name, []).append(s)
        bad = 0
        for f in self.shards.fragments:
            master = self.shards.master(f)
            for s in spans.get(f.name, []):
                lo, hi = max(s.start, f.param_offset), min(s.start + s.numel, f.param_offset + f.numel)
                if lo < hi:
                    working = s.tensor[lo - s.start:hi - s.start]
                    bad += int((working != master[lo - f.param_offset:hi - f.param_offset].to(working.dtype)).sum())
        return bad


class _Pre(StepHook):
    def __init__(self, c):
        self.c = c

    def before_step(self, step):
        c = self.c
        c.counts["between_steps"] += c.working_equals_masters()
        c.counts["steps"] += 1
        c.before = {(s.name, s.kind): (s.start, s.tensor.clone()) for s in c.spans()}
        c.masters = [m.clone() for m in c.shards.segments]

    def before_optimizer_step(self, step):
        pass


class _Post(StepHook):
    def __init__(self, c):
        self.c = c

    def before_step(self, step):
        c = self.c
        sft = c.sfts[c.order.language_at(step)]
        for s in c.spans():
            if (s.name, s.kind) not in c.before:
                continue
            start, before = c.before[(s.name, s.kind)]
            expected = before.clone()
            if s.name in sft.diffs:
                idx, values = sft.diffs[s.name]
                inside = (idx >= start) & (idx < start + before.numel())
                local = idx[inside] - start
                expected[local] = (before[local].float() + values[inside]).to(before.dtype)
            c.counts["applied"] += int((s.tensor != expected).sum())

    def before_optimizer_step(self, step):
        c = self.c
        # A ZeRO-3 parameter that was partitioned at before_step and got gathered by the forward pass (so it holds
        # φ_L in its full copy) is not in c.before: DeepSpeed's step releases it and re-gathers from the partitions.
        for s in c.spans():
            if (s.name, s.kind) in c.before:
                c.counts["restored"] += int((s.tensor != c.before[(s.name, s.kind)][1]).sum())
        c.counts["masters_moved"] += sum(int((m != b).sum()) for m, b in zip(c.shards.segments, c.masters))


# ---------------------------------------------------------------------- the distributed scenarios


def _scenarios():
    return [  # (name, deepspeed config, accumulation, ZeRO-3 persistence threshold, compare with reference, decoder)
        ("z0", "zero0.json", 1, None, True, False),
        ("z1", "zero1.json", 1, None, True, False),
        ("z2-accum", "zero2.json", 2, None, True, False),
        ("z3", "zero3.json", 1, None, True, False),  # tiny model: every parameter persistent (threshold 1e5)
        ("z3-mixed-accum", "zero3.json", 2, 100, True, False),  # matrices partitioned, biases/LayerNorms persistent
        ("z2-bf16", "zero2_bf16.json", 1, None, False, False),
        ("decoder-z3-mixed-accum", "zero3.json", 2, 100, True, True),  # instruction tuning of a tiny Llama
    ]


W1_SCENARIOS = ("z3-mixed-accum",)  # also at W=1, where ZeRO-3 "gathers" by aliasing param.data to ds_tensor


def run_swap_cases(world_size: int, names) -> dict:
    import torch.distributed as dist

    from ltsft_dist.recipe import LTSFTRecipe

    results = {}
    for name, stage_file, accumulation, threshold, _, decoder in _scenarios():
        if name not in names:
            continue
        sfts = family_sfts(decoder)
        cfg = multisource_config(stage_file, decoder)
        cfg.micro_batch_size = cfg.batch_size // (world_size * accumulation)
        ds = ds_config_for(cfg, world_size)
        if threshold is not None:
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
        model = model_for(cfg)
        order, swap = build_multisource(model, sources(decoder), sfts, cfg)  # before the engine exists
        checks = _Checks(sfts, order)
        recipe = LTSFTRecipe(model, order.examples, cfg, ds, show_progress=False, order=order,
                             step_hooks=[checks.pre, swap, checks.post])
        checks.shards = recipe.shards
        sft = recipe.run()
        final_between = checks.working_equals_masters()
        persistent = sum(1 for p in model.parameters() if getattr(p, "ds_persist", False))
        diffs = [sft.diffs if sft is not None else None]
        dist.broadcast_object_list(diffs, src=0)
        theta0 = dict(model_for(cfg).named_parameters())
        drift = working_weight_drift(model, theta0, diffs[0], recipe.eligibility.roles)
        if sft is not None:
            results[name] = {"diffs": sft.diffs, "heads": sft.heads, "stats": dict(recipe.stats.__dict__),
                             "checks": dict(checks.counts), "final_between": final_between, "working_drift": drift,
                             "swapped_steps": swap.steps, "languages": [order.language_at(s) for s in range(10)],
                             "persistent_params": persistent}
    return results


def launch_distributed(world_size: int = 2) -> dict:
    names = [s[0] for s in _scenarios()] if world_size == 2 else list(W1_SCENARIOS)
    return run_ranks(run_swap_cases, world_size, world_size, names)[0]


@pytest.fixture(scope="session")
def distributed(launches):
    return functools.partial(launches, launch_distributed)


@functools.lru_cache(maxsize=None)
def reference(with_swap: bool = True, decoder: bool = False):
    return reference_ltsft(multisource_config("zero0.json", decoder), family_sfts(decoder) if with_swap else None,
                           decoder)


RUNS = [(2, s[0]) for s in _scenarios()] + [(1, name) for name in W1_SCENARIOS]


@pytest.mark.parametrize("world_size,case", RUNS)
def test_swap_is_exact_at_every_step(world_size, case, distributed):
    got = distributed(world_size)[case]
    assert got["checks"]["steps"] == 20 == got["swapped_steps"]  # phase 1 + phase 2
    assert got["checks"] == {"between_steps": 0, "applied": 0, "restored": 0, "masters_moved": 0, "steps": 20}
    assert got["final_between"] == 0
    assert got["stats"]["frozen_drift"] == 0  # masters: frozen positions are θ⁰, so no φ_L leaked there
    assert got["working_drift"] == 0  # working weights likewise, after the last step
    assert sum(len(i) for i, _ in got["diffs"].values()) == got["stats"]["k"]
    assert len(set(got["languages"])) > 1  # the first ten steps really switch languages


def test_zero3_scenarios_cover_persistent_and_partitioned_parameters(distributed):
    n_params = len(list(tiny_model("task").parameters()))
    assert distributed()["z3"]["persistent_params"] == n_params
    for world_size in (1, 2):
        assert 0 < distributed(world_size)["z3-mixed-accum"]["persistent_params"] < n_params


@pytest.mark.parametrize("world_size,case", [(w, c) for w, c in RUNS if dict((s[0], s[4]) for s in _scenarios())[c]])
def test_matches_naive_reference(world_size, case, distributed):
    got = distributed(world_size)[case]
    mask, phi, heads = reference(True, dict((s[0], s[5]) for s in _scenarios())[case])
    assert set(got["diffs"]) == {n for n, m in mask.items() if m.any()}
    for name, (idx, values) in got["diffs"].items():
        assert torch.equal(idx, torch.nonzero(mask[name].reshape(-1)).view(-1)), f"{name}: mask differs"
        torch.testing.assert_close(values, phi[name].reshape(-1)[idx], rtol=1e-4, atol=1e-6)
    for name, value in heads.items():
        torch.testing.assert_close(got["heads"][name], value, rtol=1e-4, atol=1e-6)


def test_language_sfts_overlap_each_other_and_the_task_mask(distributed):
    sfts = language_sfts()
    task = distributed()["z2-accum"]["diffs"]
    for name, (task_idx, _) in task.items():
        if name not in sfts["de"].diffs:
            continue
        de, en, sw = (set(sfts[lang].diffs[name][0].tolist()) for lang in LANGUAGES)
        assert de & en and de & sw and en & sw, name
    overlap_with_task = sum(len(set(task_idx.tolist()) & set(sfts[lang].diffs[name][0].tolist()))
                            for name, (task_idx, _) in task.items() if name in sfts["de"].diffs for lang in LANGUAGES)
    assert overlap_with_task > 100


def test_reference_depends_on_the_swap():
    """Without the per-step language SFTs (TA-only) φ_T is far from the swapped run's: the comparisons above can
    see a missing or leaking language delta."""
    _, phi, _ = reference(True)
    _, phi_ta_only, _ = reference(False)
    assert max(float((phi[n] - phi_ta_only[n]).abs().max()) for n in phi) > 1e-2


def test_bf16_working_weights_are_the_rounded_masters(distributed):
    got = distributed()["z2-bf16"]
    assert got["checks"]["between_steps"] == 0 and got["final_between"] == 0  # bf16(master) == working
    moved = sum(int((v != 0).sum()) for _, v in got["diffs"].values())
    assert moved > 0.5 * got["stats"]["k"]


# ---------------------------------------------------------------------- single process, no DeepSpeed


def _plain_model(dtype=torch.float32):
    model = tiny_model("task").to(dtype)
    return model, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_model_swap_equals_sft_apply_and_restores_bit_exactly(dtype):
    sfts = language_sfts()
    order = MultiSourceOrder(sources(), 12, 12, 0, 1, seed=3)
    model, theta = _plain_model(dtype)
    twin, _ = _plain_model(dtype)
    swap = LanguageSwap(model, sfts, order)
    params, twin_params = dict(model.named_parameters()), dict(twin.named_parameters())
    for step in range(30):
        swap.before_step(step)
        sft = sfts[order.language_at(step)]
        sft.apply(twin, skip_missing_heads=True)
        assert swap.applied_language == order.language_at(step)
        for n in params:
            assert torch.equal(params[n], twin_params[n]), n
        sft.revert(twin)
        swap.before_optimizer_step(step)
        with torch.no_grad():  # a fake optimizer step moves the masters (here: the parameters themselves)
            for n, p in params.items():
                p.add_(1e-3 * (step + 1))
                twin_params[n].copy_(p)
                theta[n].add_(1e-3 * (step + 1))
        for n in params:
            assert torch.equal(params[n], theta[n]), n  # no drift: the deltas never stay behind
    assert swap.seconds["apply"] > 0 and swap.seconds["restore"] > 0 and swap.steps == 30


def test_one_language_and_restore_without_apply():
    sfts = language_sfts()
    model, theta = _plain_model()
    swap = LanguageSwap(model, {"en": sfts["en"]}, lambda step: "en")
    swap.restore()  # nothing applied: a no-op
    swap.before_step(0)
    assert not torch.equal(dict(model.named_parameters())["bert.embeddings.word_embeddings.weight"],
                           theta["bert.embeddings.word_embeddings.weight"])
    swap.restore()
    swap.restore()
    assert all(torch.equal(p, theta[n]) for n, p in model.named_parameters())


def _other_sft(sft: SparseFineTuning, **meta) -> SparseFineTuning:
    m = copy.copy(sft.metadata)
    for key, value in meta.items():
        setattr(m, key, value)
    return SparseFineTuning(sft.diffs, sft.shapes, sft.heads, m)


def test_errors_before_training():
    sfts = language_sfts()
    model, _ = _plain_model()
    order = MultiSourceOrder(sources(), 12, 12, 0, 1, seed=3)
    with pytest.raises(LtsftError, match=r"no language SFT for source language\(s\) 'sw'"):
        LanguageSwap(model, {"de": sfts["de"], "en": sfts["en"]}, order)
    with pytest.raises(LtsftError, match="'en' was trained on another base model"):
        LanguageSwap(model, {**sfts, "en": _other_sft(sfts["en"], base_fingerprint="0" * 64)}, order)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    wrong_shape = SparseFineTuning({name: (torch.tensor([0, 5]), torch.ones(2))}, {name: (8, 32)}, {},
                                   _other_sft(sfts["de"], base_fingerprint="").metadata)
    with pytest.raises(LtsftError, match=r"shape mismatch for 'bert.encoder.layer.0.attention.self.query.weight'"):
        LanguageSwap(model, {**sfts, "de": wrong_shape}, order)
    missing = SparseFineTuning({"bert.encoder.layer.7.output.dense.bias": (torch.tensor([0]), torch.ones(1))},
                               {"bert.encoder.layer.7.output.dense.bias": (16,)}, {},
                               _other_sft(sfts["de"], base_fingerprint="").metadata)
    with pytest.raises(LtsftError, match="changes 'bert.encoder.layer.7.output.dense.bias', which this model"):
        LanguageSwap(model, {**sfts, "de": missing}, order)
    with pytest.raises(LtsftError, match="expected a SparseFineTuning"):
        LanguageSwap(model, {**sfts, "de": "runs/sft-de"}, order)
    # fingerprint given explicitly (computed before deepspeed.initialize) is the one compared
    with pytest.raises(LtsftError, match="another base model"):
        LanguageSwap(model, sfts, order, fingerprint="f" * 64)
    # a bigger model (another base): fingerprint mismatch, found before any training
    from transformers import BertConfig, BertForSequenceClassification

    from scenarios import TINY

    bigger = BertForSequenceClassification(BertConfig(**{**TINY, "hidden_size": 32}, num_labels=3))
    with pytest.raises(LtsftError, match="another base model"):
        build_multisource(bigger, sources(), sfts, multisource_config("zero2.json", micro_batch_size=12))


def test_errors_during_steps():
    sfts = language_sfts()
    model, _ = _plain_model()
    swap = LanguageSwap(model, {"en": sfts["en"]}, lambda step: "en" if step < 2 else "xx")
    swap.before_step(0)
    with pytest.raises(LtsftError, match="still applied"):
        swap.before_step(1)
    swap.before_optimizer_step(0)
    with pytest.raises(LtsftError, match="language 'xx', which has no language SFT"):
        swap.before_step(2)
    with pytest.raises(LtsftError, match="language_at must be"):
        LanguageSwap(model, sfts, object())
