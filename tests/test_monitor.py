"""Training metrics (`ltsft_dist.monitor`) as TensorBoard itself reads them back, from one real 2-rank LT-SFT run
(ZeRO 2) with a language SFT swapped in at every step, so that every metric has something to measure."""

from __future__ import annotations

import copy
import functools
import math
import tempfile
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distributed import run_ranks
from scenarios import classification_examples, ds_config_for, language_sfts, task_config, tiny_model
from ltsft_dist.naming import module_type_and_layer
from ltsft_dist.recipe import linear_lr

WORLD = 2
CONFIG = task_config("zero2.json", log_every=2)  # 6 + 6 steps: logged after global steps 2, 4, 6 | 8, 10, 12


def monitored_run(log_dir: str, config) -> dict | None:
    import torch.distributed as dist

    from ltsft_dist.recipe import LTSFTRecipe
    from ltsft_dist.swap import LanguageSwap

    cfg = copy.deepcopy(config)
    cfg.micro_batch_size = cfg.batch_size // WORLD
    model = tiny_model("task")
    language = language_sfts()["en"]
    swap = LanguageSwap(model, {"en": language}, lambda step: "en")
    recipe = LTSFTRecipe(model, classification_examples(), cfg, ds_config_for(cfg, WORLD), show_progress=False,
                         log_dir=Path(log_dir), step_hooks=[swap])
    sft = recipe.run()
    dist.barrier()
    if sft is None:
        return None
    return {"diffs": sft.diffs, "k": recipe.stats.k, "language": language.diffs, "roles": recipe.eligibility.roles,
            "shapes": recipe.shapes}


def launch_run() -> tuple[dict, EventAccumulator]:
    log_dir = tempfile.mkdtemp(prefix="ltsft-tb-")
    result = run_ranks(monitored_run, WORLD, log_dir, CONFIG)[0]
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return result, events


@pytest.fixture(scope="session")
def run(launches):
    return functools.partial(launches, launch_run)


def series(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_only_rank_zero_writes_one_event_file(run):
    _, events = run()
    assert len(list(Path(events.path).glob("events.out.tfevents.*"))) == 1


def test_step_metrics_exist_and_are_sane(run):
    _, events = run()
    tags = set(events.Tags()["scalars"])
    assert {f"train/{m}" for m in ("loss", "lr", "l1", "grad_norm", "phase", "tokens_per_s", "step_seconds",
                                   "swap_seconds", "peak_memory_mb", "skipped_steps")} <= tags
    # One x axis over both phases; the phase marker says which phase each point belongs to.
    assert series(events, "train/phase") == [(2, 1), (4, 1), (6, 1), (8, 2), (10, 2), (12, 2)]
    steps = [2, 4, 6]
    expected_lr = [linear_lr(s - 1, CONFIG.phase1) for s in steps] + [linear_lr(s - 1, CONFIG.phase2) for s in steps]
    assert [v for _, v in series(events, "train/lr")] == pytest.approx(expected_lr, rel=1e-6)
    losses = [v for _, v in series(events, "train/loss")]
    assert all(math.isfinite(v) and 0 < v < 10 for v in losses)  # 3 classes: about ln 3 at the start
    assert all(math.isfinite(v) and v > 0 for _, v in series(events, "train/grad_norm"))
    assert all(v == 0 for _, v in series(events, "train/l1"))  # λ = 0 in this config
    assert all(v == 0 for _, v in series(events, "train/skipped_steps"))
    # 12 sequences of 6-12 tokens per step: tokens/s is tokens per step over step time.
    for (_, rate), (_, seconds) in zip(series(events, "train/tokens_per_s"), series(events, "train/step_seconds")):
        assert 12 * 6 <= rate * seconds <= 12 * 12
    assert all(0 < v < s for (_, v), (_, s) in zip(series(events, "train/swap_seconds"),
                                                    series(events, "train/step_seconds")))
    assert all(100 < v < 24 * 1024 for _, v in series(events, "train/peak_memory_mb"))


def test_selection_metrics_match_the_sft(run):
    result, events = run()
    k = result["k"]
    assert series(events, "select/k") == [(6, k)] and k == sum(len(i) for i, _ in result["diffs"].values())
    assert len(series(events, "select/threshold")) == 1
    # Density per module type and per layer, from the distributed count, against the SFT rank 0 extracted.
    sparse = [n for n, role in result["roles"].items() if role == "sparse"]
    per_type: dict[str, list[int]] = {}
    for name in sparse:
        module_type, layer = module_type_and_layer(name)
        key = module_type if layer is not None else module_type.split(".", 1)[1]  # "bert." dropped
        nnz = len(result["diffs"][name][0]) if name in result["diffs"] else 0
        counts = per_type.setdefault(key, [0, 0])
        counts[0] += nnz
        counts[1] += math.prod(result["shapes"][name])
    logged = {tag.removeprefix("mask/type/"): series(events, tag) for tag in events.Tags()["scalars"]
              if tag.startswith("mask/type/")}
    assert set(logged) == set(per_type)
    for key, (nnz, numel) in per_type.items():
        assert logged[key] == [(6, pytest.approx(nnz / numel, rel=1e-6))], key
    assert round(sum(logged[key][0][1] * numel for key, (_, numel) in per_type.items())) == k
    layers = [tag for tag in events.Tags()["scalars"] if tag.startswith("mask/layer/")]
    assert sorted(layers) == ["mask/layer/0", "mask/layer/1"]


def test_overlap_with_the_language_sft_is_counted_exactly(run):
    result, events = run()
    expected = 0
    for name, (idx, _) in result["diffs"].items():
        if name in result["language"]:
            expected += int(torch.isin(idx, result["language"][name][0]).sum())
    assert expected > 0  # the test means something only if the two overlap
    assert series(events, "mask/overlap/en") == [(6, expected)]
