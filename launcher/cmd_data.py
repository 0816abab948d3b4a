"""`zeroray data prepare | inspect | trace`."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.cli_args import add_config_args
from trainer.errors import ZerorayError

DEEPSPEED: set[str] = set()


def add_commands(sub) -> None:
    data = sub.add_parser("data", help="prepare training data")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = data_sub.add_parser(
        "prepare", help="build parquet shards and a BPE tokenizer from a folder of text files",
        description="Build parquet shards (train/ and val/) and a byte-level BPE tokenizer from a folder of "
        "text files. The default folder is this Python's standard-library source: real text, offline.",
    )
    prep.add_argument("--source", type=Path, default=None, help="folder of text files (default: the stdlib)")
    prep.add_argument("--out", type=Path, default=Path("data/stdlib"), help="output folder (default data/stdlib)")
    prep.add_argument("--shards", type=int, default=8, help="training shards (default 8; a multiple of your workers)")
    prep.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    prep.add_argument("--val-fraction", type=float, default=0.02, help="share of files held out (default 0.02)")
    prep.add_argument("--extensions", default=".py,.txt,.md,.rst", help="file extensions to read (comma-separated)")

    inspect = data_sub.add_parser(
        "inspect", help="show decoded samples, tokens per document, packing efficiency, source shares",
        description="Read a sample of each source of a run spec and its first batch: documents and tokens per "
        "document, each source's share, the objective's first batch decoded, and the share of real tokens.",
    )
    add_config_args(inspect)
    trace = data_sub.add_parser(
        "trace", help="fingerprint the global sample order, optionally across a resume on another worker count",
        description="Fingerprint the rows of each optimizer step (as a set) for N steps, simulating every worker "
        "in this process. Two traces with the same fingerprints train on the same data, e.g. a run resumed on "
        "another worker count: --resume-at K --resume-world W2.",
    )
    add_config_args(trace)
    trace.add_argument("--steps", type=int, required=True, help="optimizer steps to trace")
    trace.add_argument("--world", type=int, default=None, help="worker count (default cluster.workers)")
    trace.add_argument("--resume-at", type=int, default=None, metavar="K", help="save and resume after K steps")
    trace.add_argument("--resume-world", type=int, default=None, metavar="W2",
                       help="worker count after the resume (default: the same)")
    trace.add_argument("--json", action="store_true", help="print per-step fingerprints as JSON")


def cmd_data_prepare(args) -> int:
    from data_pipelines.prepare import prepare

    extensions = tuple(e if e.startswith(".") else "." + e for e in args.extensions.split(",") if e)
    try:
        report = prepare(args.out, args.source, args.shards, args.vocab_size, args.val_fraction, extensions)
    except (FileNotFoundError, ValueError) as exc:
        raise ZerorayError(str(exc)) from None
    print("\n".join(report.lines()))
    return 0


def cmd_data_inspect(args) -> int:
    from data_pipelines import LayoutError, SourceError
    from data_pipelines.inspect_data import lines
    from trainer.spec import load_spec

    spec = load_spec(args.config, args.overrides)
    try:
        print("\n".join(lines(spec.data)))
    except (SourceError, LayoutError) as exc:
        raise ZerorayError(str(exc)) from None
    return 0


def cmd_data_trace(args) -> int:
    from data_pipelines import LayoutError, SourceError
    from data_pipelines.trace import trace
    from trainer.spec import load_spec

    spec = load_spec(args.config, args.overrides)
    world = args.world or spec.cluster.max_workers
    resumes = []
    if args.resume_at is not None:
        resumes.append((args.resume_at, args.resume_world or world))
    elif args.resume_world is not None:
        raise ZerorayError("--resume-world needs --resume-at K (the step after which the run resumes)")
    try:
        spec.data.check_layout(spec.global_batch_size, world)
        for _, w in resumes:
            spec.data.check_layout(spec.global_batch_size, w)
        result = trace(spec.data, args.steps, spec.global_batch_size, world=world, resumes=resumes)
    except (SourceError, LayoutError, ValueError) as exc:
        raise ZerorayError(str(exc)) from None
    print(json.dumps(result.to_dict(), indent=2) if args.json else "\n".join(result.lines()))
    return 0


COMMANDS = {
    ("data", "prepare"): cmd_data_prepare,
    ("data", "inspect"): cmd_data_inspect,
    ("data", "trace"): cmd_data_trace,
}
