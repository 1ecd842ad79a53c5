"""Training-time augmentation: the policies and the search of the learned one.

Owns: the fixed ops, torchvision's search-free policies and a learned policy (its base too) applied per
image from its seed (``policies``), and the search of the learned policy (hypergradient
or population), its context, cache keys and figures (``search``).
May import: ``pipelines.evaluate`` and the layers below it, ``models``, ``meta``.
"""
