"""LT-SFT of a ~0.47B-parameter Llama-shaped decoder at W=2, ZeRO-3, against plain DeepSpeed ZeRO-3 dense training
of the same model loaded the same way (a checkpoint on disk, loaded straight into the partitions).

The model is random (no download): hidden 1024, 24 layers, 16 heads, MLP 4096, vocabulary 32,000, untied output
head; it is saved once and every run loads it with `models.build_model` under the run's ZeRO-3 config, as
`ltsft train` does. LT-SFT is a language SFT (task clm: norms and the output head frozen) with K = 5 % of the
eligible elements and the paper's L1 pull for language SFTs (λ = 0.1); the dense baseline trains every parameter
with the same AdamW, batch and sequence length. Each configuration runs in fresh processes, one thread per rank,
so the high-water marks (VmHWM at the end of the run) are the runs' own. Keys:
- llm_params: the model's parameters;
- llm_peak_rss_per_rank_over_dense_zero3: the largest rank's peak RSS, LT-SFT / dense (target ≤ 1.10: LT-SFT's
  extra is θ⁰'s shard and the mask);
- llm_phase2_step_over_dense_step: the median phase-2 step time / the median dense step time (target ≤ 1.05); a
  step is forward, backward and optimizer step (with LT-SFT's masking, pull and projection), timed on every rank
  from the step's start to its end (not the logging or the end of the run after it); each run's first step is
  left out (warm-up);
- llm_select_seconds: the collective top-K over every eligible element (reported);
- zero3_peak_rss_per_rank_W2_over_W1: the LT-SFT run's largest rank's peak RSS at W=2 / at W=1 (target ≤ 0.60:
  partitioned loading and ZeRO-3 halve what a rank holds).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from _common import status, summary

FULL_RUN_ONLY = True  # --quick skips it unless named
KEYS = ("llm_params", "llm_peak_rss_per_rank_over_dense_zero3", "llm_phase2_step_over_dense_step",
        "llm_select_seconds", "zero3_peak_rss_per_rank_W2_over_W1")
SHAPE = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
             num_key_value_heads=16, intermediate_size=4096, max_position_embeddings=512, tie_word_embeddings=False)
QUICK_SHAPE = dict(SHAPE, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=1024, vocab_size=8000)


def save_model(directory: str, shape: dict) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def _peak_rss_bytes() -> int:
    from _common import _status_kib

    return _status_kib("VmHWM") * 1024


# DeepSpeed's default buckets (5e8 elements for the gradient reduction: 2 GB in fp32) are sized for GPUs; on a
# 24 GiB host running two ranks they are what runs out. Both runs use these smaller ones.
BUCKETS = dict(reduce_bucket_size=int(5e7), stage3_prefetch_bucket_size=int(5e7), stage3_max_live_parameters=int(1e8))


def _ds_config(config, world: int) -> dict:
    from ltsft_dist.engine import ds_config_for

    ds = ds_config_for(config, world)
    ds["zero_optimization"].update(BUCKETS)
    return ds


L1 = 0.1  # the paper's λ for language SFTs


def _config(directory: str, steps: int, seq: int, world: int):
    from ltsft_dist.config import ModelConfig, PhaseConfig, TrainConfig

    config = TrainConfig(kind="language", task="clm", languages=["xx"], density=0.05, resume=False,
                         output_dir=tempfile.mkdtemp(prefix="ltsft-bench-llm-"), deepspeed="zero3.json",
                         batch_size=world, micro_batch_size=1, weight_decay=0.0, max_grad_norm=1.0,
                         phase1=PhaseConfig(steps=steps, lr=1e-5, l1=L1),
                         phase2=PhaseConfig(steps=steps, lr=1e-5, l1=L1),
                         model=ModelConfig(name_or_path=directory, architecture="llama"))
    config.data.max_seq_length = seq
    config.validate()
    return config.complete()


def _examples(vocab: int, seq: int, n: int):
    import torch

    from ltsft_dist.tasks.clm import causal_examples

    ids = torch.randint(4, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    return causal_examples(ids)


def ltsft_worker(directory: str, steps: int, seq: int, vocab: int) -> dict:
    """LT-SFT (phase 1, selection, phase 2) through the library, timing every step."""
    from ltsft_dist import comm
    from ltsft_dist.hooks import StepHook
    from ltsft_dist.models import build_model
    from ltsft_dist.recipe import LTSFTRecipe

    world = comm.world_size()
    config = _config(directory, steps, seq, world)
    ds = _ds_config(config, world)
    model = build_model(config.model, "clm", ds_config=ds)
    recipe = LTSFTRecipe(model, _examples(vocab, seq, 4 * world * steps), config, ds, show_progress=False)
    phase2 = []

    class Clock(StepHook):
        """From the step's start (before its first forward) to its end (after the optimizer step)."""

        def before_step(self, step):
            self.start = time.perf_counter()

        def restore(self):
            if recipe.selected is not None:
                phase2.append(time.perf_counter() - self.start)

    recipe.step_hooks.append(Clock())
    recipe.run()
    shutil.rmtree(config.output_dir, ignore_errors=True)
    return {"peak_rss": _peak_rss_bytes(), "phase2_step_seconds": phase2[1:],  # the first plans the mask
            "select_seconds": recipe.stats.seconds.get("select"), "k": recipe.stats.k,
            "n_eligible": recipe.stats.n_eligible}


def dense_worker(directory: str, steps: int, seq: int, vocab: int) -> dict:
    """Plain DeepSpeed ZeRO-3: every parameter trained, the same model, optimizer, batch and loading."""
    from ltsft_dist import comm
    from ltsft_dist.engine import build_engine
    from ltsft_dist.models import build_model

    world = comm.world_size()
    config = _config(directory, steps, seq, world)
    ds = _ds_config(config, world)
    model = build_model(config.model, "clm", ds_config=ds)
    engine = build_engine(model, ds, lr=1e-5, weight_decay=0.0)
    examples = _examples(vocab, seq, 4 * world * steps).tensors
    times = []
    for step in range(steps + 1):
        row = step * world + comm.rank()
        batch = {k: t[row:row + 1] for k, t in examples.items()}
        start = time.perf_counter()
        engine.backward(engine(**batch).loss)
        engine.step()
        times.append(time.perf_counter() - start)
    shutil.rmtree(config.output_dir, ignore_errors=True)
    return {"peak_rss": _peak_rss_bytes(), "step_seconds": times[1:]}


# glibc raises its mmap threshold as large blocks are freed, after which freed gigabyte-sized temporaries (loading,
# AdamW's sqrt/divide) stay in the heap: measured at 91M parameters, W=2, dense ZeRO-3, a rank's peak RSS is 2.55 GB
# with the default and 2.09 GB with a fixed 128 KiB threshold. Both runs start with it (the ranks inherit it).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def run(quick: bool) -> dict:
    from _launch import run_ranks

    shape, steps, seq = (QUICK_SHAPE, 3, 32) if quick else (SHAPE, 6, 32)
    w1_steps = 2  # the W=1 run is for its peak RSS only
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    directory = tempfile.mkdtemp(prefix="ltsft-bench-llm-model-")
    saved_env = {k: os.environ.get(k) for k in MALLOC_ENV}
    os.environ.update(MALLOC_ENV)  # inherited by the ranks launched here, and restored after them
    try:
        (n_params,) = run_ranks(save_model, 1, directory, shape, timeout=3600)
        args = (directory, steps, seq, shape["vocab_size"])
        dense = run_ranks(dense_worker, 2, *args, deepspeed=True, timeout=7200)
        ltsft = run_ranks(ltsft_worker, 2, *args, deepspeed=True, timeout=7200)
        ltsft_w1 = run_ranks(ltsft_worker, 1, directory, w1_steps, seq, shape["vocab_size"], deepspeed=True,
                             timeout=7200)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    peak = {name: max(r["peak_rss"] for r in runs) for name, runs in
            (("dense_w2", dense), ("ltsft_w2", ltsft), ("ltsft_w1", ltsft_w1))}
    phase2 = [t for r in ltsft for t in r["phase2_step_seconds"]]
    dense_steps = [t for r in dense for t in r["step_seconds"]]
    config = {"shape": shape, "W": 2, "zero_stage": 3, "task": "clm (language SFT)", "density": 0.05,
              "K": ltsft[0]["k"], "n_eligible": ltsft[0]["n_eligible"], "l1": L1, "steps_per_phase": steps,
              "steps_per_phase_w1": w1_steps, "seq_len": seq,
              "micro_batch_size": 1, "threads_per_rank": 1, "loadavg_1m_before": load, "environment": MALLOC_ENV,
              "loading": "save_pretrained once; every run: models.build_model(name_or_path, ds_config=ZeRO-3)"}
    gib = 2 ** 30
    rss = {k: v / gib for k, v in peak.items()}
    rss_ratio = peak["ltsft_w2"] / peak["dense_w2"]
    step_ratio = summary(phase2)["median"] / summary(dense_steps)["median"]
    w_ratio = peak["ltsft_w2"] / peak["ltsft_w1"]
    common = {"config": config, "peak_rss_gib": rss, "wall_seconds": time.perf_counter() - t0}
    return {
        "llm_params": {"value": n_params, "target": ">= 4.5e8", "meets_target": n_params >= 4.5e8, **common},
        "llm_peak_rss_per_rank_over_dense_zero3": {
            "value": rss_ratio, "target": "<= 1.10", "meets_target": rss_ratio <= 1.10,
            "definition": "largest rank's VmHWM at the end of LT-SFT (phase 1 + select + phase 2) / of dense "
                          "DeepSpeed ZeRO-3 training, W=2, same model loaded the same way", **common},
        "llm_phase2_step_over_dense_step": {
            "value": step_ratio, "target": "<= 1.05", "meets_target": step_ratio <= 1.05,
            "definition": "median phase-2 step (forward, backward, masked step) / median dense step, W=2 ZeRO-3",
            "phase2_step_seconds": summary(phase2), "dense_step_seconds": summary(dense_steps), **common},
        "llm_select_seconds": {"value": ltsft[0]["select_seconds"], "target": "report", "meets_target": None,
                               "definition": "the collective top-K over every eligible element, W=2", **common},
        "zero3_peak_rss_per_rank_W2_over_W1": {
            "value": w_ratio, "target": "<= 0.60", "meets_target": w_ratio <= 0.60,
            "definition": "LT-SFT's largest rank's VmHWM at W=2 / at W=1, ZeRO-3, the same model", **common},
    }


def lines(results: dict) -> list[str]:
    out = []
    for key in KEYS:
        r = results.get(key)
        if r:
            value = f"{r['value']:,}" if key == "llm_params" else f"{r['value']:.3f}"
            out.append(f"{key} = {value}  ({status(r)})")
    r = results.get(KEYS[1])
    if r:
        out.append("    peak RSS per rank (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in r["peak_rss_gib"].items()))
    return out
