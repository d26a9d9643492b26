"""The one module that reads DeepSpeed internals.

Everything else speaks of "my shard": a few flat fp32 master buffers (*segments*) and the
(parameter, offset) ranges (*fragments*) they hold. A DeepSpeed upgrade should only touch this file;
`tests/test_shards.py` pins the behaviour we rely on.

Layouts (DeepSpeed 0.19):
- ZeRO 0, fp32: the model parameters are their own masters; every rank holds all of them.
- ZeRO 1/2: `optimizer.single_partition_of_fp32_groups[g]` per param group; `param._hp_mapping` maps a
  parameter range to a range of that buffer; reduced gradients sit in `optimizer.averaged_gradients`.
- ZeRO 3: `optimizer.fp32_partitioned_groups_flat[s]` per sub-group; `optimizer.grad_position` gives each
  parameter's local slice, which holds elements `[rank * p.partition_numel(), ...)` (the tail is padding).

Padding (elements of my segments that belong to no parameter, and the tail of a ZeRO-3 working partition) is
allocated with `torch.empty`: whatever bytes were there, NaN included. It is zeroed at setup and after a
checkpoint load, and nothing here or in the callers compares or reduces over it: every such pass goes through
`fragments`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ltsft_dist import comm
from ltsft_dist.devices import move, shard_device
from ltsft_dist.errors import LtsftError


def disable_shm_allreduce() -> None:
    """Keep DeepSpeed from building its CPU shared-memory all-reduce op when the process group starts.

    We never use it (our collectives are torch.distributed's, made in comm.py), its first build JIT-compiles for
    about a minute, and every process group it joins leaves a /dev/shm buffer behind that is never unlinked: a test
    suite or a long job series filled 21 GB of shared memory here. Call before `deepspeed.init_distributed`.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@dataclass(frozen=True)
class Fragment:
    """A contiguous run of one parameter's flat (row-major) elements held in one segment of my shard."""

    name: str
    param_index: int  # position in model.named_parameters(): the canonical order for tie-breaking
    param_offset: int  # first element of the parameter held here
    numel: int
    segment: int
    segment_offset: int

    @property
    def key(self) -> tuple[int, int]:
        return (self.param_index, self.param_offset)


class Shards:
    """My rank's view of the fp32 master weights of a DeepSpeed engine, whatever its ZeRO stage."""

    def __init__(self, engine, model: torch.nn.Module):
        self.engine = engine
        self.stage = engine.zero_optimization_stage()
        self.rank = comm.rank()
        self.world_size = comm.world_size()
        # With ZeRO 0 every rank holds every element, so collectives over the shards must not double count.
        self.partitioned = self.stage > 0 and self.world_size > 1
        names = {id(p): (i, n) for i, (n, p) in enumerate(model.named_parameters())}
        opt = engine.optimizer
        self._working_padding = []  # ZeRO-3: (parameter, real elements) of my working partitions ending in padding
        if self.stage == 0:
            if engine.bfloat16_enabled() or engine.fp16_enabled():
                raise LtsftError(
                    "mixed precision (bf16/fp16) needs ZeRO stage 1, 2 or 3 here: set "
                    '"zero_optimization": {"stage": 1} (or higher) in the DeepSpeed config')
            self.inner_optimizer = opt
            self.segments, self._grad_sources, self.fragments = self._layout_stage0(opt, names)
            self._stepped_tensors = [p for g in opt.param_groups for p in g["params"]]
        elif self.stage in (1, 2):
            self.inner_optimizer = opt.optimizer
            self.segments, self._grad_sources, self.fragments = self._layout_stage12(opt, names)
            self._stepped_tensors = self.segments
        elif self.stage == 3:
            self.inner_optimizer = opt.optimizer
            self.segments, self._grad_sources, self.fragments = self._layout_stage3(opt, names)
            self._stepped_tensors = self.segments
        else:
            raise LtsftError(f"unsupported ZeRO stage {self.stage}")
        self._segment_of = {id(t): i for i, t in enumerate(self._stepped_tensors)}
        self.padding = _uncovered(self.segments, self.fragments)
        self.zero_padding()
        self.device = shard_device(self.segments, engine)  # where every tensor that meets my shard is created

    # --- layouts -------------------------------------------------------------------------------

    @staticmethod
    def _layout_stage0(opt, names):
        segments, grads, fragments = [], [], []
        for group in opt.param_groups:
            for p in group["params"]:
                index, name = names[id(p)]
                s = len(segments)
                segments.append(p.data.view(-1))
                grads.append(lambda p=p: p.grad.view(-1))
                fragments.append(Fragment(name, index, 0, p.numel(), s, 0))
        return segments, grads, fragments

    @staticmethod
    def _layout_stage12(opt, names):
        segments, grads, fragments = list(opt.single_partition_of_fp32_groups), [], []
        for g, group in enumerate(opt.bit16_groups):
            for p in group:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:
                    continue
                index, name = names[id(p)]
                lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                fragments.append(Fragment(name, index, lp.start, lp.numel, g, hp.start))
                grads.append(lambda m=mapping, i=p._index_in_param_group: m.get_lp_grad_fragment(i).view(-1))
        return segments, grads, fragments

    def _layout_stage3(self, opt, names):
        segments, grads, fragments = list(opt.fp32_partitioned_groups_flat), [], []
        for s, group in enumerate(opt.fp16_groups):
            for k, p in enumerate(group):
                index, name = names[id(p)]
                _, offset, _ = opt.grad_position[opt.get_param_id(p)]
                start = self.rank * p.partition_numel()
                real = max(0, min(p.partition_numel(), p.ds_numel - start))
                if real < p.partition_numel():
                    self._working_padding.append((p, real))
                if real == 0:
                    continue
                fragments.append(Fragment(name, index, start, real, s, offset))
                grads.append(lambda s=s, k=k, n=real: opt.averaged_gradients[s][k].view(-1)[:n])
        return segments, grads, fragments

    # --- access --------------------------------------------------------------------------------

    def master(self, f: Fragment) -> torch.Tensor:
        """A writable fp32 view of the fragment's master elements."""
        return self.segments[f.segment].narrow(0, f.segment_offset, f.numel)

    @torch.no_grad()
    def zero_padding(self, segments: list[torch.Tensor] | None = None) -> None:
        """Zero the padding of `segments` (a per-segment copy such as θ⁰), or by default of my masters and my
        ZeRO-3 working partitions. Garbage there is harmless to training (zero gradient, frozen by the mask) but a
        NaN in it would poison any comparison or reduction that strayed over it, and checkpoints copy it."""
        for s, offset, numel in self.padding:
            (self.segments if segments is None else segments)[s].narrow(0, offset, numel).zero_()
        if segments is None:
            for p, real in self._working_padding:
                p.ds_tensor.data.view(-1)[real:].zero_()

    def grads(self) -> list[torch.Tensor]:
        """Flat writable views of my reduced gradient per fragment, valid after backward and before `engine.step()`.

        These are DeepSpeed's own buffers: what is written here is what its norm, clipping and optimizer see.
        """
        return [source() for source in self._grad_sources]

    def sync_working_weights(self) -> None:
        """Copy the fp32 masters into the weights the forward pass uses (after we wrote the masters)."""
        opt = self.engine.optimizer
        if self.stage in (1, 2):
            opt.update_lp_params()
        elif self.stage == 3:  # the same sequence as DeepSpeed's own step: release, rewrite, re-gather
            opt._partition_all_parameters()
            for s in range(len(self.segments)):
                opt._reassign_or_swap_out_partitioned_parameters(s)
            if opt.persistent_parameters:  # small parameters stay whole on every rank: refresh them too
                opt.persistent_parameters[0].all_gather(opt.persistent_parameters)
            opt.invalidate_secondary_tensor()

    def set_lr(self, lr: float) -> None:
        for group in self.inner_optimizer.param_groups:
            group["lr"] = lr

    def decays(self, segment: int) -> bool:
        """Whether the inner optimizer's step decays this segment's weights (its group's weight_decay is not 0).
        Call it from an `on_optimizer_step` hook: ZeRO-3 puts a segment in its group only while stepping it; a
        segment found in no group counts as decaying."""
        tensor = self._stepped_tensors[segment]
        groups = [g for g in self.inner_optimizer.param_groups if any(p is tensor for p in g["params"])]
        return not groups or any(g.get("weight_decay", 0.0) != 0.0 for g in groups)

    def optimizer_state(self, segment: int) -> dict:
        """The inner optimizer's state of one segment (e.g. AdamW's exp_avg, exp_avg_sq); empty before step 1."""
        return self.inner_optimizer.state.get(self._stepped_tensors[segment], {})

    def optimizer_elements(self, f: Fragment) -> dict[str, torch.Tensor]:
        """Views of the fragment's elements in every per-element optimizer state tensor (AdamW: exp_avg,
        exp_avg_sq); empty before step 1."""
        return {key: value.narrow(0, f.segment_offset, f.numel) for key, value in self._per_element(f.segment).items()}

    def _per_element(self, segment: int) -> dict[str, torch.Tensor]:
        numel = self._stepped_tensors[segment].numel()
        return {key: value.view(-1) for key, value in self.optimizer_state(segment).items()
                if torch.is_tensor(value) and value.dim() > 0 and value.numel() == numel}

    def optimizer_scalars(self) -> dict[str, dict]:
        """The optimizer's scalar state (AdamW: step), the same for every segment: {key: {"value", "dtype"}}."""
        found: dict[str, dict] = {}
        for s in range(len(self._stepped_tensors)):
            per_element = self._per_element(s)
            for key, value in self.optimizer_state(s).items():
                if key in per_element:
                    continue
                scalar = {"value": float(value), "dtype": str(value.dtype).removeprefix("torch.")
                          if torch.is_tensor(value) else None}
                if found.setdefault(key, scalar) != scalar:
                    raise LtsftError(f"optimizer state {key!r} differs between the parameter groups "
                                     f"({found[key]['value']} and {scalar['value']}): cannot checkpoint it per element")
        return found

    @torch.no_grad()
    def load_optimizer_state(self, elements: list[dict[str, torch.Tensor]], scalars: dict[str, dict]) -> None:
        """Replace the inner optimizer's state (a fresh DeepSpeed engine has none before its first step):
        `elements[s]` holds segment s's per-element tensors, flat; `scalars` is what `optimizer_scalars` returned.
        Written into `optimizer.state` keyed by the stepped tensors, not through `load_state_dict`: ZeRO-3 empties
        the inner optimizer's param_groups between steps. Nothing to load (written before any step): left as is."""
        if not scalars and not any(elements):
            return
        defaults = self.inner_optimizer.defaults
        for tensor, per_element in zip(self._stepped_tensors, elements):
            # torch keeps AdamW's step on the CPU unless the optimizer is capturable or fused
            where = tensor.device if defaults.get("capturable") or defaults.get("fused") else "cpu"
            values = {key: value.to(tensor.device, tensor.dtype).view_as(tensor) for key, value in per_element.items()}
            for key, scalar in scalars.items():
                values[key] = (scalar["value"] if scalar["dtype"] is None
                               else torch.tensor(scalar["value"], dtype=getattr(torch, scalar["dtype"]), device=where))
            self.inner_optimizer.state[tensor] = values

    def reset_optimizer_state(self) -> None:
        """Zero every optimizer state tensor in place: equivalent to a fresh optimizer, and keeps
        DeepSpeed's links to the state intact."""
        for state in self.inner_optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    value.zero_()

    def on_optimizer_step(self, hook: Callable[[list[int]], None]):
        """Call `hook(segment_indices)` right after each inner optimizer step, before DeepSpeed copies the
        masters into the working weights. DeepSpeed steps one group (or ZeRO-3 sub-group) at a time."""
        return self.inner_optimizer.register_step_post_hook(lambda opt, args, kwargs: hook(self._stepped(opt)))

    def before_optimizer_step(self, hook: Callable[[list[int]], None]):
        """Call `hook(segment_indices)` right before each inner optimizer step, when `master_grad` of those
        segments holds the fp32 gradient DeepSpeed has unscaled (and clipped, see `unclipped`). Not called for a
        step DeepSpeed skips on overflow."""
        return self.inner_optimizer.register_step_pre_hook(lambda opt, args, kwargs: hook(self._stepped(opt)))

    def _stepped(self, optimizer) -> list[int]:
        return [self._segment_of[id(p)] for g in optimizer.param_groups for p in g["params"]
                if id(p) in self._segment_of]

    def master_grad(self, segment: int) -> torch.Tensor:
        """The flat fp32 gradient the inner optimizer is about to step `segment` with (inside
        `before_optimizer_step` only: DeepSpeed builds it from the reduced gradients just before)."""
        return self._stepped_tensors[segment].grad.view(-1)

    @property
    def mixed_precision(self) -> bool:
        """bf16 or fp16 working weights and gradients (the masters are fp32 either way)."""
        return bool(self.engine.bfloat16_enabled() or self.engine.fp16_enabled())

    def loss_scale(self) -> float:
        """The factor the gradients in `grads()` are multiplied by: fp16's dynamic loss scale, else 1."""
        return float(self.engine.optimizer.loss_scale) if self.engine.fp16_enabled() else 1.0

    @property
    def loss_scale_adapts(self) -> bool:
        """fp16 with dynamic loss scaling: a step skipped on overflow may pass when redone at the lowered scale."""
        return bool(self.engine.fp16_enabled() and self.engine.dynamic_loss_scale())

    def max_grad_norm(self) -> float:
        """DeepSpeed's gradient clipping threshold (0: off)."""
        return float(self.engine.gradient_clipping() or 0.0)

    @contextmanager
    def unclipped(self):
        """DeepSpeed's clipping off for the steps inside (it still unscales): the caller clips `master_grad`
        itself, e.g. to include a term added after DeepSpeed computed its norm."""
        opt = self.engine.optimizer
        saved = opt.clip_grad
        opt.clip_grad = 0.0
        try:
            yield
        finally:
            opt.clip_grad = saved

    def step_skipped(self) -> bool:
        """Whether the last `engine.step()` at an accumulation boundary was skipped by DeepSpeed: it found an inf/NaN
        gradient (fp16's loss scaling, also bf16's and ZeRO-1/2's overflow checks), moved no weight and, with fp16,
        lowered the loss scale."""
        return not self.engine.was_step_applied()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks when the shards are partitioned; a no-op when every rank holds everything."""
        return comm.all_reduce(tensor) if self.partitioned else tensor

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj` when the shards are partitioned, else mine alone; tensors arrive on the CPU."""
        return comm.all_gather_object(obj) if self.partitioned else [move(obj, "cpu")]

    def gather_object_to_zero(self, obj) -> list | None:
        """As `all_gather_object`, on rank 0 only (None elsewhere)."""
        return self.gather_object_to(obj, 0)

    def gather_object_to(self, obj, dst: int) -> list | None:
        """As `all_gather_object`, on rank `dst` only (None elsewhere)."""
        if self.partitioned:
            return comm.gather_object(obj, dst=dst)
        return [move(obj, "cpu")] if self.rank == dst else None


def _uncovered(segments: list[torch.Tensor], fragments: list[Fragment]) -> list[tuple[int, int, int]]:
    """(segment, offset, numel) of every run of segment elements that no fragment holds."""
    runs = []
    for s, segment in enumerate(segments):
        at = 0
        for offset, numel in sorted((f.segment_offset, f.numel) for f in fragments if f.segment == s):
            if offset > at:
                runs.append((s, at, offset - at))
            at = max(at, offset + numel)
        if segment.numel() > at:
            runs.append((s, at, segment.numel() - at))
    return runs


# =====================================================================================================
# Working weights: the tensors the forward pass reads (used by the per-step language swap, swap.py).
#
# Distinct from the fp32 masters above. Layouts (DeepSpeed 0.19, read from runtime/zero/):
# - ZeRO 0: `param.data` (it is also the master).
# - ZeRO 1/2: `param.data`, a full replica on every rank (a view into `bit16_groups_flat`, separate from
#   the fp32 partition); `step()` copies my fp32 partition into it and all-gathers the rest.
# - ZeRO 3: my partition `param.ds_tensor`, elements `[r * p.partition_numel(), ...)` of the flat
#   parameter with r my rank in `p.ds_process_group` (the tail is padding). The forward pass all-gathers
#   only parameters whose `ds_status` is NOT_AVAILABLE (`partitioned_param_coordinator.__all_gather_params_`),
#   so a parameter that is AVAILABLE — above all the small "persistent" ones (`p.ds_persist`), which
#   `_post_step` re-gathers after every optimizer step and the coordinator never releases — is read from
#   its full `param.data` as it stands. Both must therefore be edited (once: with a partition group of one
#   rank, `NoGatherHandle` makes `param.data` a view of `ds_tensor`). `step()` starts with
#   `_partition_all_parameters()` (every parameter, persistent ones included, released without copying
#   `param.data` back) and ends by re-gathering the persistent ones from `ds_tensor`: after a step every
#   full copy is re-derived from the partitions. With fp32 weights on the optimizer's device DeepSpeed may
#   alias the fp32 master flat with the `ds_tensor` flat (`_create_fp32_partitions`); the swap restores
#   before `engine.step()`, so that case is covered too.
# =====================================================================================================


@dataclass(frozen=True)
class WorkingSpan:
    """Elements `[start, start + numel)` of parameter `name`'s flat (row-major) values, held in `tensor`, a
    writable flat view of a working copy the forward pass reads. `kind` is "full" (the whole parameter:
    ZeRO 0/1/2, or a gathered ZeRO-3 parameter) or "partition" (my ZeRO-3 `ds_tensor`, padding cut off).
    For a given (name, kind), `start` and `numel` never change; `tensor` may be a new object after any
    DeepSpeed step or gather, so ask again each time instead of keeping it."""

    name: str
    kind: str
    start: int
    numel: int
    tensor: torch.Tensor


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor") and hasattr(p, "ds_status")


def full_copy(p: torch.Tensor) -> torch.Tensor:
    """A copy of the whole parameter, gathered from the ranks' partitions if ZeRO-3 partitioned it."""
    if not is_zero3_param(p):
        return p.detach().clone()
    import deepspeed

    with deepspeed.zero.GatheredParameters([p]):
        return p.detach().clone()


def param_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The real shape of a parameter, also under ZeRO-3 (where `p.shape` is an empty placeholder)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def working_spans(named_params) -> list[WorkingSpan]:
    """For each (name, parameter), the working tensor(s) this rank holds now. Not collective, no copies."""
    spans = []
    for name, p in named_params:
        if not is_zero3_param(p):
            spans.append(WorkingSpan(name, "full", 0, p.numel(), p.data.view(-1)))
            continue
        spans.extend(_zero3_spans(name, p))
    return spans


def _zero3_spans(name: str, p) -> list[WorkingSpan]:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if getattr(p, "ds_secondary_tensor", None) is not None:
        raise LtsftError(f"{name}: ZeRO++ hierarchical partitioning (zero_hpz_partition_size > 1) keeps a "
                         "secondary copy of the weights that the language swap does not edit; disable it")
    location = getattr(p.ds_tensor, "final_location", None)
    if location is not None and "nvme" in str(location).lower():
        raise LtsftError(f"{name}: parameters offloaded to NVMe are not supported by the language swap")
    if p.ds_status == ZeroParamStatus.INFLIGHT:
        raise LtsftError(f"{name}: parameter is being gathered; the swap must run between forward passes")
    numel = p.ds_numel
    group = getattr(p, "ds_process_group", None)
    rank = dist.get_rank(group=group) if dist.is_initialized() else 0
    size = p.partition_numel()
    start = rank * size
    real = max(0, min(size, numel - start))
    spans = []
    if real:
        spans.append(WorkingSpan(name, "partition", start, real, p.ds_tensor.data.view(-1).narrow(0, 0, real)))
    if p.ds_status == ZeroParamStatus.AVAILABLE and p.data.numel() == numel:
        # With a partition group of one rank, "gathering" makes `param.data` a view of `ds_tensor`
        # (`NoGatherHandle`): one tensor, to be edited once.
        if p.data.untyped_storage().data_ptr() != p.ds_tensor.untyped_storage().data_ptr():
            spans.append(WorkingSpan(name, "full", 0, numel, p.data.view(-1)))
    return spans
