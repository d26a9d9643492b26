"""How the phase-2 training step time and peak memory per rank scale with model size N and world size W.

Three BERT sizes (N ≈ 1.5 M, 5.4 M, 14 M) at W = 1 and W = 2 (ZeRO-2, fp32, 1 thread per rank, a 5 % task mask
attached with `GradientMask`), strong scaling: global batch 16 × 64 tokens (micro-batch 16/W). One launch per W
builds the sizes one after another; per size: warm-up, then the median step time (slower rank) and the peak RSS
growth per rank while the engine is built and stepped (`PeakMemory`: VmHWM reset first). W=1 and W=2 run in
separate launches, so their ratio carries the machine's noise between them (there is no same-process pairing for
a world size). A first pass over the smallest size is discarded (lazy imports, allocator warm-up). Plotted to `<results>-scaling.png`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from _common import BERT, build_bert, status

KEYS = ("scaling_step_W2_over_W1",)
SIZES = {"S": dict(BERT, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
         "A": dict(BERT),
         "B": dict(BERT, hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536)}
GLOBAL_BATCH, SEQ, DENSITY = 16, 64, 0.05


def worker(warmup: int, iterations: int) -> dict:
    import gc

    import torch
    from ltsft_dist import comm

    from _common import PeakMemory, phase2_engine

    world = comm.world_size()
    micro = GLOBAL_BATCH // world
    out = {}
    for n, name in enumerate([next(iter(SIZES)), *SIZES]):  # the first pass warms up (lazy imports, allocator)
        config = SIZES[name]
        g = torch.Generator().manual_seed(comm.rank())
        batch = {"input_ids": torch.randint(0, config["vocab_size"], (micro, SEQ), generator=g),
                 "attention_mask": torch.ones(micro, SEQ, dtype=torch.long),
                 "labels": torch.randint(0, 2, (micro,), generator=g)}
        with PeakMemory() as mem:
            model, eligibility = build_bert(config=config)
            engine, shards, mask, k = phase2_engine(model, eligibility, micro, world, DENSITY)
            times = []
            for i in range(warmup + iterations):
                comm.barrier()
                t = time.perf_counter()
                engine.backward(engine(**batch).loss)
                mask.mask_gradients(shards.grads())
                engine.step()
                if i >= warmup:
                    times.append(time.perf_counter() - t)
        if n:
            out[name] = {"N": sum(p.numel() for p in model.parameters()), "K": k, "step_seconds": times,
                         "peak_extra_bytes": mem.extra_bytes, "memory_method": mem.method}
        mask.detach()
        del engine, shards, mask, model
        gc.collect()
    return out


def run(quick: bool) -> dict:
    from _common import median
    from _launch import run_ranks

    warmup, iterations = (1, 3) if quick else (3, 15)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    per_w = {}
    for world in (1, 2):
        ranks = run_ranks(worker, world, warmup, iterations, threads=1, deepspeed=True, timeout=1800)
        per_w[world] = {name: {
            "N": ranks[0][name]["N"], "K": ranks[0][name]["K"],
            "step_seconds_median": median([max(r[name]["step_seconds"][i] for r in ranks)
                                           for i in range(iterations)]),
            "peak_extra_bytes_per_rank": [r[name]["peak_extra_bytes"] for r in ranks]} for name in SIZES}
    largest = list(SIZES)[-1]
    value = per_w[2][largest]["step_seconds_median"] / per_w[1][largest]["step_seconds_median"]
    table = [{"size": name, "W": w, **per_w[w][name]} for name in SIZES for w in (1, 2)]
    return {KEYS[0]: {
        "value": value, "target": "diagnostic (no target; 0.5 would be perfect strong scaling on 2 cores)",
        "meets_target": None,
        "definition": f"phase-2 step time at W=2 / at W=1 for the largest model ({largest}), global batch "
                      f"{GLOBAL_BATCH}x{SEQ}; the table has every size and W, with peak RSS growth per rank",
        "config": {"sizes": SIZES, "zero_stage": 2, "precision": "fp32", "global_batch": GLOBAL_BATCH, "seq_len": SEQ,
                   "density": DENSITY, "warmup": warmup, "repeats": iterations, "threads_per_rank": 1,
                   "loadavg_1m_before": load, "memory": ranks[0][largest]["memory_method"]},
        "table": table, "wall_seconds": time.perf_counter() - t0,
    }}


def write_artefacts(results: dict, out: Path) -> list[Path]:
    """The scaling plot: step time and peak memory per rank against N, one line per W."""
    r = results.get(KEYS[0])
    if not r:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for w in (1, 2):
        rows = [row for row in r["table"] if row["W"] == w]
        n = [row["N"] / 1e6 for row in rows]
        ax_t.plot(n, [row["step_seconds_median"] * 1e3 for row in rows], "o-", label=f"W={w}")
        ax_m.plot(n, [max(row["peak_extra_bytes_per_rank"]) / 2 ** 20 for row in rows], "o-", label=f"W={w}")
    ax_t.set(xlabel="parameters N (millions)", ylabel="phase-2 step, ms (median)",
             title=f"step time, global batch {GLOBAL_BATCH}x{SEQ}")
    ax_m.set(xlabel="parameters N (millions)", ylabel="peak RSS growth per rank, MiB",
             title="peak memory per rank (engine + steps)")
    for ax in (ax_t, ax_m):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("ltsft-dist, ZeRO-2 fp32, 1 thread per rank, shared 2-core CPU machine", fontsize=9)
    fig.tight_layout()
    path = out.with_name(out.stem + "-scaling.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def lines(results: dict) -> list[str]:
    r = results.get(KEYS[0])
    if not r:
        return []
    out = [f"scaling_step_W2_over_W1 = {r['value']:.3f}  ({status(r)}; largest model)"]
    for row in r["table"]:
        out.append(f"    {row['size']} N={row['N']:,} W={row['W']}: step {row['step_seconds_median'] * 1e3:.0f} ms, "
                   f"peak RSS growth per rank {', '.join(f'{b / 2 ** 20:.0f}' for b in row['peak_extra_bytes_per_rank'])}"
                   f" MiB")
    return out
