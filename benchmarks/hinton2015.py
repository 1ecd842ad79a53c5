"""Hinton, Vinyals and Dean 2015 ("Distilling the Knowledge in a Neural Network"), section 3,
reproduced with this pipeline's teacher stage and ``kd`` student: full MNIST, the paper's
networks, and the omitted-3 experiment with its bias shift.  One command:

    python -m benchmarks.hinton2015 --set data.root=PATH/mnist [--seeds 3] [--stand-in] --json PATH
    python -m benchmarks.hinton2015 --smoke --json PATH  # seconds: tiny networks, a few steps

Per seed (teacher seed = student seed): the ``hinton2015`` preset's teacher (784-1200-1200-10,
dropout, jitter of up to two pixels), then two 784-800-800-10 students with no regulariser,
``scratch`` (labels only) and ``kd`` (the teacher's soft targets at T=20 beside the labels),
then ``kd`` again on a transfer set with every 3 taken out, read with the logit of class 3
raised by a bias (``--stand-in``: a resnet8 teacher in place of the paper's MLP, see
``STAND_IN``): the paper's +3.5 (which the paper chose on the test set) and the bias this
benchmark chooses on the held-out validation split (which has its 3s).

The paper's numbers (section 3, checked against the text): teacher 67 test errors, the small
net alone 146, distilled at T=20 74; without 3s in the transfer set 206 errors, 133 of them on
the 1,010 test 3s, and with the bias of 3 raised by 3.5, 109 errors, 14 on 3s.

Where the recipe differs, and why: the paper trains on all 60,000 images, this on 56,400 (600
quiz and 3,000 validation images held out, which choose the bias here); the paper's dropout
nets also had max-norm weight constraints and trained for far longer (its reference [5], Hinton
et al. 2012, trains for thousands of epochs), this uses the project's cosine-scheduled SGD for
a few dozen epochs (the benchmark has to fit an hour on two CPU cores) and a small weight decay
on the teacher in place of the constraint.  The paper gives neither the epochs nor the learning
rates of section 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np
import torch

PAPER = {"teacher_errors": 67, "scratch_errors": 146, "kd_errors": 74, "no3_errors": 206, "no3_errors_on_3s": 133,
         "no3_bias": 3.5, "no3_bias_errors": 109, "no3_bias_errors_on_3s": 14, "test_3s": 1010}
# The bars: the student alone within 20% of 146, the distilled one within 15% of 74,
# the teacher at most 80 errors.
TARGETS = {"scratch_errors": (146, 0.20), "kd_errors": (74, 0.15)}
TEACHER_LIMIT = 80
# The stand-in teacher (--stand-in): the preset's MLP teacher made 107 test errors in 45
# epochs (20,000 steps, about 8 minutes here), far from the paper's 67, which took thousands
# of epochs; a resnet8 on the same jittered images is a stronger teacher within the hour.
STAND_IN = ["teacher.model.arch=resnet8", "teacher.model.kwargs={}", "teacher.train.steps=6000",
            "teacher.train.batch_size=64", "teacher.train.optimizer.weight_decay=5e-4",
            "student.must_be_smaller=false"]  # the 800-800 student has 16x the resnet8's parameters
OMITTED = 3
BIASES = [b / 2 for b in range(0, 25)]  # 0 .. 12 in halves: the validation split picks one

SMOKE = ["--seeds", "1", *[x for item in (
    "data.train_fraction=0.05", "teacher.model.kwargs.hidden=[32]", "teacher.train.steps=30",
    "student.model.kwargs.hidden=[16]", "student.train.steps=20") for x in ("--set", item)]]


def errors(logits: torch.Tensor, y: torch.Tensor, bias: float = 0.0) -> dict:
    """Test errors overall and on the omitted class, with ``bias`` added to its logit."""
    shifted = logits.clone()
    shifted[:, OMITTED] += bias
    wrong = shifted.argmax(1) != y
    return {"errors": int(wrong.sum()), "errors_on_3s": int(wrong[y == OMITTED].sum())}


def without_class(data, label: int):
    """``data`` with every training image of ``label`` removed (the transfer set the student
    learns from); the held-out and test splits keep theirs."""
    keep = data.y("train") != label
    tensors = {**data.tensors, "train_x": data.x("train")[keep], "train_y": data.y("train")[keep]}
    return dataclasses.replace(data, tensors=tensors, key=f"{data.key}-without-{label}",
                               counts={**data.counts, "train": int(keep.sum())})


def summary(values: list[int]) -> dict:
    return {"mean": float(np.mean(values)), "per_seed": values}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import parse_args, write_json
    from pipelines import data as data_stage
    from pipelines.config.errors import ConfigError
    from pipelines.config.loader import load_config
    from pipelines.evaluate.metrics import logits_of
    from pipelines.students.fit import fit_student
    from pipelines.teacher.context import TeacherContext
    from pipelines.teacher.fit import obtain_teacher

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--stand-in", action="store_true", help="a resnet8 teacher in place of the paper's MLP")
    parser.add_argument("--json", required=True)
    args = parse_args(parser, argv, SMOKE)
    if args.stand_in:  # before the command line's own settings, which win
        args.overrides = [*STAND_IN, *args.overrides]
    try:
        cfg = load_config("hinton2015", None, args.overrides)
    except ConfigError as exc:
        print(f"hinton2015: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    data = data_stage.prepare(cfg.data)
    no3 = without_class(data, OMITTED)
    test_x, test_y = data.x("test"), data.y("test")
    val_x, val_y = data.x("val"), data.y("val")
    rows: dict[str, list] = {k: [] for k in ("teacher", "scratch", "kd", "no3", "no3_paper_bias", "no3_val_bias",
                                             "val_bias", "teacher_seconds", "student_seconds")}
    for seed in range(args.seeds):
        seed_cfg = load_config("hinton2015", None, [*args.overrides, f"teacher.seed={seed}"])
        teacher = obtain_teacher(TeacherContext.from_config(seed_cfg, data))
        rows["teacher"].append(errors(logits_of(teacher.model, test_x), test_y)["errors"])
        rows["teacher_seconds"].append(teacher.train_seconds)
        seconds = {}
        for method in ("scratch", "kd"):
            model, result, _ = fit_student(method, seed_cfg, data, teacher.model, seed)
            seconds[method] = result.seconds
            rows[method].append(errors(logits_of(model, test_x), test_y)["errors"])
        model, result, _ = fit_student("kd", seed_cfg, no3, teacher.model, seed)
        seconds["no3"] = result.seconds
        test_logits, val_logits = logits_of(model, test_x), logits_of(model, val_x)
        # The bias that makes the fewest validation errors (the smallest such bias on ties).
        val_bias = min(BIASES, key=lambda b: (errors(val_logits, val_y, b)["errors"], b))
        rows["no3"].append(errors(test_logits, test_y))
        rows["no3_paper_bias"].append(errors(test_logits, test_y, PAPER["no3_bias"]))
        rows["no3_val_bias"].append(errors(test_logits, test_y, val_bias))
        rows["val_bias"].append(val_bias)
        rows["student_seconds"].append(seconds)
        print(f"seed {seed}: teacher {rows['teacher'][-1]} errors, scratch {rows['scratch'][-1]}, kd {rows['kd'][-1]}, "
              f"without 3s {rows['no3'][-1]}, +{PAPER['no3_bias']} {rows['no3_paper_bias'][-1]}, "
              f"+{rows['val_bias'][-1]} (validation) {rows['no3_val_bias'][-1]}", flush=True)

    def of(key: str, field: str) -> list[int]:
        return [r[field] for r in rows[key]]

    measured = {"teacher_errors": summary(rows["teacher"]), "scratch_errors": summary(rows["scratch"]),
                "kd_errors": summary(rows["kd"]),
                **{f"{key}_{field}": summary(of(key, field)) for key in ("no3", "no3_paper_bias", "no3_val_bias")
                   for field in ("errors", "errors_on_3s")},
                "val_bias": rows["val_bias"]}
    targets = {k: {"paper": paper, "within": share, "mean": measured[k]["mean"],
                   "met": abs(measured[k]["mean"] - paper) <= share * paper} for k, (paper, share) in TARGETS.items()}
    targets["teacher_errors"] = {"limit": TEACHER_LIMIT, "mean": measured["teacher_errors"]["mean"],
                                 "met": measured["teacher_errors"]["mean"] <= TEACHER_LIMIT}
    write_json(args.json, {
        "paper": PAPER, "stand_in": args.stand_in, "measured": measured, "targets": targets, "seeds": list(range(args.seeds)),
        "overrides": args.overrides, "splits": data.counts, "test_3s": int((test_y == OMITTED).sum()),
        "teacher": cfg.teacher.model.model_dump(), "student": cfg.student.model.model_dump(),
        "teacher_train": cfg.teacher.train.model_dump(), "student_train": cfg.student.train.model_dump(),
        "kd": {"temperature": cfg.kd.temperature, "alpha": cfg.kd.alpha},
        "teacher_seconds": rows["teacher_seconds"], "student_seconds": rows["student_seconds"],
        "units": "test errors out of 10,000 (errors_on_3s: out of the test 3s); seconds of compute",
        "wall_seconds": time.perf_counter() - start})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
