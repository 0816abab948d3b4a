"""A simulated multi-node Ray cluster on this machine, to try elastic training, placement and drains (and to
test them): `python -m cluster.simulated --cpus 2 1`. Why not in tests/: users try elastic runs with it
too (docs/fault_tolerance.md), and an installed zeroray has no tests/."""

from __future__ import annotations

import json
import os
import subprocess
import sys


class SimulatedCluster:
    """Several Ray nodes on this machine (Ray's `ray.cluster_utils.Cluster`): a head without CPUs, so no
    training worker lands on it, and worker nodes that can be removed and added while a run trains
    (join with `cluster.address=<address>`). It lives in a child process with its own temp folder:
    Ray's address file and sockets stay private, and no other Ray user on the machine attaches to it.
    A context manager; `python -m cluster.simulated --cpus 2 1` runs one and adds and removes nodes on command."""

    def __init__(self, node_cpus: list[int], temp_dir: str, resources: dict[str, float] | None = None):
        env = {**os.environ, "RAY_TMPDIR": temp_dir, "RAY_USAGE_STATS_ENABLED": "0"}
        self._resources = resources or {}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.simulated", "--serve"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
        )
        self.address: str = self._call({"cmd": "address"})["address"]
        self.node_ids = [self.add(cpus) for cpus in node_cpus]

    def _call(self, request: dict) -> dict:
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the simulated Ray cluster exited (code {self._proc.wait()}); see its output above")
        return json.loads(line)

    def add(self, cpus: int) -> str:
        """Start a worker node with `cpus` CPUs (and the custom resources); returns its Ray node id."""
        return self._call({"cmd": "add", "cpus": cpus, "resources": self._resources})["node_id"]

    def remove(self, node_id: str) -> None:
        """Kill a worker node and every process on it, as a lost machine."""
        self._call({"cmd": "remove", "node_id": node_id})

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()  # EOF: the child shuts the cluster down
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> SimulatedCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve() -> None:
    """The child side of SimulatedCluster: one JSON request per line on stdin, one answer per line on stdout."""
    import contextlib

    from ray.cluster_utils import Cluster

    with contextlib.redirect_stdout(sys.stderr):  # Ray's own output must not mix with the answers
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = {}
    for line in sys.stdin:
        request = json.loads(line)
        with contextlib.redirect_stdout(sys.stderr):
            if request["cmd"] == "address":
                answer = {"address": cluster.address}
            elif request["cmd"] == "add":
                node = cluster.add_node(num_cpus=request["cpus"], resources=request["resources"])
                nodes[node.node_id] = node
                answer = {"node_id": node.node_id}
            elif request["cmd"] == "remove":
                cluster.remove_node(nodes.pop(request["node_id"]))
                answer = {"removed": request["node_id"]}
            else:
                answer = {"error": f"unknown request {request}"}
        print(json.dumps(answer), flush=True)
    cluster.shutdown()


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=SimulatedCluster.__doc__)
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 1], help="CPUs of each worker node")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve()
    else:
        with SimulatedCluster(args.cpus, tempfile.mkdtemp(prefix="zr-sim-", dir="/tmp")) as sim:
            print(f"Ray cluster at {sim.address}; train on it with cluster.address={sim.address}")
            alive = list(sim.node_ids)
            while True:
                print(f"worker nodes: {', '.join(alive)}")
                words = input("add CPUS | remove NODE_ID | Enter to shut down> ").split()
                if not words:
                    break
                if words[0] == "add" and len(words) == 2 and words[1].isdigit():
                    alive.append(sim.add(int(words[1])))
                elif words[0] == "remove" and len(words) == 2 and words[1] in alive:
                    sim.remove(words[1])
                    alive.remove(words[1])
                else:
                    print("not understood")
