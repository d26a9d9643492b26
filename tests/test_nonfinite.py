"""A non-finite loss on one rank of a 2-rank run (its classifier made to output NaN for one phase-2 step): every
rank agrees on it. `on_nonfinite_loss: stop` stops every rank with an error naming the phase, the step and the last
checkpoint; `skip` leaves every master weight of every rank bit-identical across that step (ZeRO 0, 2 with
gradient accumulation, 3) and the run completes with exactly K entries and no frozen drift.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from scenarios import classification_examples, ds_config_for, task_config, tiny_model

from ltsft_dist.hooks import StepHook

WORLD = 2
NAN_STEP = 2  # phase-2 step index (the message counts from 1: "phase2 step 3")
NAN_RANK = 1


class NaNAt(StepHook):
    """Step hook: rank `NAN_RANK`'s loss is NaN at phase-2 step `NAN_STEP` (and so are its gradients); records
    this rank's fp32 masters before every phase-2 step."""

    def __init__(self, recipe):
        self.recipe, self.handle, self.masters = recipe, None, {}

    def before_step(self, step: int) -> None:
        if self.recipe.selected is None:  # phase 1
            return
        self.masters[step] = [s.clone() for s in self.recipe.shards.segments]
        if step == NAN_STEP and self.recipe.rank == NAN_RANK:
            self.handle = self.recipe.model.classifier.register_forward_hook(lambda m, i, out: out * float("nan"))

    def before_optimizer_step(self, step: int) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def nonfinite_cases(cases: list) -> dict:
    """Every rank returns, per case, what it saw: for `skip` whether its masters stayed put across the NaN step
    (and moved across the steps around it), for `stop` the error message."""
    from ltsft_dist.errors import LtsftError
    from ltsft_dist.recipe import LTSFTRecipe

    results = {}
    for name, cfg, accumulation in cases:
        cfg = copy.deepcopy(cfg)
        cfg.micro_batch_size = cfg.batch_size // (WORLD * accumulation)
        recipe = LTSFTRecipe(tiny_model("task"), classification_examples(), cfg, ds_config_for(cfg, WORLD),
                             show_progress=False)
        hook = NaNAt(recipe)
        recipe.step_hooks.append(hook)
        try:
            sft = recipe.run()
        except LtsftError as err:
            results[name] = {"error": str(err)}
            continue
        results_json = Path(cfg.output_dir) / f"results-rank{recipe.rank}.json"
        recipe.save_results(results_json)
        m = hook.masters
        same = lambda a, b: all(torch.equal(x, y) for x, y in zip(m[a], m[b]))  # noqa: E731
        results[name] = {"skipped_step_kept_masters": same(NAN_STEP, NAN_STEP + 1),
                         "steps_around_it_moved": not same(NAN_STEP - 1, NAN_STEP)
                         and not same(NAN_STEP + 1, NAN_STEP + 2),
                         "skipped_steps": recipe.stats.skipped_steps, "frozen_drift": recipe.stats.frozen_drift,
                         "nnz": None if sft is None else sft.nnz, "k": recipe.stats.k,
                         "results": results_json.read_text()}
    return results


CASES = [
    ("skip-z0", task_config("zero0.json", on_nonfinite_loss="skip"), 1),
    ("skip-z2-accum", task_config("zero2.json", on_nonfinite_loss="skip"), 2),
    ("skip-z3", task_config("zero3.json", on_nonfinite_loss="skip"), 1),
    ("stop", task_config("zero2.json"), 1),
    ("stop-after-checkpoint", task_config("zero2.json", checkpoint_every=2), 1),
]


def launch_nonfinite() -> list[dict]:
    return run_ranks(nonfinite_cases, WORLD, CASES)


@pytest.fixture(scope="session")
def nonfinite(launches):
    return functools.partial(launches, launch_nonfinite)


@pytest.mark.parametrize("case", [c[0] for c in CASES if c[0].startswith("skip")])
def test_skip_leaves_every_rank_unchanged_by_the_step(case, nonfinite):
    for rank, got in enumerate(nonfinite()):
        got = got[case]
        assert got["skipped_step_kept_masters"], f"rank {rank}: a master weight changed in the skipped step"
        assert got["steps_around_it_moved"], f"rank {rank}: the normal steps did not train"
        assert got["skipped_steps"] == 1 and got["frozen_drift"] == 0
        losses = json.loads(got["results"], parse_constant=lambda c: pytest.fail(f"results.json holds {c}"))
        assert losses["losses"]["phase2"].count(None) == (1 if rank == NAN_RANK else 0)
    assert nonfinite()[0][case]["nnz"] == nonfinite()[0][case]["k"] > 0


def test_stop_names_the_rank_phase_step_and_that_there_is_no_checkpoint(nonfinite):
    for got in nonfinite():
        message = got["stop"]["error"]
        assert f"non-finite loss (NaN or inf) on rank {NAN_RANK} in phase2 step {NAN_STEP + 1}" in message
        assert "last complete checkpoint: no checkpoint yet" in message
        assert "on_nonfinite_loss: skip" in message


def test_stop_names_the_last_complete_checkpoint(nonfinite):
    for got in nonfinite():
        message = got["stop-after-checkpoint"]["error"]
        assert f"phase2 step {NAN_STEP + 1}" in message
        assert message.rstrip().count("checkpoints/round1-phase2-step0000002") == 1, message


def test_on_nonfinite_loss_is_validated():
    from ltsft_dist.errors import LtsftError

    with pytest.raises(LtsftError, match="on_nonfinite_loss: 'ignore' is not one of stop, skip"):
        task_config(on_nonfinite_loss="ignore")
