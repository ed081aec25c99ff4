"""Backend-neutral description of a distributed training job, and the torchrun command line it runs.

A JobSpec says *what* to run (image, command, nodes x processes, resources, placement, credentials); the builders in
pytorchjob.py (Training Operator v1 PyTorchJob) and trainjob.py (Kubeflow Trainer v2 TrainJob) say *how* one backend
spells it. Every field is checked when the spec is made, so a bad value fails here with the field's name instead of as
an opaque API-server rejection later.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

BACKENDS = ("pytorchjob", "trainjob")

# Kubernetes resource.Quantity, as in the CRD schemas (e.g. "8", "500m", "64Gi", "1e3").
QUANTITY_RE = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# RFC 1035 DNS label: what TrainJob's CEL rule and the Training Operator require of a job name.
DNS1035_LABEL_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # namespaces
_LABEL_NAME_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
_LABEL_PREFIX_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

# Variables the operators inject into the training container; a user value would be overridden or, worse, conflict.
OPERATOR_ENV = frozenset(
    {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "PYTHONUNBUFFERED"}
    | {f"PET_{k}" for k in ("NNODES", "NPROC_PER_NODE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}
)
CLEAN_POD_POLICIES = ("None", "Running", "All")
RESTART_POLICIES = ("Never", "OnFailure", "Always", "ExitCode")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
TOLERATION_KEYS = ("key", "operator", "value", "effect", "tolerationSeconds")
TOLERATION_EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")

# The label Kueue reads on a job object to queue it in a LocalQueue (Kueue suspends the job until it is admitted).
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
_DNS1123_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# Settings with which a failed PyTorchJob gives its GPUs back and a lost process or node is retried: torchrun
# restarts the workers of a pod (--max-restarts), the kubelet restarts a failed container (OnFailure), the operator
# fails the job after `backoff_limit` container restarts and then deletes the replicas still running (Running: the
# pods that already ended stay for their logs). The manifests' overlays use them; pass them to JobSpec / pretrain_command.
RESILIENT_RUN_POLICY = {"restart_policy": "OnFailure", "backoff_limit": 3, "clean_pod_policy": "Running"}
RESILIENT_MAX_RESTARTS = 3

# The keys a TrainJob reads one by one from the Secret (a PyTorchJob takes the whole Secret through envFrom): the
# storage credentials, and the W&B key for `train.wandb_mode: online` runs (optional, like the endpoint: plain AWS S3
# needs none).
DEFAULT_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "WANDB_API_KEY")
DEFAULT_OPTIONAL_SECRET_KEYS = ("AWS_ENDPOINT_URL", "WANDB_API_KEY")


class JobSpecError(ValueError):
    """A JobSpec field holds a value no backend can run; the message names the field."""


@dataclass
class JobSpec:
    """One distributed training job: `nodes` pods, each running `nproc_per_node` processes on `gpus_per_node` GPUs."""

    name: str
    image: str
    command: list[str]
    args: list[str] = field(default_factory=list)
    namespace: str | None = None
    nodes: int = 1
    nproc_per_node: int = 1
    gpus_per_node: int = 0
    cpu: str | None = None  # request per node, e.g. "16"
    memory: str | None = None  # request and limit per node, e.g. "128Gi"
    shm_size: str | None = "16Gi"  # size of the /dev/shm emptyDir (medium Memory); None: no shm volume
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    env_from_secret: str | None = None  # Secret holding object-storage credentials
    secret_keys: tuple[str, ...] = DEFAULT_SECRET_KEYS  # keys read one by one where envFrom is unavailable (TrainJob)
    optional_secret_keys: tuple[str, ...] = DEFAULT_OPTIONAL_SECRET_KEYS
    service_account: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    ttl_seconds_after_finished: int | None = None  # PyTorchJob only; None: kept until the launcher's cleanup
    backoff_limit: int = 0
    clean_pod_policy: str = "None"
    restart_policy: str = "Never"
    image_pull_policy: str | None = None
    runtime_ref: str = "torch-distributed"  # TrainJob: the ClusterTrainingRuntime to use
    queue_name: str | None = None  # Kueue LocalQueue: label kueue.x-k8s.io/queue-name on the job object only
    scheduler_name: str | None = None  # PyTorchJob: schedulerName of every pod (TrainJob: set it in the runtime)

    def __post_init__(self) -> None:
        self.command = list(self.command)
        self.args = list(self.args)
        self.tolerations = [dict(t) for t in self.tolerations]
        self.secret_keys = tuple(self.secret_keys)
        self.optional_secret_keys = tuple(self.optional_secret_keys)
        _check_spec(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "job") -> JobSpec:
        """Build from a config mapping; unknown keys are an error naming `where` and the keys."""
        if not isinstance(data, Mapping):
            raise JobSpecError(f"{where}: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise JobSpecError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
        try:
            return cls(**dict(data))
        except TypeError as e:  # a required key is missing
            raise JobSpecError(f"{where}: {e}") from None

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


def _fail(name: str, problem: str) -> None:
    raise JobSpecError(f"JobSpec.{name}: {problem}")


def _check_int(spec: JobSpec, name: str, minimum: int, allow_none: bool = False) -> None:
    value = getattr(spec, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, f"expected an integer, got {value!r}")
    if value < minimum:
        _fail(name, f"must be >= {minimum}, got {value}")


def _check_str_list(spec: JobSpec, name: str) -> None:
    for i, item in enumerate(getattr(spec, name)):
        if not isinstance(item, str):
            _fail(f"{name}[{i}]", f"expected a string, got {item!r}")


def check_label(key: str, value: str, where: str) -> None:
    """Kubernetes label syntax: optional DNS-subdomain prefix + '/' + name (<= 63), value <= 63 of [A-Za-z0-9._-]."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _LABEL_PREFIX_RE.match(prefix)):
        raise JobSpecError(f"{where}[{key!r}]: label prefix {prefix!r} is not a DNS subdomain")
    if not name or len(name) > 63 or not _LABEL_NAME_RE.match(name):
        raise JobSpecError(
            f"{where}[{key!r}]: label name {name!r} must be 1-63 of [A-Za-z0-9._-], alphanumeric at both ends"
        )
    if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE_RE.match(value):
        raise JobSpecError(
            f"{where}[{key!r}]: label value {value!r} must be <= 63 of [A-Za-z0-9._-], alphanumeric at both ends"
        )


def _check_spec(spec: JobSpec) -> None:
    if not isinstance(spec.name, str) or len(spec.name) > 63 or not DNS1035_LABEL_RE.match(spec.name):
        _fail(
            "name",
            f"{spec.name!r} must be a DNS-1035 label: lower-case letters, digits and '-', starting with a letter, <= 63 chars",
        )
    if not isinstance(spec.image, str) or not spec.image.strip():
        _fail("image", "must be a non-empty image reference")
    if not spec.command:
        _fail("command", "must not be empty (the builders never fall back to the image's entrypoint)")
    _check_str_list(spec, "command")
    _check_str_list(spec, "args")
    if spec.namespace is not None and (len(spec.namespace) > 63 or not DNS1123_LABEL_RE.match(spec.namespace)):
        _fail("namespace", f"{spec.namespace!r} is not a valid namespace name (DNS-1123 label)")
    _check_int(spec, "nodes", 1)
    _check_int(spec, "nproc_per_node", 1)
    _check_int(spec, "gpus_per_node", 0)
    if spec.gpus_per_node and spec.nproc_per_node > spec.gpus_per_node:
        _fail("nproc_per_node", f"{spec.nproc_per_node} processes per node but only {spec.gpus_per_node} GPUs per node")
    for name in ("cpu", "memory", "shm_size"):
        value = getattr(spec, name)
        if value is not None and (not isinstance(value, str) or not QUANTITY_RE.match(value)):
            _fail(name, f"{value!r} is not a Kubernetes quantity (e.g. '8', '500m', '64Gi')")
    for key, value in spec.node_selector.items():
        check_label(key, value, "JobSpec.node_selector")
    for key, value in spec.labels.items():
        check_label(key, value, "JobSpec.labels")
    if KUEUE_QUEUE_LABEL in spec.labels:
        # labels also go to the pods (and a TrainJob's JobSet), which Kueue would then queue a second time
        _fail(f"labels[{KUEUE_QUEUE_LABEL!r}]", "set JobSpec.queue_name instead (it labels the job object only)")
    if spec.queue_name is not None:
        if not isinstance(spec.queue_name, str) or not spec.queue_name:
            _fail("queue_name", f"must name a Kueue LocalQueue, got {spec.queue_name!r}")
        check_label(KUEUE_QUEUE_LABEL, spec.queue_name, "JobSpec.queue_name")
    if spec.scheduler_name is not None and (
        not isinstance(spec.scheduler_name, str)
        or len(spec.scheduler_name) > 253
        or not _DNS1123_SUBDOMAIN_RE.match(spec.scheduler_name)
    ):
        _fail("scheduler_name", f"{spec.scheduler_name!r} is not a scheduler name (a DNS subdomain, e.g. 'volcano')")
    for i, tol in enumerate(spec.tolerations):
        _check_toleration(tol, f"tolerations[{i}]")
    for key, value in spec.env.items():
        if not isinstance(key, str) or not key or "=" in key:
            _fail(f"env[{key!r}]", "variable names must be non-empty and contain no '='")
        if not isinstance(value, str):
            _fail(f"env[{key!r}]", f"value must be a string, got {type(value).__name__}")
        if key in OPERATOR_ENV:
            _fail(f"env[{key!r}]", "is set by the training operator for torchrun; do not set it")
    if spec.env_from_secret is not None and not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", spec.env_from_secret):
        _fail("env_from_secret", f"{spec.env_from_secret!r} is not a valid Secret name")
    for key in spec.secret_keys:
        if not isinstance(key, str) or not key or "=" in key:
            _fail("secret_keys", f"{key!r} is not a usable variable name")
    stray = sorted(set(spec.optional_secret_keys) - set(spec.secret_keys))
    if stray:
        _fail("optional_secret_keys", f"{stray} are not in secret_keys {list(spec.secret_keys)}")
    if spec.service_account is not None and not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", spec.service_account):
        _fail("service_account", f"{spec.service_account!r} is not a valid ServiceAccount name")
    _check_int(spec, "ttl_seconds_after_finished", 0, allow_none=True)
    _check_int(spec, "backoff_limit", 0)
    if spec.clean_pod_policy not in CLEAN_POD_POLICIES:
        _fail("clean_pod_policy", f"{spec.clean_pod_policy!r} not in {CLEAN_POD_POLICIES}")
    if spec.restart_policy not in RESTART_POLICIES:
        _fail("restart_policy", f"{spec.restart_policy!r} not in {RESTART_POLICIES}")
    if spec.image_pull_policy is not None and spec.image_pull_policy not in PULL_POLICIES:
        _fail("image_pull_policy", f"{spec.image_pull_policy!r} not in {PULL_POLICIES}")
    if not isinstance(spec.runtime_ref, str) or not spec.runtime_ref:
        _fail("runtime_ref", "must name a (Cluster)TrainingRuntime")


def _check_toleration(tol: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(tol) - set(TOLERATION_KEYS))
    if unknown:
        _fail(where, f"unknown key(s) {unknown}; allowed: {list(TOLERATION_KEYS)}")
    operator = tol.get("operator", "Equal")
    if operator not in ("Equal", "Exists"):
        _fail(where, f"operator {operator!r} must be 'Equal' or 'Exists'")
    if operator == "Exists" and tol.get("value"):
        _fail(where, "operator 'Exists' takes no value")
    if not tol.get("key") and operator != "Exists":
        _fail(where, "an empty key needs operator 'Exists' (it matches every taint)")
    if tol.get("effect", "") not in TOLERATION_EFFECTS:
        _fail(where, f"effect {tol.get('effect')!r} not in {TOLERATION_EFFECTS[1:]}")
    seconds = tol.get("tolerationSeconds")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int)):
        _fail(where, f"tolerationSeconds must be an integer, got {seconds!r}")


def torchrun_command(
    nnodes: int,
    nproc_per_node: int,
    backend: str,
    module: str = "dinocell.cli",
    module_args: Sequence[str] = (),
    max_restarts: int = 0,
) -> list[str]:
    """`torchrun --nnodes=N --nproc-per-node=P [--max-restarts=R] [rendezvous] -m MODULE ARGS...` for one backend.

    max_restarts > 0: torchrun restarts the pod's worker processes up to R times after a failure before it exits
    (0, torchrun's default, leaves the flag out).

    torchrun reads each unset option from PET_<OPTION>. Trainer v2 injects PET_NNODES, PET_NPROC_PER_NODE,
    PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT, so a bare torchrun finds its peers. The v1 Training Operator
    injects PET_NNODES/PET_NPROC_PER_NODE/PET_NODE_RANK only in recent releases and never PET_MASTER_ADDR/PORT (it sets
    MASTER_ADDR/MASTER_PORT and RANK = node index), so for a PyTorchJob the rendezvous flags are passed explicitly as
    $(VAR) references, which the kubelet expands from the container's environment.
    """
    if backend not in BACKENDS:
        raise JobSpecError(f"torchrun_command: backend {backend!r} not in {BACKENDS}")
    for name, value in (("nnodes", nnodes), ("nproc_per_node", nproc_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise JobSpecError(f"torchrun_command: {name} must be a positive integer, got {value!r}")
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise JobSpecError(f"torchrun_command: max_restarts must be an integer >= 0, got {max_restarts!r}")
    cmd = ["torchrun", f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}"]
    if max_restarts:
        cmd.append(f"--max-restarts={max_restarts}")
    if backend == "pytorchjob":
        cmd += ["--node-rank=$(RANK)", "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)"]
    return cmd + ["-m", module, *module_args]


def pretrain_command(
    config_uri: str,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    nnodes: int = 1,
    nproc_per_node: int = 1,
    backend: str = "pytorchjob",
    max_restarts: int = 0,
) -> list[str]:
    """torchrun running `dinocell pretrain --config URI --set key=value ...` (one --set per override); a restarted
    run resumes from the latest checkpoint of train.output_dir, so max_restarts > 0 loses at most a checkpoint
    interval per restart."""
    if not isinstance(config_uri, str) or not config_uri:
        raise JobSpecError("pretrain_command: config_uri must be a non-empty URI or path")
    items = (
        [f"{k}={_override_text(v)}" for k, v in overrides.items()]
        if isinstance(overrides, Mapping)
        else list(overrides)
    )
    for item in items:
        if not isinstance(item, str) or "=" not in item or item.startswith("="):
            raise JobSpecError(f"pretrain_command: override {item!r} must look like key=value")
    args = ["pretrain", "--config", config_uri]
    for item in items:
        args += ["--set", item]
    return torchrun_command(nnodes, nproc_per_node, backend, module_args=args, max_restarts=max_restarts)


def _override_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def unique_job_name(prefix: str, max_len: int = 40) -> str:
    """prefix-<utc yymmddhhmmss>-<4 hex>: unique per submission, kept short so derived pod names stay DNS labels."""
    suffix = f"-{time.strftime('%y%m%d%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"
    stem = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")[: max(1, max_len - len(suffix))].rstrip("-")
    if not stem or not stem[0].isalpha():
        stem = "j" + stem
    return stem + suffix


# ---- pod pieces shared by both builders -------------------------------------------------------------------------

GPU_RESOURCE = "nvidia.com/gpu"
SHM_VOLUME = "dshm"


def resources_per_node(spec: JobSpec) -> dict[str, dict[str, Any]]:
    """Requests/limits of one training pod. GPUs are an extended resource: set as a limit (the request defaults to it)
    and repeated as a request so schedulers that read requests only see them too. Memory is limited at its request:
    an over-committed training pod is the one the kubelet evicts first."""
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if spec.cpu is not None:
        requests["cpu"] = spec.cpu
    if spec.memory is not None:
        requests["memory"] = limits["memory"] = spec.memory
    if spec.gpus_per_node:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = spec.gpus_per_node
    out: dict[str, dict[str, Any]] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def plain_env(spec: JobSpec) -> list[dict[str, Any]]:
    return [{"name": k, "value": v} for k, v in spec.env.items()]


def secret_key_env(spec: JobSpec) -> list[dict[str, Any]]:
    """One env var per credential key, read from the Secret (for APIs without envFrom, e.g. TrainJob.trainer.env)."""
    if spec.env_from_secret is None:
        return []
    out = []
    for key in spec.secret_keys:
        ref: dict[str, Any] = {"name": spec.env_from_secret, "key": key}
        if key in spec.optional_secret_keys:
            ref["optional"] = True
        out.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return out


def shm_volume(spec: JobSpec) -> list[dict[str, Any]]:
    """A memory-backed emptyDir for /dev/shm: the container runtime's 64 MiB default is too small for DataLoader
    workers, which pass batches through shared memory."""
    if spec.shm_size is None:
        return []
    return [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}]


def job_labels(spec: JobSpec) -> dict[str, str]:
    """Labels of the job object itself: JobSpec.labels plus the Kueue queue label (never copied to the pods)."""
    labels = dict(spec.labels)
    if spec.queue_name:
        labels[KUEUE_QUEUE_LABEL] = spec.queue_name
    return labels


def pod_placement(spec: JobSpec) -> dict[str, Any]:
    """The pod-spec fields both job kinds set the same way: node selector, tolerations, service account and the
    /dev/shm volume (empty entries left out)."""
    pod_spec: dict[str, Any] = {}
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.service_account:
        pod_spec["serviceAccountName"] = spec.service_account
    volumes = shm_volume(spec)
    if volumes:
        pod_spec["volumes"] = volumes
    return pod_spec


def shm_mount(spec: JobSpec) -> list[dict[str, Any]]:
    return [] if spec.shm_size is None else [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]


def check_derived_name_length(spec: JobSpec, longest_suffix: str, what: str) -> None:
    """Operators derive pod/service/host names from the job name; each must stay a 63-char DNS label."""
    limit = 63 - len(longest_suffix)
    if len(spec.name) > limit:
        raise JobSpecError(
            f"JobSpec.name: {spec.name!r} has {len(spec.name)} chars; with {spec.nodes} node(s) the {what} "
            f"'{spec.name}{longest_suffix}' exceeds 63, so keep the name <= {limit} chars"
        )
