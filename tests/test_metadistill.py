"""Invariants of pilot-update meta-distillation (float64 where it helps)."""

import copy

import pytest
import torch
from torch import nn

from meta.distill import distillation_loss
from meta.functional import Params, forward, params_of
from meta.metadistill import DistillFn, Pilot, first_order_teacher_grad, meta_grad, quiz_loss_after_pilot
from tests.helpers import worst_relative_error


# MetaDistil's case, the teacher's weights as the meta-parameters, built from meta.metadistill's parts.
def teacher_distill(teacher: nn.Module, teacher_params: Params, x: torch.Tensor, pilot: Pilot) -> DistillFn:
    """MetaDistil's case: the KD loss against the teacher's logits, a function of its weights."""
    teacher_logits = forward(teacher, teacher_params, x)
    return lambda logits, y: distillation_loss(logits, teacher_logits, y, pilot.temperature, pilot.alpha,
                                               pilot.soft_loss)


def pilot_quiz_loss(student: nn.Module, student_params: Params, teacher: nn.Module, teacher_params: Params,
                    batch: tuple[torch.Tensor, torch.Tensor], quiz: tuple[torch.Tensor, torch.Tensor],
                    pilot: Pilot) -> torch.Tensor:
    """Cross-entropy of the pilot student on the quiz batch (a function of the teacher)."""
    return quiz_loss_after_pilot(student, student_params, teacher_distill(teacher, teacher_params, batch[0], pilot),
                                 batch, quiz, pilot)


def teacher_meta_grad(student: nn.Module, student_params: Params, teacher: nn.Module, teacher_params: Params,
                      batch, quiz, pilot: Pilot) -> tuple[Params, float]:
    """Second-order gradient of the pilot quiz loss with respect to the teacher, and the loss."""
    return meta_grad(student, student_params, teacher_distill(teacher, teacher_params, batch[0], pilot),
                     teacher_params, batch, quiz, pilot)


def nets(seed=0):
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    teacher = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return student, teacher


def batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    xq = torch.randn(10, 4, generator=g, dtype=torch.float64)
    return (x, torch.randint(0, 3, (8,), generator=g)), (xq, torch.randint(0, 3, (10,), generator=g))


@pytest.mark.parametrize("steps", [1, 3])
def test_teacher_meta_gradient_matches_finite_differences(steps):
    student, teacher = nets()
    batch, quiz = batches()
    pilot = Pilot(steps=steps, lr=0.5, temperature=2.0, alpha=0.7)
    t_params = {k: v.detach().clone().requires_grad_() for k, v in params_of(teacher).items()}
    analytic, _ = teacher_meta_grad(student, params_of(student), teacher, t_params, batch, quiz, pilot)
    base = {k: v.detach().clone() for k, v in t_params.items()}

    def loss_at(p):
        return pilot_quiz_loss(student, params_of(student), teacher, p, batch, quiz, pilot).item()

    assert worst_relative_error(analytic, base, loss_at) < 1e-4


def test_small_teacher_step_lowers_pilot_quiz_loss():
    student, teacher = nets(3)
    batch, quiz = batches(4)
    pilot = Pilot(steps=1, lr=0.5, temperature=2.0, alpha=0.9)
    t_params = {k: v.detach().clone().requires_grad_() for k, v in params_of(teacher).items()}
    grads, before = teacher_meta_grad(student, params_of(student), teacher, t_params, batch, quiz, pilot)
    stepped = {k: (v - 1e-2 * grads[k]).detach() for k, v in t_params.items()}
    after = pilot_quiz_loss(student, params_of(student), teacher, stepped, batch, quiz, pilot).item()
    assert after < before


def test_pilot_leaves_no_trace_on_student_or_its_optimizer():
    student, teacher = nets(5)
    batch, quiz = batches(6)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(student(batch[0]), batch[1]).backward()
    optimizer.step()  # some momentum state to protect
    params_before = copy.deepcopy(student.state_dict())
    state_before = copy.deepcopy(optimizer.state_dict())
    grads_before = [p.grad.clone() for p in student.parameters()]
    t_params = {k: v.detach().clone().requires_grad_() for k, v in params_of(teacher).items()}
    teacher_meta_grad(student, params_of(student), teacher, t_params, batch, quiz, Pilot(steps=2))
    first_order_teacher_grad(student, params_of(student), teacher, t_params, batch, quiz, Pilot(),
                             torch.Generator().manual_seed(0))
    for k, v in student.state_dict().items():
        assert torch.equal(v, params_before[k])
    after = optimizer.state_dict()
    for idx, st in state_before["state"].items():
        assert torch.equal(after["state"][idx]["momentum_buffer"], st["momentum_buffer"])
    assert all(torch.equal(p.grad, g) for p, g in zip(student.parameters(), grads_before))
    assert all(v.grad is None for v in t_params.values())


def test_first_order_gradient_sign_follows_quiz_improvement():
    """MPL's teacher gradient is h * d CE(teacher / T, sampled label) with h = quiz loss
    before minus after the pilot step: checked against that formula computed here, and its
    sign on two cases with a known answer (alpha=0, so the pilot step is plain CE on the
    batch): quizzed on the batch it trained on, the step helps (h > 0) and descending the
    gradient makes the teacher surer of its labels; quizzed on other labels it hurts (h < 0)
    and the gradient turns around."""
    import torch.nn.functional as F

    student, teacher = nets(7)
    (x, y), _ = batches(8)
    pilot = Pilot(lr=0.1, temperature=2.0, alpha=0.0)
    t_params = {k: v.detach().clone().requires_grad_() for k, v in params_of(teacher).items()}

    def by_hand(quiz):
        labels = torch.multinomial(F.softmax(teacher(x).detach() / 2.0, -1), 1,
                                   generator=torch.Generator().manual_seed(0)).squeeze(1)
        ce = F.cross_entropy(teacher(x) / 2.0, labels)
        direction = torch.autograd.grad(ce, list(teacher.parameters()))
        s = {k: v.detach().clone().requires_grad_() for k, v in params_of(student).items()}
        before = F.cross_entropy(torch.func.functional_call(student, s, (quiz[0],)), quiz[1])
        step = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(student, s, (x,)), y), list(s.values()))
        after_params = {k: v - 0.1 * g for (k, v), g in zip(s.items(), step)}
        after = F.cross_entropy(torch.func.functional_call(student, after_params, (quiz[0],)), quiz[1])
        return float((before - after).detach()), direction

    for quiz, sign in (((x, y), 1.0), ((x, (y + 1) % 3), -1.0)):
        g, _ = first_order_teacher_grad(student, params_of(student), teacher, t_params, (x, y), quiz, pilot,
                                        torch.Generator().manual_seed(0))
        again, _ = first_order_teacher_grad(student, params_of(student), teacher, t_params, (x, y), quiz, pilot,
                                            torch.Generator().manual_seed(0))
        assert all(torch.equal(g[k], again[k]) for k in g)  # seeded: reproducible
        h, direction = by_hand(quiz)
        assert h * sign > 0, (h, sign)
        for (k, got), d in zip(g.items(), direction):
            assert torch.allclose(got, h * d, atol=1e-12), k
        cosine = sum((a * b).sum() for a, b in zip(g.values(), direction)) / (
            sum((a * a).sum() for a in g.values()).sqrt() * sum((b * b).sum() for b in direction).sqrt())
        assert cosine * sign > 0.99  # same direction as the label's CE gradient, or the opposite


TINY = ["teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [32]}", "teacher.train.steps=60",
        "student.train.steps=40", "meta_distill.interval=3", "meta_distill_pilot.interval=3", "data.label_budget=600"]


@pytest.mark.parametrize("learn", ["[head]", "[teacher]", "[calibration]", "[kd_params]", "[weights]",
                                   "[teacher, calibration, kd_params, weights]"])
def test_learning_rates_zero_reproduce_kd_trajectory(home, learn):
    """``meta_distill`` (the co-trained head: learn=[head]) and ``meta_distill_pilot`` (the
    other items) at learning rates 0 follow ``kd``'s trajectory exactly."""
    from pipelines import data as data_stage
    from pipelines.config.loader import load_config
    from pipelines.students.fit import run_student
    from pipelines.teacher.context import TeacherContext
    from pipelines.teacher.fit import obtain_teacher

    if learn == "[head]":  # at kd's temperature and alpha; the guard off (a revert is not kd's trajectory)
        method, section = "meta_distill", ["meta_distill.temperature.value=null", "meta_distill.alpha=null",
                                           "meta_distill.guard.every=0", "meta_distill.reference=none"]
        rates = lambda lr: [f"meta_distill.head.lr={lr}"]  # noqa: E731
    else:
        method, section = "meta_distill_pilot", ["meta_distill_pilot.temperature=null", "meta_distill_pilot.alpha=null",
                                                 f"meta_distill_pilot.learn={learn}"]
        rates = lambda lr: [f"meta_distill_pilot.teacher_lr={lr / 5}", f"meta_distill_pilot.knob_lr={lr}"]  # noqa: E731
    cfg = load_config(overrides=TINY + section + rates(0))
    prepared = data_stage.prepare(cfg.data)
    assert prepared.transfer() is not None  # the pilot and the student see transfer examples too
    teacher = obtain_teacher(TeacherContext.from_config(cfg, prepared)).model
    kd = run_student("kd", cfg, prepared, teacher, seed=3)
    md = run_student(method, cfg, prepared, teacher, seed=3)
    for (name, a), b in zip(kd.model.state_dict().items(), md.model.state_dict().values()):
        assert (a - b).abs().max() <= 1e-5, name
    # ...and with a learning rate what is learned does move, so the student differs.
    moved_cfg = load_config(overrides=TINY + section + rates(0.05))
    moved = run_student(method, moved_cfg, prepared, teacher, seed=3)
    assert any((a - b).abs().max() > 1e-5 for a, b in zip(kd.model.state_dict().values(),
                                                          moved.model.state_dict().values()))
    if "teacher" in learn or learn == "[head]":  # all its weights, or its head over the frozen trunk
        changed = [k for (k, a), b in zip(teacher.state_dict().items(), moved.learned_teacher.state_dict().values())
                   if (a - b).abs().max() > 0]
        assert changed and (learn != "[head]" or all(k.startswith("net.3.") for k in changed)), changed
    else:
        assert moved.learned_teacher is None  # the teacher stayed frozen
