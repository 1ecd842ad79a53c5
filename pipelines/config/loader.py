"""Preset, then ``--config FILE``, then ``--set`` items, validated as one tree; and the
dotted-key view of a config that MLflow logs.
"""

from __future__ import annotations

import copy
import difflib
import json
import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipelines.config.errors import ConfigError
from pipelines.config.pipeline import PipelineConfig
from pipelines.config.presets import PRESETS


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


def load_config(preset: str | None = None, config_file: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Preset, then file, then ``--set`` items, validated as one tree."""
    tree: dict[str, Any] = {}
    if config_file is not None:
        tree = _read_file(Path(config_file))
    name = preset or tree.get("preset") or "digits"
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
