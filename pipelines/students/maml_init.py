"""``maml_init``: an initialisation meta-learned over tasks drawn from the training split,
then the same training as ``scratch``.
"""

from __future__ import annotations

from torch import nn

from pipelines.engine.device import part_of
from pipelines.engine.loop import TrainResult, supervised_loss
from pipelines.students.context import StudentContext


def maml_initialised(ctx: StudentContext):
    """A new student whose initialisation is meta-learned (``ctx.maml``) over tasks
    drawn from the training split: random class subsets with permuted labels."""
    from meta.tasks import TaskSampler
    from pipelines.engine.meta_loop import meta_train

    student, meta = ctx.new_student(), ctx.maml
    sampler = TaskSampler.from_labels(ctx.data.x("train"), ctx.data.y("train"), meta.ways or ctx.data.num_classes,
                                      meta.shots, meta.queries, meta.rotations, select=part_of)
    return student, meta_train(student, sampler, meta, seed=ctx.seed, on_log=ctx.on_log, desc=f"{ctx.desc} meta",
                               checkpoint=ctx.checkpoint)


def train_maml_init(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    """Meta-learned initialisation, then the same training as ``scratch``; the reported
    train seconds include meta-training."""
    student, meta_result = maml_initialised(ctx)
    result = ctx.fit(student, supervised_loss)
    result.seconds += meta_result.seconds
    result.curve.update(meta_result.curve)
    return student, result
