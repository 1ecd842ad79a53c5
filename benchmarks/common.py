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
    """Mean paired difference, its 95% t-interval, the t-test's and Wilcoxon's p-values."""
    from scipy import stats

    n = len(diffs)
    mean = float(diffs.mean())
    if n < 2 or np.allclose(diffs, diffs[0]):
        p = 1.0 if np.allclose(diffs, 0) else 0.0
        return {"diff": mean, "ci95": [mean, mean], "p": p, "p_wilcoxon": p}
    sem = diffs.std(ddof=1) / np.sqrt(n)
    half = float(stats.t.ppf(0.975, n - 1) * sem)
    nonzero = diffs[~np.isclose(diffs, 0)]
    p_wilcoxon = float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) else 1.0
    return {"diff": mean, "ci95": [mean - half, mean + half], "p": float(stats.ttest_1samp(diffs, 0.0).pvalue),
            "p_wilcoxon": p_wilcoxon}
