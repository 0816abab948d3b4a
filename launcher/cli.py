"""The `zeroray` command line: each command module registers its subcommands (`add_commands(sub)`) and
their handlers (`COMMANDS`, keyed by (command, action)); adding a command touches its module and, for a
new module, COMMAND_MODULES."""

from __future__ import annotations

import argparse
import sys
import traceback

from launcher import bench_cmd, cluster_cli, cmd_data, cmd_model, cmd_research, cmd_run, jobs
from trainer.errors import RunPreempted, ZerorayError

EPILOG = "Run `zeroray COMMAND --help` for a command's options. Docs: docs/ in the repository."

# In the order `zeroray --help` lists their commands.
COMMAND_MODULES = (cmd_run, cmd_model, cmd_data, cmd_research, jobs, cluster_cli, bench_cmd)
COMMANDS = {key: handler for module in COMMAND_MODULES for key, handler in module.COMMANDS.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zeroray",
        description="Pre-train transformers with DeepSpeed ZeRO on a Ray cluster, fed by streaming datasets.",
        epilog=EPILOG,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return parser


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
    if any(args.command in getattr(m, "DEEPSPEED", ()) and getattr(m, "needs_deepspeed", lambda a: True)(args)
           for m in COMMAND_MODULES):
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
