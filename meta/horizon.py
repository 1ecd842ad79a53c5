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
student's: :func:`tangent_step` carries the tangents of the parameters and of the momentum
buffer through exactly ``torch.optim.SGD``'s step (tested against it, and against finite
differences of whole trajectories, in tests/test_horizon.py).  Pure torch.
"""

from __future__ import annotations

import math
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


def tangent_step(d_params: Params, d_buffer: Params, g: Params, dg: Params, opt: SGD,
                 clip: float | None = None) -> tuple[Params, Params]:
    """The tangents of the parameters and the momentum buffer after one step of
    ``torch.optim.SGD``, from the tangents before it (discounted already), the step's raw
    gradient ``g`` and its directional derivative ``dg``.  With ``clip``, the step is that
    of a loop that clipped the gradient's global norm to ``clip`` first (as
    ``clip_grad_norm_``): the factor's own derivative is carried too."""
    scale, d_scale = 1.0, 0.0
    if clip is not None:
        norm = torch.sqrt(sum((v * v).sum() for v in g.values()))
        if norm > clip:
            scale = clip / (norm + 1e-6)
            d_norm = sum((g[k] * dg[k]).sum() for k in g) / norm
            d_scale = -clip / (norm + 1e-6) ** 2 * d_norm
    new_d_params, new_d_buffer = {}, {}
    for k, v in d_params.items():
        dgk = scale * dg[k] + d_scale * g[k] + opt.weight_decay * v
        new_d_buffer[k] = (opt.momentum * d_buffer[k] + dgk).detach()
        d_step = dgk + opt.momentum * new_d_buffer[k] if opt.nesterov else new_d_buffer[k]
        new_d_params[k] = (v - opt.lr * d_step).detach()
    return new_d_params, new_d_buffer


def hypergradient(state: Trajectory, held_out: Callable[[Params], torch.Tensor]) -> torch.Tensor:
    """``d held_out(theta_t) / d log T`` along the trajectory so far: the held-out loss's
    gradient at the current parameters, dotted with their tangent."""
    params = {k: v.detach().requires_grad_() for k, v in state.params.items()}
    grads = torch.autograd.grad(held_out(params), list(params.values()))
    return sum((g * state.d_params[k]).sum() for g, k in zip(grads, params))


class TemperatureFollower:
    """RTHO along a real training run: the training loop takes its own SGD steps, and after
    each one :meth:`follow` carries the tangent ``d theta / d log T`` through it (one
    ``jvp`` at the parameters the step started from, discounted by ``discount`` first, as
    MARTHE).  :meth:`read` takes the held-out hypergradient ``grad L_val . tangent``; once
    ``window`` readings agree in sign beyond ``z`` standard errors, ``log T`` moves by
    ``lr`` against their mean's sign, inside ``box`` (bounds on T), and a new window starts."""

    def __init__(self, temperature: float, lr: float, box: tuple[float, float], discount: float = 1.0,
                 window: int = 5, z: float = 2.0):
        self.log_t, self.lr, self.discount, self.window, self.z = math.log(temperature), lr, discount, window, z
        self.box = (math.log(box[0]), math.log(box[1]))
        self.d_params: Params | None = None
        self.d_buffer: Params | None = None
        self.readings: list[float] = []
        self.moves = 0

    @property
    def temperature(self) -> float:
        return math.exp(self.log_t)

    def follow(self, params_before: Params, loss: StepLoss, opt: SGD, clip: float | None = None,
               average: Callable[[list[torch.Tensor]], object] | None = None) -> None:
        """The tangent after the step the loop just took from ``params_before`` on ``loss``
        (``average``: sums shards of a data-parallel batch into its mean, in place)."""
        if self.d_params is None:
            self.d_params = {k: torch.zeros_like(v) for k, v in params_before.items()}
            self.d_buffer = {k: torch.zeros_like(v) for k, v in params_before.items()}
        d_params = {k: self.discount * v for k, v in self.d_params.items()}
        d_buffer = {k: self.discount * v for k, v in self.d_buffer.items()}
        log_t = torch.tensor(self.log_t, dtype=next(iter(params_before.values())).dtype)
        g, dg = jvp(grad(loss), (params_before, log_t), (d_params, torch.ones_like(log_t)))
        if average is not None:
            average([*g.values(), *dg.values()])
        self.d_params, self.d_buffer = tangent_step(d_params, d_buffer, g, dg, opt, clip)

    def read(self, params: Params, held_out: Callable[[Params], torch.Tensor]) -> float:
        """One hypergradient reading at ``params``; moves ``log T`` when the window clears its noise."""
        reading = float(hypergradient(Trajectory(params, {}, self.d_params, {}), held_out))
        self.readings.append(reading)
        if len(self.readings) >= self.window:
            n = len(self.readings)
            mean = sum(self.readings) / n
            std = math.sqrt(sum((r - mean) ** 2 for r in self.readings) / (n - 1))
            if abs(mean) > self.z * std / math.sqrt(n):
                self.log_t = min(max(self.log_t - math.copysign(self.lr, mean), self.box[0]), self.box[1])
                self.moves += 1
            self.readings = []
        return reading

    def state_dict(self) -> dict:
        return {"log_t": self.log_t, "d_params": self.d_params, "d_buffer": self.d_buffer,
                "readings": self.readings, "moves": self.moves}

    def load_state_dict(self, state: dict) -> None:
        self.log_t, self.d_params, self.d_buffer = state["log_t"], state["d_params"], state["d_buffer"]
        self.readings, self.moves = state["readings"], state["moves"]
