"""Check a PyTorchJob / TrainJob dict against the vendored CRD schema, offline.

Three layers, all reported with the JSON path of the offending field:
1. the CRD's openAPIV3Schema (crds/*.json, see crds/README.md), run with jsonschema;
2. "strict" field checking: a field the schema does not define is an error, as with `kubectl apply
   --validate=strict` (the API server would otherwise drop it silently, e.g. a misspelt `nprocsPerNode`);
   together with the Kubernetes list rules jsonschema does not know (x-kubernetes-list-type map: unique keys);
3. the rules the API server / operators enforce beyond the schema (object names, PyTorchJob replica layout,
   TrainJob's CEL rules on metadata.name, the Kueue queue label on the job object only).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

CRD_DIR = Path(__file__).resolve().parent / "crds"
SCHEMA_FILES = {
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_v1_pytorchjob.json",
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_v1alpha1_trainjob.json",
}
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


class ManifestInvalid(ValueError):
    """The object would be rejected (or silently altered) by the cluster. `errors` holds (json_path, message)."""

    def __init__(self, kind: str, name: str, errors: list[tuple[str, str]]):
        self.kind, self.name, self.errors = kind, name, errors
        self.path = errors[0][0]
        lines = "\n".join(f"  {p}: {m}" for p, m in errors)
        super().__init__(f"{kind} {name!r} is invalid ({len(errors)} problem(s)):\n{lines}")


def json_path(parts: Any) -> str:
    out = "$"
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(p)):
            out += f".{p}"
        else:
            out += f"[{json.dumps(str(p))}]"
    return out


@cache
def load_crd(api_version: str, kind: str) -> dict[str, Any]:
    """The vendored CRD record: {source, group, version, kind, plural, openAPIV3Schema}."""
    try:
        filename = SCHEMA_FILES[(api_version, kind)]
    except KeyError:
        raise ManifestInvalid(
            kind, "?", [("$.kind", f"no vendored schema for {api_version} {kind}; known: {sorted(SCHEMA_FILES)}")]
        ) from None
    return json.loads((CRD_DIR / filename).read_text())


def _strict(schema: Any) -> Any:
    """Copy of `schema` where every object that lists its properties rejects unlisted ones."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _list_type(validator, list_type, instance, schema) -> Iterator[Any]:
    """x-kubernetes-list-type: 'map' lists are keyed by x-kubernetes-list-map-keys, 'set' lists hold unique items."""
    if not isinstance(instance, list):
        return
    seen: dict[Any, int] = {}
    for i, item in enumerate(instance):
        if list_type == "map" and isinstance(item, dict):
            keys = schema.get("x-kubernetes-list-map-keys", [])
            key = tuple(json.dumps(item.get(k, _default(schema, k)), sort_keys=True) for k in keys)
            label = ", ".join(f"{k}={item.get(k, _default(schema, k))!r}" for k in keys)
        elif list_type == "set":
            key, label = json.dumps(item, sort_keys=True), repr(item)
        else:
            continue
        if key in seen:
            from jsonschema import ValidationError

            yield ValidationError(f"duplicate entry ({label}) also at index {seen[key]}", path=[i])
        seen.setdefault(key, i)


def _default(list_schema: dict, key: str) -> Any:
    return list_schema.get("items", {}).get("properties", {}).get(key, {}).get("default")


def _format_checker():
    from jsonschema import FormatChecker

    checker = FormatChecker()
    for fmt, (lo, hi) in _INT_RANGES.items():
        checker.checks(fmt)(lambda v, lo=lo, hi=hi: not isinstance(v, int) or lo <= v <= hi)
    return checker


@cache
def _validator(api_version: str, kind: str, strict: bool):
    schema = load_crd(api_version, kind)["openAPIV3Schema"]
    # jsonschema is imported here so the builders work without it (needed only to validate).
    import jsonschema

    k8s_validator = jsonschema.validators.extend(
        jsonschema.Draft202012Validator, {"x-kubernetes-list-type": _list_type}
    )
    return k8s_validator(_strict(copy.deepcopy(schema)) if strict else schema, format_checker=_format_checker())


def _schema_errors(obj: Mapping[str, Any], api_version: str, kind: str, strict: bool) -> list[tuple[str, str]]:
    out = []
    for err in _validator(api_version, kind, strict).iter_errors(obj):
        path = json_path(err.absolute_path)
        if err.validator == "additionalProperties" and err.validator_value is False:
            allowed = set(err.schema.get("properties", {}))
            for extra in sorted(set(err.instance) - allowed):
                out.append(
                    (
                        json_path([*err.absolute_path, extra]),
                        f"unknown field {extra!r} (the {kind} schema has no such field here)",
                    )
                )
        elif err.validator == "format" and err.validator_value in _INT_RANGES:
            out.append((path, f"{err.instance} does not fit {err.validator_value}"))
        else:
            out.append((path, err.message))
    return out


def _metadata_errors(obj: Mapping[str, Any], kind: str) -> list[tuple[str, str]]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return [("$.metadata", "missing or not an object")]
    out = []
    name = meta.get("name")
    # Both operators require an RFC 1035 label (TrainJob: CEL rules of the CRD; PyTorchJob: the operator's webhook).
    if not isinstance(name, str) or not _DNS1035.match(name) or len(name) > 63:
        out.append(
            ("$.metadata.name", f"{name!r} must be an RFC 1035 DNS label (<= 63, [a-z0-9-], starting with a letter)")
        )
    ns = meta.get("namespace")
    if ns is not None and (not isinstance(ns, str) or not _DNS1123.match(ns) or len(ns) > 63):
        out.append(("$.metadata.namespace", f"{ns!r} is not a valid namespace name"))
    for field in ("labels", "annotations"):
        values = meta.get(field, {})
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            out.append((f"$.metadata.{field}", "must map strings to strings"))
    return out


def _pytorchjob_errors(obj: Mapping[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    spec = obj.get("spec") or {}
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if not replicas:
        out.append(("$.spec.pytorchReplicaSpecs", "needs a Master (and optionally Worker) replica spec"))
    for rtype, rspec in replicas.items():
        base = ["spec", "pytorchReplicaSpecs", rtype]
        if rtype not in ("Master", "Worker"):
            out.append((json_path(base), f"replica type {rtype!r} must be 'Master' or 'Worker'"))
        if not isinstance(rspec, dict):
            continue
        if rtype == "Master" and rspec.get("replicas", 1) != 1:
            out.append(
                (json_path([*base, "replicas"]), f"Master must have exactly 1 replica, got {rspec.get('replicas')}")
            )
        if rspec.get("restartPolicy", "Never") not in ("Always", "OnFailure", "Never", "ExitCode"):
            out.append(
                (
                    json_path([*base, "restartPolicy"]),
                    f"{rspec.get('restartPolicy')!r} not in Always/OnFailure/Never/ExitCode",
                )
            )
        template_labels = ((rspec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        out += _queue_label_errors(template_labels, [*base, "template", "metadata", "labels"])
        containers = (((rspec.get("template") or {}).get("spec") or {}).get("containers")) or []
        named = [i for i, c in enumerate(containers) if isinstance(c, dict) and c.get("name") == "pytorch"]
        cpath = [*base, "template", "spec", "containers"]
        if not named:
            out.append((json_path(cpath), "no container named 'pytorch' (the operator only wires up that one)"))
        for i in named:
            if not containers[i].get("image"):
                out.append((json_path([*cpath, i, "image"]), "the 'pytorch' container needs an image"))
    policy = (spec.get("runPolicy") or {}).get("cleanPodPolicy")
    if policy is not None and policy not in ("None", "Running", "All"):
        out.append(("$.spec.runPolicy.cleanPodPolicy", f"{policy!r} not in None/Running/All"))
    nproc = spec.get("nprocPerNode")
    if (
        nproc is not None
        and nproc not in ("auto", "cpu", "gpu")
        and not (isinstance(nproc, str) and nproc.isdigit() and int(nproc) > 0)
    ):
        out.append(("$.spec.nprocPerNode", f"{nproc!r} must be 'auto', 'cpu', 'gpu' or a positive integer string"))
    return out


def _queue_label_errors(labels: Any, path: list) -> list[tuple[str, str]]:
    """Kueue queues whatever carries its queue label: on pods (or a TrainJob's JobSet) it would queue them again,
    apart from the job, and hold them after the job was admitted."""
    if isinstance(labels, dict) and KUEUE_QUEUE_LABEL in labels:
        return [(json_path([*path, KUEUE_QUEUE_LABEL]), "the Kueue queue label belongs on the job's metadata only")]
    return []


def _trainjob_errors(obj: Mapping[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    spec = obj.get("spec") or {}
    out += _queue_label_errors(spec.get("labels"), ["spec", "labels"])
    for i, override in enumerate(spec.get("podTemplateOverrides") or []):
        if isinstance(override, dict):
            labels = (override.get("metadata") or {}).get("labels")
            out += _queue_label_errors(labels, ["spec", "podTemplateOverrides", i, "metadata", "labels"])
    managed = spec.get("managedBy")
    if managed is not None and managed not in ("trainer.kubeflow.org/trainjob-controller", "kueue.x-k8s.io/multikueue"):
        out.append(
            (
                "$.spec.managedBy",
                "ManagedBy must be trainer.kubeflow.org/trainjob-controller or kueue.x-k8s.io/multikueue if set",
            )
        )
    trainer = spec.get("trainer") or {}
    nodes = trainer.get("numNodes")
    if nodes is not None and isinstance(nodes, int) and nodes < 1:
        out.append(("$.spec.trainer.numNodes", f"must be >= 1, got {nodes}"))
    nproc = trainer.get("numProcPerNode")
    if (
        nproc is not None
        and not (isinstance(nproc, int) and not isinstance(nproc, bool) and nproc > 0)
        and nproc not in ("auto", "cpu", "gpu")
    ):
        out.append(("$.spec.trainer.numProcPerNode", f"{nproc!r} must be a positive integer or 'auto', 'cpu', 'gpu'"))
    return out


def validate_object(obj: Mapping[str, Any], strict: bool = True) -> None:
    """Raise ManifestInvalid listing every problem (JSON path + message); return None when the object is valid."""
    if not isinstance(obj, Mapping):
        raise ManifestInvalid("?", "?", [("$", f"expected an object, got {type(obj).__name__}")])
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    crd = load_crd(api_version, kind)
    if api_version != f"{crd['group']}/{crd['version']}":
        raise ManifestInvalid(kind, "?", [("$.apiVersion", f"{api_version!r} != {crd['group']}/{crd['version']}")])
    errors = _schema_errors(obj, api_version, kind, strict) + _metadata_errors(obj, kind)
    errors += _pytorchjob_errors(obj) if kind == "PyTorchJob" else _trainjob_errors(obj)
    if errors:
        name = (obj.get("metadata") or {}).get("name", "?") if isinstance(obj.get("metadata"), dict) else "?"
        raise ManifestInvalid(kind, str(name), sorted(set(errors)))
