"""The benchmark suite of the distributed LT-SFT core: runs every benchmark, writes results JSON + Markdown.

    bench/run [--quick] [--only NAME ...] [--out PATH.json] [--strict]

Each benchmark runs in freshly spawned processes (see _launch.py); this process only orchestrates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the repo root: ltsft_dist without installing it

import bench_adapters  # noqa: E402
import bench_demo  # noqa: E402
import bench_data  # noqa: E402
import bench_e2e  # noqa: E402
import bench_hf  # noqa: E402
import bench_llm  # noqa: E402
import bench_scaling  # noqa: E402
import bench_step  # noqa: E402
import bench_stress  # noqa: E402
import bench_swap  # noqa: E402
import bench_theta0  # noqa: E402
import bench_topk  # noqa: E402
from _common import status  # noqa: E402
from ltsft_dist.files import write_text  # noqa: E402

# Run order = cheapest first. Each module has KEYS, run(quick) -> {key: result} and lines(results) -> summary.
MODULES = (bench_theta0, bench_topk, bench_step, bench_swap, bench_e2e, bench_scaling, bench_adapters, bench_stress,
           bench_data, bench_llm, bench_hf, bench_demo)
NAMES = {m.__name__.removeprefix("bench_"): m for m in MODULES}  # `--only swap` runs every key of bench_swap
KEYS = {key: m for m in MODULES for key in m.KEYS}


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg()}
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
        info["mem_total_gib"] = round(int(next(line.split()[1] for line in open("/proc/meminfo")
                                               if line.startswith("MemTotal"))) / 2 ** 20, 1)
    except (OSError, StopIteration):
        pass
    for mod in ("torch", "deepspeed", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as err:  # report, don't fail: the benchmark itself will say what is missing
            info[mod] = f"unavailable ({type(err).__name__})"
    return info


def previous_results(out: Path) -> dict:
    """With --only, the keys not re-run are kept from the last results file: one file holds the whole suite,
    and each benchmark's own run (`runs`) says when, by which command and on what machine it was measured."""
    try:
        previous = json.loads(out.read_text())
    except (OSError, ValueError):
        return {}
    if previous.get("schema") != 2:  # schema 1 had no per-benchmark provenance: its values are carried under it
        previous["runs"] = {name: {k: previous[k] for k in ("generated", "command", "machine") if k in previous}
                            for name, module in NAMES.items() if any(k in previous for k in module.KEYS)}
    return previous


def summary_lines(results: dict) -> list[str]:
    """The side-by-side summary printed at the end and written into the Markdown file."""
    lines = [line for m in MODULES for line in m.lines(results)]
    for name, err in results.get("errors", {}).items():
        lines.append(f"{name}: FAILED ({err.strip().splitlines()[-1]})")
    return lines


def markdown(results: dict) -> str:
    m = results["machine"]
    head = [f"# Benchmark results{' (quick)' if results['quick'] else ''}", "",
            f"Last written {results['generated']} by `{results['command']}` on "
            f"{m.get('cpus')} CPUs ({m.get('cpu_model', '?')}), {m.get('mem_total_gib', '?')} GiB; torch "
            f"{m.get('torch')}, deepspeed {m.get('deepspeed')}. Each key's row names the run that measured it "
            f"(with its 1-min load average at start). Full numbers, configurations and raw timings: "
            f"`{results['json_name']}`. What each key means: `bench/README.md`."
            + "".join(f" Plot: `{a}`." for a in results.get("artefacts", [])), "",
            "| key | value | target | status | measured by |", "| --- | --- | --- | --- | --- |"]
    for key, module in KEYS.items():
        r = results.get(key)
        run = results.get("runs", {}).get(module.__name__.removeprefix("bench_"), {})
        load = run.get("machine", {}).get("loadavg_at_start", [float("nan")])[0]
        by = f"`{run.get('command', '?')}` {run.get('generated', '?')}, load {load:.1f}"
        if r and "value" in r:
            head.append(f"| `{key}` | {r['value']:.4g} | {r['target']} | {status(r)} | {by} |")
        else:
            failed = module.__name__.removeprefix("bench_") in results.get("errors", {})
            head.append(f"| `{key}` | — | — | {'failed' if failed else 'not run'} | |")
    return "\n".join(head + ["", "```", *summary_lines(results), "```", ""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~2 minute smoke run (fewer repeats, N=10M only; skips the adapters peer unless named)")
    parser.add_argument("--only", nargs="+", choices=[*NAMES, *KEYS], metavar="NAME",
                        help=f"run only these benchmarks (a key, or a module: {', '.join(NAMES)})")
    parser.add_argument("--out", type=Path, help="results JSON path (default bench/results.json, "
                        "bench/results-quick.json with --quick); the Markdown summary goes next to it (.md)")
    parser.add_argument("--strict", action="store_true", help="exit 2 when a measured value misses its target")
    args = parser.parse_args(argv)
    out = args.out or HERE / ("results-quick.json" if args.quick else "results.json")
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run_info = {"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(["bench/run", *(argv if argv is not None else sys.argv[1:])]),
                "machine": machine()}
    results = previous_results(out) if args.only else {}
    results.update({"schema": 2, "quick": args.quick, "json_name": out.name, **run_info})
    results.setdefault("runs", {})
    results["errors"] = {}
    for name, module in NAMES.items():
        named = bool(args.only) and (name in args.only or bool(set(module.KEYS) & set(args.only)))
        if (args.only or getattr(module, "ONLY_WHEN_NAMED", False)) and not named:
            continue
        if args.quick and getattr(module, "FULL_RUN_ONLY", False) and not named:
            print(f"[bench] {name}: skipped by --quick (name it in --only to run it)", flush=True)
            continue
        print(f"[bench] {name} ...", flush=True)
        t = time.perf_counter()
        try:
            results.update(module.run(args.quick))
            results["runs"][name] = {**run_info, "seconds": round(time.perf_counter() - t, 1)}
            values = ", ".join(f"{k} = {results[k]['value']:.4f}" for k in module.KEYS if k in results)
            print(f"[bench] {values} ({time.perf_counter() - t:.0f} s)", flush=True)
        except Exception:
            results["errors"][name] = traceback.format_exc()
            print(f"[bench] {name} FAILED after {time.perf_counter() - t:.0f} s:\n{results['errors'][name]}",
                  file=sys.stderr, flush=True)
    results["wall_seconds"] = time.perf_counter() - start
    results["artefacts"] = []
    for name, module in NAMES.items():  # plots and the like, beside the JSON; a failure must not lose the numbers
        if hasattr(module, "write_artefacts"):
            try:
                results["artefacts"].extend(p.name for p in module.write_artefacts(results, out))
            except Exception:
                results["errors"][f"{name} (artefacts)"] = traceback.format_exc()
    write_text(out, json.dumps(results, indent=1) + "\n")
    write_text(out.with_suffix(".md"), markdown(results))
    print()
    print("\n".join(summary_lines(results)))
    print(f"\nwrote {out} and {out.with_suffix('.md')} in {results['wall_seconds']:.0f} s")
    if results["errors"]:
        return 1
    missed = [k for k in KEYS if k in results and results[k]["meets_target"] is False]
    return 2 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
