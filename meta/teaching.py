"""Low-dimensional "how to teach" knobs on a frozen teacher, meta-learned like MetaDistil's
teacher: each knob shapes the distillation loss, and its gradient is the second-order
gradient of the pilot student's quiz loss (``meta.metadistill.meta_grad``).

Knobs (any combination):

- ``calibration``: a per-class temperature and bias on the teacher's logits,
  ``z_c * exp(-s_c) + b_c`` (the teacher's targets, reshaped class by class);
- ``kd_params``: the KD temperature and alpha themselves (CTKD learns the temperature);
- ``weights``: a per-example weight between the soft and the hard term from a tiny net whose
  inputs are the teacher's confidence, the student's soft loss and whether the example is
  labelled.

Every knob starts at the identity, so an untrained :class:`TeachingKnobs` computes exactly
``meta.distill.distillation_loss`` with the configured temperature and alpha.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meta.distill import distillation_loss, soft_terms

KNOBS = ("calibration", "kd_params", "weights")


class TeachingKnobs(nn.Module):
    """``forward(student_logits, teacher_logits, labels) -> loss``: the distillation loss
    under the knobs' current values (labels < 0 mark unlabeled transfer examples)."""

    def __init__(self, num_classes: int, temperature: float, alpha: float, soft_loss: str = "kl",
                 knobs: tuple[str, ...] | list[str] = (), hidden: int = 16):
        super().__init__()
        unknown = set(knobs) - set(KNOBS)
        if unknown:
            raise ValueError(f"unknown teaching knob(s) {sorted(unknown)}; allowed: {', '.join(KNOBS)}")
        self.temperature, self.alpha, self.soft_loss = float(temperature), float(alpha), soft_loss
        self.knobs = tuple(k for k in KNOBS if k in knobs)
        if "calibration" in self.knobs:
            self.class_log_scale = nn.Parameter(torch.zeros(num_classes))
            self.class_bias = nn.Parameter(torch.zeros(num_classes))
        if "kd_params" in self.knobs:
            self.log_temperature_scale = nn.Parameter(torch.zeros(()))
            self.alpha_shift = nn.Parameter(torch.zeros(()))
        if "weights" in self.knobs:
            # Zero output layer: every example starts at weight alpha.
            self.weight_net = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 1))
            nn.init.zeros_(self.weight_net[2].weight)
            nn.init.zeros_(self.weight_net[2].bias)

    def targets(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The teacher's logits after the per-class calibration (unchanged without it)."""
        if "calibration" not in self.knobs:
            return teacher_logits
        return teacher_logits * torch.exp(-self.class_log_scale) + self.class_bias

    def kd_temperature(self) -> float | torch.Tensor:
        if "kd_params" not in self.knobs:
            return self.temperature
        return self.temperature * torch.exp(self.log_temperature_scale)

    def kd_alpha(self) -> float | torch.Tensor:
        if "kd_params" not in self.knobs:
            return self.alpha
        # Clamped rather than squashed: alpha = 0 or 1 stays reachable and exact at the start.
        return (self.alpha + self.alpha_shift).clamp(0.0, 1.0)

    def example_weights(self, student_logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor,
                        temperature, alpha) -> float | torch.Tensor:
        if "weights" not in self.knobs:
            return alpha
        with torch.no_grad():  # the net's inputs are facts about the example, not paths to it
            confidence = F.softmax(targets, dim=-1).amax(-1)
            student_soft = soft_terms(student_logits, targets, temperature, self.soft_loss)
            features = torch.stack([confidence, torch.log1p(student_soft), (labels >= 0).to(targets.dtype)], -1)
        return (alpha + self.weight_net(features).squeeze(-1)).clamp(0.0, 1.0)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        targets = self.targets(teacher_logits)
        temperature, alpha = self.kd_temperature(), self.kd_alpha()
        weights = self.example_weights(student_logits, targets, labels, temperature, alpha)
        return distillation_loss(student_logits, targets, labels, temperature, weights, self.soft_loss)

    @torch.no_grad()
    def summary(self) -> dict[str, float]:
        """A few numbers to log: the learned temperature and alpha, the spread of the
        per-class scales."""
        out: dict[str, float] = {}
        if "kd_params" in self.knobs:
            out["knob_temperature"] = float(self.kd_temperature())
            out["knob_alpha"] = float(self.kd_alpha())
        if "calibration" in self.knobs:
            out["knob_class_scale_min"] = float(torch.exp(-self.class_log_scale).min())
            out["knob_class_scale_max"] = float(torch.exp(-self.class_log_scale).max())
            out["knob_class_bias_absmax"] = float(self.class_bias.abs().max())
        if "weights" in self.knobs:
            out["knob_weight_out_norm"] = float(self.weight_net[2].weight.norm())
        return out
