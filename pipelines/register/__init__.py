"""Registration of the chosen student and the promotion gate, as plain functions.

Owns: the gate and the ``promote``/``rollback`` commands (``promotion``), and registering a
student with its lineage (``student``); the flow's ``register`` task only calls them.
May import: ``pipelines.students`` and the layers below it, ``models``.
"""
