"""Registration of the chosen student and the promotion gate, as plain functions.

Owns: the gate and the ``promote``/``rollback`` commands (``promotion``), registering a
student with its lineage (``student``) and the check of its int8 variant (``int8``); the
flow's ``register`` task only calls them.
May import: ``pipelines.students`` and the layers below it, ``models``.
"""
