"""A peer method: MAD-X-style adapters (AdapterHub `adapters`) against our composed SFTs and phase-2 step.

`adapters` 1.3.0 pins transformers ~= 4.57, so the peer runs in its own venv, bench/.venv-adapters, created on
first use (`bench/run --only adapters`): `python -m venv`, then exactly the running torch build (e.g.
`torch==2.13.0+cpu`, so pip can never substitute a CUDA build), then `adapters==1.3.0` with torch pinned by a
constraint. The peer process (`adapters_peer.py`) is driven line by line from our W=1 rank, so every repetition
runs, back to back and in a rotating order: our phase-2 training step, the peer's training step, our base and
composed models' inference, the peer's base and adapter-stack inference (each inference pair as warm-up, base,
other, other, base: `adapters_peer.infer_pair`, so neither model always meets the caches another process left
cold). One thread each; medians of paired ratios.

- `composed_inference_over_base`: the base with a language SFT and a task SFT applied (5 % each) is a plain dense
  model: its forward latency over the base's, same process. Target ≤ 1.02.
- `adapters_inference_over_base`: `Stack("lang", "task")` over the same base, in the peer process. Diagnostic.
- `adapters_step_over_phase2_step`: the peer's task-adapter training step (forward, backward, clipping, AdamW)
  over our phase-2 step (W=1, ZeRO-2, K = 5 %, mask + projection), each timed in its own process. Diagnostic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import BERT, build_bert, language_body, median, random_language_sfts, status, summary

KEYS = ("composed_inference_over_base", "adapters_inference_over_base", "adapters_step_over_phase2_step")
FULL_RUN_ONLY = True  # --quick skips it: the first run installs the peer's venv
HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-adapters"
ADAPTERS = "adapters==1.3.0"
TRAIN_BATCH, INFER_BATCH, SEQ = 8, 1, 64


def ensure_venv() -> Path:
    """The peer's interpreter, creating the venv first if it does not hold `adapters` yet."""
    import torch

    python = VENV / "bin" / "python"
    check = [str(python), "-c", "import adapters, torch; print(adapters.__version__, torch.__version__)"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"[bench] creating {VENV} (torch=={torch.__version__}, {ADAPTERS}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, f"torch=={torch.__version__}"], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        constraints.write(f"torch=={torch.__version__}\n")
        constraints.flush()
        subprocess.run([*pip, "-c", constraints.name, ADAPTERS], check=True)
    subprocess.run(check, check=True)
    return python


def worker(python: str, warmup: int, repeats: int) -> dict:
    import torch

    from _common import phase2_engine
    from adapters_peer import infer_pair

    peer = subprocess.Popen([python, str(HERE / "adapters_peer.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))

    def ask(cmd: dict, answer: bool = True) -> dict | None:
        peer.stdin.write(json.dumps(cmd) + "\n")
        peer.stdin.flush()
        if not answer:
            return None
        line = peer.stdout.readline()
        if not line:
            raise RuntimeError(f"the adapters peer exited (status {peer.wait()}); its error is above")
        return json.loads(line)

    try:
        info = ask({"bert_config": BERT, "train_batch": TRAIN_BATCH, "infer_batch": INFER_BATCH, "seq_len": SEQ})
        model, eligibility = build_bert(seed=0)
        engine, shards, mask, k = phase2_engine(model, eligibility, TRAIN_BATCH, 1)
        base = build_bert(seed=0)[0].eval()
        composed = build_bert(seed=0)[0].eval()
        body = sum(language_body(composed).values())
        sfts = random_language_sfts(composed, round(0.05 * body), ("lang", "task"), seed=1)
        for sft in sfts.values():  # θ⁰ + φ_L + φ_T: composition by summation
            sft.apply(composed)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(5, BERT["vocab_size"], (TRAIN_BATCH, SEQ), generator=g)
        train = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 1] % 2}
        infer = {"input_ids": ids[:INFER_BATCH], "attention_mask": torch.ones_like(ids[:INFER_BATCH])}

        def our_step():
            t = time.perf_counter()
            engine.backward(engine(**train).loss)
            mask.mask_gradients(shards.grads())
            engine.step()
            return time.perf_counter() - t

        tasks = {"ours_step": lambda: {"ours_step": our_step()},
                 "peer_step": lambda: {"peer_step": ask({"op": "train_step"})["seconds"]},
                 "ours_infer": lambda: {f"ours_{k}": v for k, v in infer_pair(base, composed, infer).items()},
                 "peer_infer": lambda: {f"peer_{k}": v for k, v in ask({"op": "infer"}).items()}}
        names = list(tasks)
        times = {}
        for rep in range(warmup + repeats):
            for j in range(len(names)):
                for name, t in tasks[names[(rep + j) % len(names)]]().items():
                    if rep >= warmup:
                        times.setdefault(name, []).append(t)
        ask({"op": "quit"}, answer=False)
    finally:
        if peer.poll() is None:
            peer.stdin.close()
            try:
                peer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                peer.kill()
    return {"times": times, "peer": info, "K": k, "N": sum(p.numel() for p in base.parameters()),
            "K_sfts": {n: s.nnz for n, s in sfts.items()}, "threads": torch.get_num_threads()}


def run(quick: bool) -> dict:
    from _launch import run_ranks

    python = ensure_venv()
    warmup, repeats = (2, 10) if quick else (3, 40)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    (r,) = run_ranks(worker, 1, str(python), warmup, repeats, threads=1, deepspeed=True, timeout=1800)
    t = r["times"]

    def ratio(a, b):
        return median([x / y for x, y in zip(t[a], t[b])])

    config = {"bert_config": BERT, "N_base": r["N"], "peer": r["peer"], "threads": r["threads"],
              "train_batch": TRAIN_BATCH, "infer_batch": INFER_BATCH, "seq_len": SEQ, "warmup": warmup,
              "repeats": repeats, "loadavg_1m_before": load,
              "madx": "language adapter SeqBnInvConfig(reduction_factor=2) + task adapter SeqBnConfig("
                      "reduction_factor=16), active Stack('lang', 'task'), train_adapter('task') + classifier",
              "ours": {"phase2": "W=1 ZeRO-2 fp32, AdamW lr 1e-4 wd 0.01, clipping 1.0", "K_task_mask": r["K"],
                       "composed_sfts_nnz": r["K_sfts"]},
              "order": "each repetition runs the four tasks (our step, peer step, our inference pair, peer inference pair) back to back, rotating which goes first; an inference pair is warm-up, base, other, other, base"}
    seconds = {n: summary(v) for n, v in t.items()}
    common = {"config": config, "seconds": seconds, "raw_seconds": t, "wall_seconds": time.perf_counter() - t0}
    composed = ratio("ours_other", "ours_base")
    return {
        "composed_inference_over_base": {
            "value": composed, "target": "<= 1.02", "meets_target": composed <= 1.02,
            "definition": "median over repetitions of forward latency (inference_mode, batch 1 x 64) of the base "
                          "with a language and a task SFT applied / of the base, same process", **common},
        "adapters_inference_over_base": {
            "value": ratio("peer_other", "peer_base"), "target": "diagnostic (the peer)", "meets_target": None,
            "definition": "median over repetitions of forward latency of the base with the MAD-X stack / of the "
                          "plain base, both in the peer process (transformers 4.57, adapters 1.3.0)", **common},
        "adapters_step_over_phase2_step": {
            "value": ratio("peer_step", "ours_step"), "target": "diagnostic (the peer)", "meets_target": None,
            "definition": "median over repetitions of the peer's task-adapter training step / our phase-2 step "
                          "(batch 8 x 64 each), timed back to back in their own processes", **common},
    }


def lines(results: dict) -> list[str]:
    c = results.get("composed_inference_over_base")
    if not c:
        return []
    a, s, sec = results["adapters_inference_over_base"], results["adapters_step_over_phase2_step"], c["seconds"]
    ms = {n: v["median"] * 1e3 for n, v in sec.items()}
    p = c["config"]["peer"]
    return [
        f"composed_inference_over_base = {c['value']:.3f}  (target {c['target']}: {status(c)})",
        f"    batch {INFER_BATCH}x{SEQ}: base {ms['ours_base']:.2f} ms, base + language SFT + task SFT "
        f"{ms['ours_other']:.2f} ms",
        f"adapters_inference_over_base = {a['value']:.3f}  (diagnostic; adapters {p['adapters']}, transformers "
        f"{p['transformers']})",
        f"    peer base {ms['peer_base']:.2f} ms, Stack(lang, task) {ms['peer_other']:.2f} ms "
        f"({p['N_with_adapters'] - p['N_base']:,} adapter parameters)",
        f"adapters_step_over_phase2_step = {s['value']:.3f}  (diagnostic)",
        f"    batch {TRAIN_BATCH}x{SEQ}: peer task-adapter step {ms['peer_step']:.0f} ms ({p['N_trainable']:,} "
        f"trainable), our phase-2 step {ms['ours_step']:.0f} ms (W=1, K={c['config']['ours']['K_task_mask']:,})",
    ]
