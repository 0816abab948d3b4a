"""Check cluster definitions offline, before they cost money.

* `validate_ray_up(path)`: a `ray up` cluster YAML, checked by Ray's own code: the JSON schema Ray
  ships (`ray/autoscaler/ray-schema.json`), then `prepare_config` + `validate_config` from
  `ray.autoscaler._private.util`, the two steps `ray up` runs before it talks to the cloud. Both
  are offline (prepare_config merges the provider's defaults.yaml; no credentials, no boto3 or
  googleapiclient). They are private API: tests/test_cluster_configs.py pins what we rely on.
  Not checked: what `ray up` asks the cloud next (`node_config` contents such as InstanceType or
  machineType, which Ray passes to the cloud API as they are; resource autodetection).
* `validate_kuberay(path)`: a KubeRay manifest (RayCluster, RayJob) against the OpenAPI schema
  of KubeRay's CRD, vendored in tests/data/kuberay/, read the way the Kubernetes API server reads
  it with strict field validation (kubectl's default): an unknown field is an error. Not checked:
  the CRDs' CEL rules (x-kubernetes-validations) and the root `metadata` beyond its name.

`python -m cluster.validate FILE...` checks files of either kind and exits 1 on the first bad one.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

CRD_SCHEMA_DIR = Path(__file__).resolve().parent.parent / "tests" / "data" / "kuberay"
# kind → vendored schema file; both are served as ray.io/v1
KUBERAY_SCHEMAS = {"RayCluster": "raycluster.schema.json", "RayJob": "rayjob.schema.json"}
KUBERAY_API_VERSION = "ray.io/v1"
MAX_ERRORS_SHOWN = 20


class ClusterConfigError(ValueError):
    """A cluster file that Ray or Kubernetes would refuse; the message names the file and the field."""


def validate_ray_up(path: str | Path) -> dict:
    """Validate a `ray up` cluster YAML with Ray's schema and validator; return the config as
    `ray up` prepares it (provider defaults merged in, per-node-type worker limits filled)."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _read_yaml(path)
    if not isinstance(config, dict) or not isinstance(config.get("provider"), dict) or "type" not in config["provider"]:
        raise ClusterConfigError(f"{path}: not a ray up cluster config (it needs a provider section with a type)")
    # The schema on the file as written first: prepare_config indexes into the config and
    # would fail with a bare TypeError on a mistyped section.
    _raise_schema_errors(path, config, jsonschema.Draft7Validator(ray_up_schema()))
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as exc:  # a default merged in that the schema refuses
        raise ClusterConfigError(f"{path}: {_describe(exc)}") from None
    except (ValueError, RuntimeError, KeyError, TypeError, AssertionError, NotImplementedError) as exc:
        raise ClusterConfigError(f"{path}: Ray's validate_config refused it: {exc}") from None
    return prepared


def ray_up_schema() -> dict:
    """The cluster-config JSON schema of the installed Ray (the file validate_config reads)."""
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def validate_kuberay(path: str | Path, schema_dir: str | Path = CRD_SCHEMA_DIR) -> list[str]:
    """Validate every document of a KubeRay manifest against its CRD schema; return "Kind/name"
    for each. A document of any other kind is an error: nothing here could check it."""
    import jsonschema

    documents = [d for d in _read_yaml(path, all_documents=True) if d is not None]
    if not documents:
        raise ClusterConfigError(f"{path}: no YAML documents")
    checked = []
    for i, doc in enumerate(documents, 1):
        where = f"{path} (document {i})" if len(documents) > 1 else str(path)
        if not isinstance(doc, dict):
            raise ClusterConfigError(f"{where}: a manifest is a mapping with apiVersion, kind, metadata, spec")
        kind, api_version = doc.get("kind"), doc.get("apiVersion")
        if kind not in KUBERAY_SCHEMAS or api_version != KUBERAY_API_VERSION:
            raise ClusterConfigError(
                f"{where}: apiVersion {api_version!r}, kind {kind!r}: only {KUBERAY_API_VERSION} "
                f"{' and '.join(KUBERAY_SCHEMAS)} manifests can be checked (their CRD schemas are vendored)"
            )
        vendored = _crd_schema_file(Path(schema_dir) / KUBERAY_SCHEMAS[kind])
        schema = kubernetes_semantics(vendored["openAPIV3Schema"])
        _raise_schema_errors(where, doc, jsonschema.Draft7Validator(schema),
                             against=f"the {kind} CRD of KubeRay {vendored['kuberay']}")
        metadata = doc.get("metadata") or {}
        name = metadata.get("name") or metadata.get("generateName")
        if not isinstance(name, str):
            raise ClusterConfigError(f"{where}: metadata.name (or metadata.generateName) is required, a string")
        checked.append(f"{kind}/{name}")
    return checked


def kubernetes_semantics(schema: dict) -> dict:
    """An OpenAPI v3 CRD schema as JSON Schema that refuses what the API server refuses.

    A structural CRD schema leaves `additionalProperties` out, yet the API server (strict field
    validation) rejects fields it does not list unless `x-kubernetes-preserve-unknown-fields` is
    set; a required field with a default is filled in before validation; `nullable: true` admits
    null. Quantities already carry anyOf [integer, string].
    """

    def fix(node: dict) -> dict:
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        if isinstance(node.get("required"), list):  # the API server fills defaults before it validates
            props = node.get("properties", {})
            node["required"] = [r for r in node["required"] if "default" not in props.get(r, {})]
        if node.get("nullable") and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        if node.get("x-kubernetes-int-or-string") and "anyOf" not in node and "type" not in node:
            node["type"] = ["integer", "string"]
        return node

    return map_schema(schema, fix)


def crd_schema(crd: dict, version: str = "v1") -> dict:
    """The openAPIV3Schema of one version of a CustomResourceDefinition, trimmed for vendoring:
    descriptions and the `status` subtree (which a manifest never sets) removed."""
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
            break
    else:
        raise ValueError(f"{crd['metadata']['name']} has no version {version!r}")
    schema.get("properties", {}).pop("status", None)

    def drop_description(node: dict) -> dict:
        node.pop("description", None)
        return node

    return map_schema(schema, drop_description)


def map_schema(node: dict, fn: Callable[[dict], dict]) -> dict:
    """Apply fn to every schema node (bottom-up) of a copy. Walks only where schemas live, so a
    field that happens to be named "type" or "description" is left alone."""
    node = dict(node)
    if isinstance(node.get("properties"), dict):
        node["properties"] = {k: map_schema(v, fn) for k, v in node["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            node[key] = map_schema(node[key], fn)
    for key in ("anyOf", "allOf", "oneOf"):
        if isinstance(node.get(key), list):
            node[key] = [map_schema(s, fn) for s in node[key]]
    return fn(node)


def _crd_schema_file(path: Path) -> dict:
    if not path.is_file():
        raise ClusterConfigError(f"vendored CRD schema {path} is missing; tests/data/kuberay/README.md says how to make it")
    return json.loads(path.read_text())


def _read_yaml(path: str | Path, all_documents: bool = False) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ClusterConfigError(f"{path}: file not found")
    try:
        return list(yaml.safe_load_all(p.read_text())) if all_documents else yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ClusterConfigError(f"{path}: not valid YAML ({exc})") from None


def _raise_schema_errors(where: str | Path, instance: Any, validator, against: str = "Ray's cluster schema") -> None:
    errors = sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path])
    if not errors:
        return
    lines = [_describe(e) for e in errors[:MAX_ERRORS_SHOWN]]
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"… and {len(errors) - MAX_ERRORS_SHOWN} more")
    raise ClusterConfigError(f"{where}: {len(errors)} error(s) against {against}:\n  " + "\n  ".join(lines))


def _describe(error) -> str:
    """One line per error that names the field, Kubernetes-style: spec.workerGroupSpecs[0].name."""
    where = _dotted(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = list(error.schema.get("properties", {}))
        patterns = list(error.schema.get("patternProperties", {}))
        unknown = [k for k in error.instance if k not in known and not any(re.search(p, k) for p in patterns)]
        parts = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            parts.append(f"unknown field {_join(where, key)}{hint}")
        return "; ".join(parts)
    if error.validator == "pattern" and error.schema.get("x-kubernetes-int-or-string"):
        return f"{where}: {error.instance!r} is not a Kubernetes quantity (e.g. 16Gi, 500m, 4)"
    message = error.message if len(error.message) <= 200 else error.message[:200] + "…"
    return f"{where or '(top level)'}: {message}"


def _dotted(path: Iterable) -> str:
    out = ""
    for part in path:
        out = f"{out}[{part}]" if isinstance(part, int) else _join(out, part)
    return out


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m cluster.validate FILE...  (ray up cluster YAML or KubeRay manifest)", file=sys.stderr)
        return 2
    for path in paths:
        try:
            text = Path(path).read_text() if Path(path).is_file() else ""
            if re.search(r"^apiVersion:", text, re.MULTILINE):
                print(f"{path}: ok ({', '.join(validate_kuberay(path))} against KubeRay's CRDs)")
            else:
                validate_ray_up(path)
                print(f"{path}: ok (Ray's cluster schema and validate_config)")
        except ClusterConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
