"""Students trained once per process and reused as references.

``meta_distill`` compares its student with a reference method trained from the same seed
(the same initialisation and batches).  In a sweep that reference is usually one of the
sweep's own rows (``kd``, ``standard_practice``): :func:`remember` keeps each finished
student under everything that determines it, and :func:`trained_once` hands a copy back
instead of training it a second time.  The compute it reports is the training's own, so a
method's cost is the same whether or not the sweep trained its reference already.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable

from torch import nn

from pipelines.engine.loop import TrainResult
from pipelines.students.context import StudentContext
from pipelines.students.kd import teacher_fingerprint

KEEP = 32  # students kept per process (a few seeds of a sweep's reference methods)

_students: OrderedDict[str, tuple[nn.Module, TrainResult]] = OrderedDict()
_locks: dict[str, threading.Lock] = {}
_guard = threading.Lock()


def student_key(method: str, ctx: StudentContext) -> str:
    """What determines a student: the method, its seed, the teacher's weights, the data, the
    student's and the teacher-based methods' settings, the augmentation and the init."""
    parts = {"method": method, "seed": ctx.seed, "teacher": teacher_fingerprint(ctx.teacher), "data": ctx.data.key,
             "device": str(ctx.data.device), "augment": ctx.augment_key,
             "init": None if ctx.init is None else ctx.init.sha256,
             **{name: getattr(ctx, name).model_dump(mode="json") for name in ("student", "kd", "dkd", "dist_kd")}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _lock(key: str) -> threading.Lock:
    with _guard:
        return _locks.setdefault(key, threading.Lock())


def remember(method: str, ctx: StudentContext, model: nn.Module, result: TrainResult) -> None:
    key = student_key(method, ctx)
    with _guard:
        _students[key] = (copy.deepcopy(model), copy.deepcopy(result))
        _students.move_to_end(key)
        while len(_students) > KEEP:
            _students.popitem(last=False)


def train_and_remember(method: str, ctx: StudentContext,
                       train: Callable[[StudentContext], tuple[nn.Module, TrainResult]]) -> tuple[nn.Module, TrainResult]:
    """A sweep's own row of ``method``: trained with ``ctx``'s logging, then kept for a later
    :func:`trained_once` (which waits for it when it asks meanwhile)."""
    with _lock(student_key(method, ctx)):
        model, result = train(ctx)
        remember(method, ctx, model, result)
    return model, result


def trained_once(method: str, ctx: StudentContext,
                 train: Callable[[StudentContext], tuple[nn.Module, TrainResult]]) -> tuple[nn.Module, TrainResult]:
    """``method``'s student of ``ctx`` (trained silently: no logging, no checkpoints), or a
    copy of the one this process trained already.  Concurrent callers of one key wait for
    the first instead of training it twice."""
    key = student_key(method, ctx)
    with _lock(key):
        with _guard:
            kept = _students.get(key)
        if kept is None:
            model, result = train(dataclasses.replace(ctx, on_log=None, checkpoint=None,
                                                      desc=f"{ctx.desc} {method} reference"))
            remember(method, ctx, model, result)
            return model, result
        return copy.deepcopy(kept[0]), copy.deepcopy(kept[1])


def forget() -> None:
    """Drop every kept student (tests)."""
    with _guard:
        _students.clear()
