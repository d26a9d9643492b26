"""Stress: the oracle-matrix cases that once failed only under load, repeated while a load generator keeps every
core busy. Not part of the test suite or the default `bench/run`: `bench/stress` (ad hoc, with options) or
`bench/run --only stress` (the recorded keys).

One repetition = one run of every chosen case (ZeRO-3 task/ties/language/L1 cases of tests/test_core.py, and the
ZeRO-3 language-swap cases of tests/test_swap.py where the batch divides) on W ranks; one launch of W ranks runs
`per_launch` repetitions (start-up costs more than a case), and W cycles through the chosen world sizes. Each case is checked as its test checks it (masks identical to the oracle's, φ
and heads within float32 rounding, frozen drift 0 in the masters and the working weights, the swap's own
exactness counters), and every rank reports each frozen master element that is not bit-identical to θ⁰ (rank,
parameter, element, segment = ZeRO-3 sub-group, offset, both bit patterns) and every non-zero padding element.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
CORE_CASES = ("ties-z3", "language-z3")  # the two seen failing; any case of tests/test_core.py can be named
SWAP_CASES = ()  # e.g. "z3", "z3-mixed-accum" (W <= 3) of tests/test_swap.py: --swap-cases
WORLD_SIZES = (2, 3, 4)
REPETITIONS = 30  # of the ZeRO-3 cases under load (the key's target)
PER_LAUNCH = 10
ONLY_WHEN_NAMED = True  # bench/run runs it only when named in --only (tens of minutes)
KEYS = ("stress_runs", "stress_failures")


def _frozen_drift_details(recipe, limit: int = 20) -> list[dict]:
    """Each frozen master element of my shard that is not bit-identical to θ⁰ (the first `limit`)."""
    import torch

    from ltsft_dist.masking import GradientMask

    mask = GradientMask(recipe.shards, recipe.snapshot, recipe.sparse, recipe.selected)
    out = []
    for f in recipe.shards.fragments:
        frozen = mask.frozen[f.segment].narrow(0, f.segment_offset, f.numel)
        for i in torch.nonzero(recipe.snapshot.changed(f) & frozen).view(-1).tolist()[:limit - len(out)]:
            out.append({"rank": recipe.rank, "param": f.name, "element": f.param_offset + i, "segment": f.segment,
                        "segment_offset": f.segment_offset + i,
                        "master_bits": int(recipe.shards.master(f)[i:i + 1].view(torch.int32)),
                        "theta0_bits": int(recipe.snapshot.theta0(f)[i:i + 1].view(torch.int32))})
    return out


def _nonzero_padding(recipe) -> list[dict]:
    shards = recipe.shards
    return [{"rank": shards.rank, "segment": s, "offset": offset, "numel": numel,
             "nonzero": int((shards.segments[s].narrow(0, offset, numel) != 0).sum())}
            for s, offset, numel in shards.padding if bool((shards.segments[s].narrow(0, offset, numel) != 0).any())]


def worker(core_cases, swap_cases, repetitions: int) -> list[dict]:
    """One launch: `repetitions` times every case on this rank; rank 0's results plus every rank's drift and
    padding reports, per repetition."""
    return [_cases_once(core_cases, swap_cases) for _ in range(repetitions)]


def _cases_once(core_cases, swap_cases) -> dict:
    import copy

    from ltsft_dist import comm

    sys.path.insert(0, str(TESTS))
    from scenarios import ds_config_for, tiny_model, working_weight_drift
    from test_core import CASES
    from test_swap import run_swap_cases

    from ltsft_dist.recipe import LTSFTRecipe

    world_size, out = comm.world_size(), {}
    for name in core_cases:
        cfg, examples, accumulation = CASES[name]
        cfg = copy.deepcopy(cfg)
        cfg.micro_batch_size = cfg.batch_size // (world_size * accumulation)
        model = tiny_model(cfg.kind)
        recipe = LTSFTRecipe(model, examples, cfg, ds_config_for(cfg, world_size), show_progress=False)
        sft = recipe.run()
        diffs = comm.broadcast_object(sft.diffs if sft is not None else None)
        drift = working_weight_drift(model, dict(tiny_model(cfg.kind).named_parameters()), diffs,
                                     recipe.eligibility.roles)
        out[name] = {"drift_elements": _frozen_drift_details(recipe), "padding": _nonzero_padding(recipe)}
        if sft is not None:
            out[name].update(diffs=sft.diffs, heads=sft.heads, stats=dict(recipe.stats.__dict__),
                             working_drift=drift)
    if swap_cases:
        out.update({f"swap-{k}": v for k, v in run_swap_cases(world_size, swap_cases).items()})
    return out


def _core_failures(name: str, ranks: list[dict], oracle) -> list[str]:
    import torch

    got, problems = ranks[0][name], []
    mask, phi, heads = oracle
    if got["stats"]["frozen_drift"] or got["working_drift"]:
        problems.append(f"frozen_drift {got['stats']['frozen_drift']}, working_drift {got['working_drift']}")
    for r in ranks:
        problems += [f"drifted: {d}" for d in r[name]["drift_elements"]]
        problems += [f"padding not zero: {p}" for p in r[name]["padding"]]
    if set(got["diffs"]) != {n for n, m in mask.items() if m.any()}:
        problems.append(f"parameters with a diff differ from the oracle's: {sorted(got['diffs'])}")
    for param, (idx, values) in got["diffs"].items():
        want = torch.nonzero(mask[param].reshape(-1)).view(-1)
        if not torch.equal(idx, want):
            problems.append(f"{param}: mask differs from the oracle's ({len(idx)} vs {len(want)} positions)")
        elif not torch.allclose(values, phi[param].reshape(-1)[idx], rtol=1e-4, atol=1e-6):
            problems.append(f"{param}: φ differs from the oracle's beyond float32 rounding")
    for param, value in heads.items():
        if not torch.allclose(got["heads"][param], value, rtol=1e-4, atol=1e-6):
            problems.append(f"head {param} differs from the oracle's")
    return problems


def _swap_failures(got: dict) -> list[str]:
    problems = []
    clean = {"between_steps": 0, "applied": 0, "restored": 0, "masters_moved": 0}
    if {k: got["checks"][k] for k in clean} != clean or got["final_between"]:
        problems.append(f"swap not exact: {got['checks']}, final_between {got['final_between']}")
    if got["stats"]["frozen_drift"] or got["working_drift"]:
        problems.append(f"frozen_drift {got['stats']['frozen_drift']}, working_drift {got['working_drift']}")
    return problems


class LoadGenerator:
    """One busy-looping process per core, at normal priority (the runs compete with them), ended by PID."""

    def __init__(self, processes: int):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def stress(repetitions: int = REPETITIONS, world_sizes=WORLD_SIZES, core_cases=CORE_CASES, swap_cases=SWAP_CASES,
           load: int | None = None, per_launch: int = PER_LAUNCH, log=print) -> dict:
    """Run the repetitions; returns {"runs", "failures": [...], "seconds", ...}. Never raises for a failing case:
    a crash of a launch is recorded as a failure of that repetition."""
    from _launch import run_ranks

    sys.path.insert(0, str(TESTS))
    from oracle import oracle_ltsft
    from scenarios import tiny_model
    from test_core import CASES

    import torch

    torch.set_num_threads(1)
    oracles = {name: oracle_ltsft(tiny_model(CASES[name][0].kind), CASES[name][1], CASES[name][0])
               for name in core_cases}
    load = os.cpu_count() if load is None else load
    failures, runs, launch, start = [], 0, 0, time.perf_counter()
    with LoadGenerator(load):
        while runs < repetitions:
            world = world_sizes[launch % len(world_sizes)]
            count = min(per_launch, repetitions - runs)
            swaps = [c for c in swap_cases if 12 % (world * (2 if "accum" in c else 1)) == 0]
            t = time.perf_counter()
            try:
                reps = run_ranks(worker, world, list(core_cases), swaps, count, threads=1, deepspeed=True,
                                 timeout=3600)
                found = [{name: _core_failures(name, [r[i] for r in reps], oracles[name]) for name in core_cases}
                         | {f"swap-{c}": _swap_failures(reps[0][i][f"swap-{c}"]) for c in swaps}
                         for i in range(count)]
            except Exception as err:  # noqa: BLE001 - a crashed launch is a failure to record, not to stop at
                found = [{"launch": [f"{type(err).__name__}: {str(err)[-2000:]}"]}] * count
            for i, cases in enumerate(found):
                failures += [{"repetition": runs + i, "world_size": world, "case": case, "problems": problems}
                             for case, problems in cases.items() if problems]
            runs, launch = runs + count, launch + 1
            bad = sum(1 for cases in found for p in cases.values() if p)
            log(f"[stress] repetitions {runs}/{repetitions}: W={world}, {count} x {len(found[0])} cases, "
                f"{bad} failed, {time.perf_counter() - t:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    return {"runs": runs, "failures": failures, "seconds": round(time.perf_counter() - start, 1),
            "config": {"world_sizes": list(world_sizes), "core_cases": list(core_cases), "per_launch": per_launch,
                       "swap_cases": list(swap_cases), "load_processes": load, "cpus": os.cpu_count()}}


def run(quick: bool) -> dict:
    result = stress(repetitions=len(WORLD_SIZES) if quick else REPETITIONS)
    config = {**result["config"], "repetitions": result["runs"], "seconds": result["seconds"]}
    return {
        "stress_runs": {"value": result["runs"], "target": f">= {REPETITIONS}",
                        "meets_target": result["runs"] >= REPETITIONS, "config": config,
                        "definition": "launches of W ranks, each running every chosen ZeRO-3 case, completed "
                                      "while a busy loop per core kept the machine loaded"},
        "stress_failures": {"value": len(result["failures"]), "target": "0",
                            "meets_target": not result["failures"], "failures": result["failures"],
                            "definition": "cases (over all repetitions) that crashed or missed their test's "
                                          "checks: oracle masks/φ/heads, frozen drift, padding, swap exactness"}}


def lines(results: dict) -> list[str]:
    runs, failures = results.get("stress_runs"), results.get("stress_failures")
    if not runs or not failures:
        return []
    c = runs["config"]
    return [f"stress_runs = {runs['value']} (W in {c['world_sizes']}, {len(c['core_cases'])} core + "
            f"{len(c['swap_cases'])} swap ZeRO-3 cases, {c['load_processes']} busy loops on {c['cpus']} CPUs, "
            f"{c['seconds']:.0f} s), stress_failures = {failures['value']}"]


def main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="bench/stress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--repetitions", type=int, default=REPETITIONS)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=list(WORLD_SIZES))
    parser.add_argument("--cases", nargs="+", default=list(CORE_CASES), help=f"of tests/test_core.py ({CORE_CASES})")
    parser.add_argument("--swap-cases", nargs="*", default=list(SWAP_CASES), help="of tests/test_swap.py")
    parser.add_argument("--load", type=int, help="busy-loop processes (default: one per CPU; 0: none)")
    parser.add_argument("--per-launch", type=int, default=PER_LAUNCH, help="repetitions per launch of W ranks")
    parser.add_argument("--out", type=Path, help="write the failures (and the run's config) to this JSON file")
    args = parser.parse_args(argv)
    result = stress(args.repetitions, tuple(args.world_sizes), tuple(args.cases), tuple(args.swap_cases), args.load,
                    args.per_launch)
    for f in result["failures"]:
        print(f"FAILED repetition {f['repetition']} W={f['world_size']} {f['case']}:", *f["problems"][:20],
              sep="\n  ")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[stress] {result['runs']} repetitions, {len(result['failures'])} failed cases, {result['seconds']:.0f} s")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
