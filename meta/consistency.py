"""Consistency training on unlabeled data (FixMatch, Sohn et al. 2020; UDA, Xie et al. 2020).

The model's prediction on a weak view of an unlabeled image, kept where it is confident,
is the target of its prediction on a strong view of the same image.  ``sharpen=None`` is
FixMatch (the hard pseudo-label, cross-entropy); a temperature is UDA (the prediction
sharpened by ``softmax(logits / sharpen)``, cross-entropy against it).  Either way the
mean runs over every unlabeled example, so a low-confidence batch contributes less.
Pure torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pseudo_targets(weak_logits: torch.Tensor, threshold: float,
                   sharpen: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, mask)`` from the weak view's logits (no gradient): targets as class
    probabilities (one-hot when ``sharpen`` is None), mask 1 where the weak view's top
    probability reaches ``threshold``."""
    with torch.no_grad():
        probs = weak_logits.float().softmax(-1)
        confidence, label = probs.max(-1)
        mask = (confidence >= threshold).float()
        if sharpen is None:
            targets = F.one_hot(label, weak_logits.shape[-1]).float()
        else:
            targets = (weak_logits.float() / sharpen).softmax(-1)
    return targets, mask


def consistency_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float = 0.95,
                     sharpen: float | None = None) -> tuple[torch.Tensor, float]:
    """The masked cross-entropy of the strong view against the weak view's targets,
    averaged over all examples; and the share of examples kept (the mask rate)."""
    targets, mask = pseudo_targets(weak_logits, threshold, sharpen)
    per_example = -(targets * F.log_softmax(strong_logits.float(), -1)).sum(-1)
    return (per_example * mask).mean(), float(mask.mean())
