"""End-to-end LT-SFT: the library's recipe vs the same run in plain PyTorch (`plain_ltsft.py`), one process.

What a user pays for the distributed machinery when it is not needed: `LTSFTRecipe` at W=1 (DeepSpeed ZeRO-2,
engine build included) against a direct single-process implementation, on the benchmark BERT (task SFT, K = 5 %),
same data order (`StepOrder`), same optimizer settings, one thread each. Repetitions alternate the two in the same
process (a fresh model each time); value = median ours / median plain. The selected masks are compared as a
sanity check (they agree up to floating-point summation order, so the overlap should be ~1).
"""

from __future__ import annotations

import os
import tempfile
import time

from _common import BERT, build_bert, ds_config, status, summary

KEYS = ("ltsft_e2e_over_plain_pytorch",)


def worker(steps: int, repeats: int, micro: int, seq: int, density: float) -> dict:
    import torch

    import plain_ltsft
    from ltsft_dist.config import PhaseConfig, TrainConfig
    from ltsft_dist.data import Examples, StepOrder
    from ltsft_dist.recipe import LTSFTRecipe

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, BERT["vocab_size"], (micro * steps, seq), generator=g)
    examples = Examples({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 1] % 2})
    times = {"ours": [], "plain": []}
    overlap = None
    for rep in range(repeats + 1):  # the first pair warms up (imports, allocator)
        for kind in (("ours", "plain") if rep % 2 else ("plain", "ours")):
            model, eligibility = build_bert(seed=0)
            with tempfile.TemporaryDirectory() as out:
                config = TrainConfig(kind="task", density=density, output_dir=out, resume=False,
                                     phase1=PhaseConfig(steps=steps, lr=1e-4), phase2=PhaseConfig(steps=steps, lr=1e-4),
                                     batch_size=micro, micro_batch_size=micro, weight_decay=0.01, max_grad_norm=1.0)
                k = config.k_for(eligibility.count(model, "sparse"))
                t = time.perf_counter()
                if kind == "ours":
                    recipe = LTSFTRecipe(model, examples, config, ds_config(2, micro, 1), show_progress=False)
                    sft = recipe.run()
                    ours_sel = {n: idx for n, (idx, _) in sft.diffs.items()}
                else:
                    order = StepOrder(examples, micro, micro, 0, 1, config.seed)
                    plain_sel = plain_ltsft.train(model, eligibility.roles, lambda s: order.batch_at(s, 0), k,
                                                  (steps, steps), 1e-4, 0.01, 1.0)
                elapsed = time.perf_counter() - t
            if rep:
                times[kind].append(elapsed)
        if overlap is None:
            both = sum(len(set(ours_sel.get(n, torch.empty(0)).tolist()) & set(v.tolist()))
                       for n, v in plain_sel.items())
            overlap = {"K": k, "selected_by_both": both}
    return {"times": times, "overlap": overlap, "torch_threads": torch.get_num_threads(),
            "n_params": sum(p.numel() for p in model.parameters())}


def run(quick: bool) -> dict:
    from _launch import run_ranks

    steps, repeats, micro, seq, density = (6, 2, 8, 64, 0.05) if quick else (30, 4, 8, 64, 0.05)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    (r,) = run_ranks(worker, 1, steps, repeats, micro, seq, density, threads=1, deepspeed=True, timeout=1800)
    ours, plain = r["times"]["ours"], r["times"]["plain"]
    value = summary(ours)["median"] / summary(plain)["median"]
    return {KEYS[0]: {
        "value": value, "target": "diagnostic (no target): the cost of the distributed machinery at W=1",
        "meets_target": None,
        "definition": "median wall time of LTSFTRecipe.run() at W=1 (ZeRO-2, engine build included) / median wall "
                      "time of plain_ltsft.train() (single process, no DeepSpeed), same model, data order, optimizer "
                      "settings and K; phase 1 + select + rewind + phase 2",
        "config": {"model": "BertForSequenceClassification", "bert_config": BERT, "N_params": r["n_params"],
                   "W": 1, "zero_stage": 2, "kind": "task", "density": density, "K": r["overlap"]["K"],
                   "phase1_steps": steps, "phase2_steps": steps, "micro_batch_size": micro, "seq_len": seq,
                   "repeats": repeats, "threads": r["torch_threads"], "loadavg_1m_before": load,
                   "order": "ours and plain alternate (which goes first alternates too), one warm-up pair"},
        "ours_seconds": summary(ours), "plain_seconds": summary(plain),
        "raw": {"ours_seconds": ours, "plain_seconds": plain},
        "mask_overlap": r["overlap"]["selected_by_both"] / r["overlap"]["K"],
        "wall_seconds": time.perf_counter() - t0,
    }}


def lines(results: dict) -> list[str]:
    r = results.get(KEYS[0])
    if not r:
        return []
    c = r["config"]
    return [f"ltsft_e2e_over_plain_pytorch = {r['value']:.3f}  ({status(r)})",
            f"    W=1 ZeRO-{c['zero_stage']} N={c['N_params']:,} K={c['K']:,}, {c['phase1_steps']}+{c['phase2_steps']} "
            f"steps of {c['micro_batch_size']}x{c['seq_len']}, repeats={c['repeats']}: ours "
            f"{r['ours_seconds']['median']:.2f} s vs plain PyTorch {r['plain_seconds']['median']:.2f} s; "
            f"masks agree on {r['mask_overlap']:.1%} of K"]
