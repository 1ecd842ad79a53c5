"""What the teacher's stages are given: the teacher's section of the config, the
augmentation's context, the brought weights and the cache keys, each worked out once.

The teacher stage (``fit``) and its improvement (``improve``) never see the whole tree:
:meth:`TeacherContext.from_config` is where it is taken apart, at each stage's entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pipelines.augment.search import AugmentContext
from pipelines.common.home import cache_dir, cache_key
from pipelines.config.pipeline import PipelineConfig
from pipelines.config.students import StudentConfig
from pipelines.config.teacher import TeacherConfig
from pipelines.data.prepared import Prepared
from pipelines.teacher import sources

TEACHER_CACHE_VERSION = 3  # 2: per-sample augmentation seeds; 3: fixed ops batched, hash-seeded
IMPROVE_CACHE_VERSION = 1


@dataclass(frozen=True)
class TeacherContext:
    """The teacher's inputs: its section (network, training, source, fine-tune, improvement,
    seed), the augmentation it trains under, the prepared data, and the brought weights
    (``source``: resolved once; None for a teacher trained here).  The keys are computed
    once, on first use, over the augmentation's own (teacher key -> policy fingerprint ->
    search key)."""

    teacher: TeacherConfig
    student: StudentConfig  # only for the check that a brought teacher outsizes the student
    augmentation: AugmentContext  # the augmentation stage's context: the policy it trains under, its keys
    data: Prepared
    source: sources.WeightsSource | None

    @classmethod
    def from_config(cls, cfg: PipelineConfig, data: Prepared,
                    source: sources.WeightsSource | None = None) -> TeacherContext:
        """The teacher's context of ``cfg`` on ``data``; ``source``: its brought weights when
        already resolved (a torchrun worker is handed the flow's copy, and never resolves)."""
        source = source or sources.teacher_source(cfg.teacher, data.input_shape)
        return cls(cfg.teacher, cfg.student, AugmentContext.from_config(cfg, data), data, source)

    @cached_property
    def teacher_key(self) -> str:
        """The labelled teacher's cache key: the data, the augmentation it trains under and its
        own settings; a brought teacher's weights by their hash, not the reference (an alias
        may move)."""
        teacher = self.teacher.model_dump(mode="json", include={"model", "train", "seed"})
        if self.teacher.brought():
            teacher = {"sha256": self.source.sha256, "spec": self.source.spec, "seed": self.teacher.seed,
                       "finetune": self.teacher.finetune.model_dump(mode="json")}
        return cache_key(TEACHER_CACHE_VERSION, data=self.data.key, augment=self.augmentation.policy_fingerprint,
                         teacher=teacher)

    @property
    def teacher_folder(self) -> Path:
        return cache_dir("teacher") / self.teacher_key

    @cached_property
    def improve_key(self) -> str:
        """The improved teacher's cache key: the labelled teacher's, the improvement's settings,
        and the learned policy when it is the strong view."""
        strong = self.augmentation.learned_fingerprint if self.teacher.improve.strong == "learned" else {}
        # ema came later: off, it is left out, so improved teachers cached before it stay valid
        improve = self.teacher.improve.model_dump(mode="json", exclude={"ema"} if self.teacher.improve.ema is None
                                                  else None)
        return cache_key(IMPROVE_CACHE_VERSION, teacher=self.teacher_key, improve=improve, **strong)

    @property
    def improved_folder(self) -> Path:
        return cache_dir("teacher_improved") / self.improve_key
