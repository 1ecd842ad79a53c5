"""The configuration reference, generated from the schema: every key of ``PipelineConfig``
with its type, default, allowed values and description.

``keys()`` lists them (sections included, in the schema's order), ``markdown()`` is the
docs site's page ``reference/configuration.md`` (made at each build by ``docs/hooks.py``,
so it cannot go stale), and ``explain(key)`` is what ``metadistill config --explain KEY``
prints for one key or a whole section.  A key inside a list of sections is written with
``[]`` (``data.augment[].padding``: each item of ``data.augment`` has a ``padding``).
"""

from __future__ import annotations

import difflib
import json
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

from pipelines.config.errors import ConfigError
from pipelines.config.loader import MOVED_KEYS
from pipelines.config.pipeline import PipelineConfig

DEFAULT_PRESET = "digits"  # what `metadistill run` uses when no preset is named
GONE_KEYS = {"meta_distill.learn": "meta_distill always co-trains the teacher's head now; an old "
                                   "meta_distill.learn=[...] of pilot items runs the method meta_distill_pilot with "
                                   "meta_distill_pilot.learn=[...] (with a FutureWarning), [head] is dropped"}


@dataclass(frozen=True)
class KeyDoc:
    """One key of the tree.  ``default`` is the schema's (JSON text; ``None`` for a section
    or a required key); ``preset`` the default preset's value where it differs."""

    key: str
    type: str
    default: str | None
    allowed: str
    description: str
    section: bool = False
    preset: str | None = None
    children: tuple[str, ...] = field(default=())

    @property
    def depth(self) -> int:
        return self.key.count(".")


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The section class a field holds, and whether it holds a list (or mapping) of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple, set, dict) and args:
        inner = args[-1]
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner, True
    return None, False


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args]
        return " or ".join(dict.fromkeys(names))
    if origin is Literal:
        kinds = {type(a).__name__ for a in args}
        return kinds.pop() if len(kinds) == 1 else "value"
    if origin in (list, set):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "section"
        if issubclass(annotation, Path):
            return "path"
        return annotation.__name__
    if annotation is Any:
        return "any"
    return str(annotation).replace("typing.", "")


def _choices(annotation: Any) -> list[Any]:
    """Every Literal choice anywhere in the annotation."""
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return [c for a in typing.get_args(annotation) for c in _choices(a)]


def _number(v: Any) -> str:
    return json.dumps(v)


def _bounds(info: FieldInfo) -> list[str]:
    """Field bounds as an interval ("(0, 1]") or one side ("> 0"); lengths and patterns."""
    found: dict[str, Any] = {}
    out = []
    for meta in info.metadata:
        for attr in ("gt", "ge", "lt", "le", "min_length", "max_length", "pattern"):
            if getattr(meta, attr, None) is not None:
                found[attr] = getattr(meta, attr)
    low = ("(", found["gt"]) if "gt" in found else ("[", found["ge"]) if "ge" in found else None
    high = (")", found["lt"]) if "lt" in found else ("]", found["le"]) if "le" in found else None
    if low and high:
        out.append(f"{low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}")
    elif low:
        out.append(f"{'>' if low[0] == '(' else '>='} {_number(low[1])}")
    elif high:
        out.append(f"{'<' if high[0] == ')' else '<='} {_number(high[1])}")
    if "min_length" in found:
        out.append(f"length >= {found['min_length']}")
    if "max_length" in found:
        out.append(f"length <= {found['max_length']}")
    if "pattern" in found:
        out.append(f"matches {found['pattern']}")
    return out


def _extra_allowed() -> dict[tuple[str, str], str]:
    """Values a validator checks (rather than the field's type), by (schema class, field)."""
    from models.registry import MODEL_NAMES
    from pipelines.config.presets import PRESETS
    from pipelines.config.students import METHOD_NAMES

    return {("PipelineConfig", "preset"): "one of " + ", ".join(PRESETS),
            ("ModelConfig", "arch"): "one of " + ", ".join(MODEL_NAMES),
            ("StudentConfig", "methods"): "items from " + ", ".join(METHOD_NAMES) + "; each at most once",
            ("StudentConfig", "seeds"): "distinct integers, at least one",
            ("KDConfig", "grid_alpha"): "each in [0, 1], at least one",
            ("KDConfig", "grid_temperature"): "each > 0, at least one",
            ("KDConfig", "grid_transfer_ratio"): "each >= 0, at least one",
            ("AugmentSearchConfig", "ops"): "distinct ops of the space",
            ("AugmentSearchConfig", "population_magnitudes"): "each in (0, 1), at least one",
            ("AugmentSearchConfig", "population_depths"): "each in [1, 3], at least one",
            ("TemperatureConfig", "box"): "0 < low <= high",
            ("MetaDistillPilotConfig", "learn"): "distinct items; order=first needs [teacher]",
            ("MetaDistillPilotConfig", "stop_step"): "> start_step",
            ("FewShotConfig", "eval_queries"): "max(eval_shots) + eval_queries <= 20"}


def _allowed(owner: type[BaseModel], name: str, info: FieldInfo) -> str:
    parts = []
    choices = _choices(info.annotation)
    if choices:
        many = typing.get_origin(info.annotation) in (list, set)
        parts.append(("items from " if many else "one of ") + ", ".join(str(c) for c in choices))
    parts += _bounds(info)
    extra = _extra_allowed().get((owner.__name__, name))
    if extra:
        parts.append(extra)
    return "; ".join(parts)  # null, where allowed, is in the type ("int or null")


def _json(value: Any) -> str:
    return json.dumps(to_jsonable_python(value), ensure_ascii=False)


def _section_text(model: type[BaseModel]) -> str:
    doc = (model.__doc__ or "").strip()
    if not doc or doc == (BaseModel.__doc__ or "").strip():
        return ""
    text = " ".join(doc.split("\n\n")[0].split()).replace("``", "`")
    return re.sub(r"^`[^`]+`: ", "", text)  # "`meta_distill.guard`: held-out checks..." names its key


def _lookup(tree: Any, parts: list[str]) -> tuple[bool, Any]:
    for part in parts:
        if not isinstance(tree, dict) or part not in tree:
            return False, None
        tree = tree[part]
    return True, tree


def keys() -> list[KeyDoc]:
    """Every key of the tree, depth first in the schema's order; sections included."""
    from pipelines.config.loader import load_config

    preset = load_config(DEFAULT_PRESET).model_dump(mode="json")
    out: list[KeyDoc] = []

    def walk(model: type[BaseModel], instance: BaseModel | None, prefix: str, in_list: bool) -> list[str]:
        names = []
        for name, info in model.model_fields.items():
            key = f"{prefix}{name}"
            names.append(key)
            if instance is not None:
                value = getattr(instance, name)
            else:
                value = info.get_default(call_default_factory=True)
            section, many = _model_of(info.annotation)
            description = " ".join((info.description or "").split()).replace("``", "`")
            found, preset_value = (False, None) if in_list else _lookup(preset, key.split("."))
            if section is not None and not many:
                index = len(out)
                out.append(None)  # its place, filled once its children are known
                children = walk(section, value, key + ".", in_list)
                out[index] = KeyDoc(key, "section", None, "", description or _section_text(section), True,
                                    children=tuple(children))
                continue
            default = None if value is PydanticUndefined else _json(value)
            shown = _json(preset_value) if found else None
            out.append(KeyDoc(key, _type_name(info.annotation) if not many else "list of sections",
                              default, _allowed(model, name, info), description,
                              preset=shown if shown != default else None))
            if many:
                index = len(out)
                out.append(None)
                children = walk(section, None, key + "[].", True)
                out[index] = KeyDoc(key + "[]", "section", None, "", _section_text(section) or description, True,
                                    children=tuple(children))
        return names

    walk(PipelineConfig, PipelineConfig.model_construct(), "", False)
    return out


# ---------------------------------------------------------------------------- markdown


def _cell(text: str) -> str:
    """Plain text in a table cell: pipes, HTML-like <words> and asterisks kept literal."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*").replace("\n", " ")


def _anchor(key: str) -> str:
    return key.replace("[]", "")


def markdown() -> str:
    """The docs site's configuration reference page."""
    docs = keys()
    lines = [
        "# Configuration reference",
        "",
        "Every key of the configuration tree, generated from its pydantic schema "
        "(`pipelines/config/`, root `PipelineConfig`) by `pipelines/config/reference.py` at each "
        "build of this site. `metadistill config --explain KEY` prints the same for one key or a "
        "whole section (`--explain meta_distill.guard`).",
        "",
        "Set a key with `--set dotted.key=value` (values are YAML: `--set student.seeds=[0,1,2]`), "
        "in a `--config FILE` (TOML or YAML, nested as below), or through a `--preset`; precedence is "
        "preset, then file, then each `--set`, and `metadistill config` prints the result. "
        f"**Default** is the schema's; every run starts from a preset (`{DEFAULT_PRESET}` when none is "
        f"named), and where the `{DEFAULT_PRESET}` preset sets another value the cell says so. "
        "`metadistill config --preset NAME` shows any preset's values. "
        "A key inside a list is written `list[].key`: each item of the list has it.",
        "",
        "Sections: " + ", ".join(f"[`{d.key}`](#{_anchor(d.key)})" for d in docs if d.section and d.depth == 0)
        + ", and [moved keys](#moved-keys).",
        "",
    ]
    top = [d for d in docs if not d.section and d.depth == 0]
    if top:
        lines += ["## Top level", "", *_table(top), ""]
    by_key = {d.key: d for d in docs}
    for doc in docs:
        if not doc.section:
            continue
        level = "#" * min(doc.depth + 2, 6)
        lines += [f"{level} {doc.key} {{#{_anchor(doc.key)}}}", ""]
        if doc.description:
            lines += [_cell(doc.description), ""]
        leaves = [by_key[c] for c in doc.children if not by_key[c].section]
        subsections = [by_key[c] for c in doc.children if by_key[c].section]
        if leaves:
            lines += [*_table(leaves), ""]
        if subsections:
            lines += ["Sub-sections: " + ", ".join(f"[`{s.key}`](#{_anchor(s.key)})" for s in subsections), ""]
    lines += _moved_table()
    return "\n".join(lines).rstrip() + "\n"


def _table(docs: list[KeyDoc]) -> list[str]:
    rows = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    for d in docs:
        default = "required" if d.default is None else f"`{d.default}`"
        if d.preset is not None:
            default += f" ({DEFAULT_PRESET}: `{d.preset}`)"
        rows.append(f"| `{d.key}` | {_cell(d.type)} | {default} | {_cell(d.allowed)} | {_cell(d.description)} |")
    return rows


def _moved_table() -> list[str]:
    lines = ["## Moved keys {#moved-keys}", "",
             "Keys renamed in this release (issue 35: `meta_distill`'s sub-sections, the pilot update's own "
             "method `meta_distill_pilot`). The old names work until the next release: each use warns "
             "(`FutureWarning`) and names the new key.", "",
             "| old key | new key |", "|---|---|"]
    lines += [f"| `{old}` | `{new}` |" for old, new in MOVED_KEYS.items()]
    lines += [f"| `{old}` | gone: {_cell(why)} |" for old, why in GONE_KEYS.items()]
    return [*lines, ""]


# ---------------------------------------------------------------------------- explain


def _normal(key: str) -> str:
    return key.replace("[]", "")


def _wrap(text: str, indent: str = "  ") -> list[str]:
    return textwrap.wrap(text, 96, initial_indent=indent, subsequent_indent=indent) if text else []


def _describe(doc: KeyDoc, value: Any = None, has_value: bool = False) -> list[str]:
    if doc.section:
        return [f"{doc.key}  (section)", *_wrap(doc.description)]
    facts = [f"type: {doc.type}", f"default: {'required' if doc.default is None else doc.default}"]
    if doc.preset is not None:
        facts.append(f"{DEFAULT_PRESET} preset: {doc.preset}")
    if has_value:
        facts.append(f"here: {_json(value)}")
    lines = [doc.key, *_wrap("; ".join(facts))]
    if doc.allowed:
        lines += _wrap(f"allowed: {doc.allowed}")
    return lines + _wrap(doc.description)


def explain(key: str, config: PipelineConfig | None = None) -> str:
    """One key, or a section with every key under it, as plain text.  With ``config``, each
    key's value in it too.  An unknown key raises :class:`ConfigError` naming it and the
    closest key; a moved key is explained under its new name."""
    docs = keys()
    by_key = {_normal(d.key): d for d in docs}
    wanted = _normal(key.strip())
    note = []
    if wanted in GONE_KEYS:
        note = [f"{wanted} is gone: {GONE_KEYS[wanted]}", ""]
        wanted = "meta_distill_pilot.learn"
    elif wanted in MOVED_KEYS and wanted in by_key:  # a section now; its old scalar key moved inside it
        note = [f"{wanted}=VALUE (the old key) now sets {MOVED_KEYS[wanted]}, with a FutureWarning until the next "
                f"release", ""]
    elif wanted in MOVED_KEYS:
        note = [f"{wanted} is now {MOVED_KEYS[wanted]} (the old key works until the next release, with a "
                f"FutureWarning)", ""]
        wanted = MOVED_KEYS[wanted]
    if wanted not in by_key:
        sections = ", ".join(d.key for d in docs if d.section and d.depth == 0)
        raise ConfigError(f"unknown key {key!r}{_suggest(wanted, list(by_key))}; --explain takes a key or a "
                          f"section ({sections})")
    chosen = [d for d in docs if _normal(d.key) == wanted or _normal(d.key).startswith(wanted + ".")] \
        if by_key[wanted].section else [by_key[wanted]]
    tree = config.model_dump(mode="json") if config is not None else None
    blocks = []
    for doc in chosen:
        found, value = _lookup(tree, doc.key.split(".")) if tree is not None and "[]" not in doc.key else (False, None)
        blocks.append("\n".join(_describe(doc, value, found)))
    return "".join(line + "\n" for line in note) + "\n\n".join(blocks) + "\n"


def _suggest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if not close:  # the last part alone: 'temprature' -> kd.temperature
        last = key.rsplit(".", 1)[-1]
        tails = {}
        for name in names:
            tails.setdefault(name.rsplit(".", 1)[-1], name)
        match = difflib.get_close_matches(last, list(tails), n=1, cutoff=0.75)
        close = [tails[match[0]]] if match else []
    return f" (did you mean {close[0]!r}?)" if close else ""


__all__ = ["KeyDoc", "keys", "markdown", "explain", "DEFAULT_PRESET"]
