"""`zeroray bench`: run bench/suite.py's sections in one sitting, write the results and print the table.

The bench lives in the source checkout's bench/ folder, as scripts that import each other by file
name (each also runs alone under python or torchrun), so it is reached through that folder rather
than installed as a package.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

from trainer.errors import ZerorayError

BENCH = Path(__file__).resolve().parent.parent / "bench"


def bench_module(name: str) -> ModuleType:
    """A module of the checkout's bench/ folder."""
    if not (BENCH / "suite.py").is_file():
        raise ZerorayError(
            f"zeroray bench runs from a source checkout, and {BENCH} holds no suite.py: clone the "
            f"repository and install it with `pip install -e .`"
        )
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def parse_sections(text: str | None, known: tuple[str, ...]) -> list[str]:
    """The sections --only names, in the bench's own order; all of them without --only."""
    if text is None:
        return list(known)
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in known]
    if unknown or not wanted:
        what = f"unknown section(s) {', '.join(map(repr, unknown))}" if unknown else "no section"
        raise ZerorayError(
            f"--only {text!r}: {what}; choose from {', '.join(known)}, comma-separated "
            f"(e.g. --only memory,startup)"
        )
    return [s for s in known if s in wanted]


def add_commands(sub) -> None:
    bench = sub.add_parser(
        "bench", help="measure throughput, MFU, scaling, memory, start-up and the data pipeline vs targets",
        description="Run the performance bench in one sitting (bench/ of the source checkout): zeroray "
        "against a hand-written DeepSpeed loop per ZeRO stage, MFU against the measured matmul peak, 2 "
        "workers against 1, model-state memory against the ZeRO paper, per-model throughput, "
        "hyper-connection and MoE overheads, start-up, and the data pipeline against the trainer and a "
        "naive loader; each "
        "figure against its target. Writes bench/results/<date>.json and .md (quick or partial sittings add "
        "a suffix) and prints the table. 15–20 minutes on a 2-core machine, about 3 with --quick; "
        "docs/performance.md explains each figure.",
    )
    bench.add_argument("--quick", action="store_true",
                       help="fewer steps and stages, no ~100M LLM and no realistic configs (about 3 minutes)")
    bench.add_argument("--only", default=None, metavar="SECTION[,SECTION…]",
                       help="run only these sections: overhead, mfu, scaling, memory, models, hc, moe, "
                       "startup, pipeline")
    bench.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    bench.add_argument("--out", type=Path, default=BENCH / "results", metavar="DIR",
                       help="folder for the results files (default bench/results of the checkout)")


def cmd_bench(args) -> int:
    suite, table, files = bench_module("suite"), bench_module("results_table"), bench_module("results_file")
    sections = parse_sections(args.only, suite.SECTIONS)

    def log(line: str) -> None:
        print(f"bench: {line}", file=sys.stderr, flush=True)

    # Libraries imported while measuring (DeepSpeed's logger) write to stdout, which is for the table or JSON.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            results = suite.run(sections, args.quick, log)
        except suite.BenchError as exc:
            raise ZerorayError(str(exc)) from None
    markdown = table.render(results)
    stem = files.results_stem(args.quick, sections if args.only else None)
    json_path, md_path = files.save(results, markdown, args.out, stem)
    print(json.dumps(results, indent=2) if args.json else markdown.rstrip("\n"))
    log(f"wrote {json_path} and {md_path}")
    for section, error in results["errors"].items():
        print(f"zeroray: error: bench section {section} failed: {error}", file=sys.stderr)
    return 1 if results["errors"] else 0


COMMANDS = {("bench", None): cmd_bench}
