"""The cluster's job server: Ray's JobSubmissionClient, with its failures turned into messages that say what to do."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import ZerorayError

PACKAGES = ("launcher", "trainer", "models", "data_pipelines", "cluster")  # what pyproject installs
SPEC_FILE = "spec.yaml"
RUN_KEY = "zeroray_run"  # metadata key that marks a job as a zeroray run
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
STOP_WAIT_S = 30.0


@dataclass(frozen=True)
class Submission:
    """One validated run spec and how it was asked for (recorded in the job's metadata)."""

    config: str
    overrides: tuple[str, ...]
    spec: object  # trainer.spec.RunSpec

    @property
    def name(self) -> str:
        return self.spec.output.name

    @property
    def run_dir(self) -> str:
        return self.spec.output.location

    def metadata(self) -> dict[str, str]:
        c = self.spec.cluster
        per_worker = f"{c.cpus_per_worker} CPU"
        if c.gpus_per_worker:
            per_worker = f"({per_worker} + {c.gpus_per_worker} GPU)"
        return {
            "job_name": self.name,  # the metadata key Ray's tools use for a job's name
            RUN_KEY: self.name,
            "zeroray_config": self.config,
            "zeroray_overrides": json.dumps(list(self.overrides)),
            "zeroray_run_dir": self.run_dir,
            "zeroray_workers": f"{c.workers} × {per_worker}",
        }


class JobServer:
    """Ray's JobSubmissionClient, with its failures turned into messages that say what to do."""

    def __init__(self, address: str | None):
        if not address:
            raise ZerorayError("--address is required: the Ray dashboard of the cluster, e.g. http://HEAD:8265 "
                               "(or set RAY_API_SERVER_ADDRESS)")
        import logging

        from ray.job_submission import JobSubmissionClient

        # Ray logs each package it zips and uploads, and each closed log stream, at INFO: noise here.
        for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                     "ray._private.runtime_env.packaging"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.address = address if "://" in address else f"http://{address}"
        self.client = self._call(JobSubmissionClient, self.address)

    def _call(self, fn, *args, job: str | None = None, **kwargs):
        import requests
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except AuthenticationError as exc:
            raise ZerorayError(
                f"the Ray cluster at {self.address} refused the request: {str(exc).splitlines()[0]}\n"
                f"It uses token authentication: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's "
                f"token> (or put it in ~/.ray/auth_token); docs/clusters.md, 'Authentication'"
            ) from None
        except (ConnectionError, requests.exceptions.RequestException) as exc:
            raise ZerorayError(
                f"cannot reach Ray's job server at {self.address} ({str(exc).rstrip('.')}). It is the cluster's dashboard "
                f"(port 8265): open a tunnel first (`ray dashboard CLUSTER.yaml`, `kubectl port-forward "
                f"svc/NAME-head-svc 8265:8265`) and check that the head runs ray[default]"
            ) from None
        except RuntimeError as exc:
            if job is not None and "404" in str(exc):
                raise ZerorayError(f"no job {job!r} on the cluster at {self.address}; `zeroray status --address "
                                   f"{self.address}` lists them") from None
            raise ZerorayError(f"Ray's job server at {self.address}: {exc}") from None

    def submit(self, sub: Submission) -> str:
        with tempfile.TemporaryDirectory(prefix="zeroray-job-") as folder:
            Path(folder, SPEC_FILE).write_text(sub.spec.to_yaml())
            return self._call(
                self.client.submit_job,
                entrypoint=f"python -m launcher.cli train {SPEC_FILE} cluster.address=auto",
                runtime_env={
                    "working_dir": folder,
                    "py_modules": [str(Path(importlib.import_module(p).__file__).parent) for p in PACKAGES],
                    "excludes": ["__pycache__/", "*.pyc"],
                    # Ray's job logs are the driver's output: unbuffered, `zeroray logs --follow` shows it live.
                    "env_vars": {"PYTHONUNBUFFERED": "1"},
                },
                metadata=sub.metadata(),
                # The driver reserves no resources (Ray's default, said out loud): it runs on the head
                # (CPU 0 in cluster/*.yaml) and Ray Train asks for the workers' CPUs and GPUs. A job whose
                # workers do not fit yet waits in Ray Train's placement-group queue (retried without limit),
                # which the autoscaler scales for. Reserving the workers' resources for the entrypoint would
                # deadlock: the driver would hold the CPUs its own workers need.
                entrypoint_num_cpus=0,
                entrypoint_num_gpus=0,
            )

    def jobs(self) -> list:
        """zeroray's jobs on the cluster, oldest first."""
        found = [j for j in self._call(self.client.list_jobs) if RUN_KEY in (j.metadata or {})]
        return sorted(found, key=lambda j: j.start_time or 0)

    def info(self, job: str):
        return self._call(self.client.get_job_info, job, job=job)

    def logs(self, job: str) -> str:
        return self._call(self.client.get_job_logs, job, job=job)

    def follow(self, job: str, out=sys.stdout) -> None:
        """Print the job's output as it comes, until the job ends."""

        async def stream():
            async for chunk in self.client.tail_job_logs(job):
                out.write(chunk)
                out.flush()

        self.info(job)  # a clear error for an unknown job; the websocket would only say "404"
        try:
            asyncio.run(stream())
        except Exception as exc:  # aiohttp's and Ray's errors alike: the job itself goes on
            raise ZerorayError(f"lost the log stream of job {job} ({type(exc).__name__}: {exc}); the job goes on: "
                               f"`zeroray logs {job} --follow --address {self.address}`") from None

    def stop(self, job: str) -> bool:
        return self._call(self.client.stop_job, job, job=job)

    def wait(self, job: str, timeout_s: float | None = None):
        """The job's info once it is finished (or when timeout_s has passed)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            info = self.info(job)
            if str(info.status) in TERMINAL or (deadline is not None and time.monotonic() > deadline):
                return info
            time.sleep(0.5)

    def active_job_for(self, run_dir: str):
        for j in self.jobs():
            if (j.metadata or {}).get("zeroray_run_dir") == run_dir and str(j.status) not in TERMINAL:
                return j
        return None
