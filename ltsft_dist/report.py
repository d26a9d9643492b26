"""Gains with uncertainty: task+lang − TA-only per language, with 95 % bootstrap intervals over examples.

A toy evaluation has a few hundred examples, so a difference of a few points can be noise; the paired bootstrap
(the same resampled examples for both settings) says which gains are not. It reads the per-example correctness
that accuracy-scored tasks put into results.json (`correct`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ltsft_dist.evaluation import COMPOSED, TASK_ONLY
RESAMPLES, SEED = 2000, 0


def paired_bootstrap(composed: list[int], task_only: list[int], resamples: int = RESAMPLES,
                     seed: int = SEED) -> dict:
    """Means (in points) of both settings and of their difference, each with a 95 % percentile interval from
    `resamples` resamplings of the examples (seeded: the same inputs give the same intervals)."""
    a, b = np.asarray(composed, dtype=float) * 100, np.asarray(task_only, dtype=float) * 100
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired bootstrap needs the same examples in both settings ({a.size} vs {b.size})")
    idx = np.random.default_rng(seed).integers(0, a.size, (resamples, a.size))
    out = {"n": int(a.size)}
    for name, values in (("composed", a), ("task_only", b), ("difference", a - b)):
        low, high = np.percentile(values[idx].mean(1), [2.5, 97.5])
        out[name] = (float(values.mean()), float(low), float(high))
    return out


def gains(results: dict) -> dict[str, dict]:
    """Per language evaluated in both settings with per-example scores: `paired_bootstrap` of them."""
    return {lang: paired_bootstrap(s[COMPOSED]["correct"], s[TASK_ONLY]["correct"])
            for lang, s in results["languages"].items()
            if COMPOSED in s and TASK_ONLY in s and "correct" in s[COMPOSED] and "correct" in s[TASK_ONLY]}


def _cell(mean: float, low: float, high: float, sign: str = "") -> str:
    return f"{mean:{sign}.1f} [{low:{sign}.1f}, {high:{sign}.1f}]"


def gains_table(results: dict) -> str:
    """Markdown: per language n, task+lang, TA-only and their difference with 95 % intervals ('' if none)."""
    rows = gains(results)
    if not rows:
        return ""
    lines = ["| language | n | task+lang | TA-only | difference |", "|---|---|---|---|---|"]
    lines += [f"| {lang} | {g['n']} | {_cell(*g['composed'])} | {_cell(*g['task_only'])} | "
              f"{_cell(*g['difference'], sign='+')} |" for lang, g in rows.items()]
    return ("Accuracy in points, with 95 % paired bootstrap intervals over the examples "
            f"({RESAMPLES} resamples, seed {SEED}):\n\n" + "\n".join(lines) + "\n")


def verdict(results: dict, language: str) -> str:
    """One line: is `language`'s gain from its language SFT significant (its 95 % interval excludes 0)?"""
    g = gains(results).get(language)
    if g is None:
        return f"{language}: no paired scores with and without its language SFT; no verdict"
    diff, low, high = g["difference"]
    if low > 0:
        word = "significant: the 95 % interval is above 0"
    elif high < 0:
        word = "significant LOSS: the 95 % interval is below 0"
    else:
        word = "not significant: the 95 % interval contains 0"
    return (f"{language}: the language SFT changes accuracy by {diff:+.1f} points [{low:+.1f}, {high:+.1f}] "
            f"(n = {g['n']}), {word}")


def plot(results: dict, path) -> Path | None:
    """A bar chart of accuracy per language and setting with the 95 % intervals; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = gains(results)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(rows), 3.2))
    x = np.arange(len(rows))
    for offset, key, label in ((-0.2, "task_only", "TA-only"), (0.2, "composed", "task+lang")):
        means = np.array([g[key][0] for g in rows.values()])
        errors = np.array([[g[key][0] - g[key][1] for g in rows.values()],
                           [g[key][2] - g[key][0] for g in rows.values()]])
        ax.bar(x + offset, means, 0.4, yerr=errors, capsize=3, label=label)
    ax.set_xticks(x, list(rows))
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right")
    ax.set_title("zero-shot accuracy, 95 % bootstrap intervals")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
