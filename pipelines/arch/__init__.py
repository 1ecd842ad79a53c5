"""The architecture stage: the student's network searched for this run's teacher under the
deployment budget, before the student stage.

Owns: the space's points, their costs and the budget's reward (``space``), the searchers as
Optuna samplers (``searchers``), the study, its trials, its cache and the choice (``stage``).
May import: ``pipelines.students`` and the layers below it, ``models``, ``optuna``.
"""
