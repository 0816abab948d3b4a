"""The `zeroray` command line."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from launcher import bench_cmd, cluster_cli, jobs
from trainer.errors import RunPreempted, ZerorayError

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

    inspect = data_sub.add_parser(
        "inspect", help="show decoded samples, tokens per document, packing efficiency, source shares",
        description="Read a sample of each source of a run spec and its first batch: documents and tokens per "
        "document, each source's share, the objective's first batch decoded, and the share of real tokens.",
    )
    _add_config_args(inspect)
    trace = data_sub.add_parser(
        "trace", help="fingerprint the global sample order, optionally across a resume on another worker count",
        description="Fingerprint the rows of each optimizer step (as a set) for N steps, simulating every worker "
        "in this process. Two traces with the same fingerprints train on the same data, e.g. a run resumed on "
        "another worker count: --resume-at K --resume-world W2.",
    )
    _add_config_args(trace)
    trace.add_argument("--steps", type=int, required=True, help="optimizer steps to trace")
    trace.add_argument("--world", type=int, default=None, help="worker count (default cluster.workers)")
    trace.add_argument("--resume-at", type=int, default=None, metavar="K", help="save and resume after K steps")
    trace.add_argument("--resume-world", type=int, default=None, metavar="W2",
                       help="worker count after the resume (default: the same)")
    trace.add_argument("--json", action="store_true", help="print per-step fingerprints as JSON")

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

    runs = sub.add_parser(
        "runs", help="list runs: model, status, step, last loss",
        description="List the run directories under a folder (default runs/) with model, status (running, "
        "finished, failed, interrupted, preempted, stopped), step, latest checkpoint and last loss.",
    )
    runs.add_argument("--dir", type=Path, default=Path("runs"), help="folder of run directories (default runs/)")
    runs.add_argument("--json", action="store_true", help="print JSON instead of a table")

    resume = sub.add_parser(
        "resume", help="continue a run from its latest checkpoint",
        description="Relaunch a run from its saved spec (RUN_DIR/spec.yaml); overrides apply on top, e.g. "
        "trainer.max_steps=600 to train a finished run further.",
    )
    resume.add_argument("run_dir", type=Path, help="run directory (e.g. runs/demo)")
    resume.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    resume.add_argument("--progress-interval", type=float, default=10.0, metavar="SECONDS",
                        help="seconds between progress lines when output is not a terminal (default 10)")

    plot = sub.add_parser(
        "plot", help="draw a metric of one or more runs on one chart (PNG)",
        description="Draw a metric (default loss) against the step for each run, on one chart.",
    )
    plot.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run directories")
    plot.add_argument("--metric", default="loss", help="metric name from metrics.jsonl (default loss)")
    plot.add_argument("-o", "--output", type=Path, default=Path("plot.png"), help="PNG to write (default plot.png)")

    experiment = sub.add_parser(
        "experiment", help="compare architectures: every arm × seed trained and evaluated, one results table",
        description="Run an experiment of configs/experiments/ (hyper-connections, widenet, charformer, convbert): "
        "every arm × seed through `zeroray train` on one Ray cluster, with the same data and budget, evaluated "
        "on the held-out split; writes results.md, results.json and eval_loss.png into the experiment's "
        "directory. Re-running skips the runs that finished. docs/results.md has the latest figures.",
    )
    experiment.add_argument("name", metavar="NAME", help="experiment: a file name in configs/experiments/")
    experiment.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every arm")
    experiment.add_argument("--scale", default="tiny",
                            help="budget and platform: smoke (3 steps), tiny (this 2-core CPU, 10–20 min), "
                            "small (one 8-GPU node), base (the papers' shapes on a GPU cluster); default tiny")
    experiment.add_argument("--seeds", type=int, default=2, help="seeds per arm (trainer.seed 0..N-1; default 2)")
    experiment.add_argument("--out", type=Path, default=None,
                            help="experiment directory (default runs/experiments/NAME-SCALE)")
    experiment.add_argument("--dry-run", action="store_true",
                            help="print the plan (arms, overrides, sizes, token budget) without training")
    experiment.add_argument("--progress-interval", type=float, default=30.0, metavar="SECONDS",
                            help="seconds between progress lines when output is not a terminal (default 30)")
    jobs.add_commands(sub, _add_config_args)  # submit, sweep, status, logs, stop: Ray jobs on a cluster
    cluster_cli.add_commands(sub)  # cluster up|down|status
    bench_cmd.add_commands(sub)  # the performance bench (bench/ of the checkout)
    return parser


def cmd_runs(args) -> int:
    from launcher.runs import list_runs

    rows = list_runs(args.dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<24} {'model':<16} {'status':<12} {'step':>13} {'loss':>8}  path")
    for r in rows:
        loss = "" if r["loss"] is None else f"{r['loss']:.4f}"
        error = f"  ({r['error']})" if r.get("error") else ""
        print(f"{r['name']:<24} {r['model']:<16} {r['status']:<12} {r['step']:>6}/{r['max_steps']:<6} {loss:>8}  "
              f"{r['path']}{error}")
    return 0


def cmd_resume(args) -> int:
    from launcher.runs import run_spec
    from trainer.spec import apply_overrides, parse_spec, resolve

    saved = run_spec(args.run_dir)
    spec = resolve(parse_spec(apply_overrides(saved.to_dict(), args.overrides), origin=str(args.run_dir / "spec.yaml")))
    return _launch_and_summarise(spec, fresh=False, progress_interval=args.progress_interval)


def cmd_plot(args) -> int:
    from launcher.runs import plot_runs

    plot_runs(args.run_dirs, args.metric, args.output)
    print(f"wrote {args.output} ({args.metric} of {len(args.run_dirs)} run(s))")
    return 0


def cmd_experiment(args) -> int:
    from launcher.experiments import cli

    return cli(args.name, args.scale, args.seeds, args.out, args.dry_run, args.overrides, args.progress_interval)


def cmd_export(args) -> int:
    from launcher.export import export_hf

    ckpt, out = export_hf(args.run_dir, args.hf, args.step)
    print(f"exported {ckpt.path} (step {ckpt.step}) to {out}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


def cmd_train(args) -> int:
    from trainer.spec import load_spec

    overrides = args.overrides + ([f"cluster.address={args.address}"] if args.address else [])
    return _launch_and_summarise(load_spec(args.config, overrides), args.fresh, args.progress_interval)


def _launch_and_summarise(spec, fresh: bool, progress_interval: float) -> int:
    from launcher.ray_launch import launch

    result = launch(spec, fresh=fresh, progress_interval_s=progress_interval,
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
    from trainer.ds_config import deepspeed_config, resolve_precision
    from trainer.spec import load_spec

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


def cmd_models(args) -> int:
    from launcher.model_table import model_rows

    rows = model_rows(args.configs)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'config':<24} {'model':<16} {'params':>9} {'active':>9} {'train FLOPs/token':>18}  description")
    for r in rows:
        print(f"{r['config']:<24} {r['model']:<16} {r['params'] / 1e6:>8.2f}M {r['active_params'] / 1e6:>8.2f}M "
              f"{r['flops_per_token']:>18.3e}  {r['summary']}")
    return 0


COMMANDS = {
    ("train", None): cmd_train,
    ("config", "show"): cmd_config_show,
    ("data", "prepare"): cmd_data_prepare,
    ("data", "inspect"): cmd_data_inspect,
    ("data", "trace"): cmd_data_trace,
    ("models", None): cmd_models,
    ("export", None): cmd_export,
    ("runs", None): cmd_runs,
    ("resume", None): cmd_resume,
    ("plot", None): cmd_plot,
    ("experiment", None): cmd_experiment,
    **jobs.COMMANDS,
    **cluster_cli.COMMANDS,
    **bench_cmd.COMMANDS,
}


def _deepspeed_logs_to_stderr() -> None:
    """DeepSpeed's logger writes to stdout from import time on; stdout is for our output
    (`zeroray config show | ...`), so import it once with stdout pointed at stderr."""
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.accelerator import get_accelerator

        get_accelerator()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`zeroray train C --address auto k=v`): argparse stops taking
    # positionals at the first option, so pick up the key=value leftovers ourselves.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or not all("=" in item and not item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    action = getattr(args, f"{args.command}_command", None)
    if args.command in ("train", "config", "export", "resume", "runs", "plot") or (
            args.command == "experiment" and not args.dry_run):
        _deepspeed_logs_to_stderr()
    try:
        return COMMANDS[(args.command, action)](args)
    except RunPreempted as exc:  # a stop on request, with a checkpoint: not an error
        print(f"zeroray: {exc}", file=sys.stderr)
        return 143  # 128 + SIGTERM, what a shell reports for a process ended by the signal
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
