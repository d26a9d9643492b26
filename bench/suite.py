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

import bench_step  # noqa: E402
import bench_theta0  # noqa: E402
import bench_topk  # noqa: E402

BENCHMARKS = {  # key -> module; order = run order (cheapest first)
    "theta0_bytes_per_rank_over_full": bench_theta0,
    "topk_over_torch_topk": bench_topk,
    "phase2_step_over_dense_step": bench_step,
}


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


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _pass(ok) -> str:
    return "meets target" if ok else "MISSES target"


def summary_lines(results: dict) -> list[str]:
    """The side-by-side summary printed at the end and written into the Markdown file."""
    lines = []
    r = results.get("phase2_step_over_dense_step")
    if r and "value" in r:
        c = r["config"]
        lines.append(f"phase2_step_over_dense_step = {r['value']:.3f}  (target <= 1.05: {_pass(r['meets_target'])})")
        lines.append(f"    W={c['W']} ZeRO-{c['zero_stage']} {c['precision']} N={c['N_trainable']:,} "
                     f"K={c['K']:,} ({c['density']:.0%}) repeats={c['repeats']} engines={'/'.join(c['engines'])}")
        o, f, b = r["optimizer_step"], r["full_train_step"], r["breakdown_rank0_median_seconds"]
        lines.append(f"    optimizer step: dense {o['dense_seconds']['median'] * 1e3:.1f} ms, masked "
                     f"{o['masked_seconds']['median'] * 1e3:.1f} ms, paired ratio IQR "
                     f"[{o['ratios']['p25']:.3f}, {o['ratios']['p75']:.3f}], ratio of medians "
                     f"{o['ratio_of_medians']:.3f}; noise floor (same-kind engines) dense "
                     f"{o['control_dense_b_over_dense_a']:.3f}, masked {o['control_masked_b_over_masked_a']:.3f}")
        lines.append(f"    full train step (fwd+bwd+step): ratio {f['ratios']['median']:.3f} "
                     f"(dense {f['dense_seconds']['median'] * 1e3:.0f} ms, masked "
                     f"{f['masked_seconds']['median'] * 1e3:.0f} ms)")
        lines.append(f"    rank-0 components alone: mask_gradients {b['mask_gradients_alone'] * 1e3:.2f} ms, "
                     f"projection {b['project_all_segments_alone'] * 1e3:.2f} ms "
                     f"(inside step {b['projection_hook_inside_masked_step'] * 1e3:.2f} ms), "
                     f"grads() {b['grads_views_alone'] * 1e3:.2f} ms; frozen drift {r['frozen_drift']}")
        lines.append(f"    masked AdamW state: {r['masked_exp_avg_sq_zero_fraction']:.1%} of exp_avg_sq exactly 0; torch.sqrt "
                     f"on {c['local_master_elements_per_rank'][0]:,} zeros {b['torch_sqrt_of_zeros_local_size'] * 1e3:.2f} ms"
                     f" vs nonzeros {b['torch_sqrt_of_nonzeros_local_size'] * 1e3:.2f} ms")
    r = results.get("topk_over_torch_topk")
    if r and "value" in r:
        lines.append(f"topk_over_torch_topk = {r['value']:.3f}  (worst N; target <= 1.0 at W=2: "
                     f"{_pass(r['meets_target'])})")
        for n, p in r["per_N"].items():
            c = p["config"]
            mem = p["peak_extra_memory_bytes_per_rank"]
            lines.append(f"    N={int(n):,} W={c['W']} K={c['K']:,} repeats={c['repeats']}: ratio {p['value']:.3f} "
                         f"(ours {p['ours_seconds']['median']:.3f} s vs torch.topk {p['torch_topk_seconds']['median']:.3f}"
                         f" s); vs topk(sorted=False) {p['ratio_vs_topk_sorted_false']:.3f} "
                         f"({p['torch_topk_sorted_false_seconds']['median']:.3f} s)")
            lines.append(f"        exact K: {p['exact']['equals_K']}, same threshold as torch.topk: "
                         f"{p['exact']['threshold_equals_torch_kth']}; bytes communicated per rank "
                         f"{p['bytes_communicated_per_rank']['total']:,}; peak extra memory per rank "
                         f"{', '.join(f'{m / 2 ** 20:.0f}' for m in mem)} MiB (scores "
                         f"{p['scores_bytes_per_rank'][0] / 2 ** 20:.0f} MiB/rank) vs torch.topk "
                         f"{p['torch_topk_peak_extra_memory_bytes'] / 2 ** 20:.0f} MiB")
    r = results.get("theta0_bytes_per_rank_over_full")
    if r and "value" in r:
        lines.append(f"theta0_bytes_per_rank_over_full = {r['value']:.4f}  (worst of ZeRO 1-3; target 1/W: "
                     f"{_pass(r['meets_target'])})")
        for stage, p in r["per_stage"].items():
            c = p["config"]
            lines.append(f"    {stage}: {p['value']:.4f}  W={c['W']} N_trainable={c['N_trainable']:,} "
                         f"bytes/rank {', '.join(f'{b:,}' for b in p['theta0_bytes_per_rank'])} "
                         f"of {p['full_copy_bytes']:,}")
    for key, err in results.get("errors", {}).items():
        lines.append(f"{key}: FAILED ({err.strip().splitlines()[-1]})")
    return lines


def markdown(results: dict) -> str:
    m = results["machine"]
    head = [f"# Benchmark results{' (quick)' if results['quick'] else ''}", "",
            f"Generated {results['generated']} by `{results['command']}` in {results['wall_seconds']:.0f} s on "
            f"{m.get('cpus')} CPUs ({m.get('cpu_model', '?')}), {m.get('mem_total_gib', '?')} GiB; torch "
            f"{m.get('torch')}, deepspeed {m.get('deepspeed')}; 1-min load average at start "
            f"{m['loadavg_at_start'][0]:.1f}. Full numbers, configurations and raw timings: "
            f"`{results['json_name']}`. What each key means: `bench/README.md`.", "",
            "| key | value | target | status |", "| --- | --- | --- | --- |"]
    for key in BENCHMARKS:
        r = results.get(key)
        if r and "value" in r:
            head.append(f"| `{key}` | {r['value']:.4g} | {r['target']} | {_pass(r['meets_target'])} |")
        else:
            head.append(f"| `{key}` | — | — | {'failed' if key in results.get('errors', {}) else 'not run'} |")
    return "\n".join(head + ["", "```", *summary_lines(results), "```", ""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~2 minute smoke run (fewer repeats, N=10M only)")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--out", type=Path, help="results JSON path (default bench/results.json, "
                        "bench/results-quick.json with --quick); the Markdown summary goes next to it (.md)")
    parser.add_argument("--strict", action="store_true", help="exit 2 when a measured value misses its target")
    args = parser.parse_args(argv)
    out = args.out or HERE / ("results-quick.json" if args.quick else "results.json")
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {"schema": 1, "quick": args.quick, "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(["bench/run", *(argv if argv is not None else sys.argv[1:])]),
               "json_name": out.name, "machine": machine(), "errors": {}}
    for key, module in BENCHMARKS.items():
        if args.only and key not in args.only:
            continue
        print(f"[bench] {key} ...", flush=True)
        t = time.perf_counter()
        try:
            results[key] = module.run(args.quick)
            print(f"[bench] {key} = {results[key]['value']:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
        except Exception:
            results["errors"][key] = traceback.format_exc()
            print(f"[bench] {key} FAILED after {time.perf_counter() - t:.0f} s:\n{results['errors'][key]}",
                  file=sys.stderr, flush=True)
    results["wall_seconds"] = time.perf_counter() - start
    write_atomic(out, json.dumps(results, indent=1) + "\n")
    write_atomic(out.with_suffix(".md"), markdown(results))
    print()
    print("\n".join(summary_lines(results)))
    print(f"\nwrote {out} and {out.with_suffix('.md')} in {results['wall_seconds']:.0f} s")
    if results["errors"]:
        return 1
    missed = [k for k in BENCHMARKS if k in results and not results[k]["meets_target"]]
    return 2 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
