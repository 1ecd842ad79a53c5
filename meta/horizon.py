"""Long-horizon hypergradients of a training knob in forward mode (RTHO).

Franceschi et al. 2017 ("Forward and reverse gradient-based hyperparameter
optimization", the real-time variant) carry the tangent ``Z_t = d theta_t / d lambda``
of the training trajectory forward, one Jacobian-vector product per step, so the
hypergradient of a held-out loss after ``t`` steps, ``grad L_val(theta_t) . Z_t``, can be
read at any step, with no unrolled graph kept and no horizon cut.  MARTHE (Donini et al.
2020) multiplies the tangent by a discount ``gamma`` before each step, so the influence
of long-past steps fades (``gamma = 1``: RTHO; ``gamma = 0``: one step ahead only).

Here the knob is ``log T`` (the distillation temperature, positive, searched in log
space) and the optimiser is torch's SGD with momentum, weight decay and Nesterov, as the
student's: :func:`sgd_step` takes exactly ``torch.optim.SGD``'s step (tested), and the
tangents of the parameters and of the momentum buffer go with it.  Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import grad, jvp

from meta.functional import Params

# (params, log_t) -> the training loss of this step's batch
StepLoss = Callable[[Params, torch.Tensor], torch.Tensor]


@dataclass
class Trajectory:
    """The student's parameters and momentum buffer, and their tangents along ``log T``."""

    params: Params
    buffer: Params
    d_params: Params
    d_buffer: Params

    @classmethod
    def start(cls, params: Params) -> Trajectory:
        params = {k: v.detach() for k, v in params.items()}
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        return cls(params, dict(zeros), dict(zeros), dict(zeros))


@dataclass(frozen=True)
class SGD:
    """torch.optim.SGD's settings (no dampening)."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False


def sgd_step(state: Trajectory, loss: StepLoss, log_t: torch.Tensor, opt: SGD, discount: float = 1.0) -> Trajectory:
    """One SGD step of the parameters and, alongside, of their tangent: the gradient and its
    directional derivative along (tangent, d log T = 1) come from one ``jvp``.  A zero
    buffer stands for torch's "no buffer yet" (``momentum * 0 + g = g``)."""
    d_params = {k: discount * v for k, v in state.d_params.items()}
    d_buffer = {k: discount * v for k, v in state.d_buffer.items()}
    g, dg = jvp(grad(loss), (state.params, log_t.detach()), (d_params, torch.ones_like(log_t)))
    params, buffer, new_d_params, new_d_buffer = {}, {}, {}, {}
    for k, p in state.params.items():
        gk, dgk = g[k] + opt.weight_decay * p, dg[k] + opt.weight_decay * d_params[k]
        buffer[k] = opt.momentum * state.buffer[k] + gk
        new_d_buffer[k] = opt.momentum * d_buffer[k] + dgk
        step, d_step = (gk + opt.momentum * buffer[k], dgk + opt.momentum * new_d_buffer[k]) if opt.nesterov \
            else (buffer[k], new_d_buffer[k])
        params[k] = (p - opt.lr * step).detach()
        new_d_params[k] = (d_params[k] - opt.lr * d_step).detach()
    return Trajectory(params, {k: v.detach() for k, v in buffer.items()}, new_d_params,
                      {k: v.detach() for k, v in new_d_buffer.items()})


def hypergradient(state: Trajectory, held_out: Callable[[Params], torch.Tensor]) -> torch.Tensor:
    """``d held_out(theta_t) / d log T`` along the trajectory so far: the held-out loss's
    gradient at the current parameters, dotted with their tangent."""
    params = {k: v.detach().requires_grad_() for k, v in state.params.items()}
    grads = torch.autograd.grad(held_out(params), list(params.values()))
    return sum((g * state.d_params[k]).sum() for g, k in zip(grads, params))
