"""Shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipelines.common import home


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None, smoke: Sequence[str]) -> argparse.Namespace:
    """``parser``'s arguments from ``argv`` (default: the command line), with ``--smoke``: the
    module's tiny setting ``smoke`` (seconds, for CI: tests/test_benchmarks.py) before them, so
    that arguments given beside ``--smoke`` win."""
    parser.add_argument("--smoke", action="store_true", help=f"the tiny setting, for CI: {' '.join(smoke)}")
    argv = sys.argv[1:] if argv is None else list(argv)
    return parser.parse_args([*smoke, *argv] if "--smoke" in argv else argv)


def write_json(path: str | Path, result: dict) -> None:
    """Write ``result`` to ``path`` (folders created; atomically, as the pipeline writes) and print it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    home.write_json(Path(path), result, indent=2)
    print(json.dumps(result, indent=2))


def paired_stats(diffs: np.ndarray) -> dict:
    """Mean paired difference (seed by seed), its 95% t-interval, the paired t-test's and
    Wilcoxon's two-sided p-values, and the number of pairs.

    Where a test cannot speak it says so instead of claiming certainty: with one pair there
    is no spread, so no interval and no p-value (``None``); when every difference is the same
    non-zero value the t-test is undefined (no spread), the interval is ``None``, and both
    p-values are the exact sign test's, ``2 / 2^n`` (what Wilcoxon's exact test gives when
    every difference has one sign)."""
    from scipy import stats

    diffs = np.asarray(diffs, dtype=float)
    n, mean = len(diffs), float(np.mean(diffs)) if len(diffs) else float("nan")
    if n < 2:
        return {"diff": mean, "ci95": None, "p": None, "p_wilcoxon": None, "n": n}
    if np.allclose(diffs, diffs[0]):
        p = 1.0 if np.isclose(diffs[0], 0) else min(1.0, 2.0 / 2 ** n)
        return {"diff": mean, "ci95": None, "p": p, "p_wilcoxon": p, "n": n}
    sem = diffs.std(ddof=1) / np.sqrt(n)
    half = float(stats.t.ppf(0.975, n - 1) * sem)
    nonzero = diffs[~np.isclose(diffs, 0)]
    p_wilcoxon = float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) else 1.0
    return {"diff": mean, "ci95": [mean - half, mean + half], "p": float(stats.ttest_1samp(diffs, 0.0).pvalue),
            "p_wilcoxon": p_wilcoxon, "n": n}


def paired_text(stats: dict, scale: float = 1.0) -> str:
    """``+0.42 [+0.10, +0.74], p = 0.02 (Wilcoxon 0.03)`` of ``paired_stats`` (values times
    ``scale``), saying "no interval" or "no test" where there is none."""
    text = f"{scale * stats['diff']:+.2f}"
    if stats["ci95"] is not None:
        lo, hi = stats["ci95"]
        text += f" [{scale * lo:+.2f}, {scale * hi:+.2f}]"
    elif stats["p"] is not None:
        text += " (every pair the same: no interval)"
    if stats["p"] is None:
        return text + f" ({stats.get('n', 1)} pair: no test)"
    return text + f", p = {stats['p']:.2g} (Wilcoxon {stats['p_wilcoxon']:.2g})"
