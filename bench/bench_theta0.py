"""Bytes of θ⁰ held per rank by `ltsft_dist.snapshot.Snapshot` vs a full fp32 copy (composable-sft's 4·N).

One launch of W ranks builds the benchmark model under each ZeRO stage (0, 1, 2, 3) in turn and reads
`Snapshot(Shards(engine, model)).nbytes` on every rank. N_trainable counts parameters with requires_grad.
Value per stage = the largest rank's bytes / (4·N_trainable); the target for ZeRO 1-3 is 1/W (ZeRO 0 keeps a
full copy by design: 1.0). Partition padding (DeepSpeed aligns partitions; ZeRO 3 pads each parameter to a
multiple of W) makes the measured value slightly above 1/W.
"""

from __future__ import annotations

import time

from _common import build_bert, ds_config, status

STAGES = (0, 1, 2, 3)
TOLERANCE = 0.01  # relative slack over 1/W allowed for partition padding


def worker(stages) -> dict:
    import gc

    from ltsft_dist import comm

    from ltsft_dist.engine import build_engine
    from ltsft_dist.shards import Shards
    from ltsft_dist.snapshot import Snapshot

    out = {}
    for stage in stages:
        model, _ = build_bert(seed=0)
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        engine = build_engine(model, ds_config(stage, 4, comm.world_size()), lr=1e-4, weight_decay=0.01)
        shards = Shards(engine, model)
        snapshot = Snapshot(shards)
        out[stage] = {"nbytes": snapshot.nbytes, "n_trainable": n_trainable,
                      "segments": len(snapshot.segments),
                      "segment_elements": sum(s.numel() for s in snapshot.segments),
                      "fragment_elements": sum(f.numel for f in shards.fragments)}
        del snapshot, shards, engine, model
        gc.collect()
        comm.barrier()
    return out


KEYS = ("theta0_bytes_per_rank_over_full",)


def run(quick: bool) -> dict:
    from _common import BERT
    from _launch import run_ranks

    W = 2
    t0 = time.perf_counter()
    ranks = run_ranks(worker, W, STAGES, threads=1, deepspeed=True, timeout=900)
    wall = time.perf_counter() - t0
    per_stage = {}
    for stage in STAGES:
        n = ranks[0][stage]["n_trainable"]
        full = 4 * n
        nbytes = [r[stage]["nbytes"] for r in ranks]
        value = max(nbytes) / full
        target = 1.0 if stage == 0 else 1 / W
        per_stage[f"zero{stage}"] = {
            "value": value, "target": "1.0 (full copy by design)" if stage == 0 else f"1/W = {1 / W}",
            "meets_target": value <= target * (1 + TOLERANCE),
            "config": {"N_trainable": n, "W": W, "stage": stage, "repeats": 1, "model": "BertForSequenceClassification",
                       "bert_config": BERT},
            "theta0_bytes_per_rank": nbytes, "full_copy_bytes": full,
            "segments_per_rank": [r[stage]["segments"] for r in ranks],
            "segment_elements_per_rank": [r[stage]["segment_elements"] for r in ranks],
            "owned_parameter_elements_per_rank": [r[stage]["fragment_elements"] for r in ranks],
            "padding_elements_per_rank": [r[stage]["segment_elements"] - r[stage]["fragment_elements"]
                                         for r in ranks],
        }
    sharded = [per_stage[f"zero{s}"] for s in (1, 2, 3)]
    worst = max(r["value"] for r in sharded)
    return {KEYS[0]: {"value": worst, "target": f"1/W = {1 / W} for ZeRO 1-3 (within {TOLERANCE:.0%} for padding)",
            "meets_target": all(r["meets_target"] for r in sharded),
            "definition": "max over ranks of Snapshot.nbytes / (4 * N_trainable); value = worst of ZeRO 1, 2, 3",
            "config": {"W": W, "stages": list(STAGES), "N_trainable": ranks[0][0]["n_trainable"]},
            "per_stage": per_stage, "wall_seconds": wall}}


def lines(results: dict) -> list[str]:
    r = results.get("theta0_bytes_per_rank_over_full")
    if not r:
        return []
    lines = []
    lines.append(f"theta0_bytes_per_rank_over_full = {r['value']:.4f}  (worst of ZeRO 1-3; target 1/W: "
                 f"{status(r)})")
    for stage, p in r["per_stage"].items():
        c = p["config"]
        lines.append(f"    {stage}: {p['value']:.4f}  W={c['W']} N_trainable={c['N_trainable']:,} "
                     f"bytes/rank {', '.join(f'{b:,}' for b in p['theta0_bytes_per_rank'])} "
                     f"of {p['full_copy_bytes']:,}")
    return lines
