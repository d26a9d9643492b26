"""The distributed engine against the single-process oracle, across world sizes and ZeRO stages.

One launch per world size runs every case (DeepSpeed start-up is the slow part). Masks must be identical to
the oracle's; φ and the heads agree within float32 rounding, because gradients are summed in a different
order across ranks (the W=1 runs agree to ~1e-8).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from distributed import run_ranks
from oracle import oracle_ltsft
from scenarios import (classification_examples, clm_config, clm_examples, instruct_examples, mlm_examples, model_for,
                       run_cases, task_config, tiny_model, TINY_LLAMA)
from ltsft_dist.config import ModelConfig, PhaseConfig

STAGES = (0, 1, 2, 3)


def _cases():
    base = classification_examples()
    ties = classification_examples(used_vocab=30)
    cases = []
    for stage in STAGES:
        ds = f"zero{stage}.json"
        cases.append((f"base-z{stage}", task_config(ds), base, 1))
        # No weight decay, few tokens in use and K > the number of changed elements: many exact-zero diffs tie.
        cases.append((f"ties-z{stage}", task_config(ds, weight_decay=0.0, density=0.9), ties, 1))
        cases.append((f"random-z{stage}", task_config(ds, selection="random", density=0.05), base, 1))
    for stage in (2, 3):
        language = task_config(f"zero{stage}.json", kind="language", weight_decay=0.05)
        cases.append((f"language-z{stage}", language, mlm_examples(), 1))
        l1 = task_config(f"zero{stage}.json", batch_size=24, phase1=PhaseConfig(steps=4, lr=3e-3, l1=0.1),
                         phase2=PhaseConfig(steps=4, lr=3e-3, l1=0.1))
        cases.append((f"l1-accum-z{stage}", l1, base, 2))
    # A language SFT of a tiny Llama (task clm): next-token loss over full blocks, norms and the untied head frozen.
    for stage in (0, 2, 3):
        cases.append((f"clm-z{stage}", clm_config(f"zero{stage}.json"), clm_examples(), 1))
    clm_l1 = clm_config("zero3.json", batch_size=24, phase1=PhaseConfig(steps=4, lr=3e-3, l1=0.1),
                        phase2=PhaseConfig(steps=4, lr=3e-3, l1=0.1))
    cases.append(("clm-l1-accum-z3", clm_l1, clm_examples(), 2))
    # A task SFT of the tiny Llama on instructions (task instruct): the loss on responses of varying lengths only.
    for stage in (2, 3):
        instruct = task_config(f"zero{stage}.json", task="instruct", batch_size=24, weight_decay=0.05,
                               model=ModelConfig(tiny=dict(TINY_LLAMA), architecture="llama"))
        cases.append((f"instruct-accum-z{stage}", instruct, instruct_examples(), 2))
    return cases


CASES = {name: (cfg, ex, acc) for name, cfg, ex, acc in _cases()}


def launch_distributed(world_size: int) -> dict:
    cases = [(n, c, e, a) for n, (c, e, a) in CASES.items()]
    return run_ranks(run_cases, world_size, cases, world_size)[0]


@pytest.fixture(scope="session")
def distributed(launches):
    return functools.partial(launches, launch_distributed)


@functools.lru_cache(maxsize=None)
def oracle(case: str):
    cfg, examples, _ = CASES[case]
    return oracle_ltsft(model_for(cfg), examples, cfg)


def _mask_indices(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask.reshape(-1)).view(-1)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("case", [n for n in CASES if not n.startswith("random")])
def test_matches_oracle(case, world_size, distributed):
    got = distributed(world_size)[case]
    mask, phi, heads = oracle(case)
    stats = got["stats"]
    assert set(got["diffs"]) == {n for n, m in mask.items() if m.any()}
    for name, (idx, values) in got["diffs"].items():
        assert torch.equal(idx, _mask_indices(mask[name])), f"{name}: mask differs from the oracle's"
        torch.testing.assert_close(values, phi[name].reshape(-1)[idx], rtol=1e-4, atol=1e-6)
    for name, value in heads.items():
        torch.testing.assert_close(got["heads"][name], value, rtol=1e-4, atol=1e-6)
    assert sum(len(i) for i, _ in got["diffs"].values()) == stats["k"]
    assert stats["frozen_drift"] == 0
    assert got["working_drift"] == 0


def test_l1_case_depends_on_l1():
    """The L1 cases only prove something if the pull changes the result."""
    cfg, examples, _ = CASES["l1-accum-z2"]
    without = copy.deepcopy(cfg)
    without.phase1.l1 = without.phase2.l1 = 0.0
    _, phi_l1, _ = oracle("l1-accum-z2")
    _, phi_plain, _ = oracle_ltsft(tiny_model(cfg.kind), examples, without)
    assert max(float((phi_l1[n] - phi_plain[n]).abs().max()) for n in phi_l1) > 1e-5


def test_l1_cases_cover_both_forms_of_the_phase2_pull(distributed):
    """The oracle comparison of the L1 cases covers the phase-2 pull computed at the mask's offsets only (a sparse
    mask) and over whole fragments (the tiny classifier's ZeRO-3 segments are over 1/8 trainable: a bool mask)."""
    got = {case: distributed(2)[case]["sparse_pulls"] for case in ("l1-accum-z2", "l1-accum-z3", "clm-l1-accum-z3")}
    assert got["l1-accum-z2"] > 0 and got["clm-l1-accum-z3"] > 0 and got["l1-accum-z3"] == 0, got


def test_ties_case_really_has_ties(distributed):
    stats = distributed(2)["ties-z2"]["stats"]
    assert stats["threshold"] == 0.0
    assert stats["ties_at_threshold"] > stats["ties_taken"] > 0


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_masks_identical_across_world_sizes_and_stages(world_size, distributed):
    reference = distributed(1)["random-z0"]["diffs"]
    for stage in STAGES:
        got = distributed(world_size)[f"random-z{stage}"]
        assert got["diffs"].keys() == reference.keys()
        for name, (idx, _) in reference.items():
            assert torch.equal(got["diffs"][name][0], idx)
        assert sum(len(i) for i, _ in got["diffs"].values()) == got["stats"]["k"]


def test_theta0_is_sharded(distributed):
    """θ⁰ bytes per rank: a full copy at ZeRO 0, about 1/W of it under ZeRO 1-3."""
    full = distributed(1)["base-z0"]["stats"]["theta0_bytes_per_rank"]
    for stage in (1, 2, 3):
        per_rank = distributed(4)[f"base-z{stage}"]["stats"]["theta0_bytes_per_rank"]
        assert per_rank <= full / 4 * 1.1, (stage, per_rank, full)
    assert distributed(4)["base-z0"]["stats"]["theta0_bytes_per_rank"] == full


def _variants():
    base = classification_examples()
    cases = []
    for stage in (0, 2, 3):
        cases.append((f"rounds-z{stage}", task_config(f"zero{stage}.json", rounds=2), base, 1))
    for stage in (1, 2, 3):
        cases.append((f"bf16-z{stage}", task_config(f"zero{stage}_bf16.json"), base, 1))
    cases.append(("bitfit-z2", task_config("zero2.json", kind="bitfit", density=None), base, 1))
    # Decoders: bf16 working weights over fp32 masters, and activation checkpointing (model.gradient_checkpointing).
    cases.append(("clm-bf16-z3", clm_config("zero3_bf16.json"), clm_examples(), 1))
    checkpointed = clm_config("zero3.json")
    checkpointed.model.gradient_checkpointing = True
    cases.append(("clm-checkpointed-z3", checkpointed, clm_examples(), 1))
    return cases


def launch_variants() -> dict:
    return run_ranks(run_cases, 2, _variants(), 2)[0]


@pytest.fixture(scope="session")
def variants(launches):
    return functools.partial(launches, launch_variants)


def test_iterative_rounds_are_exact_and_stage_independent(variants):
    reference = variants()["rounds-z0"]
    assert sum(len(i) for i, _ in reference["diffs"].values()) == reference["stats"]["k"]
    for stage in (2, 3):
        got = variants()[f"rounds-z{stage}"]
        assert got["diffs"].keys() == reference["diffs"].keys()
        for name, (idx, _) in reference["diffs"].items():
            assert torch.equal(got["diffs"][name][0], idx)
        assert got["stats"]["frozen_drift"] == 0 and got["working_drift"] == 0
    assert len(reference["stats"]["losses"]) == 4  # phase1.1, phase2.1, phase1.2, phase2.2


@pytest.mark.parametrize("case", ["bf16-z1", "bf16-z2", "bf16-z3", "clm-bf16-z3"])
def test_bf16_keeps_frozen_positions_bit_identical(case, variants):
    got = variants()[case]
    assert got["stats"]["frozen_drift"] == 0  # fp32 masters
    assert got["working_drift"] == 0  # bf16 working weights
    assert sum(len(i) for i, _ in got["diffs"].values()) == got["stats"]["k"]
    moved = sum(int((v != 0).sum()) for _, v in got["diffs"].values())
    assert moved > 0.5 * got["stats"]["k"]


def test_activation_checkpointing_changes_nothing_but_memory(variants, distributed):
    """A tiny Llama trained with gradient checkpointing at W=2 ZeRO-3 selects the same mask as without it, and φ
    agrees to fp32 rounding: recomputing activations changes no gradient."""
    got, plain = variants()["clm-checkpointed-z3"], distributed(2)["clm-z3"]
    assert got["diffs"].keys() == plain["diffs"].keys()
    for name, (idx, values) in plain["diffs"].items():
        assert torch.equal(got["diffs"][name][0], idx), name
        torch.testing.assert_close(got["diffs"][name][1], values, rtol=1e-5, atol=1e-7)
    assert got["stats"]["frozen_drift"] == 0 and got["working_drift"] == 0
    # Training mode (dropout on, checkpointing active), with the layer recomputed once per backward pass.
    assert plain["first_layer_calls"][0] > 0 and got["first_layer_calls"][0] == 2 * plain["first_layer_calls"][0]


def test_bitfit_trains_all_biases_and_nothing_else(variants):
    got = variants()["bitfit-z2"]
    model = tiny_model("bitfit")
    biases = {n: p.numel() for n, p in model.named_parameters()
              if n.endswith(".bias") and n.startswith("bert.") and ".pooler." not in n}
    assert {n: len(i) for n, (i, _) in got["diffs"].items()} == biases
    # the pooler belongs to the dense task head (BERT's two-layer head on [CLS])
    assert set(got["heads"]) == {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight",
                                 "bert.pooler.dense.bias"}
    assert got["working_drift"] == 0


def test_language_sft_freezes_layernorm_and_output_embeddings(distributed):
    got = distributed(2)["language-z2"]
    assert not any("LayerNorm" in n or n == "cls.predictions.decoder.weight" for n in got["diffs"])
    assert "bert.embeddings.word_embeddings.weight" in got["diffs"]
    assert got["heads"] == {}


def test_clm_language_sft_freezes_norms_and_the_untied_output_head(distributed):
    """Decoders follow the method's language-SFT rules: input embeddings eligible, RMSNorms and lm_head frozen."""
    got = distributed(2)["clm-z2"]
    assert not any("norm" in n or n == "lm_head.weight" for n in got["diffs"])
    assert "model.embed_tokens.weight" in got["diffs"]
    assert {n.rsplit(".", 2)[-2] for n in got["diffs"]} >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"}
    assert got["heads"] == {}


def _run_cases_on_recycled_memory(cases, world_size):
    """`run_cases` with `torch.empty` returning NaN-filled memory, as a caching allocator's recycled blocks may:
    DeepSpeed allocates ZeRO-3 partitions, padding included, with `torch.empty`."""
    torch.use_deterministic_algorithms(True)  # also fills uninitialised float memory with NaN
    return run_cases(cases, world_size)


@pytest.mark.parametrize("world_size", [2, 3])
def test_zero3_decoders_are_built_straight_into_partitions(world_size, distributed):
    """Under ZeRO-3, `ltsft train` loads a decoder checkpoint inside `deepspeed.zero.Init` (via transformers'
    HfDeepSpeedConfig): each rank holds about 1/W of it from the start, and the results above still equal the
    oracle's. The tiny BERT cases reach ZeRO-3 the other way (built whole, partitioned by the engine)."""
    results = distributed(world_size)
    for case in ("clm-z3", "instruct-accum-z3"):
        built = results[case]["held_at_build"]
        assert built["partitioned"] and built["held"] <= built["total"] / world_size + 4 * world_size * 64, built
    for case in ("clm-z2", "base-z3"):
        assert not results[case]["held_at_build"]["partitioned"]
        assert results[case]["held_at_build"]["held"] == results[case]["held_at_build"]["total"]


def test_zero3_padding_never_counts_as_drift():
    """At W=3 several parameters' numel is not a multiple of 3, so the last rank's partitions end in padding."""
    names = ("language-z3", "base-z3", "clm-z3")
    cases = [(n, *CASES[n]) for n in names]
    got = run_ranks(_run_cases_on_recycled_memory, 3, cases, 3)[0]
    for name in names:
        mask, _, _ = oracle(name)
        assert got[name]["stats"]["frozen_drift"] == 0, name
        assert got[name]["working_drift"] == 0, name
        for param, (idx, _) in got[name]["diffs"].items():
            assert torch.equal(idx, _mask_indices(mask[param])), f"{name}: {param}: mask differs from the oracle's"
