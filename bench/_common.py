"""Helpers shared by the benchmarks: peak-memory probes, statistics, the benchmark model."""

from __future__ import annotations

import re
import resource
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# --- memory ---------------------------------------------------------------------------------------
# tracemalloc does not see torch's allocations. We read the kernel's resident-set counters instead:
# /proc/self/status VmRSS (now) and VmHWM (peak), and reset VmHWM to the current RSS by writing "5" to
# /proc/self/clear_refs (Linux >= 4.0). Peak extra memory of an operation = VmHWM after it − VmRSS before.
# Where clear_refs cannot be written, fall back to getrusage(RUSAGE_SELF).ru_maxrss deltas, which only see
# growth above the process's earlier peak (a lower bound); the method used is reported with each number.
# Before the "before" reading, glibc's malloc_trim(0) returns freed heap memory to the kernel, so memory the
# process freed earlier (and would silently reuse) does not hide part of the peak.


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


class PeakMemory:
    """`with PeakMemory() as m: ...` then `m.extra_bytes` (peak RSS during the block − RSS before it)."""

    def __enter__(self):
        import gc

        gc.collect()
        _malloc_trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM after − VmRSS before, VmHWM reset via /proc/self/clear_refs"
        except OSError:
            self.method = "ru_maxrss delta (lower bound: clear_refs not writable)"
        self.rss_before = _status_kib("VmRSS") * 1024
        self.maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        if self.method.startswith("VmHWM"):
            self.extra_bytes = _status_kib("VmHWM") * 1024 - self.rss_before
        else:
            self.extra_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.maxrss_before
        return False


# --- statistics -----------------------------------------------------------------------------------

def median(xs):
    return statistics.median(xs)


def quantile(xs, q):
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(xs) -> dict:
    return {"median": median(xs), "p25": quantile(xs, 0.25), "p75": quantile(xs, 0.75), "min": min(xs),
            "max": max(xs), "n": len(xs)}


def status(result: dict) -> str:
    ok = result.get("meets_target")
    return "diagnostic" if ok is None else "meets target" if ok else "MISSES target"


# --- the benchmark model ----------------------------------------------------------------------------

BERT = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
            max_position_embeddings=128)


def build_bert(seed: int = 0, num_labels: int = 2, config: dict = BERT):
    """A BertForSequenceClassification built in code (no download; default ~5.4M parameters), task-SFT roles
    applied."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from ltsft_dist import eligibility as elig

    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(**config, num_labels=num_labels))
    eligibility = elig.resolve(model, "task")
    elig.apply_roles(model, eligibility)
    return model, eligibility


def ds_config(stage: int, micro_batch_size: int, world_size: int, max_grad_norm: float = 1.0) -> dict:
    from ltsft_dist.config import PACKAGE_DS_CONFIGS
    from ltsft_dist.engine import load_ds_config

    return load_ds_config(PACKAGE_DS_CONFIGS / f"zero{stage}.json", micro_batch_size=micro_batch_size,
                          accumulation=1, world_size=world_size, max_grad_norm=max_grad_norm)


def phase2_engine(model, eligibility, micro_batch_size: int, world_size: int, density: float = 0.05, stage: int = 2,
                  attach: bool = True):
    """A DeepSpeed engine set up for phase 2 as the recipe does: θ⁰ snapshot, a K = density mask from the library's
    own selection (on seeded random scores), `GradientMask` attached (unless `attach=False`, e.g. to instrument
    its projection first). Returns (engine, shards, mask, K)."""
    from ltsft_dist.engine import build_engine
    from ltsft_dist.masking import GradientMask
    from ltsft_dist.shards import Shards
    from ltsft_dist.snapshot import Snapshot
    from ltsft_dist.topk import random_scores, select_topk

    engine = build_engine(model, ds_config(stage, micro_batch_size, world_size), lr=1e-4, weight_decay=0.01)
    shards = Shards(engine, model)
    sparse = [f for f in shards.fragments if eligibility.roles[f.name] == "sparse"]
    k = round(density * eligibility.count(model, "sparse"))
    selected = select_topk(random_scores([f.key for f in sparse], [f.numel for f in sparse], seed=0,
                                         device=shards.device),
                           [f.key for f in sparse], k, shards.all_reduce, shards.all_gather_object).masks
    mask = GradientMask(shards, Snapshot(shards), sparse, selected)
    if attach:
        mask.attach()
    return engine, shards, mask, k


def language_body(model) -> dict:
    """Parameter name -> numel of what a language SFT may touch: `bert.*` without pooler and LayerNorms."""
    return {n: p.numel() for n, p in model.named_parameters()
            if n.startswith("bert.") and not n.startswith("bert.pooler.") and "LayerNorm" not in n}


def random_language_sfts(model, k_per_language: int, languages, seed: int) -> dict:
    """Random language SFTs with exactly ~k positions each, spread over the body in proportion to size."""
    import torch

    from ltsft_dist.sft import SFTMetadata, SparseFineTuning, base_fingerprint

    body = language_body(model)
    total = sum(body.values())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    fingerprint = base_fingerprint(model)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for lang in languages:
        diffs = {}
        for name, numel in body.items():
            k = round(k_per_language * numel / total)
            if k:
                idx = torch.sort(torch.randperm(numel, generator=g)[:k]).values
                diffs[name] = (idx, torch.randn(k, generator=g) * 1e-3)
        meta = SFTMetadata(kind="language", languages=[lang], base_model="bench", base_fingerprint=fingerprint,
                           k=k_per_language, density=k_per_language / total, training_config={})
        out[lang] = SparseFineTuning(diffs, {n: shapes[n] for n in diffs}, {}, meta)
    return out
