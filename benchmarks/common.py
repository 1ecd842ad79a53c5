"""Shared by the benchmark scripts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipelines.common import home


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
