"""The bottom layer: what every stage shares and nothing in particular owns.

Owns: the project home and its caches (``home``: cache keys, atomic writes, the locks that
let overlapping runs share it), the threads each run takes (``threads``), the lock on
torch's global generator (``rng``), loopback networking (``net``), progress bars
(``progress``) and the module paths that must stay strings (``entrypoints``).
May import: the standard library and third-party packages only; nothing of ``pipelines``.
"""
