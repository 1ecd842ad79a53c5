"""The student methods, one module per family, and the student stage's body.

Owns: what every method is given (``context``), Hinton KD and its tuned grid (``kd``), the
MAML-family initialisation (``maml_init``), learning to teach (``meta_distill``: the
teacher's head co-trained while it teaches, guarded; its parts are step hooks), MetaDistil's
pilot update as a baseline (``meta_distill_pilot``), the table of methods (``methods``) and
training plus evaluating one student (``fit``).
May import: ``pipelines.teacher`` and the layers below it, ``models``, ``meta``.
"""
