"""Cost of the per-step language delta swap of multi-source task training (`ltsft_dist.swap.LanguageSwap`).

One launch of W=2 ranks (ZeRO-2, fp32, 1 torch thread per rank) builds, per model size, one phase-2 engine
(AdamW, a 5 % random task mask attached with `GradientMask` exactly as the recipe does) and three language SFTs
of random positions at the given language density (relative to the body parameters a language SFT may touch:
`bert.*` without pooler and LayerNorms). Two kinds of training step run on that engine, each as
`LTSFTRecipe.train_step` does (batch from the order → `before_step` hooks → forward → backward →
`before_optimizer_step` hooks → `mask_gradients(shards.grads())` → `engine.step()`):

- single-source: `StepOrder` over one language's examples, no hook (one source whose language SFT is not swapped
  per step, e.g. TA-only);
- multi-source: `MultiSourceOrder` over three languages (proportional policy), `LanguageSwap` hook: each step
  applies and restores its language's φ_L.

Every iteration runs one multi-source step and two single-source steps (the second is a control: the noise floor
of the measurement), rotating which goes first; a barrier precedes each timed step and the slower rank counts;
an iteration's single-source time is the mean of its two. Keys:

- `swap_over_step` = median over iterations of (apply + restore time inside the multi-source step, slower rank) /
  (single-source phase-2 step time), on model A at language density 5 %. Target ≤ 0.02. Under ZeRO-2 every rank
  holds the full working weights, so every rank applies all K_L elements. Independence of N is shown by model B
  (≈2.6× N) with the same K_L per language: `swap_seconds_fixed_K_in_step` for both models, plus standalone
  apply+restore timings (outside training) at K_A on A, K_A on B and 5 % on B (the cost follows K, not N).
- `multisource_step_over_single_source_step` = median over iterations of multi-source step time / single-source
  step time (same engine, same shapes), model A. Target ≤ 1.03. `noise_floor_single_b_over_single_a` is the same
  statistic between the two single-source steps.

Runs in about 2 min on 2 idle CPU cores (`--quick`: about 40 s).
"""

from __future__ import annotations

import os
import time

from _common import BERT, build_bert, language_body, phase2_engine, random_language_sfts, status, summary

MODELS = {"A": dict(BERT), "B": dict(BERT, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                                     intermediate_size=1536)}
LANGUAGES = ("de", "en", "sw")


def _examples(n: int, seq_len: int, vocab: int, seed: int):
    import torch

    from ltsft_dist.data import Examples

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, seq_len), generator=g)
    return Examples({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 1] % 2})


def _measure_model(config: dict, k_languages: list[int], micro: int, seq_len: int, warmup: int, iterations: int,
                   task_density: float, standalone_repeats: int) -> dict:
    from ltsft_dist import comm

    from ltsft_dist.data import StepOrder
    from ltsft_dist.multisource import MultiSourceOrder
    from ltsft_dist.swap import LanguageSwap

    rank, world = comm.rank(), comm.world_size()
    model, eligibility = build_bert(config=config)
    n_params = sum(p.numel() for p in model.parameters())
    body = sum(language_body(model).values())
    sft_sets = {k: random_language_sfts(model, k, LANGUAGES, seed=10 + i) for i, k in enumerate(k_languages)}
    sources = {lang: _examples(micro * world * 8, seq_len, config["vocab_size"], seed=i)
               for i, lang in enumerate(LANGUAGES)}
    multi = MultiSourceOrder(sources, micro * world, micro, rank, world, seed=0)
    swaps = {k: LanguageSwap(model, sfts, multi) for k, sfts in sft_sets.items()}  # before the engine: checked
    engine, shards, mask, k_task = phase2_engine(model, eligibility, micro, world, task_density)
    n_eligible = eligibility.count(model, "sparse")
    single = StepOrder(sources["en"], micro * world, micro, rank, world, seed=0)

    def step(order, hooks, i):
        comm.barrier()
        t0 = time.perf_counter()
        batch = order.batch_at(i, 0)
        for h in hooks:
            h.before_step(i)
        loss = engine(**batch).loss
        engine.backward(loss)
        for h in hooks:
            h.before_optimizer_step(i)
        mask.mask_gradients(shards.grads())
        engine.step()
        return time.perf_counter() - t0

    out = {"N_params": n_params, "N_language_body": body, "N_eligible_task": n_eligible, "K_task": k_task,
           "K_languages": {str(k): {lang: s.nnz for lang, s in sft_sets[k].items()} for k in k_languages}}
    swap = swaps[k_languages[0]]  # training steps use the first K
    times = {"single": [], "multi": [], "control": []}
    swap_s = []
    modes = ("single", "multi", "control")  # control: a second single-source step (the noise floor)
    for it in range(warmup + iterations):
        for j in range(len(modes)):
            mode = modes[(it + j) % len(modes)]  # rotate who goes first
            if mode != "multi":
                t = step(single, [], it)
            else:
                before = dict(swap.seconds)
                t = step(multi, [swap], it)
                s = {k: swap.seconds[k] - before[k] for k in before}
            if it >= warmup:
                times[mode].append(t)
                if mode == "multi":
                    swap_s.append(s)
    single_s, multi_s = times["single"], times["multi"]
    out.update(single=single_s, multi=multi_s, control=times["control"],
               swap=[a["apply"] + a["restore"] for a in swap_s],
               apply=[a["apply"] for a in swap_s], restore=[a["restore"] for a in swap_s],
               languages=[multi.language_at(i) for i in range(warmup + iterations)])
    # Standalone apply+restore (no training around it), each K, rotating through the languages.
    standalone = {}
    for k, swap in swaps.items():
        times = []
        for i in range(standalone_repeats + 2):
            t = time.perf_counter()
            swap.before_step(10_000 + i)
            swap.before_optimizer_step(10_000 + i)
            if i >= 2:
                times.append(time.perf_counter() - t)
        standalone[str(k)] = summary(times)
    out["standalone"] = standalone
    mask.detach()
    drift = sum(int(((m != t) & f).sum()) for m, t, f in zip(shards.segments, mask.snapshot.segments, mask.frozen))
    out["frozen_drift"] = drift
    return out


def worker(micro: int, seq_len: int, warmup: int, iterations: dict, density: float, task_density: float,
           standalone_repeats: int) -> dict:
    import gc

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    sizes = {}
    for name, cfg in MODELS.items():  # body sizes first (cheap), to fix K from model A
        torch.manual_seed(0)
        sizes[name] = sum(language_body(BertForSequenceClassification(BertConfig(**cfg, num_labels=2))).values())
    k_a = round(density * sizes["A"])
    k_b = round(density * sizes["B"])
    out = {"A": _measure_model(MODELS["A"], [k_a], micro, seq_len, warmup, iterations["A"], task_density,
                               standalone_repeats)}
    gc.collect()
    out["B"] = _measure_model(MODELS["B"], [k_a, k_b], micro, seq_len, warmup, iterations["B"], task_density,
                              standalone_repeats)
    out["torch_threads"] = torch.get_num_threads()
    out["K"] = {"A": k_a, "B": k_b}
    return out


KEYS = ("swap_over_step", "multisource_step_over_single_source_step")


def run(quick: bool) -> dict:
    from _launch import run_ranks

    W, micro, seq = 2, 8, 64
    # Model A carries both keys: many iterations (the step-time ratio is a ~2% effect in ±4% per-step noise).
    # Model B only shows how the swap scales with N at fixed K: fewer.
    warmup, iterations, repeats = (2, {"A": 10, "B": 4}, 10) if quick else (4, {"A": 100, "B": 20}, 40)
    density, task_density = 0.05, 0.05
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    ranks = run_ranks(worker, W, micro, seq, warmup, iterations, density, task_density, repeats, threads=1,
                      deepspeed=True, timeout=3600)
    wall = time.perf_counter() - t0

    def slowest(model, what):
        return [max(r[model][what][i] for r in ranks) for i in range(iterations[model])]

    per_model = {}
    for m in ("A", "B"):
        single_a, control, multi, swap = (slowest(m, w) for w in ("single", "control", "multi", "swap"))
        single = [(x + y) / 2 for x, y in zip(single_a, control)]  # both single-source steps of the iteration
        r0 = ranks[0][m]
        per_model[m] = {
            "bert_config": MODELS[m], "N_params": r0["N_params"], "N_language_body": r0["N_language_body"],
            "K_per_language": r0["K_languages"][next(iter(r0["K_languages"]))],
            "language_density": next(iter(r0["K_languages"][next(iter(r0["K_languages"]))].values()))
            / r0["N_language_body"],
            "swap_over_step": summary([s / t for s, t in zip(swap, single)]),
            "multi_over_single": summary([a / b for a, b in zip(multi, single)]),
            "control_single_b_over_single_a": summary([y / x for x, y in zip(single_a, control)]),
            "single_step_seconds": summary(single), "multi_step_seconds": summary(multi),
            "raw_seconds": {"single_a": single_a, "single_b": control, "multi": multi, "swap": swap},
            "swap_seconds_in_step": summary(swap),
            "apply_seconds_in_step": summary(slowest(m, "apply")),
            "restore_seconds_in_step": summary(slowest(m, "restore")),
            "standalone_apply_restore_seconds_by_K": {k: v for k, v in r0["standalone"].items()},
            "frozen_drift": sum(r[m]["frozen_drift"] for r in ranks),
            "languages_of_steps": r0["languages"],
        }
    a, b = per_model["A"], per_model["B"]
    k_a, k_b = (str(ranks[0]["K"][m]) for m in ("A", "B"))
    config = {"W": W, "zero_stage": 2, "precision": "fp32", "micro_batch_size": micro, "accumulation": 1,
              "seq_len": seq, "warmup_iterations": warmup, "repeats": iterations["A"],
              "repeats_model_B": iterations["B"], "standalone_repeats": repeats, "task_mask_density": task_density,
              "language_density": density, "languages": list(LANGUAGES), "policy": "proportional",
              "torch_threads_per_rank": ranks[0]["torch_threads"],
              "optimizer": "torch.optim.AdamW via ltsft_dist.engine.build_engine (lr 1e-4, wd 0.01)",
              "gradient_clipping": 1.0, "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]],
              "timing": "per iteration one multi-source step and two single-source steps (the second a control "
                        "for the noise floor) on one engine, rotating which goes first; barrier before each step; "
                        "slower rank per step; single-source time of an iteration = mean of its two"}
    swap_value = a["swap_over_step"]["median"]
    ms_value = a["multi_over_single"]["median"]
    fixed_k = {"A": a["swap_seconds_in_step"]["median"], "B": b["swap_seconds_in_step"]["median"]}
    return {
        "swap_over_step": {
            "value": swap_value, "target": "<= 0.02", "meets_target": swap_value <= 0.02,
            "definition": "median over iterations of (LanguageSwap apply + restore seconds inside a multi-source "
                          "phase-2 step, slower rank) / (single-source phase-2 step seconds), model A, language "
                          "density 5%",
            "config": {**config, "model": "A", "bert_config": MODELS["A"], "N_params": a["N_params"],
                       "N_language_body": a["N_language_body"], "K_per_language": a["K_per_language"]},
            "swap_seconds_fixed_K_in_step": fixed_k,
            "swap_seconds_fixed_K_ratio_B_over_A": fixed_k["B"] / fixed_k["A"],
            "N_ratio_B_over_A": b["N_params"] / a["N_params"],
            "swap_over_step_model_B_same_K": b["swap_over_step"]["median"],
            "standalone_apply_restore_median_seconds": {
                f"A_K={k_a}": a["standalone_apply_restore_seconds_by_K"][k_a]["median"],
                f"B_K={k_a}": b["standalone_apply_restore_seconds_by_K"][k_a]["median"],
                f"B_K={k_b}": b["standalone_apply_restore_seconds_by_K"][k_b]["median"]},
            "per_model": per_model, "wall_seconds": wall,
        },
        "multisource_step_over_single_source_step": {
            "value": ms_value, "target": "<= 1.03", "meets_target": ms_value <= 1.03,
            "definition": "median over iterations of (multi-source phase-2 step seconds: MultiSourceOrder + "
                          "LanguageSwap hook) / (single-source phase-2 step seconds: StepOrder, no hook), same "
                          "engine and shapes, model A, slower rank",
            "config": {**config, "model": "A", "bert_config": MODELS["A"], "N_params": a["N_params"],
                       "K_per_language": a["K_per_language"]},
            "ratio_of_medians": a["multi_step_seconds"]["median"] / a["single_step_seconds"]["median"],
            "noise_floor_single_b_over_single_a": a["control_single_b_over_single_a"]["median"],
            "model_B_same_K": b["multi_over_single"]["median"],
        },
    }


def lines(results: dict) -> list[str]:
    s, m = results.get("swap_over_step"), results.get("multisource_step_over_single_source_step")
    if not s:
        return []
    a, b = s["per_model"]["A"], s["per_model"]["B"]
    return [
        f"swap_over_step = {s['value']:.4f}  (target {s['target']}: {status(s)})",
        f"    W=2 ZeRO-2 fp32, model A N={a['N_params']:,}, K_L={next(iter(a['K_per_language'].values())):,} "
        f"({a['language_density']:.1%} of {a['N_language_body']:,} language-body elements); swap "
        f"{a['swap_seconds_in_step']['median'] * 1e3:.2f} ms (apply "
        f"{a['apply_seconds_in_step']['median'] * 1e3:.2f}, restore "
        f"{a['restore_seconds_in_step']['median'] * 1e3:.2f}) in a {a['single_step_seconds']['median'] * 1e3:.0f} ms "
        f"step (IQR of ratio [{a['swap_over_step']['p25']:.4f}, {a['swap_over_step']['p75']:.4f}])",
        f"    same K on model B N={b['N_params']:,} ({s['N_ratio_B_over_A']:.2f}x N): swap "
        f"{b['swap_seconds_in_step']['median'] * 1e3:.2f} ms (B/A {s['swap_seconds_fixed_K_ratio_B_over_A']:.2f}), "
        f"ratio to its {b['single_step_seconds']['median'] * 1e3:.0f} ms step {s['swap_over_step_model_B_same_K']:.4f}",
        "    standalone apply+restore: " + ", ".join(f"{k} {v * 1e3:.2f} ms"
                                                    for k, v in s["standalone_apply_restore_median_seconds"].items()),
        f"multisource_step_over_single_source_step = {m['value']:.4f}  (target {m['target']}: {status(m)})",
        f"    model A: single {a['single_step_seconds']['median'] * 1e3:.0f} ms, multi "
        f"{a['multi_step_seconds']['median'] * 1e3:.0f} ms, ratio of medians {m['ratio_of_medians']:.4f}, IQR of "
        f"paired ratios [{a['multi_over_single']['p25']:.4f}, {a['multi_over_single']['p75']:.4f}], noise floor "
        f"(single/single) {m['noise_floor_single_b_over_single_a']:.4f} IQR "
        f"[{a['control_single_b_over_single_a']['p25']:.4f}, {a['control_single_b_over_single_a']['p75']:.4f}]; "
        f"model B "
        f"{m['model_B_same_K']:.4f}; frozen drift {a['frozen_drift'] + b['frozen_drift']}",
    ]
