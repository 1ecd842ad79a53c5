"""The table of student methods: name -> function that trains one student."""

from __future__ import annotations

from pipelines.students.context import StudentMethod, train_scratch
from pipelines.students.kd import train_kd, train_kd_tuned
from pipelines.students.maml_init import train_maml_init
from pipelines.students.meta_distill import train_meta_distill, train_meta_distill_maml_init
from pipelines.students.meta_distill_pilot import train_meta_distill_pilot

STUDENT_METHODS: dict[str, StudentMethod] = {
    "scratch": train_scratch,
    "kd": train_kd,
    "kd_tuned": train_kd_tuned,
    "maml_init": train_maml_init,
    "meta_distill": train_meta_distill,
    "meta_distill+maml_init": train_meta_distill_maml_init,
    "meta_distill_pilot": train_meta_distill_pilot,
}
