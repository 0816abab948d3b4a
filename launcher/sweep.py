"""`zeroray sweep`'s grid: comma-separated override values → one run (and run name) per combination."""

from __future__ import annotations

import itertools
import re

from trainer.errors import SpecError


def split_values(text: str) -> list[str]:
    """`v1,v2` → ["v1", "v2"]: commas inside brackets, braces, parentheses or quotes do not split,
    so a YAML list or mapping (`model.moe={num_experts: 4, top_k: 2}`) stays one value."""
    parts, current, depth, quote = [], [], 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def expand_sweep(overrides: list[str]) -> list[tuple[list[str], dict[str, str]]]:
    """The cartesian product of the comma lists: one (overrides, {swept key: value}) per combination,
    the first key varying slowest."""
    axes: list[list[tuple[str, str]]] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"override {item!r} must look like key=value or key=v1,v2,… (a sweep)")
        values = split_values(value)
        if len(values) > 1 and any(not v.strip() for v in values):
            raise SpecError(f"sweep {item!r} has an empty value; write key=v1,v2 (quote a value that holds a comma)")
        axes.append([(key, v) for v in values])
    if not any(len(axis) > 1 for axis in axes):
        raise SpecError("nothing to sweep: give at least one key with several values, e.g. trainer.lr=1e-3,3e-3")
    swept = [axis[0][0] for axis in axes if len(axis) > 1]
    short = {k: k.rsplit(".", 1)[-1] for k in swept}
    if len(set(short.values())) < len(short):  # two keys end alike (model.x, trainer.x): name them in full
        short = {k: k for k in swept}
    combos = []
    for choice in itertools.product(*axes):
        combos.append(([f"{k}={v}" for k, v in choice], {short[k]: v for k, v in choice if k in short}))
    return combos


def sweep_name(base: str, swept: dict[str, str]) -> str:
    """`tiny` + {lr: 1e-3} → `tiny-lr=1e-3`; characters that do not belong in a folder name become _."""
    def clean(value: str) -> str:
        return re.sub(r"_+", "_", re.sub(r"[^\w.+-]", "_", value)).strip("_") or "_"

    return "-".join([base] + [f"{k}={clean(v)}" for k, v in swept.items()])
