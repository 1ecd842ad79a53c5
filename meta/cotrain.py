"""A teacher that keeps learning while it teaches: Meta Pseudo Labels' feedback (Pham et al.
2021), first order, and a trust region around the teacher it started as.  Pure torch.

The student takes a step on what the teacher taught; ``h`` is how much that step lowered
the student's loss on held-out labelled data, ``h = loss_before - loss_after``.  The
teacher then descends ``h * CE(teacher(x), y_hat)`` for the pseudo-labels ``y_hat`` it
taught on that step: a step that helped (``h > 0``) makes those labels more likely, one
that hurt makes them less likely.  This is the score-function (REINFORCE) estimate of the
held-out loss's gradient with the loss before the step as the baseline:
``d/dz E_{y~p(z)}[L(theta'(y))] = E[(L(theta'(y)) - L(theta)) d log p(y|z)/dz]`` and
``d log p / dz = -d CE / dz`` (tested against the exact expectation).  The paper's
equation and its official code disagree on this sign (google-research issue 602); the
derivation above is the one tested.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def feedback_h(before: float, after: float, clip: float, scale: float = 1.0) -> float:
    """The student's held-out improvement from its last step, in units of ``scale``,
    clipped to ``[-clip, clip]``."""
    return max(-clip, min(clip, (before - after) / scale))


def feedback_loss(teacher_logits: torch.Tensor, pseudo_labels: torch.Tensor, h: float) -> torch.Tensor:
    """``h * CE(teacher_logits, pseudo_labels)``: descending it raises the pseudo-labels'
    probability when ``h > 0`` and lowers it when ``h < 0``."""
    return h * F.cross_entropy(teacher_logits, pseudo_labels)


def drift(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """``KL(reference || current)`` of the class distributions, averaged over examples: the
    trust region's distance from the teacher the co-training started from."""
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference_logits, -1), reduction="batchmean",
                    log_target=True)
