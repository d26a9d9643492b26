"""The DeepSpeed internals `ltsft_dist/shards.py` relies on, one test per attribute or behaviour and ZeRO stage, so
that a DeepSpeed upgrade fails here first, with a message naming the internal that changed.

One W=2 launch builds an engine per ZeRO stage on a tiny classifier and probes each internal; the facts are cached
for the session (a failing launch fails every test with its traceback, once).
"""

from __future__ import annotations

import math

import pytest
import torch

from distributed import run_ranks
from scenarios import classification_examples, task_config, tiny_classifier

pytestmark = [pytest.mark.slow, pytest.mark.multirank]
WORLD = 2

# Mixed precision and overflow (the L1 pull into the fp32 master gradients, redone skipped steps), ZeRO 1-3.
PRECISION_PROBES = ["optimizer.optimizer.register_step_pre_hook", "optimizer.clip_grad", "optimizer.loss_scale",
                    "engine.was_step_applied"]
DECAY_PROBE = "inner param_groups[...]['weight_decay'] while stepping"
# (stage, internal): what shards.py does with it. Each probe raises AssertionError describing what it found.
PROBES = {
    0: ["engine.optimizer.param_groups", "param.grad", "bfloat16_enabled/fp16_enabled", DECAY_PROBE],
    1: ["optimizer.optimizer", "optimizer.single_partition_of_fp32_groups", "optimizer.bit16_groups",
        "param._hp_mapping", "_hp_mapping.get_lp_grad_fragment", "optimizer.update_lp_params",
        "optimizer.optimizer.register_step_post_hook", "optimizer.optimizer.state",
        "optimizer.optimizer.state written", DECAY_PROBE] + PRECISION_PROBES,
    3: ["optimizer.optimizer", "optimizer.fp32_partitioned_groups_flat", "optimizer.fp16_groups",
        "optimizer.grad_position", "param.partition_numel/ds_numel", "optimizer.averaged_gradients",
        "optimizer._partition_all_parameters/_reassign_or_swap_out_partitioned_parameters",
        "optimizer.persistent_parameters", "optimizer.invalidate_secondary_tensor",
        "optimizer.optimizer.register_step_post_hook", "optimizer.optimizer.state",
        "optimizer.optimizer.state written", "param.ds_shape", "param.ds_tensor/ds_status",
        "param.ds_process_group", "ZeroParamStatus", DECAY_PROBE] + PRECISION_PROBES,
}
PROBES[2] = PROBES[1]
GLOBAL_PROBES = ["deepspeed.ops.__compatible_ops__['deepspeed_shm_comm']"]


def _engine(stage: int):
    import deepspeed

    from ltsft_dist.engine import ds_config_for

    cfg = task_config(f"zero{stage}.json", batch_size=8, micro_batch_size=4)
    model = tiny_classifier()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config=ds_config_for(cfg, WORLD))
    return engine, model


def _backward(engine, loss_factor: float = 1.0) -> None:
    import torch.distributed as dist

    from ltsft_dist.data import StepOrder

    batch = StepOrder(classification_examples(n=8), 8, 4, dist.get_rank(), WORLD, 0).batch_at(0, 0)
    engine.backward(engine(**batch).loss * loss_factor)


def _expect(condition, found: str) -> None:
    if not condition:
        raise AssertionError(found)


def _probe(stage: int, name: str, engine, model) -> None:
    """One internal of one stage; raises AssertionError (or AttributeError, ...) when it is not as shards.py needs."""
    import torch.distributed as dist

    opt = engine.optimizer
    params = dict(model.named_parameters())
    rank = dist.get_rank()
    if name == "engine.optimizer.param_groups":  # ZeRO 0: the torch optimizer itself; parameters are masters
        stepped = {id(p) for g in opt.param_groups for p in g["params"]}
        _expect(stepped == {id(p) for p in params.values()}, "param_groups do not hold exactly the model parameters")
    elif name == "param.grad":  # ZeRO 0: after backward, the gradient averaged over ranks
        _backward(engine)
        p = params["classifier.weight"]
        gathered = [torch.empty_like(p.grad) for _ in range(WORLD)]
        dist.all_gather(gathered, p.grad)
        _expect(torch.equal(gathered[0], gathered[1]), "p.grad differs between ranks after backward")
    elif name == "bfloat16_enabled/fp16_enabled":
        _expect(engine.bfloat16_enabled() is False and engine.fp16_enabled() is False, "unexpected precision flags")
    elif name == "optimizer.optimizer":
        _expect(isinstance(opt.optimizer, torch.optim.AdamW), f"found {type(opt.optimizer).__name__}")
    elif name == "optimizer.single_partition_of_fp32_groups":
        _one_flat_fp32_master_per_group(opt.single_partition_of_fp32_groups, opt.bit16_groups)
    elif name == "optimizer.bit16_groups":
        _groups_hold_the_model(opt.bit16_groups, params)
    elif name == "param._hp_mapping":  # my fp32 range of each parameter: the ranks' ranges tile it exactly
        mine = []
        for g, n, p in _grouped(opt, params):
            m = getattr(p, "_hp_mapping", None)
            if m is None:
                continue
            lp, hp = m.lp_fragment_address, m.hp_fragment_address
            flat = opt.single_partition_of_fp32_groups[g]
            _expect(torch.equal(flat[hp.start:hp.start + lp.numel], p.data.view(-1)[lp.start:lp.start + lp.numel]),
                    f"{n}: master range hp_fragment_address != working range lp_fragment_address")
            mine.append((n, lp.start, lp.numel))
        everyone = [None] * WORLD
        dist.all_gather_object(everyone, mine)
        covered = {n: 0 for n in params}
        for ranges in everyone:
            for n, _, numel in ranges:
                covered[n] += numel
        wrong = [n for n, c in covered.items() if c != params[n].numel()]
        _expect(not wrong, f"ranges do not cover {wrong[:3]} exactly once")
    elif name == "_hp_mapping.get_lp_grad_fragment":  # the reduced gradient the optimizer will step with
        _backward(engine)
        for p in params.values():
            m = getattr(p, "_hp_mapping", None)
            if m is not None:
                g = m.get_lp_grad_fragment(p._index_in_param_group)
                _expect(g.numel() == m.lp_fragment_address.numel, "fragment size differs from lp_fragment_address")
    elif name == "optimizer.update_lp_params":  # masters -> working weights
        with torch.no_grad():
            for flat in opt.single_partition_of_fp32_groups:
                flat.add_(1.0)
        opt.update_lp_params()
        for g, n, p in _grouped(opt, params):
            m = getattr(p, "_hp_mapping", None)
            if m is not None:
                lp, hp = m.lp_fragment_address, m.hp_fragment_address
                flat = opt.single_partition_of_fp32_groups[g]
                _expect(torch.equal(flat[hp.start:hp.start + lp.numel], p.data.view(-1)[lp.start:lp.start + lp.numel]),
                        f"{n}: working weights not updated from the masters")
    elif name == "optimizer.optimizer.register_step_post_hook":  # runs after the inner step, before the copy-back
        seen = []
        masters = [s.clone() for s in _masters(stage, opt)]
        opt.optimizer.register_step_post_hook(lambda *_: seen.append([s.clone() for s in _masters(stage, opt)]))
        _backward(engine)
        engine.step()
        _expect(seen, "the post hook did not run during engine.step()")
        _expect(any(not torch.equal(a, b) for a, b in zip(seen[0], masters)), "masters unchanged when the hook ran")
    elif name == "optimizer.optimizer.state":  # keyed by the flat masters, AdamW moments as tensors
        _backward(engine)
        engine.step()
        keys = {id(t) for t in opt.optimizer.state}
        _expect(keys <= {id(t) for t in _masters(stage, opt)}, "state is not keyed by the fp32 master flats")
        _expect(all(torch.is_tensor(s.get("exp_avg")) for s in opt.optimizer.state.values()), "no exp_avg tensors")
    elif name == DECAY_PROBE:  # Shards.decays: the stepped segment sits in its group, with the group's decay
        from ltsft_dist.shards import Shards

        shards = Shards(engine, model)
        for weight_decay in (0.0, 0.01):
            for group in shards.inner_optimizer.param_groups:
                group["weight_decay"] = weight_decay
            seen = []
            handle = shards.on_optimizer_step(lambda segments: seen.extend(shards.decays(s) for s in segments))
            _backward(engine)
            engine.step()
            handle.remove()
            _expect(len(seen) == len(shards.segments) and all(d == (weight_decay != 0.0) for d in seen),
                    f"weight_decay {weight_decay}: decays() said {seen} while stepping")
    elif name == "optimizer.optimizer.register_step_pre_hook":  # the stepped fp32 flat carries its gradient
        from ltsft_dist.shards import Shards

        shards, seen = Shards(engine, model), []
        shards.before_optimizer_step(lambda segments: seen.extend(
            (s, shards.master_grad(s).dtype, shards.master_grad(s).numel()) for s in segments))
        _backward(engine)
        engine.step()
        _expect(sorted(s for s, _, _ in seen) == list(range(len(shards.segments))),
                f"the pre hook saw segments {seen}, not each of {len(shards.segments)} once")
        _expect(all(dtype == torch.float32 and numel == shards.segments[s].numel() for s, dtype, numel in seen),
                f"master_grad is not the segment's fp32 gradient: {seen}")
    elif name == "optimizer.clip_grad":  # off inside Shards.unclipped(): the hook sees the reduced gradient as is
        from ltsft_dist.shards import Shards

        shards = Shards(engine, model)
        _expect(opt.clip_grad == 0.5 == shards.max_grad_norm(), f"clip_grad {opt.clip_grad}, expected 0.5")
        seen = []
        shards.before_optimizer_step(lambda segments: seen.extend(
            float(shards.master_grad(s).double().pow(2).sum()) for s in segments))
        _backward(engine, loss_factor=100.0)  # a gradient norm well above the threshold
        local = sum(float(g.double().pow(2).sum()) for g in shards.grads())
        total = torch.tensor([local], dtype=torch.float64)
        dist.all_reduce(total)
        _expect(math.sqrt(float(total)) > 0.5, "the gradient is too small to be clipped: the probe proves nothing")
        with shards.unclipped():
            _expect(opt.clip_grad == 0.0, "unclipped() did not turn clipping off")
            engine.step()
        _expect(opt.clip_grad == 0.5, "unclipped() did not restore clip_grad")
        _expect(math.isclose(sum(seen), local, rel_tol=1e-5), f"clipped anyway: {sum(seen)} vs {local}")
    elif name == "optimizer.loss_scale":  # fp16's dynamic scale (CPU DeepSpeed has no fp16): 1 in fp32
        from ltsft_dist.shards import Shards

        _expect(float(opt.loss_scale) == 1.0, f"loss_scale {opt.loss_scale!r}")
        shards = Shards(engine, model)
        _expect(shards.loss_scale() == 1.0 and not shards.loss_scale_adapts and not shards.mixed_precision,
                "fp32 reported as scaled or mixed precision")
    elif name == "engine.was_step_applied":  # an inf gradient: DeepSpeed skips the step and says so
        from ltsft_dist.shards import Shards

        shards = Shards(engine, model)
        _backward(engine)
        engine.step()
        _expect(not shards.step_skipped(), "a clean step reported as skipped")
        masters = [s.clone() for s in shards.segments]
        _backward(engine)
        grads = shards.grads()
        if grads:
            grads[0][0] = float("inf")
        engine.step()
        _expect(shards.step_skipped(), "a step with an inf gradient was not skipped")
        _expect(all(torch.equal(a, b) for a, b in zip(masters, shards.segments)), "the skipped step moved masters")
        _backward(engine)
        engine.step()
        _expect(not shards.step_skipped(), "the step after a skipped one reported as skipped")
    elif name == "optimizer.optimizer.state written":  # a checkpoint's resume: state set into a fresh optimizer
        _state_written_is_used(engine, model)
    elif name == "optimizer.fp32_partitioned_groups_flat":
        _one_flat_fp32_master_per_group(opt.fp32_partitioned_groups_flat, opt.fp16_groups)
    elif name == "optimizer.fp16_groups":
        _groups_hold_the_model(opt.fp16_groups, params)
    elif name == "optimizer.grad_position":  # (group, offset, numel) of my partition of each parameter
        for s, group in enumerate(opt.fp16_groups):
            for p in group:
                _, offset, _ = opt.grad_position[opt.get_param_id(p)]
                start = rank * p.partition_numel()
                real = max(0, min(p.partition_numel(), p.ds_numel - start))
                master = opt.fp32_partitioned_groups_flat[s][offset:offset + real]
                _expect(torch.equal(master, p.ds_tensor.data.view(-1)[:real].float()),
                        "master slice at grad_position differs from the parameter's ds_tensor partition")
    elif name == "param.partition_numel/ds_numel":  # elements [rank * partition_numel, ...) of the flat parameter
        for n, p in params.items():
            _expect(p.partition_numel() * WORLD >= p.ds_numel == p.ds_shape.numel(), f"{n}: sizes do not add up")
    elif name == "optimizer.averaged_gradients":
        _backward(engine)  # (one micro-batch per step: the backward pass is the reduction boundary)
        for s, group in enumerate(opt.fp16_groups):
            for k, p in enumerate(group):
                _expect(opt.averaged_gradients[s][k].numel() >= min(p.partition_numel(), p.ds_numel),
                        "averaged_gradients[s][k] is smaller than the parameter's partition")
    elif name == "optimizer._partition_all_parameters/_reassign_or_swap_out_partitioned_parameters":
        with torch.no_grad():
            _masters(stage, opt)[0].add_(1.0)
        from ltsft_dist.shards import Shards

        Shards(engine, model).sync_working_weights()
        for p in opt.fp16_groups[0]:
            _, offset, _ = opt.grad_position[opt.get_param_id(p)]
            real = max(0, min(p.partition_numel(), p.ds_numel - rank * p.partition_numel()))
            _expect(torch.equal(p.ds_tensor.data.view(-1)[:real].float(),
                                opt.fp32_partitioned_groups_flat[0][offset:offset + real]),
                    "ds_tensor does not hold the masters after the re-partition sequence")
    elif name == "optimizer.persistent_parameters":
        _expect(isinstance(opt.persistent_parameters, list), "not a list")
        _expect(all(getattr(p, "ds_persist", False) for p in opt.persistent_parameters), "not all ds_persist")
        if opt.persistent_parameters:
            _expect(callable(opt.persistent_parameters[0].all_gather), "persistent parameters have no all_gather")
    elif name == "optimizer.invalidate_secondary_tensor":
        _expect(callable(opt.invalidate_secondary_tensor), "not callable")
    elif name == "param.ds_shape":
        for n, p in params.items():
            _expect(tuple(p.ds_shape) == tuple(dict(tiny_classifier().named_parameters())[n].shape),
                    f"{n}: ds_shape is not the real shape")
    elif name == "param.ds_tensor/ds_status":
        from ltsft_dist.shards import is_zero3_param

        _expect(all(is_zero3_param(p) for p in params.values()), "parameters lack ds_tensor or ds_status")
    elif name == "param.ds_process_group":
        for p in params.values():
            _expect(dist.get_rank(group=getattr(p, "ds_process_group", None)) == rank, "rank in the group differs")
    elif name == "ZeroParamStatus":
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        _expect({"AVAILABLE", "NOT_AVAILABLE", "INFLIGHT"} <= set(ZeroParamStatus.__members__), "members changed")
    else:
        raise AssertionError(f"no probe for {name}")


def _state_written_is_used(engine, model) -> None:
    """Shards.load_optimizer_state writes AdamW's state into `optimizer.optimizer.state` keyed by the fp32 flats
    (ZeRO-3 empties the inner param_groups between steps, so not through `load_state_dict`): the next step must use
    it. Step 2 is taken twice from the same masters, once with the state as DeepSpeed left it, once with it
    cleared and written back; the masters must come out bit-identical."""
    from ltsft_dist.shards import Shards

    shards = Shards(engine, model)
    _backward(engine)
    engine.step()
    scalars = shards.optimizer_scalars()
    _expect(scalars == {"step": {"value": 1.0, "dtype": "float32"}}, f"scalar state after one step: {scalars}")
    masters = [s.clone() for s in shards.segments]
    saved = [{k: v.view(-1).clone() for k, v in shards.optimizer_state(i).items() if torch.is_tensor(v) and v.dim()}
             for i in range(len(shards.segments))]
    _expect(all(set(state) == {"exp_avg", "exp_avg_sq"} for state in saved), "per-element state is not AdamW's")
    _backward(engine)
    engine.step()
    want = [s.clone() for s in shards.segments]
    with torch.no_grad():
        for segment, master in zip(shards.segments, masters):
            segment.copy_(master)
    shards.inner_optimizer.state.clear()
    shards.load_optimizer_state(saved, scalars)
    shards.sync_working_weights()
    _backward(engine)
    engine.step()
    _expect(all(torch.equal(a, b) for a, b in zip(want, shards.segments)),
            "a step after writing the optimizer state differs from the step with DeepSpeed's own state")


def _one_flat_fp32_master_per_group(flats: list, groups: list) -> None:
    _expect(all(t.dtype == torch.float32 and t.dim() == 1 for t in flats), "not flat fp32 tensors")
    _expect(len(flats) == len(groups), "not one per parameter (sub-)group")


def _groups_hold_the_model(groups: list, params: dict) -> None:
    held = {id(p) for group in groups for p in group}
    _expect(held == {id(p) for p in params.values()}, "groups do not hold exactly the model parameters")


def _grouped(opt, params: dict):
    """(group index, name, parameter) over ZeRO-1/2's bit16_groups."""
    names = {id(p): n for n, p in params.items()}
    return [(g, names[id(p)], p) for g, group in enumerate(opt.bit16_groups) for p in group]


def _masters(stage: int, opt) -> list[torch.Tensor]:
    return list(opt.single_partition_of_fp32_groups if stage in (1, 2) else opt.fp32_partitioned_groups_flat)


def probe_all() -> dict:
    """On every rank: {(stage, internal): None if as expected, else what was found}. A fresh engine per probe
    (several probes step or write the masters)."""
    import traceback

    import deepspeed.ops

    found = {}
    key = GLOBAL_PROBES[0]
    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    found[(None, key)] = None if isinstance(ops, dict) and "deepspeed_shm_comm" in ops else f"found {ops!r}"
    for stage, names in sorted(PROBES.items()):
        for name in names:
            try:
                engine, model = _engine(stage)
                _probe(stage, name, engine, model)
                found[(stage, name)] = None
            except Exception as err:  # recorded per internal: one change must not hide the others
                found[(stage, name)] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"
    return found


@pytest.fixture(scope="session")
def facts():
    return run_ranks(probe_all, WORLD)


@pytest.mark.parametrize("stage,internal", [(None, k) for k in GLOBAL_PROBES] +
                         [(s, n) for s, names in sorted(PROBES.items()) for n in names])
def test_deepspeed_internal(facts, stage, internal):
    where = "deepspeed" if stage is None else f"ZeRO-{stage}"
    problems = [f"rank {r}: {f[(stage, internal)]}" for r, f in enumerate(facts) if f[(stage, internal)]]
    assert not problems, (f"{where}: the DeepSpeed internal `{internal}` that ltsft_dist/shards.py relies on has "
                          "changed:\n" + "\n".join(problems))


def _untie_partitioned_tied_base() -> dict:
    """A tied decoder (Gemma) saved whole, then loaded under ZeRO-3 as `ltsft train` loads it: the untied output
    head is a whole copy of the partitioned embedding (`shards.full_copy`), partitioned in turn by the engine."""
    import tempfile

    import deepspeed

    from ltsft_dist import comm
    from ltsft_dist.config import ModelConfig
    from ltsft_dist.engine import build_engine, ds_config_for
    from ltsft_dist.models import build_model
    from ltsft_dist.shards import is_zero3_param

    sizes = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=24, max_position_embeddings=32, head_dim=8)
    directory = comm.broadcast_object(tempfile.mkdtemp(prefix="ltsft-gemma-") if comm.rank() == 0 else None)
    if comm.rank() == 0:
        from transformers import AutoModelForCausalLM, GemmaConfig

        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(GemmaConfig(**sizes, tie_word_embeddings=True)).save_pretrained(directory)
    comm.barrier()
    cfg = task_config("zero3.json", kind="language", task="clm", batch_size=8, micro_batch_size=4,
                      model=ModelConfig(name_or_path=directory, architecture="gemma"))
    ds = ds_config_for(cfg, WORLD)
    model = build_model(cfg.model, "clm", ds_config=ds)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    with deepspeed.zero.GatheredParameters([embedding]):
        whole = embedding.detach().clone()
    facts = {"embedding_partitioned": is_zero3_param(embedding), "head_separate": head is not embedding,
             "head_is_the_embedding": torch.equal(head.detach(), whole)}
    build_engine(model, ds, lr=1e-3, weight_decay=0.0)
    facts["head_partitioned_by_engine"] = is_zero3_param(model.get_output_embeddings().weight)
    return facts


@pytest.mark.slow
@pytest.mark.multirank
def test_a_tied_base_loaded_into_zero3_partitions_unties_into_a_whole_copy():
    for rank, facts in enumerate(run_ranks(_untie_partitioned_tied_base, WORLD)):
        assert facts == {"embedding_partitioned": True, "head_separate": True, "head_is_the_embedding": True,
                         "head_partitioned_by_engine": True}, f"rank {rank}: {facts}"
