"""The families an architecture search draws from, each a few size knobs that map to an
ordinary architecture name and its arguments (so a searched student is registered, served
and exported like a hand-picked one).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from models.registry import RESNET_DEPTHS


@dataclass(frozen=True)
class Family:
    knobs: dict[str, Callable[[int], bool]]  # knob -> which values it takes
    build: Callable[..., tuple[str, dict]]  # knob values -> (arch, kwargs)
    needs: str = ""  # the inputs it needs, said when it cannot take them


FAMILIES: dict[str, Family] = {
    "mlp": Family({"depth": lambda v: v >= 0, "width": lambda v: v >= 1},
                  lambda depth, width: ("mlp", {"hidden": [width] * depth})),
    "cnn": Family({"stages": lambda v: v >= 1, "width": lambda v: v >= 1, "depth": lambda v: v >= 1,
                   "kernel": lambda v: v >= 1 and v % 2 == 1},
                  lambda stages, width, depth, kernel: ("cnn", {"widths": [width * 2 ** i for i in range(stages)],
                                                                "depth": depth, "kernel": kernel})),
    "resnet": Family({"depth": lambda v: v in RESNET_DEPTHS, "width": lambda v: v >= 1},
                     lambda depth, width: (f"resnet{depth}", {"base_width": width})),
    "conv4": Family({"width": lambda v: v >= 1}, lambda width: ("conv4", {"channels": width}),
                    needs="inputs of at least 16x16"),
}

KNOB_RULES = {"mlp.depth": ">= 0", "mlp.width": ">= 1", "cnn.stages": ">= 1", "cnn.width": ">= 1",
              "cnn.depth": ">= 1", "cnn.kernel": "odd", "resnet.depth": f"one of {list(RESNET_DEPTHS)}",
              "resnet.width": ">= 1", "conv4.width": ">= 1"}


def points(space: dict[str, dict[str, list[int]]]) -> list[tuple[str, dict[str, int]]]:
    """Every point of ``space`` (family -> knob -> values): its family and knob values."""
    return [(family, dict(zip(knobs, values)))
            for family, knobs in space.items() for values in itertools.product(*knobs.values())]


def to_model(family: str, knobs: dict[str, int]) -> tuple[str, dict]:
    """The (arch, kwargs) of one point of ``family``."""
    return FAMILIES[family].build(**knobs)


def check_family(family: str, knobs: dict[str, list[int]]) -> None:
    """Refuse an unknown family, a knob it does not have or lacks, an empty choice or a
    value it cannot take, naming the key ``arch_search.space.<family>.<knob>``."""
    if family not in FAMILIES:
        raise ValueError(f"arch_search.space.{family}: unknown family; known: {', '.join(FAMILIES)}")
    spec = FAMILIES[family]
    extra, missing = set(knobs) - set(spec.knobs), set(spec.knobs) - set(knobs)
    if extra or missing:
        raise ValueError(f"arch_search.space.{family}: knobs {sorted(extra)} unknown and {sorted(missing)} missing; "
                         f"{family} takes {', '.join(spec.knobs)}")
    for knob, values in knobs.items():
        key = f"arch_search.space.{family}.{knob}"
        if not isinstance(values, list) or not values:
            raise ValueError(f"{key} must list at least one value")
        if len(set(values)) != len(values):
            raise ValueError(f"{key} lists a value twice: {values}")
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not spec.knobs[knob](v)]
        if bad:
            raise ValueError(f"{key} has values {bad} it cannot take (integers {KNOB_RULES[f'{family}.{knob}']})")
