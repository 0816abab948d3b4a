"""The `zeroray` command line."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from launcher.errors import ZerorayError

EPILOG = "Run `zeroray COMMAND --help` for a command's options. Docs: docs/ in the repository."


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run spec YAML file, e.g. configs/demo.yaml")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="dotted overrides applied on top of the file, e.g. trainer.zero_stage=3 cluster.workers=2",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zeroray",
        description="Pre-train transformers with DeepSpeed ZeRO on a Ray cluster, fed by streaming datasets.",
        epilog=EPILOG,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train", help="train a model from a run spec",
        description="Train from a run spec on an embedded local Ray cluster (or cluster.address). Relaunching "
        "the same command resumes from the run's latest checkpoint.",
    )
    _add_config_args(train)
    train.add_argument("--address", default=None, metavar="ADDRESS",
                       help="join this Ray cluster (host:port, ray://host:10001, auto) instead of starting an "
                       "embedded one; same as cluster.address=ADDRESS")
    train.add_argument("--fresh", action="store_true",
                       help="start over: move the existing run directory aside instead of resuming")
    train.add_argument("--progress-interval", type=float, default=10.0, metavar="SECONDS",
                       help="seconds between progress lines when output is not a terminal (default 10)")

    config = sub.add_parser("config", help="inspect run specs")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_sub.add_parser(
        "show", help="print the resolved run spec and the DeepSpeed config derived from it",
        description="Validate a run spec and print it fully resolved (defaults filled in, paths absolute), "
        "followed by the DeepSpeed config the trainer will use on this machine.",
    )
    _add_config_args(show)

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

    models_cmd = sub.add_parser(
        "models", help="list model configs with parameters and FLOPs per token",
        description="For each run spec (default: every file in configs/), the model family, total and active "
        "parameters (top_k experts of each MoE layer) and training FLOPs per token at the spec's sequence length.",
    )
    models_cmd.add_argument("configs", nargs="*", help="run spec files (default: configs/*.yaml)")
    models_cmd.add_argument("--json", action="store_true", help="print JSON instead of a table")
    export = sub.add_parser(
        "export", help="write a checkpoint as a folder that transformers loads",
        description="Consolidate a run's checkpoint (any ZeRO stage) into full weights and write a folder that "
        "transformers opens with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) (zeroray must "
        "be installed), with the run's tokenizer.",
    )
    export.add_argument("run_dir", type=Path, help="run directory (e.g. runs/demo)")
    export.add_argument("--hf", type=Path, required=True, metavar="OUT_DIR", help="folder to write")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    return parser


def cmd_export(args) -> int:
    from launcher.export import export_hf

    ckpt, out = export_hf(args.run_dir, args.hf, args.step)
    print(f"exported {ckpt.path} (step {ckpt.step}) to {out}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


def cmd_train(args) -> int:
    from launcher.ray_launch import launch
    from launcher.spec import load_spec

    overrides = args.overrides + ([f"cluster.address={args.address}"] if args.address else [])
    spec = load_spec(args.config, overrides)
    result = launch(spec, fresh=args.fresh, progress_interval_s=args.progress_interval,
                    announce=lambda s: print(f"zeroray: {s}", file=sys.stderr, flush=True))
    last = result.last or {}
    print("zeroray: training finished" if last else "zeroray: nothing to train")
    print(f"  run directory: {result.run.root}")
    print(f"  checkpoints:   {result.run.checkpoints}")
    print(f"  metrics:       {result.run.metrics}")
    print(f"  logs:          {result.run.logs}")
    if last:
        print(f"  final step {last['step']}: loss {last['loss']:.4f}, {last['tokens_per_s']:.0f} tokens/s, "
              f"precision {last['precision']}")
    if result.first_step_s is not None:
        print(f"  first optimizer step {result.first_step_s:.1f} s after launch; wall time {result.wall_s:.1f} s")
    return 0


def cmd_config_show(args) -> int:
    from launcher.spec import load_spec
    from trainer.ds_config import deepspeed_config, resolve_precision

    spec = load_spec(args.config, args.overrides)
    print("# run spec (resolved)")
    print(spec.to_yaml())
    precision = resolve_precision(spec)
    print(f"# DeepSpeed config (precision {spec.trainer.precision} → {precision} on this machine)")
    print(json.dumps(deepspeed_config(spec, precision), indent=2))
    return 0


def cmd_data_prepare(args) -> int:
    from data_pipelines.prepare import prepare

    extensions = tuple(e if e.startswith(".") else "." + e for e in args.extensions.split(",") if e)
    try:
        report = prepare(args.out, args.source, args.shards, args.vocab_size, args.val_fraction, extensions)
    except (FileNotFoundError, ValueError) as exc:
        raise ZerorayError(str(exc)) from None
    print("\n".join(report.lines()))
    return 0


def cmd_models(args) -> int:
    from launcher.model_table import model_rows

    rows = model_rows(args.configs)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'config':<24} {'model':<8} {'params':>9} {'active':>9} {'train FLOPs/token':>18}  description")
    for r in rows:
        print(f"{r['config']:<24} {r['model']:<8} {r['params'] / 1e6:>8.2f}M {r['active_params'] / 1e6:>8.2f}M "
              f"{r['flops_per_token']:>18.3e}  {r['summary']}")
    return 0


COMMANDS = {
    ("train", None): cmd_train,
    ("config", "show"): cmd_config_show,
    ("data", "prepare"): cmd_data_prepare,
    ("models", None): cmd_models,
    ("export", None): cmd_export,
}


def _deepspeed_logs_to_stderr() -> None:
    """DeepSpeed's logger writes to stdout from import time on; stdout is for our output
    (`zeroray config show | ...`), so import it once with stdout pointed at stderr."""
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.accelerator import get_accelerator

        get_accelerator()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    action = getattr(args, f"{args.command}_command", None)
    if args.command in ("train", "config", "export"):
        _deepspeed_logs_to_stderr()
    try:
        return COMMANDS[(args.command, action)](args)
    except ZerorayError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"zeroray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zeroray: interrupted; the last published checkpoint is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
