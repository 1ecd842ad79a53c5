"""``fewshot.*``: the ``metadistill fewshot`` command's settings."""

from __future__ import annotations

from pydantic import Field, model_validator

from pipelines.config.sources import FromSource, InitSource, check_source
from pipelines.config.students import MamlConfig
from pipelines.config.training import ModelConfig


class FewShotConfig(FromSource):
    """``metadistill fewshot``: meta-train on Omniglot background characters, test on
    evaluation characters, one model per number of ways."""

    # MAML's Omniglot recipe (Finn et al. 2017): batch-statistics norm, one inner step in
    # training and three at test, lr 0.4, 32 tasks a step, one query per class in training.
    # 32 channels rather than 64: on 2 cores it runs 1.7x the steps in the same time, and
    # both widths reached the same accuracy after 2,000 steps (docs/fewshot.md).
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(
        arch="conv4", kwargs={"channels": 32, "norm": "batch"}), description="the network meta-trained, one per way")
    meta: MamlConfig = Field(default_factory=lambda: MamlConfig(
        ways=5, shots=1, queries=1, inner_steps=1, inner_lr=0.4, meta_batch=32, meta_steps=100000,
        time_budget_s=1500, rotations=True, eval_inner_steps=3),
        description="MAML's settings for meta-training (fewshot.train_ways replaces its ways)")
    train_ways: list[int] = Field(default_factory=lambda: [5, 20], description="one model meta-trained per entry, "
                                                                              "for N-way tasks")
    eval_shots: list[int] = Field(default_factory=lambda: [1, 5], description="K-shot settings each model is tested "
                                                                             "on")
    eval_tasks: int = Field(600, gt=0, description="fixed evaluation tasks per setting (seeded by 1000 + shots)")
    eval_queries: int = Field(15, gt=0, description="query examples per class at evaluation (20 - 5 shots max)")
    lake_runs: bool = Field(True, description="also score the 20 one-shot runs of Lake et al. (all_runs.zip)")
    seed: int = Field(0, description="seed of each model's initialisation and of its meta-training's task draws")
    init: InitSource = Field("scratch", description="starting weights of the model MAML meta-trains "
                                                    "(pretrained first, then meta-trained); see student.init")
    init_uri: str | None = Field(None, description="see student.init_uri")

    @model_validator(mode="after")
    def _fits_twenty(self) -> FewShotConfig:
        if self.meta.meta_steps is None:
            raise ValueError("fewshot.meta.meta_steps must be set (its time_budget_s usually ends meta-training first)")
        check_source("fewshot.init", self.init, self.init_uri, "fewshot.init_uri", self.model.arch)
        if max(self.eval_shots) + self.eval_queries > 20:
            raise ValueError(f"fewshot: max(eval_shots) + eval_queries = {max(self.eval_shots) + self.eval_queries} "
                             f"exceeds Omniglot's 20 drawings per character")
        return self
