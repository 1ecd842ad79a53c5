"""The forward-mode tangent of a 20-step student trajectory along log T (meta.horizon)
against finite differences of the final parameters, in float64; the step against
torch.optim.SGD's."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import grad, jvp

from meta.distill import distillation_loss
from meta.functional import forward, params_of
from meta.horizon import SGD, StepLoss, Trajectory, hypergradient, tangent_step

OPT = SGD(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)


# The reference trajectory: torch.optim.SGD's step of the parameters (tested below) and,
# alongside, meta.horizon's step of their tangent, as TemperatureFollower takes it.
def sgd_step(state: Trajectory, loss: StepLoss, log_t: torch.Tensor, opt: SGD, discount: float = 1.0) -> Trajectory:
    """One SGD step of the parameters and, alongside, of their tangent: the gradient and its
    directional derivative along (tangent, d log T = 1) come from one ``jvp``.  A zero
    buffer stands for torch's "no buffer yet" (``momentum * 0 + g = g``)."""
    d_params = {k: discount * v for k, v in state.d_params.items()}
    d_buffer = {k: discount * v for k, v in state.d_buffer.items()}
    g, dg = jvp(grad(loss), (state.params, log_t.detach()), (d_params, torch.ones_like(log_t)))
    params, buffer = {}, {}
    for k, p in state.params.items():
        gk = g[k] + opt.weight_decay * p
        buffer[k] = (opt.momentum * state.buffer[k] + gk).detach()
        step = gk + opt.momentum * buffer[k] if opt.nesterov else buffer[k]
        params[k] = (p - opt.lr * step).detach()
    new_d_params, new_d_buffer = tangent_step(d_params, d_buffer, g, dg, opt)
    return Trajectory(params, buffer, new_d_params, new_d_buffer)


def _setting():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    teacher = nn.Sequential(nn.Linear(6, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 16, 6, generator=g, dtype=torch.float64)  # 20 steps, 16 examples each
    y = torch.randint(0, 4, (20, 16), generator=g)
    y[:, ::2] = -1  # half of every batch is unlabeled transfer data: soft term only
    with torch.no_grad():
        teacher_logits = teacher(x)
    xq = torch.randn(64, 6, generator=g, dtype=torch.float64)
    yq = torch.randint(0, 4, (64,), generator=g)
    return student, x, y, teacher_logits, (xq, yq)


def _loss(student, x, y, t_logits):
    return lambda params, log_t: distillation_loss(forward(student, params, x), t_logits, y, log_t.exp(), 0.9)


def _run(student, x, y, t_logits, log_t: float, steps: int = 20, discount: float = 1.0) -> Trajectory:
    state = Trajectory.start(params_of(student))
    lt = torch.tensor(log_t, dtype=torch.float64)
    for s in range(steps):
        state = sgd_step(state, _loss(student, x[s], y[s], t_logits[s]), lt, OPT, discount)
    return state


def test_the_step_is_torch_sgd():
    student, x, y, t_logits, _ = _setting()
    state = _run(student, x, y, t_logits, math.log(3.0), steps=5)
    reference = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    reference.load_state_dict(student.state_dict())
    opt = torch.optim.SGD(reference.parameters(), lr=OPT.lr, momentum=OPT.momentum, weight_decay=OPT.weight_decay,
                          nesterov=True)
    for s in range(5):
        opt.zero_grad()
        distillation_loss(reference(x[s]), t_logits[s], y[s], 3.0, 0.9).backward()
        opt.step()
    for k, v in reference.named_parameters():
        assert torch.allclose(state.params[k], v, atol=1e-12), k


def test_tangent_of_20_steps_equals_finite_differences_of_the_final_parameters():
    student, x, y, t_logits, quiz = _setting()
    log_t, eps = math.log(3.0), 1e-6
    state = _run(student, x, y, t_logits, log_t)
    plus, minus = _run(student, x, y, t_logits, log_t + eps), _run(student, x, y, t_logits, log_t - eps)
    for k in state.params:
        numeric = (plus.params[k] - minus.params[k]) / (2 * eps)
        assert numeric.abs().max() > 1e-4, k  # the temperature really moves the trajectory
        error = (state.d_params[k] - numeric).norm() / numeric.norm()
        assert error < 1e-6, (k, error.item())
    # ... and the held-out hypergradient read from it, against the held-out loss's own difference
    held_out = lambda p: nn.functional.cross_entropy(forward(student, p, quiz[0]), quiz[1])  # noqa: E731
    numeric = (held_out(plus.params) - held_out(minus.params)) / (2 * eps)
    assert abs(hypergradient(state, held_out).item() - numeric.item()) < 1e-7 * max(1.0, abs(numeric.item()))


def test_a_discount_of_zero_keeps_only_the_last_step():
    """gamma = 0 (MARTHE's greedy end): the tangent is the last step's own effect, the
    difference of one step from the same start at log T +- eps."""
    student, x, y, t_logits, _ = _setting()
    log_t, eps = math.log(3.0), 1e-6
    before = _run(student, x, y, t_logits, log_t, steps=19)
    state = sgd_step(before, _loss(student, x[19], y[19], t_logits[19]), torch.tensor(log_t, dtype=torch.float64),
                     OPT, discount=0.0)
    greedy = {k: torch.zeros_like(v) for k, v in before.d_params.items()}
    start = Trajectory(before.params, before.buffer, greedy, dict(greedy))
    ends = [sgd_step(start, _loss(student, x[19], y[19], t_logits[19]), torch.tensor(log_t + e, dtype=torch.float64), OPT)
            for e in (eps, -eps)]
    for k in state.params:
        numeric = (ends[0].params[k] - ends[1].params[k]) / (2 * eps)
        assert torch.allclose(state.d_params[k], numeric, atol=1e-8), k
