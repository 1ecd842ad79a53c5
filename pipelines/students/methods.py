"""The table of student methods: name -> function that trains one student."""

from __future__ import annotations

from pipelines.students.context import StudentMethod, train_scratch
from pipelines.students.dist_kd import train_dist_kd
from pipelines.students.dkd import train_dkd
from pipelines.students.kd import train_kd
from pipelines.students.maml_init import train_maml_init
from pipelines.students.meta_distill import train_meta_distill, train_meta_distill_maml_init
from pipelines.students.meta_distill_pilot import train_meta_distill_pilot
from pipelines.students.tuned import TUNINGS, train_standard_practice, train_tuned

STUDENT_METHODS: dict[str, StudentMethod] = {
    "scratch": train_scratch,
    "kd": train_kd,
    "kd_tuned": lambda ctx: train_tuned(ctx, TUNINGS["kd"]),
    "dkd": train_dkd,
    "dkd_tuned": lambda ctx: train_tuned(ctx, TUNINGS["dkd"]),
    "dist_kd": train_dist_kd,
    "dist_kd_tuned": lambda ctx: train_tuned(ctx, TUNINGS["dist_kd"]),
    "standard_practice": train_standard_practice,
    "maml_init": train_maml_init,
    "meta_distill": train_meta_distill,
    "meta_distill+maml_init": train_meta_distill_maml_init,
    "meta_distill_pilot": train_meta_distill_pilot,
}
