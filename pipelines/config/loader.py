"""Preset, then ``--config FILE``, then ``--set`` items, validated as one tree; and the
dotted-key view of a config that MLflow logs.
"""

from __future__ import annotations

import copy
import difflib
import json
import tomllib
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipelines.config.errors import ConfigError, MovedKeyWarning
from pipelines.config.pipeline import PipelineConfig
from pipelines.config.presets import PRESETS

# Keys that moved (issue 35: meta_distill's sub-sections, the pilot update's own method),
# kept working for one release: each use warns, naming the new key.
MOVED_KEYS = {
    **{f"meta_distill.{old}": f"meta_distill.{new}" for old, new in {
        "head_lr": "head.lr", "trust_kl": "head.trust_kl", "max_drift": "head.max_drift",
        "guard_every": "guard.every", "guard_z": "guard.z", "guard_damping": "guard.damping",
        "temperature": "temperature.value", "learn_temperature": "temperature.learn",
        "temperature_lr": "temperature.lr", "temperature_box": "temperature.box",
        "horizon_discount": "temperature.discount", "temperature_share": "temperature.share",
        "horizon_window": "temperature.window", "feedback": "feedback.weight", "feedback_clip": "feedback.clip"}.items()},
    **{f"meta_distill.{key}": f"meta_distill_pilot.{key}" for key in (
        "knob_lr", "order", "pilot_steps", "pilot_lr", "teacher_lr", "teacher_optimizer", "start_step", "stop_step",
        "lr_schedule", "teacher_ce_weight")},
}
# Keys of meta_distill that the pilot update read too: they follow it when an old
# ``meta_distill.learn`` selects the pilot update.
_SHARED_WITH_PILOT = {"temperature": ("temperature", "value"), "alpha": ("alpha",), "interval": ("interval",),
                      "quiz_batch_size": ("quiz_batch_size",)}
_PILOT_MARK = "__pilot_from_meta_distill_learn"


def _moved(parts: list[str], value: Any, tree: dict) -> list[str] | None:
    """The new place of an old key (None: drop it), with a warning; ``parts`` when it did not move."""
    key = ".".join(parts)
    if key == "meta_distill.learn":
        if value == ["head"]:
            warnings.warn("meta_distill.learn is gone: meta_distill always co-trains the teacher's head; the other "
                          "items are meta_distill_pilot.learn (method meta_distill_pilot)", MovedKeyWarning, stacklevel=4)
            return None
        warnings.warn(f"meta_distill.learn={value} is now the method meta_distill_pilot with "
                      f"meta_distill_pilot.learn={value}: meta_distill is run as meta_distill_pilot until the next "
                      f"release", MovedKeyWarning, stacklevel=4)
        tree[_PILOT_MARK] = True
        return ["meta_distill_pilot", "learn"]
    if key in MOVED_KEYS and not isinstance(value, dict):
        new = MOVED_KEYS[key]
        warnings.warn(f"{key} is now {new}; the old key works until the next release", MovedKeyWarning, stacklevel=4)
        return new.split(".")
    return parts


def _migrate(tree: dict) -> dict:
    """A file's tree with its old keys moved (see MOVED_KEYS)."""
    section = tree.get("meta_distill")
    if not isinstance(section, dict):
        return tree
    tree = copy.deepcopy(tree)
    # A scalar ``temperature`` or ``feedback`` becomes its section first, so that the old
    # keys moving into that section find a table there.
    for key in sorted(tree["meta_distill"], key=lambda k: k not in ("temperature", "feedback")):
        value = tree["meta_distill"][key]
        parts = _moved(["meta_distill", key], value, tree)
        if parts != ["meta_distill", key]:
            del tree["meta_distill"][key]
            if parts is not None:
                node = tree
                for part in parts[:-1]:
                    node = node.setdefault(part, {})
                node[parts[-1]] = value
    return tree


def _pilot_from_old_learn(tree: dict) -> None:
    """An old ``meta_distill.learn`` chose the pilot update: run it as ``meta_distill_pilot``
    with the settings it shared with ``meta_distill``."""
    if not tree.pop(_PILOT_MARK, False):
        return
    student = tree.setdefault("student", {})
    methods = student.get("methods", [])
    if "meta_distill+maml_init" in methods:
        raise ConfigError("meta_distill.learn is gone, and the pilot update (meta_distill_pilot) has no +maml_init "
                          "variant: drop meta_distill+maml_init or meta_distill.learn")
    student["methods"] = ["meta_distill_pilot" if m == "meta_distill" else m for m in methods]
    source, pilot = tree.get("meta_distill", {}), tree.setdefault("meta_distill_pilot", {})
    for key, path in _SHARED_WITH_PILOT.items():
        node = source
        for part in path:
            node = node.get(part, {}) if isinstance(node, dict) else node
        if not isinstance(node, dict):  # the tree of load_config holds every default
            pilot[key] = node


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    if "arch" in over and "kwargs" not in over and over["arch"] != base.get("arch"):
        out["kwargs"] = {}  # another architecture: the old one's arguments do not apply
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"--config {path}: use a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config {path}: cannot parse: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the top level must be a table/mapping")
    return data


def _parse_set(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _check_path(parts: list[str], model: type[BaseModel] = None) -> None:
    """Name the first unknown segment of a dotted key, with the allowed keys at that level."""
    model = model or PipelineConfig
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            close = difflib.get_close_matches(part, list(fields), n=1)
            guess = f"did you mean {'.'.join([*parts[:depth], close[0]])!r}? " if close else ""
            raise ConfigError(f"unknown key {'.'.join(parts)!r}: {guess}{where} allows "
                              f"{', '.join(sorted(fields))}")
        annotation = fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return


def _apply_set(tree: dict, parts: list[str], value: Any) -> None:
    parts = _moved(parts, value, tree)
    if parts is None:
        return
    _check_path(parts)
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(parts)}: {part} is not a table")
    if parts[-1] == "arch" and node.get("arch") != value:
        node["kwargs"] = {}  # another architecture: the old one's arguments do not apply
    node[parts[-1]] = value


def apply_override(tree: dict, item: str) -> None:
    """Apply one ``dotted.key=value`` item to a config tree (checked, not yet validated)."""
    parts, value = _parse_set(item)
    _apply_set(tree, parts, value)


def _preset_for_data(tree: dict, overrides: list[str] | tuple[str, ...]) -> str | None:
    """The preset a run's data set implies when none is named: ``imagefolder`` for an image
    folder (from the file's ``data.name`` or a ``--set data.name=`` item); None otherwise."""
    data = tree.get("data")
    name = data.get("name") if isinstance(data, dict) else None
    for item in overrides:
        parts, value = _parse_set(item)
        if parts == ["data", "name"]:
            name = value
        elif parts == ["data"] and isinstance(value, dict) and "name" in value:
            name = value["name"]
    return "imagefolder" if name == "imagefolder" else None


def load_config(preset: str | None = None, config_file: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Preset, then file, then ``--set`` items, validated as one tree."""
    tree: dict[str, Any] = {}
    if config_file is not None:
        tree = _migrate(_read_file(Path(config_file)))
    name = preset or tree.get("preset") or _preset_for_data(tree, overrides) or "digits"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    # Start from the full default tree so a partial override of a nested default
    # (e.g. fewshot.model.kwargs) keeps the default's other fields.
    defaults = PipelineConfig.model_construct().model_dump(mode="json")
    tree = _merge(_merge(_merge(defaults, PRESETS[name]), tree), {"preset": name})
    for item in overrides:
        apply_override(tree, item)
    return validate_tree(tree)


def validate_tree(tree: dict) -> PipelineConfig:
    _pilot_from_old_learn(tree)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def _format_errors(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}" + (f" (got {err['input']!r})" if err["type"] != "extra_forbidden"
                                          and not isinstance(err.get("input"), dict) else ""))
    return "\n".join(lines)


def flatten(cfg: PipelineConfig) -> dict[str, str]:
    """Dotted-key view of the config, for MLflow params."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node and not prefix.endswith("kwargs"):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            out[prefix] = json.dumps(node) if not isinstance(node, str) else node

    walk("", cfg.model_dump(mode="json"))
    return out
