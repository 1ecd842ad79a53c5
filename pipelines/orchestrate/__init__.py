"""Orchestration: the Prefect flow and everything that starts processes.

Owns: the ``metadistill`` flow and its tasks (``flow``), the torchrun worker (``worker``)
and its launcher (``launch``), schedules and triggers (``schedule``), the local Prefect
API (``prefect_api``), a team's servers (``services``: PostgreSQL, MLflow and Prefect on
it), whose turn it is to register (``registration``), the checks before any work
(``preflight``) and the few-shot command (``fewshot``).
The only package that imports Prefect.
May import: every layer below it, ``models``, ``meta``.
"""
