"""Teaching knobs (meta.teaching): identity at the start, exact meta-gradients."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from meta.distill import distillation_loss
from meta.functional import params_of
from meta.metadistill import Pilot, meta_grad, quiz_loss_after_pilot
from meta.teaching import KNOBS, TeachingKnobs
from tests.helpers import worst_relative_error


def batch(seed=0, n=8, classes=3):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, classes, generator=g, dtype=torch.float64)
    t = torch.randn(n, classes, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    y[::3] = -1  # some unlabeled transfer examples
    return s, t, y


@pytest.mark.parametrize("knobs", [(), ("calibration",), ("kd_params",), ("weights",), KNOBS])
def test_untrained_knobs_are_exactly_kd(knobs):
    s, t, y = batch()
    module = TeachingKnobs(3, 2.5, 0.8, "kl", knobs).double()
    assert torch.allclose(module(s, t, y), distillation_loss(s, t, y, 2.5, 0.8), rtol=0, atol=1e-12)


def test_knob_values_have_their_documented_meaning():
    s, t, y = batch(1)
    module = TeachingKnobs(3, 2.0, 0.5, "kl", ("calibration", "kd_params")).double()
    with torch.no_grad():
        module.class_log_scale.copy_(torch.tensor([0.0, torch.log(torch.tensor(2.0)), 0.0]))
        module.class_bias.copy_(torch.tensor([0.5, 0.0, 0.0]))
        module.log_temperature_scale.fill_(torch.log(torch.tensor(1.5)))
        module.alpha_shift.fill_(0.9)  # 0.5 + 0.9 clamps to 1
    targets = t.clone()
    targets[:, 1] /= 2
    targets[:, 0] += 0.5
    assert torch.allclose(module(s, t, y), distillation_loss(s, targets, y, 3.0, 1.0))


def test_unknown_knob_is_refused():
    with pytest.raises(ValueError, match="unknown teaching knob.*temperture"):
        TeachingKnobs(3, 1.0, 0.5, "kl", ("temperture",))


def _setting(seed=0):
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    teacher = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    y[1::2] = -1
    quiz = (torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (7,), generator=g))
    return student, teacher, (x, y), quiz


# The weighting net's inputs are detached facts about the pilot student, so after a second
# pilot step its meta-gradient leaves out their dependence on the knobs: exact for K = 1.
@pytest.mark.parametrize("knobs,steps", [(("calibration",), 2), (("kd_params",), 2), (("weights",), 1)])
def test_knob_meta_gradient_matches_finite_differences(knobs, steps):
    student, teacher, (x, y), quiz = _setting()
    module = TeachingKnobs(3, 2.0, 0.6, "kl", knobs).double()
    with torch.no_grad():  # away from the identity, so every path of the gradient is exercised
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pilot = Pilot(steps=steps, lr=0.4)
    teacher_logits = teacher(x).detach()

    def distill_at(params):
        return lambda logits, labels: functional_call(module, params, (logits, teacher_logits, labels))

    params = {k: v.detach().clone().requires_grad_() for k, v in module.named_parameters()}
    analytic, _ = meta_grad(student, params_of(student), distill_at(params), params, (x, y), quiz, pilot)
    base = {k: v.detach().clone() for k, v in params.items()}

    def loss_at(p):
        return quiz_loss_after_pilot(student, params_of(student), distill_at(p), (x, y), quiz, pilot).item()

    assert worst_relative_error(analytic, base, loss_at) < 1e-4


def test_a_small_knob_step_lowers_the_pilot_quiz_loss():
    student, teacher, (x, y), quiz = _setting(3)
    module = TeachingKnobs(3, 4.0, 0.9, "kl", KNOBS).double()
    pilot = Pilot(steps=1, lr=0.5)
    teacher_logits = teacher(x).detach()
    params = {k: v.detach().clone().requires_grad_() for k, v in module.named_parameters()}

    def distill_at(p):
        return lambda logits, labels: functional_call(module, p, (logits, teacher_logits, labels))

    grads, before = meta_grad(student, params_of(student), distill_at(params), params, (x, y), quiz, pilot)
    stepped = {k: (v - 1e-2 * grads[k]).detach() for k, v in params.items()}
    after = quiz_loss_after_pilot(student, params_of(student), distill_at(stepped), (x, y), quiz, pilot).item()
    assert after < before
