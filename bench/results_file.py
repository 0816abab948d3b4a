"""Where `zeroray bench` stores a sitting: bench/results/<date>[-quick][-only-…][-N].json and the same
name with .md for the rendered table. A full sitting of every section owns the plain date; -N numbers the
later sittings of a day."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def results_stem(quick: bool, only: list[str] | None) -> str:
    stem = str(datetime.date.today())
    if quick:
        stem += "-quick"
    if only:
        stem += "-only-" + "+".join(only)
    return stem


def save(results: dict, markdown: str, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write the results and their table; returns (json path, markdown path). A later sitting of the same
    name the same day is numbered (<stem>-2, -3, …): a recorded sitting, which docs may quote, is never
    overwritten."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name, n = stem, 1
    while (out_dir / f"{name}.json").exists() or (out_dir / f"{name}.md").exists():
        n += 1
        name = f"{stem}-{n}"
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path
