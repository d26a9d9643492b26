"""The phase-2 mask's plans: a segment's plan restricted to a fragment or a gradient run says exactly which
elements are frozen, in every form the plan takes."""

from __future__ import annotations

import pytest
import torch

from ltsft_dist.masking import INDEX_FORM_LIMIT, _frozen_elements, _keep_only, _plan, _restrict


def _segment(trainable_share: float, numel: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(numel, generator=g) >= trainable_share  # True = frozen


@pytest.mark.parametrize("share,form", [(0.0, "all_frozen"), (1.0, "all_trainable"),
                                        (0.5 / INDEX_FORM_LIMIT, "index"), (0.5, "mask")])
def test_restricted_plans_match_the_mask(share, form):
    frozen = _segment(share)
    plan = _plan(frozen.clone())
    assert plan[0] == form
    for start, numel in ((0, 4096), (0, 1000), (1000, 3096), (1234, 1), (4000, 96)):
        got = _frozen_elements(_restrict(plan, start, numel), numel, frozen.device)
        assert torch.equal(got, frozen[start:start + numel]), (start, numel)


def test_an_index_plan_at_offset_0_is_a_view_of_the_segments():
    plan = _plan(_segment(0.05))
    how, idx = _restrict(plan, 0, 2000)
    assert how == "index" and idx.untyped_storage().data_ptr() == plan[1].untyped_storage().data_ptr()


def test_keep_only_through_a_restricted_plan_touches_only_frozen_elements():
    frozen = _segment(0.05)
    plan = _plan(frozen.clone())
    values, theta0 = torch.randn(4096), torch.randn(4096)
    start, numel = 700, 2500
    part = values[start:start + numel].clone()
    _keep_only(part, _restrict(plan, start, numel), theta0[start:start + numel])
    window = frozen[start:start + numel]
    assert torch.equal(part[window], theta0[start:start + numel][window])
    assert torch.equal(part[~window], values[start:start + numel][~window])
