"""The collective top-K, with ranks simulated by threads so many partitionings can be checked quickly."""

from __future__ import annotations

import pickle
import threading

import pytest
import torch

from ltsft_dist.errors import LtsftError
from ltsft_dist.topk import random_scores, select_topk


class ThreadGroup:
    """All-reduce and all-gather between threads: enough to run `select_topk` as W ranks in one process."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size)
        self.slots = [None] * world_size
        self.bytes_sent = 0

    def _exchange(self, rank, value):
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def all_reduce(self, rank):
        def op(tensor):
            self.bytes_sent += tensor.numel() * tensor.element_size() if rank == 0 else 0
            tensor.copy_(sum(t.clone() for t in self._exchange(rank, tensor.clone())))
            return tensor
        return op

    def all_gather_object(self, rank):
        def op(obj):
            self.bytes_sent += len(pickle.dumps(obj)) if rank == 0 else 0
            return self._exchange(rank, obj)
        return op


def oracle_mask(full: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(full, descending=True, stable=True).indices
    mask = torch.zeros(full.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def shard(params: list[torch.Tensor], world_size: int, gen: torch.Generator):
    """Cut the concatenated parameters at random points into W contiguous shards, ZeRO-1/2 style: each rank
    gets fragments (key, scores) with keys (param index, offset)."""
    total = sum(p.numel() for p in params)
    cuts = sorted(torch.randint(0, total + 1, (world_size - 1,), generator=gen).tolist())
    bounds = [0, *cuts, total]
    starts = torch.cumsum(torch.tensor([0] + [p.numel() for p in params]), 0).tolist()
    ranks = []
    for r in range(world_size):
        lo, hi = bounds[r], bounds[r + 1]
        frags = []
        for i, p in enumerate(params):
            a, b = max(lo, starts[i]), min(hi, starts[i + 1])
            if a < b:
                frags.append(((i, a - starts[i]), p[a - starts[i]:b - starts[i]]))
        ranks.append(frags)
    return ranks


def run_select(ranks, k):
    group = ThreadGroup(len(ranks))
    results, errors = [None] * len(ranks), []

    def work(r):
        try:
            keys = [key for key, _ in ranks[r]]
            scores = [s for _, s in ranks[r]]
            results[r] = select_topk(scores, keys, k, group.all_reduce(r), group.all_gather_object(r))
        except Exception as err:  # surfaced below
            errors.append(err)
            group.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(ranks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, group


def assemble(ranks, results, params):
    masks = [torch.zeros(p.numel(), dtype=torch.bool) for p in params]
    for frags, result in zip(ranks, results):
        for ((i, offset), _), m in zip(frags, result.masks):
            masks[i][offset:offset + m.numel()] = m
    return torch.cat(masks)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("distribution", ["continuous", "few-values", "mostly-zero"])
def test_exact_topk_matches_oracle(world_size, distribution):
    gen = torch.Generator().manual_seed(world_size * 7 + len(distribution))
    sizes = [37, 1000, 3, 517, 64]
    if distribution == "continuous":
        params = [torch.rand(n, generator=gen) for n in sizes]
    elif distribution == "few-values":  # heavy ties everywhere
        params = [torch.randint(0, 4, (n,), generator=gen).float() / 4 for n in sizes]
    else:  # K exceeds the number of non-zero scores: the tie at 0 decides most of the mask
        params = [torch.where(torch.rand(n, generator=gen) < 0.05, torch.rand(n, generator=gen), 0.0)
                  for n in sizes]
    full = torch.cat(params)
    for k in (1, 10, 250, full.numel() // 2, full.numel()):
        ranks = shard(params, world_size, gen)
        results, _ = run_select(ranks, k)
        mask = assemble(ranks, results, params)
        assert int(mask.sum()) == k
        assert torch.equal(mask, oracle_mask(full, k))


def test_threshold_and_tie_report():
    params = [torch.tensor([0.5, 0.2, 0.2, 0.2, 0.1]), torch.tensor([0.2, 0.9])]
    results, _ = run_select(shard(params, 2, torch.Generator().manual_seed(0)), 4)
    assert results[0].threshold == pytest.approx(0.2)
    assert results[0].ties_at_threshold == 4 and results[0].ties_taken == 2
    # the first two 0.2s in (parameter, offset) order win
    mask = assemble(shard(params, 2, torch.Generator().manual_seed(0)), results, params)
    assert mask.tolist() == [True, True, True, False, False, False, True]


def test_communication_does_not_grow_with_n():
    sent = []
    for n in (10_000, 1_000_000):
        gen = torch.Generator().manual_seed(0)
        params = [torch.rand(n // 2, generator=gen), torch.rand(n // 2, generator=gen)]
        _, group = run_select(shard(params, 2, gen), n // 20)
        sent.append(group.bytes_sent)
    assert sent[0] == sent[1] or abs(sent[0] - sent[1]) < 200  # only the tie table's pickling may vary
    assert sent[1] < 2 * (1 << 16) * 8 + 4096


def test_bad_inputs():
    with pytest.raises(LtsftError, match="K=0"):
        run_select([[((0, 0), torch.rand(10))]], 0)
    with pytest.raises(LtsftError, match="K=11"):
        run_select([[((0, 0), torch.rand(10))]], 11)
    with pytest.raises(LtsftError, match="finite"):
        run_select([[((0, 0), torch.tensor([1.0, float("nan")]))]], 1)


def test_random_scores_depend_only_on_position():
    whole = random_scores([(3, 0)], [100], seed=5)[0]
    parts = random_scores([(3, 0), (3, 40)], [40, 60], seed=5)
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(random_scores([(3, 0)], [100], seed=6)[0], whole)
    assert not torch.equal(random_scores([(4, 0)], [100], seed=5)[0], whole)
    assert whole.unique().numel() > 90  # close to uniform, few collisions
