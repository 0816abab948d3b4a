"""The commands of a run's life: train, resume, config show, export, runs, plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from launcher.cli_args import add_config_args

# The commands that import DeepSpeed in this process (cli.main points its stdout logger at stderr first). Not
# train and resume: the driver starts Ray Train and checks the data, the ranks import DeepSpeed
# (tests/test_imports.py); not runs and plot, which read files.
DEEPSPEED = {"config", "export"}


def add_commands(sub) -> None:
    train = sub.add_parser(
        "train", help="train a model from a run spec",
        description="Train from a run spec on an embedded local Ray cluster (or cluster.address). Relaunching "
        "the same command resumes from the run's latest checkpoint.",
    )
    add_config_args(train)
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
    add_config_args(show)

    export = sub.add_parser(
        "export", help="write a checkpoint as a folder that transformers loads",
        description="Consolidate a run's checkpoint (any ZeRO stage) into full weights and write a folder that "
        "transformers opens, with the run's tokenizer (safetensors): llama as LlamaForCausalLM, dropless llama "
        "MoE as Qwen2MoeForCausalLM, bert as ElectraForMaskedLM/ElectraForPreTraining, convbert as "
        "ConvBertForMaskedLM/ConvBertModel (transformers alone), the other families with remote code "
        "(AutoModel….from_pretrained(DIR, trust_remote_code=True), zeroray installed).",
    )
    export.add_argument("run_dir", help="run directory (runs/demo, s3://bucket/runs/demo) or a checkpoint in one")
    export.add_argument("--hf", type=Path, required=True, metavar="OUT_DIR", help="folder to write")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it holds an earlier export")

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


def cmd_export(args) -> int:
    from launcher.export import export_hf

    ckpt, out = export_hf(args.run_dir, args.hf, args.step, overwrite=args.overwrite)
    exported = json.loads((out / "zeroray_export.json").read_text())
    print(f"exported {ckpt.path} (step {ckpt.step}) to {out} as {exported['class']}")
    if exported["remote_code"]:
        print(f"load it with: AutoModel….from_pretrained({str(out)!r}, trust_remote_code=True) (zeroray installed)")
    else:
        from models.hf_native import auto_class_name

        print(f"load it with transformers alone: {auto_class_name(exported['class'])}.from_pretrained({str(out)!r})")
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


COMMANDS = {
    ("train", None): cmd_train,
    ("config", "show"): cmd_config_show,
    ("export", None): cmd_export,
    ("runs", None): cmd_runs,
    ("resume", None): cmd_resume,
    ("plot", None): cmd_plot,
}
