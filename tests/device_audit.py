"""A checking wrapper for a training run: every model input and every collective argument against the device the
engine and the process group's backend declare.

Inside `with DeviceAudit(model) as audit:` (the model before it is handed to DeepSpeed):
- every forward pass of `model` has only tensors that `devices.to_device` produced (the one way onto the
  engine's device) and that lie on `audit.engine_device` (set it once the engine exists);
- every `torch.distributed` collective is recorded with its caller: one made by ltsft code must come from
  `ltsft_dist.comm`; a tensor argument must lie on a device type the backend serves (`comm.backend_devices`); an
  object collective's object must hold CPU tensors only.
On a CPU machine the device comparisons hold trivially; what bites there is that every input took the
`to_device` path and every collective the `comm` path. On a GPU (tests/test_gpu.py) the comparisons bite too.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from ltsft_dist import comm, devices

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "gather", "gather_object", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "scatter", "barrier", "all_to_all_single")
OBJECT_COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list")


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


class DeviceAudit:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.engine_device: torch.device | None = None
        self.violations: list[str] = []
        self.forwards = 0  # forward passes checked
        self.collectives: list[tuple[str, str, tuple[str, ...]]] = []  # (caller module, name, tensor devices)
        self._moved: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive so ids stay unique)
        self._undo = []

    # --- checks (also called directly by tests) --------------------------------------------------------------

    def check_inputs(self, args, kwargs) -> None:
        self.forwards += 1
        for t in _tensors([args, kwargs]):
            if id(t) not in self._moved:
                self.violations.append(f"forward input {tuple(t.shape)} on {t.device} did not go through "
                                       "devices.to_device")
            elif self.engine_device is not None and t.device != self.engine_device:
                self.violations.append(f"forward input on {t.device}, engine on {self.engine_device}")

    def check_collective(self, caller: str, name: str, args, kwargs) -> None:
        found = list(_tensors([args, kwargs]))
        self.collectives.append((caller, name, tuple(str(t.device) for t in found)))
        if caller.startswith("ltsft_dist") and caller != "ltsft_dist.comm":
            self.violations.append(f"{caller} calls torch.distributed.{name} (only ltsft_dist.comm may)")
        if name in OBJECT_COLLECTIVES:
            bad = [str(t.device) for t in found if t.device.type != "cpu"]
            if bad:
                self.violations.append(f"{caller}: {name} pickles tensors on {bad} (must be CPU tensors)")
            return
        served = comm.backend_devices() if comm.is_distributed() else comm.backend_devices("gloo")
        for t in found:
            if t.device.type not in served:
                self.violations.append(f"{caller}: {name} on a {t.device} tensor, backend serves {sorted(served)}")

    # --- wiring ------------------------------------------------------------------------------------------------

    def __enter__(self):
        real_to_device = devices.to_device

        def recording_to_device(batch, device):
            out = real_to_device(batch, device)
            for t in _tensors(out):
                self._moved[id(t)] = t
            return out

        for module in list(sys.modules.values()):  # every ltsft module that imported it by name
            if getattr(module, "__name__", "").startswith("ltsft_dist") and \
                    getattr(module, "to_device", None) is real_to_device:
                self._patch(module, "to_device", recording_to_device)
        for name in COLLECTIVES:
            real = getattr(dist, name)

            def recording(*args, _real=real, _name=name, **kwargs):
                caller = sys._getframe(1).f_globals.get("__name__", "?")
                self.check_collective(caller, _name, args, kwargs)
                return _real(*args, **kwargs)

            self._patch(dist, name, recording)
        handle = self.model.register_forward_pre_hook(lambda m, a, k: self.check_inputs(a, k), with_kwargs=True)
        self._undo.append(handle.remove)
        return self

    def _patch(self, owner, name, value) -> None:
        old = getattr(owner, name)
        setattr(owner, name, value)
        self._undo.append(lambda: setattr(owner, name, old))

    def __exit__(self, *exc):
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        return False

    def ours(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """The collectives ltsft's own code made (through comm)."""
        return [c for c in self.collectives if c[0].startswith("ltsft_dist")]


def audited_runs(cases, world_size: int) -> dict:
    """LT-SFT runs under `DeviceAudit` (one launch, several cases: [(name, TrainConfig, Examples)]), each with
    its held-out loss evaluated at the end of phase 2. Rank 0 returns per case what the audit saw, where the
    shard's tensors ended up, and the SFT (on the CPU)."""
    import copy

    from scenarios import ds_config_for, tiny_model

    from ltsft_dist.data import Examples
    from ltsft_dist.heldout import HeldOut
    from ltsft_dist.recipe import LTSFTRecipe

    results = {}
    for name, cfg, examples in cases:
        cfg = copy.deepcopy(cfg)
        cfg.micro_batch_size = cfg.batch_size // world_size
        model = tiny_model(cfg.kind)
        held = examples if examples.mlm is None else Examples(  # MLM: every token a label (fixed, as held-out)
            {**examples.tensors, "labels": examples.tensors["input_ids"]})
        held_out = HeldOut({"xx": held}, cfg.micro_batch_size, comm.rank(), world_size)
        with DeviceAudit(model) as audit:
            recipe = LTSFTRecipe(model, examples, cfg, ds_config_for(cfg, world_size), show_progress=False,
                                 held_out=held_out)
            audit.engine_device = devices.engine_device(recipe.engine)
            sft = recipe.run()
        shard = recipe.shards.device
        misplaced = [f"{what} on {t.device}, shard on {shard}"
                     for what, tensors in (("θ⁰", recipe.snapshot.segments), ("mask", recipe.selected))
                     for t in tensors if t.device != shard]
        if sft is not None:
            results[name] = {
                "violations": audit.violations, "forwards": audit.forwards, "misplaced": misplaced,
                "ours": sorted({(caller, op) for caller, op, _ in audit.ours()}),
                "sft_devices": sorted({str(t.device) for idx, v in sft.diffs.values() for t in (idx, v)}),
                "nnz": sft.nnz, "k": recipe.stats.k, "sft": sft, "engine_device": str(audit.engine_device)}
        elif audit.violations or misplaced:  # other ranks report only what went wrong
            raise AssertionError(f"rank {comm.rank()}, {name}: {audit.violations + misplaced}")
    return results
