"""Phase-2 masking on the shards, and the L1 pull toward θ⁰.

Gradients are edited in DeepSpeed's own reduced-gradient buffers before `engine.step()`, so the gradient
norm and clipping DeepSpeed computes are those of the masked gradient. After each inner optimizer step, the frozen
elements of every segment whose parameter group decays are projected back onto θ⁰ (AdamW's decoupled weight decay
moves zero-gradient elements), before DeepSpeed copies the masters into the working weights. Without decay nothing
moves them: their gradient is zero at every step and so is their first moment (zeroed at the rewind), so AdamW's
update there is exactly 0 (`frozen_drift` checks it at the end of every run).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import torch

from ltsft_dist.shards import Fragment, Shards
from ltsft_dist.snapshot import Snapshot


class GradientMask:
    def __init__(self, shards: Shards, snapshot: Snapshot, sparse: list[Fragment],
                 selected: list[torch.Tensor]):
        """`sparse` are my eligible fragments and `selected[i]` their bool masks; every other element of my
        segments (the dense head) stays trainable, except ZeRO-3 padding, which is frozen too.

        Only the per-segment plans are kept (at K = 5 %, int64 offsets of the trainable elements: 0.4 bytes per
        element instead of a 1-byte bool mask); the gradient runs reuse them (views where they can)."""
        self.shards, self.snapshot = shards, snapshot
        self._segment_plans = []
        for i, segment in enumerate(shards.segments):
            frozen = torch.ones(segment.numel(), dtype=torch.bool, device=segment.device)  # padding stays frozen
            for f in shards.fragments:
                if f.segment == i:
                    frozen.narrow(0, f.segment_offset, f.numel).fill_(False)
            for f, sel in zip(sparse, selected):
                if f.segment == i:
                    torch.logical_not(sel, out=frozen.narrow(0, f.segment_offset, f.numel))
            self._segment_plans.append(_plan(frozen))
            del frozen  # one segment's bool mask at a time
        self._grad_layout, self._grad_runs = None, []
        self._steps = [0] * len(self._segment_plans)
        self._handle = None

    def selected(self, sparse: list[Fragment]) -> SelectedMasks:
        """The selected elements of each fragment in `sparse`, read from the plans: phase 2 holds the mask once."""
        return SelectedMasks(self, sparse)

    def frozen_of(self, f: Fragment) -> torch.Tensor:
        """Which elements of fragment `f` are frozen (a new bool tensor)."""
        return _frozen_elements(self._fragment_plan(f), f.numel, self.shards.segments[f.segment].device)

    def trainable_offsets(self, f: Fragment) -> torch.Tensor | None:
        """The offsets of `f`'s trainable elements when the mask is sparse enough to be kept as offsets; None
        otherwise (then a pass over every element of `f` is as cheap)."""
        how, arg = self._fragment_plan(f)
        if how == "all_frozen":
            return torch.empty(0, dtype=torch.int64, device=self.shards.segments[f.segment].device)
        return arg if how == "index" else None

    def _fragment_plan(self, f: Fragment) -> tuple[str, torch.Tensor | None]:
        return _restrict(self._segment_plans[f.segment], f.segment_offset, f.numel)

    @torch.no_grad()
    def mask_gradients(self, grads: list[torch.Tensor]) -> None:
        """Zero the frozen elements of `grads` (one view per fragment, as `Shards.grads()` returns them).

        DeepSpeed keeps the fragments' gradients side by side in one buffer (ZeRO 1-3), so they are edited as a
        few long runs of that buffer (3 ops per run, not 3 per fragment: ~9 instead of ~100 kernel launches per
        step). What remains is memory bandwidth: one pass over the partition."""
        layout = _storage_layout(grads)
        if layout != self._grad_layout:  # planned once per buffer layout, not per step
            self._grad_layout, self._grad_runs = layout, self._plan_grad_runs(grads)
        for first, offset, numel, plan in self._grad_runs:
            _keep_only(grads[first].as_strided((numel,), (1,), offset), plan, 0.0)

    def _plan_grad_runs(self, grads: list[torch.Tensor]) -> list[tuple[int, int, int, tuple]]:
        """(view index, storage offset, numel, plan) per maximal run of views that tile one storage range."""
        order = sorted(range(len(grads)), key=lambda i: (_storage_id(grads[i]), grads[i].storage_offset()))
        runs: list[list[int]] = []
        for i in order:
            prev = runs[-1][-1] if runs else None
            if (prev is not None and _storage_id(grads[i]) == _storage_id(grads[prev])
                    and grads[i].storage_offset() == grads[prev].storage_offset() + grads[prev].numel()):
                runs[-1].append(i)
            else:
                runs.append([i])
        return [(run[0], grads[run[0]].storage_offset(), sum(grads[i].numel() for i in run), self._run_plan(run))
                for run in runs]

    def _run_plan(self, run: list[int]) -> tuple[str, torch.Tensor | None]:
        """A run of fragments lying side by side in one segment (as DeepSpeed lays them out) shares that segment's
        plan; any other layout gets a plan of its own."""
        fragments = [self.shards.fragments[i] for i in run]
        first = fragments[0]
        if all(b.segment == first.segment and b.segment_offset == a.segment_offset + a.numel
               for a, b in zip(fragments, fragments[1:])):
            return _restrict(self._segment_plans[first.segment], first.segment_offset,
                             sum(f.numel for f in fragments))
        return _plan(torch.cat([self.frozen_of(f) for f in fragments]))

    @torch.no_grad()
    def project(self, segment_indices: list[int]) -> None:
        for i in segment_indices:
            if self.shards.decays(i):
                _keep_only(self.shards.segments[i], self._segment_plans[i], self.snapshot.segments[i])
            if self._steps[i] % REFRESH_SECOND_MOMENT == 0:
                self._refresh_second_moment(i)
            self._steps[i] += 1

    def _refresh_second_moment(self, i: int) -> None:
        """Frozen elements' second moment never matters (their gradient and first moment are zero, or they are put
        back onto θ⁰ after every step); it is kept at 1 because torch's CPU sqrt is ~8× slower on zeros (and
        denormals) than on normal values. Refreshed before β₂-decay could make it denormal (0.999^10000 ≈ 4.5e-5)."""
        second = self.shards.optimizer_state(i).get("exp_avg_sq")
        if second is not None:
            _keep_only(second.view(-1), self._segment_plans[i], 1.0)

    def attach(self) -> None:
        self._handle = self.shards.on_optimizer_step(self.project)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None



class SelectedMasks(Sequence):
    """`selected[i]` is the bool mask of the i-th sparse fragment, built when read (one fragment at a time)."""

    def __init__(self, mask: GradientMask, sparse: list[Fragment]):
        self.mask, self.sparse = mask, sparse

    def __len__(self) -> int:
        return len(self.sparse)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.logical_not(self.mask.frozen_of(self.sparse[i]))


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _storage_layout(views: list[torch.Tensor]) -> tuple:
    """Which views share a storage (numbered by first appearance, not by address: ZeRO-1 reallocates its
    gradient buffer every step in the same layout), and where each starts in it."""
    ids: dict[int, int] = {}
    return tuple((ids.setdefault(_storage_id(v), len(ids)), v.storage_offset(), v.numel()) for v in views)


REFRESH_SECOND_MOMENT = 10_000  # steps
INDEX_FORM_LIMIT = 8  # index form when at most 1/8 of a run is trainable: its int64 indices cost ≤ a bool mask


def _plan(frozen: torch.Tensor) -> tuple[str, torch.Tensor | None]:
    """How to edit one run of elements. On CPU, bool-masked writes (`masked_fill_`, `where`) cost ~8× a plain
    copy, so a sparse mask is applied in index form: save the kept elements, overwrite all, put them back."""
    keep = frozen.numel() - int(torch.count_nonzero(frozen))
    if keep == 0:
        return "all_frozen", None
    if keep == frozen.numel():
        return "all_trainable", None
    if keep * INDEX_FORM_LIMIT <= frozen.numel():
        return "index", torch.nonzero(~frozen).view(-1)
    return "mask", frozen  # owned by the plan: callers pass a mask made for it


def _restrict(plan: tuple[str, torch.Tensor | None], start: int, numel: int) -> tuple[str, torch.Tensor | None]:
    """The plan of elements [start, start + numel) of a run, from the run's plan: views where possible (at offset 0
    an index plan is a slice of the run's)."""
    how, arg = plan
    if how == "mask":
        return how, arg.narrow(0, start, numel)
    if how != "index":
        return plan
    lo, hi = torch.searchsorted(arg, torch.tensor([start, start + numel], device=arg.device)).tolist()
    if lo == hi:
        return "all_frozen", None
    return how, arg[lo:hi] if start == 0 else arg[lo:hi] - start


def _frozen_elements(plan: tuple[str, torch.Tensor | None], numel: int, device: torch.device) -> torch.Tensor:
    """A plan as a bool mask of its frozen elements."""
    how, arg = plan
    if how == "mask":
        return arg.clone()
    frozen = torch.full((numel,), how != "all_trainable", dtype=torch.bool, device=device)
    if how == "index":
        frozen[arg] = False
    return frozen


def _keep_only(values: torch.Tensor, plan: tuple[str, torch.Tensor | None], frozen_value: torch.Tensor | float):
    """Set the frozen elements of `values` to `frozen_value`, leaving the others bit-identical."""
    how, arg = plan
    if how == "all_trainable":
        return
    if how == "mask":
        if isinstance(frozen_value, float):
            values.masked_fill_(arg, frozen_value)
        else:
            torch.where(arg, frozen_value, values, out=values)
        return
    kept = values.index_select(0, arg) if how == "index" else None
    if isinstance(frozen_value, float):
        values.fill_(frozen_value)
    else:
        values.copy_(frozen_value)
    if kept is not None:
        values.index_copy_(0, arg, kept)


class L1Pull:
    """J = λ/N Σ|θ − θ⁰| over the N eligible elements: its gradient λ/N·sign(θ − θ⁰) is added on the shards,
    so no extra pass over the full model is needed.

    In every precision it is added before clipping, as the paper's L1 term in the loss is (and tests/oracle.py):
    the clipping norm is that of data gradient + pull. Where it is added depends on the gradients' dtype:
    - fp32: into DeepSpeed's reduced gradients (`Shards.grads()`) before `engine.step()`, so DeepSpeed's own norm
      and clipping include it.
    - bf16/fp16: those buffers are half precision (fp16 also loss-scaled), where λ/N (≈ 3.6e-10 for XLM-R base
      at λ = 0.1) rounds away against the data gradient or underflows. It is added to the fp32 master gradient
      instead, in a hook right before the inner optimizer step, after DeepSpeed has unscaled it; DeepSpeed's
      clipping is off for that step and the hook clips by the global norm of gradient + pull, computed before the
      step from the half-precision buffers upcast to fp32. A step DeepSpeed skips on overflow never reaches it.
    Frozen elements (phase 2) sit at θ⁰ exactly, so the pull is 0 there: given phase 2's `mask`, it is computed
    at the trainable elements only (K/N of a pass over the shard, when the mask is kept as offsets)."""

    def __init__(self, shards: Shards, snapshot: Snapshot, sparse: list[Fragment], coefficient: float,
                 n_eligible: int, mask: GradientMask | None = None):
        self.shards, self.snapshot, self.sparse, self.mask = shards, snapshot, sparse, mask
        self.scale = coefficient / n_eligible
        positions = {f: i for i, f in enumerate(shards.fragments)}
        self._grad_index = [positions[f] for f in sparse]

    def _add_pull(self, grad: torch.Tensor, f: Fragment) -> None:
        """grad += λ/N·sign(θ − θ⁰) on fragment `f` (`grad` has its shape)."""
        offsets = self._offsets(f)
        if offsets is None:
            grad.add_(torch.sign(self.snapshot.delta(f)), alpha=self.scale)
        else:
            grad.index_add_(0, offsets, self._delta_at(f, offsets).sign_(), alpha=self.scale)

    def _abs_delta_sum(self, f: Fragment) -> torch.Tensor:
        offsets = self._offsets(f)
        delta = self.snapshot.delta(f) if offsets is None else self._delta_at(f, offsets)
        return delta.abs_().sum(dtype=torch.float64)

    def _offsets(self, f: Fragment) -> torch.Tensor | None:
        return self.mask.trainable_offsets(f) if self.mask is not None else None

    def _delta_at(self, f: Fragment, offsets: torch.Tensor) -> torch.Tensor:
        return self.shards.master(f).index_select(0, offsets).sub_(self.snapshot.theta0(f).index_select(0, offsets))

    @contextmanager
    def pulling(self, grads: list[torch.Tensor]):
        """Add the pull to the optimizer step run inside (`engine.step()` at an accumulation boundary); `grads`
        are `Shards.grads()` after masking."""
        if self.scale == 0.0:
            yield
            return
        if not self.shards.mixed_precision:
            self._add(grads)
            yield
            return
        max_norm = self.shards.max_grad_norm()
        divisor = self._clip_divisor(grads, max_norm) if max_norm > 0 else 1.0
        handle = self.shards.before_optimizer_step(lambda segments: self._add_to_masters(segments, divisor))
        try:
            with self.shards.unclipped() if max_norm > 0 else nullcontext():
                yield
        finally:
            handle.remove()

    @torch.no_grad()
    def _add(self, grads: list[torch.Tensor]) -> None:
        for f, i in zip(self.sparse, self._grad_index):
            self._add_pull(grads[i], f)

    @torch.no_grad()
    def _clip_divisor(self, grads: list[torch.Tensor], max_norm: float) -> float:
        """What clipping divides gradient + pull by: max(1, (‖g + pull‖ + 1e-6) / max_norm), as DeepSpeed's and
        torch's clipping. Collective under ZeRO 1-3."""
        unscale = 1.0 / self.shards.loss_scale()
        pulled = dict(zip(self._grad_index, self.sparse))
        total = torch.zeros(1, dtype=torch.float64, device=self.shards.device)
        for i, g in enumerate(grads):
            g = g.to(torch.float32, copy=True).mul_(unscale)  # never in place: these are DeepSpeed's buffers
            if i in pulled:
                self._add_pull(g, pulled[i])
            total += g.pow_(2).sum(dtype=torch.float64)
        norm = math.sqrt(float(self.shards.all_reduce(total)))
        return max(1.0, (norm + 1e-6) / max_norm)

    @torch.no_grad()
    def _add_to_masters(self, segments: list[int], divisor: float) -> None:
        for f in self.sparse:
            if f.segment in segments:
                self._add_pull(self.shards.master_grad(f.segment).narrow(0, f.segment_offset, f.numel), f)
        if divisor > 1.0:
            for s in segments:
                self.shards.master_grad(s).mul_(1.0 / divisor)

    @torch.no_grad()
    def penalty(self) -> float:
        """The current L1 term (collective under ZeRO 1-3: every rank must call it)."""
        local = torch.zeros(1, dtype=torch.float64, device=self.shards.device)
        for f in self.sparse:
            local += self._abs_delta_sum(f)
        return float(self.shards.all_reduce(local)) * self.scale
