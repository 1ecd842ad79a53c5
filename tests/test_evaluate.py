import numpy as np
import pytest
import torch
from torch import nn

from pipelines.evaluate.metrics import evaluate, expected_calibration_error
from pipelines.register.promotion import Paired, decide


def test_ece_hand_computed():
    # Two samples in bin (0.8, 0.867]: confidence 0.85 each, one right -> |0.5 - 0.85| weighted 2/4.
    # Two samples in bin (0.933, 1]: confidence 0.95 each, both right -> |1 - 0.95| weighted 2/4.
    probs = torch.tensor([[0.85, 0.15], [0.85, 0.15], [0.95, 0.05], [0.95, 0.05]])
    labels = torch.tensor([0, 1, 0, 0])
    assert abs(expected_calibration_error(probs, labels) - (0.5 * 0.35 + 0.5 * 0.05)) < 1e-6


class Fixed(nn.Module):
    def forward(self, x):
        return x.flatten(1)


def test_evaluate_accuracy_per_class_and_confusion():
    x = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
    y = torch.tensor([0, 1, 1, 1])
    ev = evaluate(Fixed(), x, y, 2)
    assert ev.accuracy == 0.75
    assert ev.per_class_accuracy == pytest.approx([1.0, 2 / 3])
    assert np.array_equal(ev.confusion, np.array([[1, 0], [1, 2]]))


def test_promotion_gate():
    assert decide(0.9, None).alias == "champion"
    better = decide(0.95, 0.9, "3")
    assert better.alias == "champion" and abs(better.delta - 0.05) < 1e-12 and "v3" in better.reason
    worse = decide(0.9, 0.9, "3")
    assert worse.alias == "challenger" and worse.delta == 0.0


def test_mcnemar_gate_by_hand():
    # 5 images right only for the candidate, none only for the champion: P(X >= 5 | n=5, 1/2) = 1/32.
    wins = Paired.of([1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1, 0])
    assert (wins.only_candidate, wins.only_champion, wins.images) == (5, 0, 7)
    assert wins.p_value() == pytest.approx(1 / 32)
    assert decide(6 / 7, 1 / 7, "2", wins).alias == "champion"
    # 3 of 3 discordant images: p = 1/8, not enough at 0.05 although the accuracy rose.
    few = Paired(3, 0, 359)
    assert few.p_value() == pytest.approx(1 / 8)
    slight = decide(0.9666, 0.9582, "2", few)
    assert slight.alias == "challenger" and "McNemar exact p = 0.125" in slight.reason
    # 6 wins, 1 loss: P(X >= 6 | n=7) = (7 + 1) / 128.
    assert Paired(6, 1, 359).p_value() == pytest.approx(8 / 128)
    # An identical model: no discordant image, p = 1, never promoted.
    same = decide(0.9582, 0.9582, "1", Paired(0, 0, 359))
    assert same.alias == "challenger" and same.p_value == 1.0 and same.delta == 0.0
    # min_delta is applied on top of the test.
    assert decide(0.99, 0.97, "1", Paired(30, 0, 1000), min_delta=0.03).alias == "challenger"
    with pytest.raises(ValueError, match="different images"):
        Paired.of([1, 0], [1, 0, 1])


def _outcome(method, seed, val_acc, test_acc=0.9, val_loss=None):
    from pipelines.engine.loop import TrainResult
    from pipelines.evaluate.compare import StudentOutcome
    from pipelines.evaluate.metrics import Evaluation

    evaluation = Evaluation(test_acc, 0.3, 0.01, [test_acc] * 10, np.zeros((10, 10)))
    return StudentOutcome(method, seed, nn.Identity(), TrainResult(), evaluation, val_acc, val_loss=val_loss,
                          val_images=20)


def test_the_choice_is_the_best_method_on_mean_validation_then_its_best_seed():
    from pipelines.evaluate.compare import choose_student

    # "lucky" has the single best seed, "steady" the better mean: steady is chosen, its seed 1.
    outcomes = [_outcome("lucky", 0, 0.99), _outcome("lucky", 1, 0.80),
                _outcome("steady", 0, 0.92), _outcome("steady", 1, 0.93)]
    choice = choose_student(outcomes)
    assert (choice.outcome.method, choice.outcome.seed) == ("steady", 1)
    assert choice.reason == ("steady has the best mean validation accuracy over its 2 seed(s): 0.9250; next lucky "
                             "0.8950; its seed 1 scored best on validation (0.9300)")
    # A seed at chance does not count toward its method's mean.
    outcomes.append(_outcome("lucky", 2, 0.99, test_acc=0.1))
    assert choose_student(outcomes).outcome.method == "steady"


def test_a_tie_is_broken_by_the_lower_validation_loss_and_said():
    from pipelines.evaluate.compare import choose_student

    # 0.70 and 0.70 on 20 validation images (issue 36): b's lower validation loss decides, not the order.
    outcomes = [_outcome("a", 0, 0.70, val_loss=0.52), _outcome("b", 0, 0.70, val_loss=0.41),
                _outcome("c", 0, 0.65, val_loss=0.30)]
    choice = choose_student(outcomes)
    assert choice.outcome.method == "b"
    assert choice.reason == ("b has the best mean validation accuracy over its 1 seed(s): 0.7000; tied with a at 0.7000 "
                             "on 20 validation images: broken by the lower mean validation loss (0.4100 vs 0.5200); "
                             "its seed 0 scored best on validation (0.7000)")
    # No loss to go by: the listed order, said so.
    plain = choose_student([_outcome("a", 0, 0.70), _outcome("b", 0, 0.70)])
    assert plain.outcome.method == "a" and "tied with b" in plain.reason and "broken by the listed order" in plain.reason
    # Two seeds of the chosen method tie: the lower validation loss again.
    seeds = choose_student([_outcome("kd", 0, 0.80, val_loss=0.6), _outcome("kd", 1, 0.80, val_loss=0.5)])
    assert seeds.outcome.seed == 1 and "tied with seed 0: broken by the lower validation loss (0.5000 vs 0.6000)" in seeds.reason


def test_paired_difference_from_kd_with_a_t_interval_from_three_seeds():
    from scipy.stats import t

    from pipelines.evaluate.compare import comparison_markdown, paired_vs_kd, summarise, vs_kd_text

    kd = [0.90, 0.92, 0.94]
    md = [0.91, 0.95, 0.95]
    outcomes = ([_outcome("kd", s, 0.9, test_acc=a) for s, a in enumerate(kd)]
                + [_outcome("meta_distill", s, 0.9, test_acc=a) for s, a in enumerate(md)]
                + [_outcome("scratch", s, 0.9, test_acc=0.5) for s in range(3)]
                + [_outcome("kd_tuned", s, 0.9, test_acc=0.93) for s in range(2)])
    found = paired_vs_kd(outcomes)
    assert set(found) == {"meta_distill", "kd_tuned"}  # teacher-based methods only
    diffs = np.array(md) - np.array(kd)
    half = t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    entry = found["meta_distill"]
    assert entry["seeds"] == 3 and entry["diff"] == pytest.approx(diffs.mean())
    assert entry["ci95"] == pytest.approx([diffs.mean() - half, diffs.mean() + half])
    lo, hi = 100 * (diffs.mean() - half), 100 * (diffs.mean() + half)
    assert vs_kd_text(entry) == f"{100 * diffs.mean():+.2f} [{lo:+.2f}, {hi:+.2f}]"
    # Two seeds: the difference, no interval.
    assert found["kd_tuned"]["seeds"] == 2 and "ci95" not in found["kd_tuned"]
    assert vs_kd_text(found["kd_tuned"]).endswith("(2 seeds, no CI)")
    assert paired_vs_kd([o for o in outcomes if o.method != "kd"]) == {}
    rows = summarise(outcomes)
    for r in rows:
        if r["method"] in found:
            r["vs_kd"] = found[r["method"]]
    table = comparison_markdown(rows)
    assert "Δ vs kd, points (95% CI) |" in table.splitlines()[0] and vs_kd_text(entry) in table


def test_held_out_warnings_below_100_images():
    from pipelines.evaluate.compare import held_out_warnings

    notes = held_out_warnings({"train": 160, "quiz": 20, "val": 20, "test": 359})
    assert len(notes) == 1 and notes[0].startswith("the validation split holds 20 images (quiz 20, validation 20")
    assert "by 5.0 points" in notes[0] and "about 31 points" in notes[0] and "data.label_budget" in notes[0]
    assert held_out_warnings({"quiz": 100, "val": 100, "test": 359}) == []
    assert "the test split holds 50 images" in held_out_warnings({"val": 144, "test": 50})[0]


def test_the_run_description_has_the_table_the_choice_and_the_registration():
    from pipelines.evaluate.compare import choose_student, run_description, summarise

    outcomes = [_outcome("scratch", 0, 0.8), _outcome("kd", 0, 0.9)]
    choice = choose_student(outcomes)
    summary = {"teacher_arch": "resnet8", "teacher_test_acc": 0.95, "teacher": {"cached": True},
               "teacher_improved": {"skipped": "no transfer data", "why": "..."},
               "student_model": {"arch": "mlp", "kwargs": {"hidden": [16]}, "parameters": 1210},
               "chosen": {"method": "kd", "seed": 0, "reason": choice.reason},
               "registered_model": {"name": "x-student", "version": "2", "alias": "challenger", "reason": "p = 0.3"},
               "held_out": {"train": 160, "val": 20}, "warnings": ["the validation split holds 20 images"]}
    text = run_description(summary, summarise(outcomes))
    assert "**Teacher:** resnet8, test accuracy 95.00% (cached); improvement skipped: no transfer data" in text
    assert '**Students:** mlp {"hidden": [16]}, 1,210 parameters' in text
    assert "| kd |" in text and f"**Chosen:** kd seed 0: {choice.reason}" in text
    assert "**Registered:** x-student v2 as challenger: p = 0.3" in text
    assert "**Images:** train 160, val 20" in text and "**Warning:** the validation split holds 20 images" in text
