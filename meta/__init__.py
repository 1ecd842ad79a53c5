"""Meta-learning and distillation algorithms: pure torch, no orchestration, no ranks."""

from meta.distill import distillation_loss

__all__ = ["distillation_loss"]
