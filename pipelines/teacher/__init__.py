"""The teacher: trained here, or brought from elsewhere and fine-tuned.

Owns: weights brought from a file, the registry, torchvision or timm (``sources``), and
the teacher stage's body (``fit``): its cache key, training or fine-tuning, saving and
loading.
May import: ``pipelines.augment`` and the layers below it, ``models``, ``meta``.
"""
