"""Language-SFT data at scale: a generated text corpus prepared (tokenised into the token cache) and trained on
for a few steps at W=2, against the same run on a tiny corpus.

Two launches of `ltsft_dist.training.TrainingRun` (task mlm, packed, 5% held out, ZeRO-2, the benchmark BERT with a
WordPiece tokenizer trained on a sample), each in fresh processes: one on a tiny corpus (the baseline: the model,
DeepSpeed and the process's own footprint) and one on the big corpus. Per rank, the peak RSS (VmHWM, reset via
clear_refs) of `setup()` (which reads and tokenises the text: rank 0 builds the cache, rank 1 waits and maps it)
and of `train()` (a few phase-1 and phase-2 steps and the held-out evaluation); `data_prep_peak_rss_gb` is the
largest big-minus-baseline difference over ranks and both parts. `data_prep_tokens_per_s`: tokens of the corpus
over the cache build's seconds (rank 0). `data_tokens_used_fraction`: tokens in rows over tokens in the text (train
and held out), from the run's stats. The corpus (deterministic: seeded Zipfian pseudo-words, sentence lines and
long article lines) is generated into a temp directory and deleted after; its size is `LTSFT_BENCH_DATA_MB`
(default 256; the target is stated for 1024, which takes 20-35 min of tokenising on 2 loaded cores) and is
recorded as `data_corpus_bytes`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import BERT, status

KEYS = ("data_prep_peak_rss_gb", "data_prep_tokens_per_s", "data_tokens_used_fraction")
ONLY_WHEN_NAMED = True  # bench/run runs it only when named in --only (minutes of tokenising)
RSS_TARGET_GB = 1.5
STEPS = 3  # per phase
GB = 1024 ** 3


def write_corpus(path: Path, target_bytes: int, seed: int = 0) -> int:
    """Seeded text: lines of 5-60 pseudo-words (sentences) and, one in 50, of 500-5000 (whole articles)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyzäöüß"))
    vocab = np.array(["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(20000)])
    written = 0
    with path.open("w", encoding="utf-8") as f:
        while written < target_bytes:
            lengths = np.where(rng.random(2000) < 0.02, rng.integers(500, 5000, 2000), rng.integers(5, 60, 2000))
            words = vocab[(rng.zipf(1.2, size=int(lengths.sum())) - 1) % len(vocab)]
            text = "\n".join(" ".join(line) for line in np.split(words, np.cumsum(lengths)[:-1])) + "\n"
            f.write(text)
            written += len(text.encode("utf-8"))
    return written


def worker(corpus: str, tokenizer_dir: str, out_dir: str) -> dict:
    from _common import PeakMemory

    from ltsft_dist import token_cache
    from ltsft_dist.config import DataConfig, ModelConfig, PhaseConfig, TrainConfig
    from ltsft_dist.training import TrainingRun

    build_seconds = []
    real_build = token_cache.build

    def timed_build(*args):
        start = time.perf_counter()
        real_build(*args)
        build_seconds.append(time.perf_counter() - start)

    token_cache.build = timed_build
    config = TrainConfig(kind="language", task="mlm", languages=["xx"], output_dir=out_dir, density=0.05, batch_size=8,
                         micro_batch_size=4, model=ModelConfig(tiny=dict(BERT), tokenizer=tokenizer_dir),
                         data=DataConfig(train_file=corpus, max_seq_length=BERT["max_position_embeddings"],
                                         eval_fraction=0.05),
                         phase1=PhaseConfig(steps=STEPS, lr=1e-4), phase2=PhaseConfig(steps=STEPS, lr=1e-4),
                         log_every=STEPS, resume=False)
    run = TrainingRun(config, show_progress=False, handle_signals=False)
    try:
        with PeakMemory() as prep:
            run.setup()
        with PeakMemory() as training:
            result = run.train()
    finally:
        run.cleanup()
    return {"prep_peak_bytes": prep.rss_before + prep.extra_bytes, "prep_rss_before": prep.rss_before,
            "train_peak_bytes": training.rss_before + training.extra_bytes, "method": prep.method,
            "build_seconds": build_seconds, "data": result.stats.data}


def run(quick: bool) -> dict:
    from _launch import run_ranks

    from ltsft_dist.data import train_wordpiece

    megabytes = int(os.environ.get("LTSFT_BENCH_DATA_MB", "16" if quick else "256"))
    root = Path(tempfile.mkdtemp(prefix="ltsft-bench-data-"))
    try:
        t0 = time.perf_counter()
        big, tiny = root / "big.txt", root / "tiny.txt"
        corpus_bytes = write_corpus(big, megabytes * 2 ** 20)
        write_corpus(tiny, 200_000, seed=1)
        generate_seconds = time.perf_counter() - t0
        with tiny.open(encoding="utf-8") as f:
            sample = [next(f) for _ in range(2000)]
        train_wordpiece(sample, BERT["vocab_size"]).save_pretrained(str(root / "tokenizer"))
        runs = {}
        for name, corpus in (("baseline", tiny), ("big", big)):
            runs[name] = run_ranks(worker, 2, str(corpus), str(root / "tokenizer"), str(root / name / "run"),
                                   threads=1, deepspeed=True, timeout=7200)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    extra = {part: [(b[f"{part}_peak_bytes"] - a[f"{part}_peak_bytes"]) / GB for a, b in zip(runs["baseline"],
                                                                                              runs["big"])]
             for part in ("prep", "train")}
    worst = max(max(v) for v in extra.values())
    report = runs["big"][0]["data"]["xx"]
    tokens = report["tokens"] + report["held_out_tokens"]
    used = report["tokens_used"] + report["held_out_tokens_used"]
    seconds = sum(runs["big"][0]["build_seconds"])
    config = {"W": 2, "corpus_bytes": corpus_bytes, "max_seq_length": BERT["max_position_embeddings"],
              "packed": True, "eval_fraction": 0.05, "steps_per_phase": STEPS, "model": "tiny BERT", "bert": BERT}
    return {
        "data_prep_peak_rss_gb": {
            "value": worst, "target": f"≤ {RSS_TARGET_GB} GB above the model's own", "meets_target":
            worst <= RSS_TARGET_GB, "unit": "GiB",
            "definition": "max over ranks and over setup()/train() of peak RSS with the corpus − peak RSS with a "
                          "200 KB corpus (same model, same run)",
            "per_rank_gb": extra, "method": runs["big"][0]["method"],
            "peak_bytes": {name: [{k: r[k] for k in ("prep_peak_bytes", "train_peak_bytes")} for r in ranks]
                           for name, ranks in runs.items()},
            "data_corpus_bytes": corpus_bytes, "config": config},
        "data_prep_tokens_per_s": {
            "value": tokens / seconds, "target": "reported (no target)", "meets_target": None,
            "definition": "tokens of the corpus (train + held out) / seconds of rank 0's token-cache build",
            "tokens": tokens, "build_seconds": seconds, "data_corpus_bytes": corpus_bytes,
            "corpus_generation_seconds": generate_seconds, "config": config},
        "data_tokens_used_fraction": {
            "value": used / tokens, "target": "1.0", "meets_target": used == tokens,
            "definition": "tokens in training or held-out rows / tokens of the text", "report": report,
            "data_corpus_bytes": corpus_bytes, "config": config},
    }


def lines(results: dict) -> list[str]:
    r = results.get("data_prep_peak_rss_gb")
    if not r:
        return []
    mb = r["data_corpus_bytes"] / 2 ** 20
    out = [f"data_prep_peak_rss_gb = {r['value']:.3f}  (corpus {mb:.0f} MiB, W=2; target ≤ {RSS_TARGET_GB}: "
           f"{status(r)})",
           f"    per rank, GiB above the baseline: setup {', '.join(f'{v:.3f}' for v in r['per_rank_gb']['prep'])}; "
           f"train {', '.join(f'{v:.3f}' for v in r['per_rank_gb']['train'])}"]
    t = results.get("data_prep_tokens_per_s")
    if t:
        out.append(f"data_prep_tokens_per_s = {t['value']:,.0f}  ({t['tokens']:,} tokens in "
                   f"{t['build_seconds']:.0f} s)")
    u = results.get("data_tokens_used_fraction")
    if u:
        out.append(f"data_tokens_used_fraction = {u['value']:.6f}  (target 1.0: {status(u)})")
    return out
