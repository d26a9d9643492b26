"""The short benchmark of bench/gpu_check, on one GPU (rank 0 of a 1-rank NCCL group); prints one JSON object.

- `phase2_step_over_dense_step`: a phase-2 training step (forward, backward, masked gradients, step with the
  projection onto θ⁰) / a plain DeepSpeed step, BERT-base shape (110 M parameters), ZeRO-2 fp32, batch 16 × 128,
  the two engines stepped alternately on the same batch; medians, with `torch.cuda.synchronize()` around each.
- `topk_over_torch_topk_1e8`, `..._1e9`: `select_topk` (the library's, its histograms on the GPU) / `torch.topk` on
  the same device tensor, K = 5 %; checked: exactly K selected, the threshold equals torch.topk's K-th value, and
  everything above it selected (a mismatch is reported, and fails bench/gpu_check).
- `swap_over_step`: the language swap (apply + restore, K_L = 5 % of the body) / the phase-2 step.
- `control_allreduce_us`: one control all-reduce through `comm` (a CPU tensor of 3 int32: to the GPU, NCCL, back).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512)
DENSITY = 0.05


def _timed(fn, repeats: int) -> list[float]:
    import torch

    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def bench_step(iterations: int) -> dict:
    import torch

    from _common import build_bert, ds_config, phase2_engine, random_language_sfts
    from ltsft_dist.devices import engine_device, to_device
    from ltsft_dist.engine import build_engine
    from ltsft_dist.swap import LanguageSwap

    model, eligibility = build_bert(seed=0, config=BERT_BASE)
    dense = build_engine(model, ds_config(2, 16, 1), lr=1e-4, weight_decay=0.01)
    masked_model, masked_eligibility = build_bert(seed=0, config=BERT_BASE)
    sfts = random_language_sfts(masked_model, round(DENSITY * sum(
        p.numel() for n, p in masked_model.named_parameters() if n.startswith("bert."))), ["de"], seed=1)
    swap = LanguageSwap(masked_model, sfts, lambda step: "de")
    engine, shards, mask, _ = phase2_engine(masked_model, masked_eligibility, 16, 1, DENSITY, stage=2)
    g = torch.Generator().manual_seed(0)
    batch = to_device({"input_ids": torch.randint(0, 30522, (16, 128), generator=g),
                       "attention_mask": torch.ones(16, 128, dtype=torch.long),
                       "labels": torch.randint(0, 2, (16,), generator=g)}, engine_device(engine))

    def dense_step():
        dense.backward(dense(**batch).loss)
        dense.step()

    def masked_step():
        engine.backward(engine(**batch).loss)
        mask.mask_gradients(shards.grads())
        engine.step()

    def swap_only():
        swap.before_step(0)
        swap.before_optimizer_step(0)

    for _ in range(3):  # warm-up: kernels, allocator, optimizer state
        dense_step(), masked_step(), swap_only()
    ratios, masked_times, swaps = [], [], []
    for _ in range(iterations):
        d1, = _timed(dense_step, 1)
        m, = _timed(masked_step, 1)
        d2, = _timed(dense_step, 1)
        ratios.append(m / ((d1 + d2) / 2))
        masked_times.append(m)
        swaps += _timed(swap_only, 1)
    step = statistics.median(masked_times)
    return {"phase2_step_over_dense_step": statistics.median(ratios), "phase2_step_seconds": step,
            "swap_seconds": statistics.median(swaps), "swap_over_step": statistics.median(swaps) / step,
            "parameters": sum(p.numel() for p in model.parameters())}


def bench_topk(n: int, repeats: int) -> tuple[dict, list[str]]:
    import torch

    from ltsft_dist import comm
    from ltsft_dist.topk import select_topk

    k = round(DENSITY * n)
    g = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.rand(n, device="cuda", generator=g)
    fragment = 1 << 24  # parameters of ~16 M elements, as a model's largest matrices
    parts = list(torch.split(scores, fragment))
    keys = [(i, 0) for i in range(len(parts))]
    ours = lambda: select_topk(parts, keys, k, comm.all_reduce, comm.all_gather_object)  # noqa: E731
    result = ours()
    kth = torch.topk(scores, k, sorted=False).values.min().item()
    selected = sum(int(m.sum()) for m in result.masks)
    above = int((scores > result.threshold).sum())
    selected_above = sum(int((m & (s > result.threshold)).sum()) for m, s in zip(result.masks, parts))
    mismatches = []
    if selected != k:
        mismatches.append(f"topk n={n}: selected {selected}, K={k}")
    if result.threshold != kth:
        mismatches.append(f"topk n={n}: threshold {result.threshold!r}, torch.topk's K-th value {kth!r}")
    if selected_above != above:
        mismatches.append(f"topk n={n}: {above - selected_above} elements above the threshold not selected")
    del result
    ours_s = statistics.median(_timed(ours, repeats))
    torch_s = statistics.median(_timed(lambda: torch.topk(scores, k, sorted=False), repeats))
    return {"n": n, "k": k, "ours_seconds": ours_s, "torch_topk_seconds": torch_s, "ratio": ours_s / torch_s}, mismatches


def bench_control_allreduce(repeats: int) -> float:
    """Microseconds of `comm.all_reduce` on a CPU control tensor under NCCL (the multi-rank path, taken in a
    1-rank group: host-to-device copy, the NCCL all-reduce, device-to-host copy)."""
    import torch

    from ltsft_dist import comm

    real_world_size = comm.world_size
    comm.world_size = lambda: 2
    try:
        flags = torch.zeros(3, dtype=torch.int32)
        for _ in range(10):
            comm.all_reduce(flags)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            comm.all_reduce(flags)
            times.append(time.perf_counter() - t)
    finally:
        comm.world_size = real_world_size
    return statistics.median(times) * 1e6


def main(quick: bool) -> dict:
    import deepspeed
    import torch

    from ltsft_dist.engine import init_distributed

    init_distributed()
    out = {"machine": {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                       "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__},
           "mismatches": []}
    out["control_allreduce_us"] = bench_control_allreduce(200)
    out.update(bench_step(5 if quick else 20))
    out["topk"] = {}
    for n in (10 ** 8,) if quick else (10 ** 8, 10 ** 9):
        out["topk"][f"{n:.0e}"], bad = bench_topk(n, 3)
        out[f"topk_over_torch_topk_{n:.0e}".replace("+", "")] = out["topk"][f"{n:.0e}"]["ratio"]
        out["mismatches"] += bad
        torch.cuda.empty_cache()
    out["decoder_tokens_per_s"] = "not measured: no decoder model in this version"
    return out


if __name__ == "__main__":
    print(json.dumps(main(quick="--quick" in sys.argv)))
