"""Scoring trained networks and comparing the students of a sweep.

Owns: test metrics (``metrics``: accuracy, loss, calibration, confusion) and the comparison
of students (``compare``: the outcome of one student, the per-method summary, the choice
of the best student, the comparison tables).
May import: ``pipelines.engine`` and the layers below it.
"""
