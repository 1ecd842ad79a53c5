"""Training machinery shared by every stage, with no knowledge of teachers or students.

Owns: the one module that knows about ranks (``distributed``), devices and batched host
to device copies (``device``), the batch plan and feed (``batches``), the training loop
and its checkpointed state (``loop``), running metrics (``metrics``), optimisers
(``optim``), checkpoints (``checkpoint``) and the meta-training loop of the MAML family
(``meta_loop``).
May import: ``pipelines.data``, ``pipelines.config``, ``pipelines.common``, ``meta``.
"""
