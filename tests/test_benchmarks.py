"""Every benchmark module runs end to end at its smoke setting (``--smoke``: each module's
``SMOKE`` arguments, a size that runs in seconds) and writes the JSON shape of its published
results in docs/benchmarks, so that a benchmark that rots fails here rather than at its next
publication (issue 35).

The modules are discovered from benchmarks/*.py: a new one without a ``SMOKE`` and an entry
in ``EXPECT`` fails.  Each runs in this process (``main(argv)``; the ones that must launch
processes, torchrun or servers, still do).  The ones marked ``slow`` start several
``metadistill run`` processes each (about 15 s apiece on the idle 2-core machine, 35-130 s
a module), more than this file's budget of about 90 s: they are skipped, saying so, unless
``METADISTILL_BENCH_SMOKE=all`` (the 17 modules of that time took about 7 minutes there).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "docs" / "benchmarks"
NOT_BENCHMARKS = ("__init__", "common")
MODULES = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem not in NOT_BENCHMARKS)
RUN_ALL = os.environ.get("METADISTILL_BENCH_SMOKE") == "all"


def top_keys(published: dict) -> set[str]:
    return set(published)


def registered_tiny(tmp: Path) -> list[str]:
    """serving: a tiny registered champion in the project home (as tests/test_serving.py makes
    it) instead of the default pipeline's, a run less."""
    from tests.test_serving import NAME, register_tiny

    register_tiny(1, 0.9, "champion")
    return ["--model", NAME]


def served(result: dict) -> None:
    for server in ("metadistill", "mlflow"):
        assert result[server]["rps"] > 0 and result[server]["errors"] == 0, result


def fewshot_keys(published: dict) -> set[str]:
    """fewshot_configs_h200.json gathers several processes' JSON by hand: run2's entries are
    this script's output (run1's came from an earlier copy of it)."""
    return set().union(*(set(entry) for entry in published["run2"].values()))


@dataclass(frozen=True)
class Expect:
    """What a module's smoke must write: every top-level key of its published JSON
    (``published``, under docs/benchmarks) but those written there by hand."""

    published: str | None  # None: the module writes no JSON (distill_report prints Markdown)
    by_hand: tuple[str, ...] = ()
    keys: Callable[[dict], set[str]] = top_keys
    args: Callable[[Path], list[str]] = lambda tmp: []  # more arguments (and their set-up), given tmp_path
    check: Callable[[dict], None] = lambda result: None
    slow: str | None = None  # why it is over this file's time budget


EXPECT = {
    "arch_search": Expect("arch_search_digits.json"),
    "augment_quality": Expect("augment_quality_mnist_wide.json"),
    "busy_machine": Expect("busy_machine.json", slow="6 step-timing processes and 3 `metadistill run` processes, "
                                                     "one beside a CPU burner"),
    "concurrent_students": Expect("concurrent_students_h200.json", slow="3 `metadistill run` processes"),
    "data_stream": Expect("data_stream.json", args=lambda tmp: ["--folder", str(tmp / "jpegs")],
                          slow="2 streamed `metadistill run` processes with DataLoader workers"),
    "ddp_scaling": Expect("ddp_scaling.json", by_hand=("note",),
                          slow="torchrun at several world sizes, about 30 s; the DDP path itself is tested in "
                               "test_distributed"),
    "distill_cost": Expect("distill_cost.json"),
    "distill_quality": Expect("round4/distill_quality_fashion_mnist.json"),
    "distill_report": Expect(None),
    "distill_variants": Expect("ablation/mnist_search.json"),
    "fewshot_configs": Expect("fewshot_configs_h200.json", keys=fewshot_keys),
    "gpu_throughput": Expect("gpu_throughput_h200.json"),
    "hinton2015": Expect("hinton2015_stand_in.json", check=lambda r: r["measured"]["no3_errors_on_3s"]["mean"] <= r["test_3s"]),
    "meta_engine": Expect("meta_engine.json"),
    "pipeline_overhead": Expect("pipeline_overhead.json", slow="2 `metadistill run` processes"),
    "serving": Expect("serving.json", args=registered_tiny, check=served),
    "strong_view": Expect("strong_view_fashion_mnist.json"),
    "teacher_sources": Expect("teacher_sources.json"),
    "team_runs": Expect("team_runs.json", slow="PostgreSQL, an MLflow and a Prefect server, 6 `metadistill run` "
                                               "processes"),
    "team_auth": Expect("team_auth.json", slow="two sets of PostgreSQL, MLflow and Prefect servers, 2 `metadistill "
                                               "run` processes; its refusal table runs in test_team"),
}


@pytest.fixture
def isolated(home, shared_data, monkeypatch):
    """A fresh project home and the shared data; what a benchmark sets in this process (the
    environment: MLflow exports its URIs there; torch's thread count) is put back after it."""
    monkeypatch.setenv("METADISTILL_DATA", str(shared_data))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL"):
        monkeypatch.delenv(name, raising=False)
    environ, threads = dict(os.environ), torch.get_num_threads()
    yield home
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_smoke(name, isolated, tmp_path, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    assert isinstance(getattr(module, "SMOKE", None), list), f"benchmarks/{name}.py has no SMOKE (its --smoke setting)"
    expect = EXPECT.get(name)
    assert expect, f"list benchmarks/{name}.py in EXPECT with the published JSON its smoke must match"
    if expect.slow and not RUN_ALL:
        pytest.skip(f"over this file's time budget ({expect.slow}): METADISTILL_BENCH_SMOKE=all runs it")
    if name == "serving" and shutil.which("wrk") is None:
        pytest.fail("the serving benchmark's load generator is wrk: apt-get install wrk")
    out = tmp_path / f"{name}.json"
    argv = ["--smoke", *expect.args(tmp_path)]
    if expect.published is None:  # distill_report: Markdown tables of the published distill_quality JSON
        assert module.main([*argv, "--out", str(out.with_suffix(".md"))]) == 0
        text = out.with_suffix(".md").read_text()
        assert text.count("| setting |") == 3 and "| mnist |" in text
        return
    assert module.main([*argv, "--json", str(out)]) in (0, None)
    result = json.loads(out.read_text())
    published = json.loads((PUBLISHED / expect.published).read_text())
    missing = expect.keys(published) - set(expect.by_hand) - set(result)
    assert not missing, f"{name}'s JSON lacks {sorted(missing)} of docs/benchmarks/{expect.published}"
    expect.check(result)
    capsys.readouterr()  # each prints its JSON: not kept for the report


def test_paired_stats_against_hand_computed_values_and_scipy():
    """Diffs 1, 2, 3: mean 2, standard error 1/sqrt(3), t = 2*sqrt(3) on 2 degrees of freedom,
    whose two-sided p is 1 - t / sqrt(t^2 + 2); the interval's half-width is t_0.975(2) = 4.3027
    standard errors; Wilcoxon's exact p with three positive ranks is 2/8."""
    import math

    import numpy as np
    from scipy import stats

    from benchmarks.common import paired_stats, paired_text

    got = paired_stats(np.array([1.0, 2.0, 3.0]))
    t = 2 * math.sqrt(3)
    assert got["diff"] == pytest.approx(2.0) and got["n"] == 3
    assert got["p"] == pytest.approx(1 - t / math.sqrt(t * t + 2))
    assert got["ci95"] == pytest.approx([2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)], abs=1e-5)
    assert got["p_wilcoxon"] == pytest.approx(0.25)
    a, b = np.random.default_rng(0).normal(size=10), np.random.default_rng(1).normal(size=10)
    paired = paired_stats(a - b)
    assert paired["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert paired["p_wilcoxon"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    # One seed: nothing to test.  Every seed the same non-zero gain: the t-test is undefined
    # (no spread), the sign test's exact p is 2/2^n, not 0.
    one = paired_stats(np.array([0.7]))
    assert one["p"] is None and one["ci95"] is None and "no test" in paired_text(one)
    same = paired_stats(np.full(10, 0.5))
    assert same["ci95"] is None and same["p"] == pytest.approx(2 / 1024) and same["p_wilcoxon"] == same["p"]
    assert paired_stats(np.zeros(4))["p"] == 1.0
    assert paired_text(got, scale=100) == "+200.00 [-48.41, +448.41], p = 0.074 (Wilcoxon 0.25)"


def test_hinton2015_counts_errors_with_the_bias_of_the_omitted_class():
    """Hand-made logits: the omitted class (3) loses where its logit is 1 below the top,
    and a bias of 1.5 on it wins those images back, turning one right answer wrong."""
    from benchmarks.hinton2015 import errors

    logits = torch.zeros(4, 10)
    logits[0, 3], logits[0, 5] = 1.0, 2.0  # a 3 read as 5 (3 is 1 below)
    logits[1, 3], logits[1, 8] = 0.5, 1.5  # a 3 read as 8
    logits[2, 7] = 1.0  # a 7, right; 3's logit 1 below
    logits[3, 1], logits[3, 3] = 3.0, 0.0  # a 1, right; 3 far below
    y = torch.tensor([3, 3, 7, 1])
    assert errors(logits, y) == {"errors": 2, "errors_on_3s": 2}
    assert errors(logits, y, 1.5) == {"errors": 1, "errors_on_3s": 0}  # the 7 is now read as a 3
    assert errors(logits, y, 0.5) == {"errors": 2, "errors_on_3s": 2}  # not enough for either 3
