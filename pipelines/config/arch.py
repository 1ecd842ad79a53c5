"""``arch_search.*``: the architecture stage, which searches the student's network for this
run's teacher under the deployment budget (``student.budget``) before the students train."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, field_validator

from models.space import check_family
from pipelines.config.errors import Strict


def default_space() -> dict[str, dict[str, list[int]]]:
    return {"mlp": {"depth": [1, 2], "width": [16, 32, 64, 128, 256]},
            "cnn": {"stages": [1, 2, 3], "width": [8, 16, 32], "depth": [1, 2], "kernel": [3, 5]},
            "resnet": {"depth": [8, 14], "width": [4, 8, 16]}}


class ArchSearchConfig(Strict):
    enabled: bool = Field(False, description="search the student's network before the student stage; the chosen "
                                             "point becomes student.model for every method")
    searcher: Literal["random", "reinforce", "evolution", "tpe", "nsga2"] = Field(
        "random", description="random (the baseline, and the default: it matched or beat the four others on digits "
                              "and Fashion-MNIST, docs/benchmarks/architecture.md), reinforce (a REINFORCE controller, "
                              "as AKD), evolution (regularised evolution, Real et al. 2019), tpe or nsga2 (Optuna's "
                              "samplers; nsga2 trades accuracy against cost as two objectives)")
    trials: int = Field(16, ge=1, description="candidates trained (at most); points over a hard budget are refused "
                                              "before training and do not count")
    proxy_steps: int | None = Field(None, ge=1, description="a candidate's training steps; null: student.train.steps, "
                                                            "the full budget (a quarter of it ranked the families "
                                                            "wrongly on CIFAR-10: MLPs learn first, CNNs win later)")
    reward: Literal["distill", "scratch"] = Field(
        "distill", description="distill: the candidate learns from this run's teacher by kd (the teacher-aware "
                               "search of AKD); scratch: from the labels alone (search, then distil)")
    halving: bool = Field(False, description="successive halving (Optuna's pruner): candidates report held-out "
                                             "accuracy at rungs and the worse are stopped; not with nsga2. Off by "
                                             "default: early readings favour the families that learn first")
    default_budget: Literal["latency", "macs", "params"] = Field(
        "latency", description="when student.budget sets no limit, the hand-picked student.model's cost on this "
                               "measure is the limit")
    keep_p: float = Field(0.05, gt=0, le=1, description="the searched point replaces the hand-picked student.model "
                                                        "only when it beats it beyond noise on the held-out images: "
                                                        "a sign test on the images the two disagree on, one-sided "
                                                        "p below this (1: any gain replaces it)")
    seed: int = Field(0, description="the searcher's seed (candidates train with student seed 0)")
    population: int = Field(8, ge=2, description="evolution: the population (the last trials, oldest dies)")
    tournament: int = Field(3, ge=1, description="evolution: candidates drawn per tournament")
    controller_lr: float = Field(0.5, gt=0, description="reinforce: the controller's step size")
    space: dict[str, dict[str, list[int]]] = Field(
        default_factory=default_space, description="the families searched and the values of each knob: mlp {depth, "
                                                   "width}; cnn {stages, width (doubling per stage), depth, kernel}; "
                                                   "resnet {depth (6n+2), width}; conv4 {width}")

    @field_validator("space")
    @classmethod
    def _space(cls, space: dict[str, dict[str, list[int]]]) -> dict[str, dict[str, list[int]]]:
        if not space:
            raise ValueError("arch_search.space is empty: list at least one family (mlp, cnn, resnet, conv4)")
        for family, knobs in space.items():
            check_family(family, knobs)
        return space


SEARCHERS: tuple[str, ...] = get_args(ArchSearchConfig.model_fields["searcher"].annotation)
