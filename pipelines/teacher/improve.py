"""The teacher-improvement stage: the labelled teacher keeps training on the unlabeled
transfer split by consistency (``meta.consistency``), in the shared training loop.

Each step is a labelled batch and ``unlabeled_ratio`` times as many transfer images, both
under the weak view (the data's own augmentation, or none); the loss is the labelled
cross-entropy plus ``weight`` times the consistency of a strong view of each transfer
image with its weak view's confident prediction.  Transfer images carry no labels (the
prepared data holds none for them): the loop marks them ``UNLABELED`` and only the
consistency term reads them.  Cached under the project home by the teacher's key and
this section (``TeacherContext.improve_key``), so the seeds and methods of a sweep, and
later runs, share one improvement.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from meta.augment import OPS, AugmentPolicy
from meta.consistency import consistency_loss
from models.normalize import unwrap
from models.weights import save_weights
from pipelines.augment.policies import LearnedOps, uniform
from pipelines.augment.search import learned_policy
from pipelines.common.home import made_once
from pipelines.config.teacher import ImproveConfig
from pipelines.data.prepared import Prepared
from pipelines.engine.batches import Augment, Transfer
from pipelines.engine.loop import LogFn, StepHook, TrainResult, train_classifier
from pipelines.engine.metrics import correctness, held_out, sign_test
from pipelines.teacher.context import TeacherContext
from pipelines.teacher.fit import TeacherOutcome, cached_teacher, record_cost, teacher_inputs, teacher_spec


class StrongView:
    """FixMatch's strong view, batched and seeded per image: a policy's ops (``LearnedOps``),
    then a cutout square set to the mean colour (0 in normalised units)."""

    def __init__(self, ops: LearnedOps, cutout: float):
        self.ops, self.cutout = ops, cutout

    def __call__(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        x = self.ops(x, seeds)
        if self.cutout == 0:
            return x
        n, _, h, w = x.shape
        side_h, side_w = max(1, round(self.cutout * h)), max(1, round(self.cutout * w))
        seeds = seeds.to(x.device)
        top = (uniform(seeds, 101) * (h - side_h + 1)).long().view(-1, 1, 1, 1)
        left = (uniform(seeds, 102) * (w - side_w + 1)).long().view(-1, 1, 1, 1)
        r = torch.arange(h, device=x.device).view(1, 1, h, 1)
        c = torch.arange(w, device=x.device).view(1, 1, 1, w)
        inside = (r >= top) & (r < top + side_h) & (c >= left) & (c < left + side_w)
        return x.masked_fill(inside, 0.0)


class ConsistencyLoss(StepHook):
    """The stage's batch loss: labelled cross-entropy + ``weight`` x consistency on the
    transfer rows.  The strong view's seeds hash (row, step), so a resumed or sharded run
    draws the same views: it is also a step hook, told the step before each forward.
    ``mask_rates`` records the share of pseudo-labels kept."""

    def __init__(self, model: nn.Module, strong: Augment, cfg: ImproveConfig, seed: int):
        self.model, self.strong, self.cfg, self.seed = model, strong, cfg, seed
        self.step, self.mask_rates = 0, []

    def before_step(self, step: int, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
        self.step = step

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        labelled = y >= 0
        loss = F.cross_entropy(logits[labelled], y[labelled])
        if (~labelled).any():
            seeds = (index[~labelled] * 1_000_003 + self.step * 7_919 + self.seed) & 0x7FFFFFFF
            strong_logits = self.model(self.strong(x[~labelled], seeds))
            term, rate = consistency_loss(logits[~labelled].detach(), strong_logits, self.cfg.threshold,
                                          self.cfg.sharpen)
            loss = loss + self.cfg.weight * term
            self.mask_rates.append(rate)
        return loss


class WeightAverage(StepHook):
    """``teacher.improve.ema``: after each optimiser step, ``average = decay * average +
    (1 - decay) * weights``, for the parameters and the floating buffers (batch-norm
    statistics) alike; integer buffers are copied.  Starts from the teacher it improves,
    so early steps cannot pull it far."""

    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay = model, decay
        self.average = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        live = dict(self.model.state_dict())
        for name, value in self.average.state_dict().items():
            if value.is_floating_point():
                value.lerp_(live[name], 1 - self.decay)
            else:
                value.copy_(live[name])

    def state_dict(self) -> dict:
        return {"average": self.average.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state["average"])


def strong_view(ctx: TeacherContext) -> StrongView:
    """``teacher.improve.strong``'s view: FixMatch's RandAugment (``strong_depth`` narrow ops
    drawn uniformly, each at up to its full range) or the learned policy, then cutout."""
    improve, data = ctx.teacher.improve, ctx.data
    if improve.strong == "learned":
        spec = learned_policy(ctx.augmentation).spec
    else:
        spec = AugmentPolicy(OPS, 0.999, improve.strong_depth, "uniform").to_json()
    return StrongView(LearnedOps(spec, data.mean, data.std), improve.cutout)


def improves(improve: ImproveConfig, data: Prepared) -> bool:
    """Whether the teacher goes through the improvement stage (``teacher.improve``) on ``data``."""
    return improve.method != "none" and data.transfer() is not None


def fit_improved(teacher: nn.Module, improve: ImproveConfig, data: Prepared, weak: Augment | None,
                 strong: Augment, seed: int, on_log: LogFn | None = None) -> tuple[nn.Module, TrainResult, float]:
    """A copy of ``teacher`` after consistency training on the transfer split (``weak`` and
    ``strong`` views); its training result and the mean share of pseudo-labels kept."""
    model = copy.deepcopy(teacher).train().requires_grad_(True)
    loss = ConsistencyLoss(model, strong, improve, seed)
    average = WeightAverage(model, improve.ema) if improve.ema is not None else None
    hooks = [loss] if average is None else [loss, average]
    transfer = Transfer(data.transfer(), int(round(improve.unlabeled_ratio * improve.batch_size)))
    result = train_classifier(model, data.x("train"), data.y("train"), improve, loss, seed=seed, hooks=hooks,
                              augment=weak if improve.augment else None, val=(data.x("val"), data.y("val")),
                              on_log=on_log, desc="teacher improve", transfer=transfer, device=data.device)
    rate = sum(loss.mask_rates) / max(1, len(loss.mask_rates))
    return (model if average is None else average.average).eval(), result, rate


def improve_teacher(ctx: TeacherContext, teacher: nn.Module, on_log: LogFn | None = None) -> TeacherOutcome:
    """The improved teacher: from the cache, or trained now from ``teacher``."""
    folder = ctx.improved_folder
    return made_once(f"teacher_improved-{folder.name}", lambda: cached_teacher(folder, ctx.data),
                     lambda: _improve(ctx, teacher, folder, on_log))


def _improve(ctx: TeacherContext, teacher: nn.Module, folder: Path, on_log: LogFn | None) -> TeacherOutcome:
    start = time.perf_counter()
    _, weak = teacher_inputs(ctx)
    model, result, rate = fit_improved(teacher, ctx.teacher.improve, ctx.data, weak, strong_view(ctx),
                                       ctx.teacher.seed, on_log)
    save_weights(unwrap(model), folder, teacher_spec(ctx))
    seconds = time.perf_counter() - start
    record_cost(folder, seconds)
    return TeacherOutcome(model, result, folder.name, seconds, train_seconds=seconds, mask_rate=rate)


@dataclass
class Verdict:
    """Whether the improved teacher replaces the original, and the evidence."""

    kept: bool
    original_acc: float  # on the held-out labelled images
    improved_acc: float
    wins: int  # held-out images only the improved teacher gets right
    losses: int  # ... only the original gets right
    p: float  # McNemar's exact one-sided p-value
    reason: str

    def as_json(self) -> dict:
        return asdict(self)


def judge_improvement(original: nn.Module, improved: nn.Module, data: Prepared, keep_p: float) -> Verdict:
    """The improved teacher is kept only when it beats the original on the held-out
    labelled images (quiz and validation splits) beyond noise: on the images the two
    disagree on, it is right more often than chance allows (``sign_test``, p < ``keep_p``).
    A worse teacher makes every student worse; so does one that is merely different."""
    x, y = held_out(data)
    new, old = correctness(improved, x, y), correctness(original, x, y)
    wins, losses, p = sign_test(new, old)
    original_acc, improved_acc = old.float().mean().item(), new.float().mean().item()
    kept = p < keep_p or keep_p >= 1
    evidence = (f"held-out {100 * improved_acc:.2f}% against the original's {100 * original_acc:.2f}% on "
                f"{len(y)} images; right on {wins} the original gets wrong, wrong on {losses} it gets right: "
                f"sign test p = {p:.2g}")
    reason = (f"the improved teacher replaces the original ({evidence})" if kept else
              f"the students learn from the original teacher: the improved one is not better beyond noise "
              f"({evidence} >= teacher.improve.keep_p {keep_p:g})")
    return Verdict(kept, original_acc, improved_acc, wins, losses, p, reason)

