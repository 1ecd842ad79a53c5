"""What `metadistill run` prints at its end, from a hand-built summary (no flow): the table
at full width when stdout is not a terminal, the teachers' rows, the students'
architecture, the paired difference from kd, and what to do next."""

import pytest

from pipelines.cli import _print_table


@pytest.fixture(autouse=True)
def _plain_log(monkeypatch):
    """stdout as in CI or a pipe: not a terminal, 80 columns, no forced colour."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "80")


def _summary(**changes) -> dict:
    method = {"test_acc": 0.95, "test_acc_std": 0.01, "test_loss": 0.2, "train_seconds": 3.0, "seeds": 3}
    summary = {
        "mlflow_run_id": "0123456789abcdef0123456789abcdef", "experiment": "metadistill-imagefolder-pets",
        "methods": {"scratch": dict(method), "kd": dict(method),
                    "meta_distill+maml_init": {**method, "vs_kd": {"diff": 0.0067, "seeds": 3, "ci95": [-0.002, 0.0154]}}},
        "chosen": {"method": "kd", "seed": 1, "reason": "kd has the best mean validation accuracy over its 3 seed(s)"},
        "registered_model": {"name": "metadistill-imagefolder-pets-student", "version": "1", "alias": "champion",
                             "reason": "no champion yet"},
        "teacher_test_acc": 0.595, "teacher_arch": "resnet8",
        "teacher": {"arch": "resnet8", "test_acc": 0.595, "cached": True, "train_seconds": 41.25},
        "teacher_improved": {"arch": "resnet8", "test_acc": 0.61, "cached": False, "train_seconds": 12.5,
                             "mask_rate": 0.4, "kept": False, "verdict": {"kept": False, "reason": (
                                 "the students learn from the original teacher: the improved one is not better "
                                 "beyond noise (held-out 60.50% against the original's 60.00% on 40 images; ...)")}},
        "student_arch": "mlp", "student_model": {"arch": "mlp", "kwargs": {"hidden": [16]}, "parameters": 1210},
        "held_out": {"train": 160, "quiz": 20, "val": 20, "test": 200, "transfer": 400},
        "warnings": ["the validation split holds 20 images (quiz 20, validation 20, test 200): ..."],
        "timings": {"teacher": 0.2, "teacher_improve": 12.9},
    }
    summary.update(changes)
    return summary


def test_the_table_is_whole_in_a_log_and_says_what_was_used_and_what_next(capsys):
    _print_table(_summary())
    out = capsys.readouterr().out
    assert "test acc % (mean ± std)" in out and "…" not in out  # no header cut at 80 columns
    teacher = next(line for line in out.splitlines() if "teacher (resnet8)" in line)
    assert "59.50" in teacher and "41.2 (cached)" in teacher and "0.2" not in teacher.split("59.50")[1]
    improved = next(line for line in out.splitlines() if "teacher improved (resnet8)" in line)
    assert "61.00" in improved and "12.9" in improved  # trained in this run: its stage's seconds
    assert "teacher: the students learn from the original teacher: the improved one is not better" in out
    assert "Δ vs kd, points (95% CI)" in out and "+0.67 [-0.20, +1.54]" in out
    assert 'students: mlp {"hidden": [16]}, 1,210 parameters each; teacher: resnet8' in out
    assert "chosen: kd seed 1" in out and "registered metadistill-imagefolder-pets-student v1 as champion" in out
    assert "warning: the validation split holds 20 images" in out
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("next: metadistill ui")
    assert "metadistill serve --model metadistill-imagefolder-pets-student" in last
    assert "metadistill export --format onnx --model metadistill-imagefolder-pets-student --out student.onnx" in last


def test_a_skipped_improvement_and_nothing_registered(capsys):
    _print_table(_summary(
        teacher={"arch": "resnet8", "test_acc": 0.595, "cached": False, "train_seconds": 30.0},
        teacher_improved={"skipped": "no transfer data", "why": "every labelled image is used for training: set "
                          "data.label_budget, or data.transfer_root to a folder of unlabelled images"},
        registered_model=None, chosen=None, warnings=[],
        methods={"kd": {"test_acc": 0.9, "test_acc_std": 0.0, "test_loss": 0.3, "train_seconds": 2.0, "seeds": 1}}))
    out = capsys.readouterr().out
    assert "teacher improved (skipped: no transfer data)" in out and "data.label_budget" in out
    assert "(cached)" not in out and "Δ vs kd" not in out and "warning" not in out
    teacher = next(line for line in out.splitlines() if "teacher (resnet8)" in line)
    assert "0.2" in teacher  # this run's own teacher time
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("next: metadistill ui") and "serve" not in last  # nothing registered to serve


def test_a_challenger_is_named_with_how_to_try_it(capsys):
    _print_table(_summary(registered_model={"name": "m-student", "version": "4", "alias": "challenger",
                                            "reason": "does not beat champion v1"},
                          teacher_improved={"skipped": "teacher.improve.method=none", "why": "off"}))
    out = capsys.readouterr().out
    assert "teacher improved (skipped: teacher.improve.method=none)" in out
    assert "--alias challenger" in out and "metadistill promote 4 --model m-student" in out
    assert out.rstrip().splitlines()[-1].startswith("next: metadistill ui")


def test_the_cost_cards_one_line_each_in_human_units(capsys):
    latency = {"calls": 200, "repeats": 5}
    student = {"arch": "mlp", "kwargs": {"hidden": [16]}, "parameters": 1210,
               "cost": {"parameters": 1210, "macs": 1184, "size_bytes": 5128,
                        "latency_b1": {"median_ms": 0.0801, "spread_pct": 5.0, "batch": 1, **latency},
                        "latency_b64": {"median_ms": 0.2, "spread_pct": 3.0, "batch": 64, **latency}}}
    teacher = {"arch": "resnet8", "test_acc": 0.595, "cached": True, "train_seconds": 41.25,
               "cost": {"parameters": 78_042, "macs": 12_475_392, "size_bytes": 330_000,
                        "latency_b1": {"median_ms": 1.93, "spread_pct": 1.0, "batch": 1, **latency},
                        "latency_b64": {"median_ms": 81.2, "spread_pct": 0.5, "batch": 64, **latency}}}
    _print_table(_summary(student_model=student, teacher=teacher))
    out = capsys.readouterr().out
    assert ('student mlp {"hidden": [16]}: 1,210 params · 1,184 MACs · 5.01 KiB · 80.1 us at batch 1 (±2.5%) · '
            "200 us at batch 64") in out
    assert "teacher resnet8: 78,042 params · 12.5 M MACs · 322 KiB · 1.93 ms at batch 1 (±0.5%) · 81.2 ms at batch 64" in out
    assert "params ·" not in next(line for line in out.splitlines() if line.startswith("students: "))
