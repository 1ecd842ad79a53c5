"""The teacher: trained here, or brought from elsewhere and fine-tuned.

Owns: weights brought from a file, the registry, torchvision or timm (``sources``), what
the teacher's stages are given, taken from the config once, and their cache keys
(``context``), the teacher stage's body (``fit``): training or fine-tuning, saving and
loading; and the teacher's consistency training on the unlabeled transfer split
(``improve``), a stage of its own.
May import: ``pipelines.augment`` and the layers below it, ``models``, ``meta``.
"""
