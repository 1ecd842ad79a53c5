"""Learning to teach, round 3: consistency training of the teacher on the transfer split,
the co-trained head's feedback sign, the trust region, and the guard's revert."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from meta.consistency import consistency_loss, pseudo_targets
from meta.cotrain import drift, feedback_h, feedback_loss
from meta.distill import UNLABELED
from meta.guard import Guard
from pipelines import data as data_stage
from pipelines.config.loader import load_config
from pipelines.engine.loop import StepHook, TrainResult
from pipelines.engine.metrics import accuracy
from pipelines.students.context import StudentContext
from pipelines.students.meta_distill import co_teaching, held_out_parts
from pipelines.teacher import improve
from pipelines.teacher.context import TeacherContext
from pipelines.teacher.fit import obtain_teacher

TINY = ["teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [32]}", "teacher.train.steps=80",
        "student.train.steps=30", "data.label_budget=500", "teacher.improve.steps=20",
        "teacher.improve.batch_size=32"]


# --- consistency (hand-computed) ------------------------------------------------------------

def test_fixmatch_loss_keeps_confident_hard_labels_and_averages_over_all():
    weak = torch.tensor([[4.0, 0.0], [0.1, 0.0]])  # confident (0.982) / unsure (0.525)
    strong = torch.tensor([[1.0, 2.0], [3.0, -3.0]])
    loss, rate = consistency_loss(weak, strong, threshold=0.9)
    expected = -math.log(math.exp(1) / (math.exp(1) + math.exp(2))) / 2  # row 1 only, mean over 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert rate == 0.5


def test_uda_targets_are_the_sharpened_weak_prediction():
    weak = torch.tensor([[1.0, 0.0, -1.0]])
    targets, mask = pseudo_targets(weak, threshold=0.0, sharpen=0.5)
    sharp = torch.tensor([2.0, 0.0, -2.0]).softmax(-1)
    assert torch.allclose(targets[0], sharp) and mask.item() == 1.0
    strong = torch.tensor([[0.0, 1.0, 0.0]])
    loss, _ = consistency_loss(weak, strong, threshold=0.0, sharpen=0.5)
    assert loss.item() == pytest.approx(float(-(sharp * strong.log_softmax(-1)[0]).sum()), rel=1e-6)


def test_consistency_gradient_reaches_only_the_strong_view():
    weak = torch.randn(4, 3, requires_grad=True)
    strong = torch.randn(4, 3, requires_grad=True)
    consistency_loss(weak, strong, threshold=0.0)[0].backward()
    assert weak.grad is None and strong.grad.abs().sum() > 0


# --- the feedback's sign (MPL, first order) ------------------------------------------------

def test_feedback_gradient_is_the_exact_score_function_gradient():
    """For a teacher distribution p(z) over labels, the expected feedback gradient
    E_y[h(y) dCE(z, y)/dz] equals d/dz E_y[L_heldout(theta'(y))] (computed exactly by
    enumerating labels): descending it lowers the student's expected held-out loss."""
    torch.manual_seed(0)
    x, xq, yq, lr = torch.randn(4).double(), torch.randn(4).double(), 2, 0.5
    theta = torch.randn(3, 4).double() * 0.1  # a linear softmax student: logits = theta @ x

    def heldout(t):
        return float(F.cross_entropy((t @ xq)[None], torch.tensor([yq])))

    def step(label):
        t = theta.clone().requires_grad_()
        loss = F.cross_entropy((t @ x)[None], torch.tensor([label]))
        (g,) = torch.autograd.grad(loss, t)
        return (t - lr * g).detach()

    before = heldout(theta)
    after = {c: heldout(step(c)) for c in range(3)}
    z = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    expected = sum(z.softmax(-1)[c] * after[c] for c in range(3))
    (exact,) = torch.autograd.grad(expected, z)
    estimate = torch.zeros(3, dtype=torch.float64)
    for c in range(3):
        zc = z.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(feedback_loss(zc[None], torch.tensor([c]), feedback_h(before, after[c], 1e9)), zc)
        estimate += z.softmax(-1)[c].detach() * g
    # The score-function identity: d E[L] / dz = E[(L - L_before) dlogp/dz] = E[h dCE/dz].
    assert torch.allclose(estimate, exact, atol=1e-12)


def test_feedback_raises_a_helpful_label_and_lowers_a_harmful_one():
    z = torch.zeros(1, 3, requires_grad=True)
    (helped,) = torch.autograd.grad(feedback_loss(z, torch.tensor([1]), feedback_h(1.0, 0.8, 5.0)), z)
    (hurt,) = torch.autograd.grad(feedback_loss(z, torch.tensor([1]), feedback_h(1.0, 1.2, 5.0)), z)
    assert (z - 0.1 * helped).softmax(-1)[0, 1] > 1 / 3 > (z - 0.1 * hurt).softmax(-1)[0, 1]
    assert feedback_h(1.0, -9.0, 2.0) == 2.0 and feedback_h(0.0, 0.1, 1.0, scale=0.1) == pytest.approx(-1.0)


def test_drift_is_zero_at_the_start_and_the_kl_of_the_distributions():
    a = torch.tensor([[1.0, 0.0]])
    assert drift(a, a).item() == pytest.approx(0.0, abs=1e-7)
    p, q = a.softmax(-1)[0], torch.tensor([0.0, 1.0]).softmax(-1)
    assert drift(torch.tensor([[0.0, 1.0]]), a).item() == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)


# --- the guard ----------------------------------------------------------------------------

def test_guard_accepts_noise_and_reverts_a_real_drop():
    part = torch.nn.Linear(2, 1)
    guard = Guard(z=2.0, damping=0.5)
    assert guard.check(0.80, 400, {"p": part})
    kept = copy.deepcopy(part.state_dict())
    margin = guard.margin(0.80, 400)  # 2 * sqrt(0.16 / 400) = 0.04
    assert margin == pytest.approx(0.04)
    assert guard.check(0.80 - 0.9 * margin, 400, {"p": part}) and guard.reverts == 0
    with torch.no_grad():
        part.weight.fill_(7.0)
    assert not guard.check(0.80 - 1.1 * margin, 400, {"p": part})
    assert torch.equal(part.weight, kept["weight"]) and guard.scale == 0.5 and guard.reverts == 1


@pytest.fixture
def setting(home):
    cfg = load_config(overrides=TINY)
    prepared = data_stage.prepare(cfg.data)
    return cfg, prepared, obtain_teacher(TeacherContext.from_config(cfg, prepared)).model


def test_a_harmful_teacher_step_is_reverted_and_damped(setting):
    """Force the co-trained head to teach garbage after the first guard check: the next
    check finds the student behind its snapshot, restores student and head to it, and
    halves the head's step size, which its next update runs at; the returned student is
    the better one."""
    cfg, prepared, teacher = setting
    cfg = load_config(overrides=TINY + ["student.train.steps=60", "meta_distill.guard.every=20",
                                        "meta_distill.head.max_drift=1e9"])
    ctx = StudentContext.from_config(cfg, prepared, teacher, seed=0)
    student = ctx.new_student()
    parts = co_teaching(ctx, student)
    head, seen = parts.head.head, {}

    class Harm(StepHook):  # after the guard's own hook, as a harmful meta step would land
        def after_step(self, step, optimizer):
            if step == 20:
                seen["snapshot_head"] = copy.deepcopy(head.state_dict())
                seen["snapshot_student"] = copy.deepcopy(student.state_dict())
                with torch.no_grad():  # a harmful meta step: the head now points at the wrong class
                    head.weight.copy_(-10 * head.weight.roll(1, 0))
                    head.bias.zero_()
                for group in optimizer.param_groups:  # and the student follows it fast
                    group["lr"] = 0.5
            if step == 40:
                seen["reverts"] = parts.check.guard.reverts
                seen["head"] = copy.deepcopy(head.state_dict())
                seen["student"] = copy.deepcopy(student.state_dict())
                seen["updates"] = parts.update.updates

    ctx.teach(student, parts.loss, [*parts.hooks, Harm()])
    assert seen["reverts"] == 1 and parts.check.guard.scale == 0.5
    for k, v in seen["snapshot_head"].items():
        assert torch.equal(seen["head"][k], v)
    for k, v in seen["snapshot_student"].items():  # the student went back to the snapshot, weights and all
        assert torch.equal(seen["student"][k], v), k
    assert parts.update.updates > seen["updates"]  # the head learned on after the revert ...
    assert parts.update.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.meta_distill.head.lr * 0.5)  # ... damped
    parts.check.finish()
    assert accuracy(student, *held_out_parts(ctx)[0]) >= parts.check.guard.best


# --- the improvement stage -----------------------------------------------------------------

def test_improved_teacher_never_sees_a_transfer_label_and_is_cached(setting, home, monkeypatch):
    cfg, prepared, teacher = setting
    assert "transfer_y" not in prepared.tensors and prepared.transfer() is not None
    seen = []
    original = improve.ConsistencyLoss.__call__

    def spy(self, logits, x, y, index):
        n_train = len(prepared.y("train"))
        seen.append((y[index >= n_train], y[index < n_train]))
        return original(self, logits, x, y, index)

    monkeypatch.setattr(improve.ConsistencyLoss, "__call__", spy)
    first = improve.improve_teacher(TeacherContext.from_config(cfg, prepared), teacher)
    assert not first.cached and first.result.steps == 20 and 0 <= first.mask_rate <= 1
    assert len(seen) == 20
    assert all((t == UNLABELED).all() and len(t) == 96 for t, _ in seen)  # 3 x 32 transfer rows, unlabeled
    assert all((lab >= 0).all() and len(lab) == 32 for _, lab in seen)
    changed = any(not torch.equal(a, b) for a, b in zip(teacher.state_dict().values(),
                                                        first.model.state_dict().values()))
    assert changed
    again = improve.improve_teacher(TeacherContext.from_config(cfg, prepared), teacher)
    assert again.cached and len(seen) == 20
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    off = load_config(overrides=TINY + ["teacher.improve.method=none"])
    assert not improve.improves(off.teacher.improve, prepared)


def test_an_improved_teacher_is_kept_only_when_it_beats_the_original_beyond_noise(setting):
    """A teacher whose weights were damaged is never kept in place of the original; the
    original is kept in place of the damaged one; a copy of the same teacher is not kept
    (no disagreements: p = 1), except with keep_p=1, which always replaces."""
    cfg, prepared, teacher = setting
    damaged = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in damaged.parameters():
            p.add_(0.5 * torch.randn_like(p))
    worse = improve.judge_improvement(teacher, damaged, prepared, keep_p=0.05)
    assert not worse.kept and worse.improved_acc < worse.original_acc and worse.losses > worse.wins
    assert "learn from the original teacher" in worse.reason and "teacher.improve.keep_p 0.05" in worse.reason
    better = improve.judge_improvement(damaged, teacher, prepared, keep_p=0.05)
    assert better.kept and better.p < 0.05 and (better.wins, better.losses) == (worse.losses, worse.wins)
    same = improve.judge_improvement(teacher, copy.deepcopy(teacher), prepared, keep_p=0.05)
    assert not same.kept and (same.wins, same.losses, same.p) == (0, 0, 1.0)
    assert improve.judge_improvement(teacher, copy.deepcopy(teacher), prepared, keep_p=1.0).kept


def test_a_teacher_that_harms_the_student_slowly_is_bounded_by_the_reference(setting, monkeypatch):
    """The co-trained head's targets drift, over the whole run, towards the next class's
    (a wrong label, more and more sure): the guard, which compares the student with its own
    snapshots, lets it through; the default reference (standard practice) trained from the
    same seed is returned instead, exactly the sweep's paired standard_practice student, which
    the sweep trained already and the reference reuses instead of training it again."""
    from pipelines.students import meta_distill, paired
    from pipelines.students.fit import run_student

    cfg, prepared, teacher = setting
    steps = 200
    cfg = load_config(overrides=TINY + [f"student.train.steps={steps}"])
    assert cfg.meta_distill.reference == "standard_practice"
    paired.forget()
    practice = run_student("standard_practice", cfg, prepared, teacher, seed=3)
    kd = run_student("kd", cfg, prepared, teacher, seed=3)
    original, calls = meta_distill.TeachingHead.targets, {"n": 0}

    def harmful(self, x, index):
        targets = original(self, x, index)
        calls["n"] += 1
        w = min(1.0, calls["n"] / steps)
        return (1 - w) * targets + w * 3 * targets.roll(1, dims=-1)

    trainings = []
    monkeypatch.setattr(meta_distill.TeachingHead, "targets", harmful)
    monkeypatch.setitem(meta_distill.REFERENCES, "standard_practice",
                        lambda ctx: trainings.append(ctx) or pytest.fail("the sweep's student was trained again"))
    logged = {}
    bounded = run_student("meta_distill", cfg, prepared, teacher, seed=3, on_log=lambda s, m: logged.update(m))
    calls["n"] = 0
    off = load_config(overrides=TINY + [f"student.train.steps={steps}", "meta_distill.reference=none"])
    harmed = run_student("meta_distill", off, prepared, teacher, seed=3)
    assert harmed.evaluation.accuracy < kd.evaluation.accuracy - 0.2  # the harm is real
    assert logged["returned_reference"] == 1.0 and logged["reference_wins"] > logged["learned_wins"]
    assert not trainings
    for a, b in zip(bounded.model.state_dict().values(), practice.model.state_dict().values()):
        assert torch.equal(a, b)
    assert bounded.result.seconds > practice.result.seconds  # the reference's compute is counted


def test_the_learned_student_replaces_the_reference_only_beyond_noise(setting, monkeypatch):
    """With the kd reference and a learned student that disagrees with it on held-out images:
    5 wins and 0 losses (p = 1/32) replace the reference at keep_p 0.05; 5 wins and 1 loss
    (p = 7/64) do not, but do at keep_p 0.2; a tie never does."""
    from pipelines.students import meta_distill, paired
    from pipelines.students.context import StudentContext

    cfg, prepared, teacher = setting
    ctx = StudentContext.from_config(cfg, prepared, teacher, seed=0)
    n = len(meta_distill.held_out_parts(ctx)[1][1])
    learned, reference = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)

    def returned(wins: int, losses: int, keep_p: float) -> str:
        hits = {id(reference): torch.zeros(n, dtype=torch.bool), id(learned): torch.zeros(n, dtype=torch.bool)}
        hits[id(learned)][:wins] = True
        hits[id(reference)][wins:wins + losses] = True
        monkeypatch.setattr(meta_distill, "correctness", lambda model, x, y: hits[id(model)])
        monkeypatch.setattr(paired, "trained_once", lambda method, c, train: (reference, TrainResult({}, 1.0)))
        c = dataclasses.replace(ctx, meta_distill=cfg.meta_distill.model_copy(update={"reference": "kd",
                                                                                      "keep_p": keep_p}))
        model, _ = meta_distill.bounded_by_reference(c, learned, TrainResult({}, 1.0))
        return "learned" if model is learned else "reference"

    assert returned(5, 0, 0.05) == "learned"
    assert returned(5, 1, 0.05) == "reference"
    assert returned(5, 1, 0.2) == "learned"
    assert returned(3, 3, 1.0) == "reference"


def test_the_learned_student_is_judged_on_images_its_teaching_never_saw(setting, monkeypatch):
    """The held-out images split into a teaching part (what HeldOut, and so the head, the
    temperature and the guard, draw from) and a judging part (what the keep test scores):
    disjoint, together the whole held-out set, judge_fraction of it judging, a different
    draw per seed and the same draw for the same seed."""
    from pipelines.students import meta_distill, paired
    from pipelines.students.context import StudentContext

    cfg, prepared, teacher = setting
    ctx = StudentContext.from_config(cfg, prepared, teacher, seed=0)
    x, y = ctx.held_out()
    (tx, ty), (jx, jy) = meta_distill.held_out_parts(ctx)
    assert len(jy) == round(len(y) * cfg.meta_distill.judge_fraction) and len(ty) + len(jy) == len(y)
    key = lambda images: {tuple(row.flatten().tolist()) for row in images}  # noqa: E731
    assert key(tx).isdisjoint(key(jx)) and key(tx) | key(jx) == key(x)
    assert torch.equal(meta_distill.held_out_parts(ctx)[1][0], jx)
    other = meta_distill.held_out_parts(dataclasses.replace(ctx, seed=1))[1][0]
    assert key(other) != key(jx)
    assert torch.equal(meta_distill.HeldOut(ctx, torch.nn.Linear(1, 1), 8).x, tx)

    scored = []
    monkeypatch.setattr(meta_distill, "correctness", lambda model, x, y: scored.append(x) or torch.ones(len(y), dtype=torch.bool))
    monkeypatch.setattr(paired, "trained_once", lambda method, c, train: (torch.nn.Linear(1, 1), TrainResult({}, 1.0)))
    c = dataclasses.replace(ctx, meta_distill=cfg.meta_distill.model_copy(update={"reference": "kd"}))
    meta_distill.bounded_by_reference(c, torch.nn.Linear(1, 1), TrainResult({}, 1.0))
    assert len(scored) == 2 and all(torch.equal(images, jx) for images in scored)


def test_the_learned_policy_can_be_the_strong_view(setting):
    """``teacher.improve.strong=learned``: the strong view is the searched policy (its base
    included) and the improvement's cache key follows the search; the default stays
    FixMatch's RandAugment over the narrow ops."""
    cfg, prepared, _ = setting
    learned = ["teacher.improve.strong=learned", "data.augment_search.steps=20", "data.augment_search.space=wide",
               "data.augment_search.base=fixed", "data.augment=[{name: horizontal_flip}]"]
    on = load_config(overrides=TINY + learned)
    view = improve.strong_view(TeacherContext.from_config(on, prepared))
    from pipelines.augment.search import AugmentContext, learned_policy

    spec = learned_policy(AugmentContext.from_config(on, prepared)).spec
    assert view.ops.ops == tuple(op["name"] for op in spec["ops"]) and view.ops.base is not None
    default = improve.strong_view(TeacherContext.from_config(cfg, prepared))
    assert default.ops.base is None and default.ops.ops == ("rotate", "shear_x", "shear_y", "translate_x",
                                                            "translate_y", "scale", "brightness", "contrast",
                                                            "sharpness")
    other_search = load_config(overrides=TINY + learned + ["data.augment_search.seed=1"])
    keys = {TeacherContext.from_config(c, prepared).improve_key for c in (cfg, on, other_search)}
    assert len(keys) == 3
    x = prepared.x("train")[:8]
    assert view(x, torch.arange(8)).shape == x.shape


# --- the long-horizon temperature -------------------------------------------------------

def _co_taught(cfg, prepared, teacher, smooth: bool = False):
    ctx = StudentContext.from_config(cfg, prepared, teacher, seed=0)
    student = ctx.new_student()
    if smooth:  # tanh for ReLU: see the tangent test
        student.net[2] = torch.nn.Tanh()
    parts = co_teaching(ctx, student)
    ctx.teach(student, parts.loss, parts.hooks)
    return student, parts.follow


def test_the_tangent_carried_through_the_real_loop_equals_finite_differences(setting):
    """The follower's d theta / d log T after 30 real steps (cosine schedule, momentum,
    weight decay, gradient clipping at 5) against the difference of two runs at
    T * exp(+-eps); the head and T stay put (head.lr 0, no decision within the run).  The
    student's hidden layer is tanh: with ReLU, the 128 x 16 pre-activations of a batch put
    kinks within eps of the trajectory, and the runs' difference measures the jumps (35%
    off at eps = 0.01 while the same jvp matched a one-step difference to 3e-4)."""
    cfg, prepared, teacher = setting
    fixed = TINY + ["meta_distill.head.lr=0", "meta_distill.guard.every=0", "meta_distill.temperature.window=1000",
                    "meta_distill.interval=5", "meta_distill.temperature.discount=1"]
    _, follow = _co_taught(load_config(overrides=fixed + ["meta_distill.temperature.learn=true"]), prepared, teacher,
                           smooth=True)
    eps, temperature = 0.01, 2.0
    plus, _ = _co_taught(load_config(overrides=fixed + [f"meta_distill.temperature.value={temperature * math.exp(eps)}"]),
                         prepared, teacher, smooth=True)
    minus, _ = _co_taught(load_config(overrides=fixed + [f"meta_distill.temperature.value={temperature * math.exp(-eps)}"]),
                          prepared, teacher, smooth=True)
    assert follow.follower.moves == 0 and len(follow.follower.readings) == 6  # one reading per update (30 / 5)
    minus_params = dict(minus.named_parameters())
    for name, p in plus.named_parameters():
        numeric = (p.detach() - minus_params[name].detach()) / (2 * eps)
        assert numeric.abs().max() > 1e-4, name
        error = (follow.follower.d_params[name] - numeric).norm() / numeric.norm()
        assert error < 1e-3, (name, error.item())


def test_the_temperature_moves_against_the_mean_hypergradient_only_when_the_readings_agree():
    """Hand-fed readings: the tangent is set so that each reading is ``c``.  Two readings
    that agree in sign beyond noise move log T by lr against their mean; two that disagree
    leave it; the box clips a move."""
    from meta.horizon import TemperatureFollower

    def feed(follower, values):
        params = {"w": torch.zeros(1)}
        for c in values:
            follower.d_params = {"w": torch.tensor([float(c)])}
            follower.read(params, lambda p: p["w"].sum())  # d held_out / d w = 1: the reading is c

    rising = TemperatureFollower(2.0, lr=0.1, box=(1.0, 8.0), window=2)
    feed(rising, [0.5, 0.7])  # the held-out loss rises with T: T must fall
    assert rising.moves == 1 and rising.log_t == pytest.approx(math.log(2.0) - 0.1)
    falling = TemperatureFollower(2.0, lr=0.1, box=(1.0, 8.0), window=2)
    feed(falling, [-0.5, -0.7])
    assert falling.moves == 1 and falling.log_t == pytest.approx(math.log(2.0) + 0.1)
    split = TemperatureFollower(2.0, lr=0.1, box=(1.0, 8.0), window=2)
    feed(split, [0.5, -0.7])  # they disagree: no move, and a new window starts
    assert split.moves == 0 and split.log_t == pytest.approx(math.log(2.0)) and split.readings == []
    boxed = TemperatureFollower(2.0, lr=1.0, box=(1.0, 2.5), window=2)
    feed(boxed, [-0.5, -0.7])
    assert boxed.temperature == pytest.approx(2.5)


def test_the_temperature_moves_inside_its_box_when_the_readings_agree(setting, monkeypatch):
    """Along a real run: every decision moves T against the sign of its window's mean
    hypergradient when the readings agree beyond noise, and not at all otherwise."""
    from meta.horizon import TemperatureFollower

    decisions = []
    original = TemperatureFollower.read

    def read(self, params, held_out):
        window, log_t = list(self.readings), self.log_t
        reading = original(self, params, held_out)
        if not self.readings:  # this reading closed a window
            window.append(reading)
            n, mean = len(window), sum(window) / len(window)
            std = math.sqrt(sum((r - mean) ** 2 for r in window) / (n - 1))
            decisions.append((abs(mean) > self.z * std / math.sqrt(n), mean, self.log_t - log_t))
        return reading

    monkeypatch.setattr(TemperatureFollower, "read", read)
    cfg, prepared, teacher = setting
    cfg = load_config(overrides=TINY + ["meta_distill.temperature.learn=true", "meta_distill.interval=1",
                                        "meta_distill.temperature.window=2", "meta_distill.temperature.lr=0.5",
                                        "meta_distill.temperature.box=[1.5, 2.5]", "meta_distill.guard.every=0"])
    _, follow = _co_taught(cfg, prepared, teacher)
    assert follow.follower.moves > 0 and len(decisions) == 15  # 30 readings in windows of 2
    for agree, mean, moved in decisions:
        if not agree:
            assert moved == 0
        elif moved:  # a move at the box's edge can be clipped to nothing
            assert math.copysign(1, moved) == -math.copysign(1, mean)
    assert sum(1 for agree, _, _ in decisions if agree) == follow.follower.moves
    assert 1.5 - 1e-9 <= follow.follower.temperature <= 2.5 + 1e-9


def test_weight_average_follows_the_formula_by_hand():
    """``teacher.improve.ema``: after steps with weights 1.0 then 3.0 from a start of 0.0,
    decay 0.5 gives 0.5 * 0 + 0.5 * 1 = 0.5, then 0.5 * 0.5 + 0.5 * 3 = 1.75; the
    batch-norm running mean is averaged the same way and its step counter copied."""
    net = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    with torch.no_grad():
        net[0].weight.fill_(0.0)
    average = improve.WeightAverage(net, 0.5)
    for value, batches in ((1.0, 1), (3.0, 2)):
        with torch.no_grad():
            net[0].weight.fill_(value)
            net[1].running_mean.fill_(2 * value)
            net[1].num_batches_tracked.fill_(batches)
        average.after_step(batches, None)
    assert average.average[0].weight.item() == pytest.approx(1.75)
    assert average.average[1].running_mean.item() == pytest.approx(3.5)
    assert average.average[1].num_batches_tracked.item() == 2
    restored = improve.WeightAverage(net, 0.5)
    restored.load_state_dict(average.state_dict())  # a resumed run carries the average on
    assert restored.average[0].weight.item() == pytest.approx(1.75)


def test_the_improved_teacher_with_ema_is_the_average_not_the_trained_weights(setting):
    cfg, prepared, teacher = setting
    on = load_config(overrides=TINY + ["teacher.improve.ema=0.9"])
    model, _, _ = improve.fit_improved(teacher, on.teacher.improve, prepared, None,
                                       improve.strong_view(TeacherContext.from_config(on, prepared)), 0)
    plain, _, _ = improve.fit_improved(teacher, cfg.teacher.improve, prepared, None,
                                       improve.strong_view(TeacherContext.from_config(cfg, prepared)), 0)
    # the same run, so the average sits between the start and the trained weights, on neither
    for name, start in teacher.state_dict().items():
        if start.is_floating_point() and not torch.equal(start, plain.state_dict()[name]):
            avg, end = model.state_dict()[name], plain.state_dict()[name]
            assert not torch.equal(avg, end) and not torch.equal(avg, start), name
            break
    else:
        raise AssertionError("the improvement changed nothing")
