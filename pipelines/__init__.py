"""metadistill's pipeline: composes ``models/`` and ``meta/`` with data, Prefect and MLflow.

The packages follow the data flow, and each imports only the layers below it (checked by
``lint-imports``, see ``[tool.importlinter]`` in pyproject.toml), top to bottom:

    cli          the ``metadistill`` command
    orchestrate  the Prefect flow, the torchrun worker and launcher, schedules
    register     registering the chosen student, the promotion gate
    students     the student methods (scratch, kd, kd_tuned, maml_init, meta_distill, meta_distill_pilot)
    teacher      the teacher: trained here or brought, fine-tuned
    augment      augmentation policies and the learned policy's search
    evaluate     test metrics, comparing students, choosing one
    engine       the training loop, batches, checkpoints, ranks, the meta-training loop
    data         reading, splitting, normalising, memory and stream storage
    tracking     MLflow: runs, the registry, the UI, figures (beside ``data``)
    config       the typed configuration tree, presets, loading
    common       the project home, cache keys, atomic writes, small shared helpers
"""
