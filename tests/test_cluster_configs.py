"""The shipped cluster definitions pass the checks Ray and Kubernetes apply, the validators refuse
broken copies with a message that names the field, and the files agree with the run they start."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from cluster.validate import CRD_SCHEMA_DIR, ClusterConfigError, main, validate_kuberay, validate_ray_up

REPO = Path(__file__).resolve().parent.parent
RAY_UP = sorted((REPO / "cluster").glob("*.yaml"))
KUBERAY = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def write(tmp_path: Path, doc: dict, name: str = "broken.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def worker_types(config: dict) -> dict[str, dict]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def where_in_manifest(doc: dict) -> str:
    return "spec.rayClusterSpec" if doc["kind"] == "RayJob" else "spec"


def test_the_shipped_files_are_found():
    assert {"aws.yaml", "gcp.yaml"} <= {p.name for p in RAY_UP}
    assert {"raycluster.yaml", "rayjob.yaml"} <= {p.name for p in KUBERAY}


# --- ray up: Ray's schema and Ray's own validator --------------------------------------------------

def test_rays_private_validator_works_offline_as_we_use_it():
    """Pins the private API validate_ray_up wraps: validate_config wants a config that
    prepare_config has completed, and prepare_config needs no cloud credentials or SDK."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(REPO / "cluster" / "aws.yaml")
    with pytest.raises(RuntimeError, match="cluster_synced_files"):
        validate_config(copy.deepcopy(raw))
    validate_config(prepare_config(copy.deepcopy(raw)))


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_config_passes_rays_validator(path):
    raw = load(path)
    prepared = validate_ray_up(path)
    # What prepare_config adds, as `ray up` would see it: setup commands merged into the per-role
    # lists, the head's worker limit filled in.
    assert prepared["head_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_misspelled_field_is_refused_by_name(path, tmp_path):
    config = load(path)
    name, worker = next(iter(worker_types(config).items()))
    worker["min_worker"] = worker.pop("min_workers")
    with pytest.raises(ClusterConfigError) as err:
        validate_ray_up(write(tmp_path, config))
    assert f"unknown field available_node_types.{name}.min_worker (did you mean 'min_workers'?)" in str(err.value)

    config = load(path)
    config["head_setup_command"] = config.pop("head_setup_commands")
    with pytest.raises(ClusterConfigError, match=re.escape("unknown field head_setup_command ")):
        validate_ray_up(write(tmp_path, config))


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_wrong_type_is_refused_by_name(path, tmp_path):
    config = load(path)
    config["max_workers"] = "four"
    with pytest.raises(ClusterConfigError, match=re.escape("max_workers: 'four' is not of type 'integer'")):
        validate_ray_up(write(tmp_path, config))

    config = load(path)
    name, worker = next(iter(worker_types(config).items()))
    worker["resources"]["GPU"] = 0.5  # Ray counts whole GPUs per node
    with pytest.raises(ClusterConfigError, match=re.escape(f"available_node_types.{name}.resources.GPU: 0.5")):
        validate_ray_up(write(tmp_path, config))


def test_ray_up_cross_field_error_comes_from_rays_validate_config(tmp_path):
    """Beyond the schema: Ray's validate_config checks node types against each other."""
    config = load(REPO / "cluster" / "aws.yaml")
    next(iter(worker_types(config).values()))["min_workers"] = config["max_workers"] + 1
    with pytest.raises(ClusterConfigError, match="validate_config refused it: .*max_workers"):
        validate_ray_up(write(tmp_path, config))


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_head_is_on_demand_and_gpu_workers_spot(path):
    config = load(path)
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    assert "InstanceMarketOptions" not in head and "scheduling" not in head  # on demand
    for name, worker in worker_types(config).items():
        node = worker["node_config"]
        spot = (node.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
                or node.get("scheduling", {}).get("provisioningModel") == "SPOT")
        assert spot, f"{path.name}: {name} is not spot"
        assert worker["resources"]["GPU"] >= 1 and worker["min_workers"] == 0 < worker["max_workers"]


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_starts_ray_with_token_auth(path):
    config = load(path)
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # Ray's default token path


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_gpu_nodes_hold_the_1b_run(path):
    from trainer.spec import parse_spec, read_yaml

    cluster = parse_spec(read_yaml(REPO / "configs" / "llama_1b.yaml")).cluster
    config = load(path)
    for name, worker in worker_types(config).items():
        per_node = min(worker["resources"]["GPU"] // cluster.gpus_per_worker,
                       worker["resources"]["CPU"] // cluster.cpus_per_worker)
        assert per_node * worker["max_workers"] >= cluster.workers, name


# --- KubeRay: the CRDs' OpenAPI schemas, read as the API server reads them -------------------------

def test_vendored_crd_schemas_record_their_source_and_stay_small():
    files = sorted(CRD_SCHEMA_DIR.glob("*.schema.json"))
    assert {f.name for f in files} == {"raycluster.schema.json", "rayjob.schema.json"}
    assert sum(f.stat().st_size for f in files) < 1_000_000
    for f in files:
        vendored = json.loads(f.read_text())
        assert vendored["kuberay"].startswith("v") and len(vendored["commit"]) == 40
        assert vendored["version"] == "v1" and "spec" in vendored["openAPIV3Schema"]["properties"]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_passes_its_crd_schema(path):
    doc = load(path)
    assert validate_kuberay(path) == [f"{doc['kind']}/{doc['metadata']['name']}"]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_misspelled_field_is_refused_by_name(path, tmp_path):
    doc = load(path)
    group = cluster_spec(doc)["workerGroupSpecs"][0]
    group["minReplica"] = group.pop("minReplicas")
    with pytest.raises(ClusterConfigError) as err:
        validate_kuberay(write(tmp_path, doc))
    field = f"{where_in_manifest(doc)}.workerGroupSpecs[0].minReplica"
    assert f"unknown field {field} (did you mean 'minReplicas'?)" in str(err.value)

    # deep inside the embedded pod template too
    doc = load(path)
    container = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts")
    with pytest.raises(ClusterConfigError) as err:
        validate_kuberay(write(tmp_path, doc))
    field = f"{where_in_manifest(doc)}.headGroupSpec.template.spec.containers[0].volumeMount"
    assert f"unknown field {field} (did you mean 'volumeMounts'?)" in str(err.value)


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_wrong_type_is_refused_by_name(path, tmp_path):
    doc = load(path)
    cluster_spec(doc)["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # ray start params are strings
    with pytest.raises(ClusterConfigError) as err:
        validate_kuberay(write(tmp_path, doc))
    assert f"{where_in_manifest(doc)}.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'" in str(err.value)

    doc = load(path)
    cluster_spec(doc)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "16 Gi"
    with pytest.raises(ClusterConfigError) as err:
        validate_kuberay(write(tmp_path, doc))
    field = f"{where_in_manifest(doc)}.workerGroupSpecs[0].template.spec.containers[0].resources.limits.memory"
    assert f"{field}: '16 Gi' is not a Kubernetes quantity" in str(err.value)


def test_kuberay_required_fields_count_defaults_as_the_api_server_does(tmp_path):
    doc = load(REPO / "cluster" / "kuberay" / "raycluster.yaml")
    del doc["spec"]["workerGroupSpecs"][0]["maxReplicas"]  # required, but the CRD defaults it
    validate_kuberay(write(tmp_path, doc))
    del doc["spec"]["workerGroupSpecs"][0]["groupName"]  # required, no default
    with pytest.raises(ClusterConfigError, match=re.escape("spec.workerGroupSpecs[0]: 'groupName' is a required")):
        validate_kuberay(write(tmp_path, doc))


def test_kuberay_validator_refuses_what_it_cannot_check(tmp_path):
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "zeroray-shared"},
           "spec": {"accessModes": ["ReadWriteMany"]}}
    with pytest.raises(ClusterConfigError, match="only ray.io/v1 RayCluster and RayJob"):
        validate_kuberay(write(tmp_path, pvc))


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_ray_version_is_the_pinned_one(path):
    import ray

    pinned = re.search(r"^ray==(\S+)", (REPO / "constraints.txt").read_text(), re.MULTILINE).group(1)
    assert cluster_spec(load(path))["rayVersion"] == pinned == ray.__version__


def test_rayjob_entrypoint_is_a_zeroray_run_that_fits_its_cluster():
    from launcher.cli import build_parser
    from trainer.spec import apply_overrides, parse_spec, read_yaml

    doc = load(REPO / "cluster" / "kuberay" / "rayjob.yaml")
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    command = next(p for p in doc["spec"]["entrypoint"].split("&&") if p.strip().startswith("zeroray "))
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert (args.command, args.address) == ("train", "auto")
    spec = parse_spec(apply_overrides(read_yaml(REPO / args.config), args.overrides), origin=args.config)

    # The run directory and the data lie on a volume claim mounted in every pod at the same path.
    cluster = cluster_spec(doc)
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        shared = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] in claims]
        for path in (spec.output.dir, spec.data.sources[0].path, spec.data.tokenizer):
            assert any(path.startswith(m + "/") for m in shared), path

    # The worker groups have room for every worker of the run.
    c = spec.cluster
    room = 0
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        per_pod = min(int(limits["nvidia.com/gpu"]) // c.gpus_per_worker, int(limits["cpu"]) // c.cpus_per_worker)
        room += per_pod * group["maxReplicas"]
    assert room >= c.workers


def test_command_line_checks_files_of_both_kinds(tmp_path, capsys):
    assert main([str(REPO / "cluster" / "gcp.yaml"), str(REPO / "cluster" / "kuberay" / "rayjob.yaml")]) == 0
    doc = load(REPO / "cluster" / "kuberay" / "rayjob.yaml")
    doc["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert main([str(write(tmp_path, doc))]) == 1
    assert "spec.shutdownAfterJobFinishes: 'yes' is not of type 'boolean'" in capsys.readouterr().err
