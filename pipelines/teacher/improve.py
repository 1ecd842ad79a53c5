"""The teacher-improvement stage: the labelled teacher keeps training on the unlabeled
transfer split by consistency (``meta.consistency``), in the shared training loop.

Each step is a labelled batch and ``unlabeled_ratio`` times as many transfer images, both
under the weak view (the data's own augmentation, or none); the loss is the labelled
cross-entropy plus ``weight`` times the consistency of a strong view of each transfer
image with its weak view's confident prediction.  Transfer images carry no labels (the
prepared data holds none for them): the loop marks them ``UNLABELED`` and only the
consistency term reads them.  Cached under the project home by the teacher's key and
this section, so the seeds and methods of a sweep, and later runs, share one improvement.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from meta.augment import OPS, AugmentPolicy
from meta.consistency import consistency_loss
from models.normalize import unwrap
from models.weights import save_weights
from pipelines.augment.policies import LearnedOps, uniform
from pipelines.augment.search import learned_fingerprint, learned_policy
from pipelines.common.home import cache_dir, cache_key, made_once
from pipelines.config.pipeline import PipelineConfig
from pipelines.config.teacher import ImproveConfig
from pipelines.data.prepared import Prepared
from pipelines.engine.batches import Augment, Transfer
from pipelines.engine.loop import LogFn, TrainResult, train_classifier
from pipelines.teacher.fit import load_teacher, record_cost, recorded_cost, teacher_inputs, teacher_key, teacher_spec

IMPROVE_CACHE_VERSION = 1


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


class ConsistencyLoss:
    """The stage's batch loss: labelled cross-entropy + ``weight`` x consistency on the
    transfer rows.  The strong view's seeds hash (row, step), so a resumed or sharded run
    draws the same views; ``mask_rates`` records the share of pseudo-labels kept."""

    def __init__(self, model: nn.Module, strong: Augment, cfg: ImproveConfig, seed: int):
        self.model, self.strong, self.cfg, self.seed = model, strong, cfg, seed
        self.step, self.mask_rates = 0, []

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        self.step += 1
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

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def strong_view(cfg: PipelineConfig, data: Prepared) -> StrongView:
    """``teacher.improve.strong``'s view: FixMatch's RandAugment (``strong_depth`` narrow ops
    drawn uniformly, each at up to its full range) or the learned policy, then cutout."""
    improve = cfg.teacher.improve
    if improve.strong == "learned":
        spec = learned_policy(cfg, data).spec
    else:
        spec = AugmentPolicy(OPS, 0.999, improve.strong_depth, "uniform").to_json()
    return StrongView(LearnedOps(spec, data.mean, data.std), improve.cutout)


def improve_key(cfg: PipelineConfig, data: Prepared) -> str:
    strong = learned_fingerprint(cfg, data) if cfg.teacher.improve.strong == "learned" else {}
    return cache_key(IMPROVE_CACHE_VERSION, teacher=teacher_key(cfg, data),
                     improve=cfg.teacher.improve.model_dump(mode="json"), **strong)


def improved_folder(cfg: PipelineConfig, data: Prepared) -> Path:
    return cache_dir("teacher_improved") / improve_key(cfg, data)


def improves(cfg: PipelineConfig, data: Prepared) -> bool:
    """Whether ``cfg``'s teacher goes through the improvement stage on ``data``."""
    return cfg.teacher.improve.method != "none" and data.transfer() is not None


def fit_improved(teacher: nn.Module, improve: ImproveConfig, data: Prepared, weak: Augment | None,
                 strong: Augment, seed: int, on_log: LogFn | None = None) -> tuple[nn.Module, TrainResult, float]:
    """A copy of ``teacher`` after consistency training on the transfer split (``weak`` and
    ``strong`` views); its training result and the mean share of pseudo-labels kept."""
    model = copy.deepcopy(teacher).train().requires_grad_(True)
    loss = ConsistencyLoss(model, strong, improve, seed)
    transfer = Transfer(data.transfer(), int(round(improve.unlabeled_ratio * improve.batch_size)))
    result = train_classifier(model, data.x("train"), data.y("train"), improve, loss, seed=seed,
                              augment=weak if improve.augment else None, val=(data.x("val"), data.y("val")),
                              on_log=on_log, desc="teacher improve", transfer=transfer, device=data.device)
    rate = sum(loss.mask_rates) / max(1, len(loss.mask_rates))
    return model.eval(), result, rate


@dataclass
class ImprovedOutcome:
    model: nn.Module
    result: TrainResult | None  # None when loaded from the cache
    key: str
    seconds: float
    mask_rate: float | None
    cached: bool = False
    train_seconds: float | None = None  # what the improvement cost, this run or the one that cached it


def improve_teacher(cfg: PipelineConfig, data: Prepared, teacher: nn.Module,
                    on_log: LogFn | None = None) -> ImprovedOutcome:
    """The improved teacher of ``cfg``: from the cache, or trained now from ``teacher``."""
    folder = improved_folder(cfg, data)
    return made_once(f"teacher_improved-{folder.name}", lambda: cached_improved(folder, data),
                     lambda: _improve(cfg, data, teacher, folder, on_log))


def cached_improved(folder: Path, data: Prepared) -> ImprovedOutcome | None:
    start = time.perf_counter()
    if not (folder / "model.safetensors").is_file():
        return None
    return ImprovedOutcome(load_teacher(folder, data), None, folder.name, time.perf_counter() - start, None,
                           cached=True, train_seconds=recorded_cost(folder))


def _improve(cfg: PipelineConfig, data: Prepared, teacher: nn.Module, folder: Path,
             on_log: LogFn | None) -> ImprovedOutcome:
    start = time.perf_counter()
    _, weak = teacher_inputs(cfg, data)
    model, result, rate = fit_improved(teacher, cfg.teacher.improve, data, weak, strong_view(cfg, data),
                                       cfg.teacher.seed, on_log)
    save_weights(unwrap(model), folder, teacher_spec(cfg, data))
    seconds = time.perf_counter() - start
    record_cost(folder, seconds)
    return ImprovedOutcome(model, result, folder.name, seconds, rate, train_seconds=seconds)
