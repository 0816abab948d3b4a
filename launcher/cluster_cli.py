"""`zeroray cluster up|down|status FILE`: Ray's cluster launcher, after checking FILE offline.

A `ray up` file (cluster/aws.yaml, cluster/gcp.yaml) is checked with cluster/validate.py (Ray's own
schema and validator), then handed to `ray up` / `ray down` / `ray exec FILE "ray status"`, whose
prompts and output the user sees as they are. A KubeRay manifest is checked the same way, and the
kubectl command to use is printed: zeroray does not choose a Kubernetes context for you.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from trainer.errors import ZerorayError

RAY_ACTIONS = {"up": ["up"], "down": ["down"], "status": ["exec"]}  # + FILE (+ "ray status" for status)


def is_kuberay(path: Path) -> bool:
    """A Kubernetes manifest starts a document with apiVersion; a `ray up` file never has one."""
    text = path.read_text() if path.is_file() else ""
    return re.search(r"^apiVersion:", text, re.MULTILINE) is not None


def validate(path: Path) -> list[str]:
    """Check FILE offline; return the KubeRay objects it defines ([] for a `ray up` file)."""
    from cluster.validate import ClusterConfigError, validate_kuberay, validate_ray_up

    try:
        if is_kuberay(path):
            return validate_kuberay(path)
        validate_ray_up(path)
        return []
    except ClusterConfigError as exc:
        raise ZerorayError(f"{exc}\nNothing was started or changed; fix the file and run the command again "
                           f"(`python -m cluster.validate {path}` checks it alone).") from None


def kubectl_commands(action: str, path: Path, objects: list[str]) -> list[str]:
    if action == "up":
        return [f"kubectl apply -f {shlex.quote(str(path))}"]
    if action == "down":
        return [f"kubectl delete -f {shlex.quote(str(path))}"]
    lines = []
    for obj in objects:
        kind, name = obj.split("/", 1)
        lines.append(f"kubectl get {kind.lower()} {name}")
        if kind == "RayCluster":
            lines.append(f"kubectl get pods -l ray.io/cluster={name}")
        else:  # a RayJob: its submitter's output is the run's
            lines.append(f"kubectl logs -f job/{name}")
    return lines


def ray_executable() -> str:
    """The `ray` the user would type (PATH), else the one installed beside this Python."""
    found = shutil.which("ray") or shutil.which("ray", path=str(Path(sys.executable).parent))
    if found is None:
        raise ZerorayError("the `ray` command is not installed here; pip install -c constraints.txt 'ray[default]' "
                           "(plus boto3 for AWS or google-api-python-client for GCP)")
    return found


def cmd_cluster(args) -> int:
    path, action = args.file, args.cluster_command
    objects = validate(path)
    if is_kuberay(path):
        print(f"{path}: ok ({', '.join(objects)}); KubeRay manifests are applied with kubectl:")
        for line in kubectl_commands(action, path, objects):
            print(f"  {line}")
        return 0
    command = [ray_executable(), *RAY_ACTIONS[action], str(path)]
    if action == "status":
        command.append("ray status")  # the autoscaler's view, from the head
    elif args.yes:
        command.append("--yes")
    print(f"zeroray: {path} is valid; running {shlex.join(['ray', *command[1:]])}", file=sys.stderr, flush=True)
    return subprocess.call(command)


def add_commands(sub) -> None:
    """Register `cluster up|down|status` on the `zeroray` parser's subcommands."""
    cluster = sub.add_parser(
        "cluster", help="start, stop or inspect a cluster defined in cluster/*.yaml",
        description="Check a cluster file offline (cluster/validate.py), then run Ray's cluster launcher on it: "
        "`ray up`, `ray down`, or `ray status` on the head. For KubeRay manifests, print the kubectl command.",
    )
    actions = cluster.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    for action, help_text in (("up", "start or update the cluster (ray up)"),
                              ("down", "tear the cluster down (ray down); shared storage stays"),
                              ("status", "nodes and resources, from the head (ray exec FILE 'ray status')")):
        p = actions.add_parser(action, help=help_text, description=help_text)
        p.add_argument("file", type=Path, metavar="FILE", help="ray up cluster YAML or KubeRay manifest")
        if action != "status":
            p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")


COMMANDS = {("cluster", action): cmd_cluster for action in RAY_ACTIONS}
