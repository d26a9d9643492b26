"""The transformers Trainer path (`LTSFTTrainer`) vs `ltsft train`'s recipe: the phase-2 step, W=2 ZeRO-2, fp32.

Both train the benchmark BERT (task SFT, K = 5 %) on the same data in the same order (the Trainer is given ltsft
`Examples`), with the same AdamW, schedule and clipping; the same core masks phase 2's gradients on both sides. A
run is 2 phase-1 steps and `steps` phase-2 steps; each side timestamps the start of every step (a `StepHook` in
the recipe, a `TrainerCallback` in the Trainer, both after the step's batch is fetched), and a run's value is the
median interval between consecutive phase-2 starts (forward + backward + masked step + whatever the loop adds).
Runs alternate (which goes first alternates too) after one warm-up pair; value = median over the Trainer's runs /
median over the recipe's. Per run the slower rank counts (a step is collective).
"""

from __future__ import annotations

import os
import tempfile
import time

from _common import BERT, build_bert, ds_config, status, summary

KEYS = ("hf_trainer_step_over_ltsft_step",)
PHASE1 = 2


def _recipe_run(model, examples, config, micro: int, world: int) -> list[float]:
    from ltsft_dist.hooks import StepHook
    from ltsft_dist.recipe import LTSFTRecipe

    starts: list[float] = []
    recipe = LTSFTRecipe(model, examples, config, ds_config(2, micro, world), show_progress=False)

    class Clock(StepHook):
        def before_step(self, step: int) -> None:
            if recipe.selected is not None:  # phase 2
                starts.append(time.perf_counter())

    recipe.step_hooks.append(Clock())
    recipe.run()
    return starts


def _trainer_run(model, examples, config, micro: int, out: str) -> list[float]:
    from accelerate.state import AcceleratorState
    from transformers import TrainerCallback, TrainingArguments

    from ltsft_dist.config import PACKAGE_DS_CONFIGS
    from ltsft_dist.engine import read_ds_config
    from ltsft_dist.integrations.hf import LTSFTArguments, LTSFTTrainer, join_process_group

    AcceleratorState._reset_state()
    join_process_group()
    starts: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step >= PHASE1:
                starts.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=out, deepspeed=read_ds_config(PACKAGE_DS_CONFIGS / "zero2.json"), per_device_train_batch_size=micro,
        learning_rate=config.phase1.lr, weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
        seed=config.seed, max_steps=config.phase1.steps + config.phase2.steps, save_strategy="no", report_to=[],
        logging_steps=10 ** 6, disable_tqdm=True, average_tokens_across_devices=False,
        accelerator_config={"use_configured_state": True})
    ltsft = LTSFTArguments(sft_kind="task", density=config.density, phase1_steps=config.phase1.steps,
                           phase2_steps=config.phase2.steps)
    LTSFTTrainer(model=model, args=args, train_dataset=examples, ltsft_args=ltsft, callbacks=[Clock()]).train()
    return starts


def worker(steps: int, repeats: int, micro: int, seq: int, density: float) -> dict:
    import statistics

    import torch

    from ltsft_dist import comm
    from ltsft_dist.config import PhaseConfig, TrainConfig
    from ltsft_dist.data import Examples

    world = comm.world_size()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, BERT["vocab_size"], (micro * world * (steps + PHASE1), seq), generator=g)
    examples = Examples({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 1] % 2})
    medians = {"ltsft": [], "hf": []}
    for rep in range(repeats + 1):  # the first pair warms up
        for kind in (("ltsft", "hf") if rep % 2 else ("hf", "ltsft")):
            model, _ = build_bert(seed=0)
            out = comm.broadcast_object(tempfile.mkdtemp(prefix="bench-hf-") if comm.rank() == 0 else None)
            config = TrainConfig(kind="task", density=density, output_dir=out, resume=False,
                                 phase1=PhaseConfig(steps=PHASE1, lr=1e-4), phase2=PhaseConfig(steps=steps, lr=1e-4),
                                 batch_size=micro * world, micro_batch_size=micro, weight_decay=0.01,
                                 max_grad_norm=1.0).complete()
            starts = (_recipe_run(model, examples, config, micro, world) if kind == "ltsft"
                      else _trainer_run(model, examples, config, micro, out))
            step = statistics.median(b - a for a, b in zip(starts, starts[1:]))
            slowest = max(comm.all_gather_object(step))
            if rep:
                medians[kind].append(slowest)
    return {"medians": medians, "torch_threads": torch.get_num_threads(),
            "n_params": sum(p.numel() for p in model.parameters())}


def run(quick: bool) -> dict:
    from _launch import run_ranks

    steps, repeats, micro, seq, density = (6, 1, 8, 64, 0.05) if quick else (20, 3, 8, 64, 0.05)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = run_ranks(worker, 2, steps, repeats, micro, seq, density, threads=1, deepspeed=True, timeout=1800)[0]
    hf, ours = r["medians"]["hf"], r["medians"]["ltsft"]
    value = summary(hf)["median"] / summary(ours)["median"]
    return {KEYS[0]: {
        "value": value, "target": "<= 1.05", "meets_target": value <= 1.05,
        "definition": "median phase-2 step time of LTSFTTrainer (transformers Trainer on its own DeepSpeed engine) / "
                      "the same of ltsft train's LTSFTRecipe; same model, data order, AdamW, schedule, clipping, K",
        "config": {"model": "BertForSequenceClassification", "bert_config": BERT, "N_params": r["n_params"], "W": 2,
                   "zero_stage": 2, "kind": "task", "density": density, "phase1_steps": PHASE1,
                   "phase2_steps": steps, "micro_batch_size": micro, "seq_len": seq, "repeats": repeats,
                   "threads": r["torch_threads"], "loadavg_1m_before": load,
                   "order": "the two alternate (which goes first alternates too), one warm-up pair"},
        "hf_step_seconds": summary(hf), "ltsft_step_seconds": summary(ours),
        "raw": {"hf_step_seconds": hf, "ltsft_step_seconds": ours},
        "wall_seconds": time.perf_counter() - t0,
    }}


def lines(results: dict) -> list[str]:
    if KEYS[0] not in results:
        return []
    r = results[KEYS[0]]
    c, hf, ours = r["config"], r["hf_step_seconds"]["median"], r["ltsft_step_seconds"]["median"]
    where = f"W={c['W']} ZeRO-{c['zero_stage']} N={c['N_params']:,}, {c['phase2_steps']} phase-2 steps"
    return [f"{KEYS[0]} = {r['value']:.3f}  ({status(r)})",
            f"    {where} of {c['micro_batch_size']}x{c['seq_len']} per rank, repeats={c['repeats']}: Trainer "
            f"{hf * 1e3:.1f} ms vs ltsft {ours * 1e3:.1f} ms"]
