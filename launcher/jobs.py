"""`zeroray submit | sweep | status | logs | stop`: runs as Ray jobs on a remote cluster.

A job runs `python -m launcher.cli train spec.yaml cluster.address=auto` on the cluster's head,
started by Ray's job server (Job Submission API, the dashboard's port 8265). The spec is validated
on this machine first (a bad key fails here, before anything is uploaded), written into the job's
`working_dir`, and zeroray's packages travel with it as `py_modules`: the cluster runs the code you
submitted, on the driver and on every Ray Train worker. Only the dependencies (torch, DeepSpeed,
…) must be installed on the cluster. Token authentication is Ray's own: the client reads
RAY_AUTH_MODE and RAY_AUTH_TOKEN (or ~/.ray/auth_token) from the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from launcher.cli_args import add_config_args
from launcher.job_server import RUN_KEY, STOP_WAIT_S, TERMINAL, JobServer, Submission
from launcher.sweep import expand_sweep, sweep_name
from trainer.errors import SpecError, ZerorayError

# ---- what to submit ------------------------------------------------------------------------


def prepare(config: str | Path, overrides: list[str], name: str | None = None) -> Submission:
    """Config file + overrides → a validated spec, as `load_spec` checks it, minus what only the
    cluster can check: data paths and the tokenizer are read there (they may not exist here)."""
    from trainer.spec import apply_overrides, parse_spec, read_yaml

    raw = apply_overrides(read_yaml(config), list(overrides))
    output = raw.setdefault("output", {})
    if isinstance(output, dict):
        # Set, not overridden: an override's value is parsed as YAML (a name like 1e-3 would be a float).
        output["name"] = name or output.get("name") or Path(config).stem
    spec = parse_spec(raw, origin=str(config))
    problems = cluster_path_problems(spec)
    if problems:
        raise SpecError(
            f"{config}: these paths are relative to this machine; on the cluster they would be read relative "
            f"to the job's temporary working directory:\n  " + "\n  ".join(problems) + "\nGive paths that every "
            "node of the cluster sees (e.g. output.dir=/mnt/shared/runs data.sources.0.path=/mnt/shared/data/"
            "train) or URLs (s3://…); see docs/clusters.md, 'Submitting runs'"
        )
    return Submission(str(config), tuple(overrides), spec)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # a Hub name as data_pipelines.sources reads it


def _relative_local(path: str) -> bool:
    """A relative path of this machine: the cluster could not read it. URLs, absolute paths,
    ~ (the cluster user's home) and Hub names are fine."""
    if "://" in path or path.startswith(("/", "~")):
        return False
    hub_name = _HUB_ID.fullmatch(path) is not None and not Path(path).suffix
    return path.startswith(".") or Path(path).exists() or not hub_name


def cluster_path_problems(spec) -> list[str]:
    problems = []
    if not spec.output.dir.startswith(("/", "~")) and spec.output.remote is None:
        problems.append(f"output.dir {spec.output.dir!r}")
    for i, source in enumerate(spec.data.sources):
        if _relative_local(source.path):
            problems.append(f"data.sources.{i}.path {source.path!r}")
    if spec.data.tokenizer != "bytes" and _relative_local(spec.data.tokenizer):
        problems.append(f"data.tokenizer {spec.data.tokenizer!r}")
    return problems


# ---- commands ------------------------------------------------------------------------------


def _summary(message: str | None) -> str:
    """Ray's job message in one line: its first line and, for a failure, the last line of the log
    it quotes (the exception)."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    if lines:  # "… failed with exit code 1, last available logs (truncated to 20,000 chars):"
        lines[0] = re.sub(r", last available logs.*", "", lines[0])
    return "" if not lines else lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"


def _stamp(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _hint(*lines: str) -> None:
    for line in lines:
        print(f"zeroray: {line}", file=sys.stderr)


def _refuse_busy_run_dirs(server: JobServer, subs: list[Submission]) -> None:
    """Two jobs in one run directory would write over each other's checkpoints."""
    names = [s.run_dir for s in subs]
    if len(set(names)) < len(names):
        raise ZerorayError(f"two runs of this sweep would share a run directory ({sorted(names)}); "
                           f"sweep values that differ in more than punctuation")
    for s in subs:
        busy = server.active_job_for(s.run_dir)
        if busy is not None:
            raise ZerorayError(
                f"job {busy.submission_id} ({str(busy.status)}) already trains run {s.name!r} in {s.run_dir}; wait "
                f"for it, stop it (`zeroray stop {busy.submission_id} --address {server.address}`) or choose "
                f"another name (--name NAME)"
            )


def cmd_submit(args) -> int:
    sub = prepare(args.config, args.overrides, args.name)
    server = JobServer(args.address)
    _refuse_busy_run_dirs(server, [sub])
    job = server.submit(sub)
    print(job)
    _hint(f"submitted run {sub.name!r} (run directory {sub.run_dir} on the cluster)")
    if args.no_wait:
        _hint(f"follow it: zeroray logs {job} --follow --address {server.address}")
        return 0
    try:
        server.follow(job)
        info = server.wait(job)
    except KeyboardInterrupt:
        _hint(f"stopped following; job {job} goes on. Stop it: zeroray stop {job} --address {server.address}")
        return 130
    status = str(info.status)
    _hint(f"job {job} {status}" + ("" if status == "SUCCEEDED" else f": {_summary(info.message)}"))
    return 0 if status == "SUCCEEDED" else 1


def cmd_sweep(args) -> int:
    combos = expand_sweep(args.overrides)
    base = args.name or prepare(args.config, combos[0][0]).name
    subs = [prepare(args.config, overrides, sweep_name(base, swept)) for overrides, swept in combos]
    server = JobServer(args.address)
    _refuse_busy_run_dirs(server, subs)
    for sub in subs:  # all validated before the first is submitted
        print(f"{server.submit(sub)}  {sub.name}", flush=True)
    _hint(f"{len(subs)} jobs submitted; see them with: zeroray status --address {server.address}")
    return 0


def cmd_status(args) -> int:
    server = JobServer(args.address)
    if args.job:
        info = server.info(args.job)
        meta = info.metadata or {}
        message = _summary(info.message)
        rows = [
            ("job", info.submission_id or args.job),
            ("run", f"{meta.get(RUN_KEY, '-')}  ({meta.get('zeroray_run_dir', 'not a zeroray job')})"),
            ("status", str(info.status) + (f": {message}" if message else "")),
            ("config", " ".join([meta.get("zeroray_config", info.entrypoint)]
                                + json.loads(meta.get("zeroray_overrides", "[]")))),
            ("workers", meta.get("zeroray_workers", "-")),
            ("started", _stamp(info.start_time)),
            ("ended", _stamp(info.end_time)),
            ("logs", f"zeroray logs {info.submission_id or args.job} --address {server.address}"),
        ]
        for label, value in rows:
            print(f"{label:<8} {value}")
        return 0
    jobs = server.jobs()
    width = max([len("id")] + [len(j.submission_id or "") for j in jobs])
    name_width = max([len("name")] + [len(j.metadata[RUN_KEY]) for j in jobs])
    print(f"{'id':<{width}}  {'name':<{name_width}}  {'status':<9}  {'start':<19}  end")
    for j in jobs:
        print(f"{j.submission_id:<{width}}  {j.metadata[RUN_KEY]:<{name_width}}  {str(j.status):<9}  "
              f"{_stamp(j.start_time):<19}  {_stamp(j.end_time)}")
    return 0


def cmd_logs(args) -> int:
    server = JobServer(args.address)
    if args.follow:
        try:
            server.follow(args.job)
        except KeyboardInterrupt:
            return 130
    else:
        sys.stdout.write(server.logs(args.job))
    return 0


def cmd_stop(args) -> int:
    server = JobServer(args.address)
    if not server.stop(args.job):
        print(f"job {args.job} had already ended: {str(server.info(args.job).status)}")
        return 0
    info = server.wait(args.job, timeout_s=STOP_WAIT_S)
    print(f"job {args.job}: {str(info.status)}")
    if str(info.status) not in TERMINAL:
        _hint(f"Ray is still stopping it; check with: zeroray status {args.job} --address {server.address}")
    return 0


# ---- argparse ------------------------------------------------------------------------------


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"), metavar="URL",
                   help="the cluster's Ray dashboard, e.g. http://127.0.0.1:8265 (default $RAY_API_SERVER_ADDRESS)")


def add_commands(sub) -> None:
    """Register submit, sweep, status, logs and stop on the `zeroray` parser's subcommands."""
    submit = sub.add_parser(
        "submit", help="run a spec as a Ray job on a remote cluster",
        description="Validate a run spec here, then run `zeroray train` on the cluster as a Ray job, with this "
        "checkout's zeroray code. Paths in the spec must be valid on the cluster. Waits and prints the job's "
        "output unless --no-wait.",
    )
    add_config_args(submit)
    _add_address(submit)
    submit.add_argument("--name", default=None, help="run name (output.name; default: the config's file name)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")

    sweep = sub.add_parser(
        "sweep", help="submit one job per combination of comma-separated values",
        description="Submit one job per combination of the comma lists (key=v1,v2 …), each named "
        "NAME-key=value, to one cluster; prints the job ids. Commas inside [] or {} do not split.",
    )
    sweep.add_argument("config", help="run spec YAML file, e.g. configs/demo.yaml")
    sweep.add_argument("overrides", nargs="+", metavar="key=v1,v2",
                       help="dotted overrides; a comma list sweeps the key, e.g. trainer.lr=1e-3,3e-3")
    _add_address(sweep)
    sweep.add_argument("--name", default=None, help="base run name (default: the config's output.name or file name)")

    status = sub.add_parser("status", help="list a cluster's zeroray jobs, or show one",
                            description="Without JOB: every zeroray job of the cluster (id, name, status, start, "
                            "end). With JOB: its run, status, config and times.")
    status.add_argument("job", nargs="?", help="job id (from submit, sweep or status)")
    _add_address(status)

    logs = sub.add_parser("logs", help="print a job's output", description="Print a job's output (its driver's "
                          "stdout and stderr); --follow keeps printing until the job ends.")
    logs.add_argument("job", help="job id")
    _add_address(logs)
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")

    stop = sub.add_parser("stop", help="stop a job", description="Stop a job; its run keeps its last checkpoint, "
                          "and submitting the same spec again resumes it.")
    stop.add_argument("job", help="job id")
    _add_address(stop)


COMMANDS = {
    ("submit", None): cmd_submit,
    ("sweep", None): cmd_sweep,
    ("status", None): cmd_status,
    ("logs", None): cmd_logs,
    ("stop", None): cmd_stop,
}
