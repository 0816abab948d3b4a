"""From text to plain values the run spec validates: YAML files, dotted overrides, the shape checks that
keep hostile or broken input (deep nesting, alias bombs) out of the validator, and pydantic's errors
turned into messages that name the key, the value and what is allowed."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from trainer.errors import SpecError


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the section that `loc` points into (for 'did you mean' on unknown keys)."""
    section = _walk_loc(cls, loc)[1]
    return [] if section is None else list(section.model_fields)


def _walk_loc(cls: type[BaseModel], loc: tuple) -> tuple[tuple, type[BaseModel] | None]:
    """(`loc` as the user writes the key, the section class it ends in or None). pydantic puts the tag of a
    discriminated union in the location (data.objective.span_corruption.noise_density): the key is without
    it, and the section is the union's member of that tag."""
    key: list = []
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        key.append(part)
        if cls is None or isinstance(part, int):
            continue  # an item of a list of sections: its fields are the element type's
        field = cls.model_fields.get(str(part))
        candidates = (field.annotation, *getattr(field.annotation, "__args__", ())) if field else ()
        sections = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        tagged = getattr(field, "discriminator", None) if field else None
        if isinstance(tagged, str) and parts:
            member = [c for c in sections if tagged in c.model_fields and c.model_fields[tagged].default == parts[0]]
            if member:
                parts.pop(0)
                cls = member[0]
                continue
        cls = sections[0] if sections else None
    return tuple(key), cls


def _shown(value: Any, limit: int = 200) -> str:
    """A value for a message: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _explain(err: ValidationError, origin: str, prefix: tuple, cls: type[BaseModel]) -> str:
    problems = []
    errors = err.errors()
    for e in errors:
        if e["type"] == "too_short" and any(o["loc"][:len(e["loc"])] == e["loc"] and len(o["loc"]) > len(e["loc"])
                                            for o in errors):
            continue  # a list whose bad items were dropped is "too short": the items' own errors say why
        rel, section = _walk_loc(cls, tuple(e["loc"]))
        loc = prefix + rel
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            known = _fields_at(cls, tuple(e["loc"])[:-1])
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            allowed = f"allowed here: {', '.join(known)}" if known else "this section takes no such key"
            problems.append(f"{key}: unknown key; {hint}{allowed}")
        elif e["type"] == "missing":
            problems.append(f"{key}: required but missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            shown = f" (got {_shown(e['input'])})" if not isinstance(e["input"], dict) else ""
            problems.append(f"{key}: {msg}{shown}" if loc else msg)
    return f"{origin} is invalid:\n  " + "\n  ".join(problems)


MAX_DEPTH = 64
"""Deepest nesting of sections and lists a spec may have (a real one has under 10)."""
MAX_VALUES = 100_000
"""Most values (sections, lists and scalars, YAML aliases expanded) a spec may have (a real one has hundreds)."""


def _check_shape(node: Any, where: str, prefix: tuple = ()) -> None:
    """Refuse what YAML can build but no spec holds, before anything walks it recursively (deepcopy, pydantic,
    the spec's dump): a value that contains itself (an alias inside its own anchor), aliases that expand past
    MAX_VALUES values (a "billion laughs"), nesting deeper than MAX_DEPTH, and NUL characters (no path or
    name can hold one). Iterative, and each shared value is measured once."""
    sizes: dict[int, int] = {}
    inside: set[int] = set()  # the containers on the way from the top to the value at hand
    stack: list[tuple[Any, tuple, bool]] = [(node, prefix, False)]

    def dotted(path: tuple) -> str:
        return ".".join(str(p) for p in path) or "the top level"

    while stack:
        value, path, measured = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                raise SpecError(f"{where}: {dotted(path)} holds a NUL character (\\0), which no path or name can hold")
            continue
        if not isinstance(value, dict | list):
            continue
        ident = id(value)
        children = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
        if measured:
            inside.discard(ident)
            sizes[ident] = 1 + sum(sizes.get(id(child), 1) for _, child in children)
            if sizes[ident] > MAX_VALUES:
                raise SpecError(f"{where}: {dotted(path)} expands to more than {MAX_VALUES} values (YAML aliases "
                                f"repeated inside one another?); a run spec holds a few hundred")
            continue
        if ident in inside:
            raise SpecError(f"{where}: {dotted(path)} contains itself (a YAML alias inside its own anchor)")
        if ident in sizes:
            continue  # an alias of a value measured already
        if len(path) - len(prefix) >= MAX_DEPTH:
            raise SpecError(f"{where}: {dotted(path[:3])}… is nested more than {MAX_DEPTH} levels deep")
        inside.add(ident)
        stack.append((value, path, True))
        stack.extend((child, (*path, key), False) for key, child in children)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested dict, returning a copy."""
    import copy

    _check_shape(raw, "the config")
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value_text = item.partition("=")
        if not sep or not key:
            raise SpecError(f"override {_shown(item)} must look like key=value, e.g. trainer.zero_stage=3")
        try:
            value = yaml.safe_load(value_text) if value_text else None
        except RecursionError:
            raise SpecError(f"override {_shown(item)}: the value is nested too deeply") from None
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: a date or number YAML cannot build (2024-13-01)
            raise SpecError(f"override {_shown(item)}: the value is not valid YAML ({exc})") from None
        node: Any = out
        parts = key.split(".")
        _check_shape(value, f"override {_shown(item)}", tuple(parts))
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not (part.isascii() and part.isdigit() and len(part) < 10) or int(part) >= len(node):
                    raise SpecError(f"override {_shown(item)}: {'.'.join(parts[:i])} has no item {part[:20]}")
                part = int(part)
            elif not isinstance(node, dict):
                raise SpecError(f"override {_shown(item)}: {'.'.join(parts[:i])} is not a section")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and not isinstance(node.get(part), dict | list):
                    node[part] = {}
                node = node[part]
    return out


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    try:
        # Bytes, not text: YAML reads UTF-8 and UTF-16 (by their byte-order mark) and names a bad byte itself.
        text = p.read_bytes() if p.is_file() else None
    except (OSError, ValueError) as exc:  # a name too long, no permission, a NUL in the path
        raise SpecError(f"config file {str(p)!r} cannot be read: {exc.strerror or exc if isinstance(exc, OSError) else exc}") from None
    if text is None:
        raise SpecError(f"config file {str(p)!r} not found; configs/ has examples (e.g. configs/demo.yaml)")
    try:
        raw = yaml.safe_load(text)
    except RecursionError:
        raise SpecError(f"config file {str(p)!r} is nested too deeply to be a run spec") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"config file {str(p)!r} is not valid YAML{where}: {problem}") from None
    except ValueError as exc:  # a date or number YAML cannot build (2024-13-01, a 5000-digit integer)
        raise SpecError(f"config file {str(p)!r} holds a value YAML cannot read: {exc}") from None
    _check_shape(raw, f"config file {str(p)!r}")
    if raw is None:
        raise SpecError(f"config file {str(p)!r} is empty")
    if not isinstance(raw, dict):
        raise SpecError(f"config file {str(p)!r}: the top level must be a mapping of sections")
    return raw
