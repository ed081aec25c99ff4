"""Build a Training Operator v1 `kubeflow.org/v1` PyTorchJob from a JobSpec.

Layout: one Master replica (node rank 0, whose address every node dials) plus nodes-1 Worker replicas (omitted for a
single node). The operator only wires up a container named `pytorch`, finds the rendezvous port by the port name
`pytorchjob-port`, and injects MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK (+ PET_NNODES, PET_NPROC_PER_NODE,
PET_NODE_RANK in recent releases) into it; see jobspec.torchrun_command for how the command uses them.
A Kueue queue (JobSpec.queue_name) is the label kueue.x-k8s.io/queue-name on the PyTorchJob itself: Kueue's webhook
suspends the job and resumes it once admitted. JobSpec.scheduler_name becomes every pod's schedulerName.
"""

from __future__ import annotations

from typing import Any

from dinocell.launch.jobspec import (
    JobSpec,
    JobSpecError,
    check_derived_name_length,
    job_labels,
    plain_env,
    pod_placement,
    resources_per_node,
    shm_mount,
)

GROUP = "kubeflow.org"
VERSION = "v1"
KIND = "PyTorchJob"
PLURAL = "pytorchjobs"
CONTAINER = "pytorch"
PORT_NAME = "pytorchjob-port"
DEFAULT_PORT = 23456  # the operator's default master port

# Pod labels the operator sets (used to find the master pod and its log).
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"


def master_pod_selector(job_name: str) -> str:
    return f"{JOB_NAME_LABEL}={job_name},{REPLICA_TYPE_LABEL}=master"


def _pod_template(spec: JobSpec) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "command": list(spec.command),
        "ports": [{"name": PORT_NAME, "containerPort": DEFAULT_PORT, "protocol": "TCP"}],
    }
    if spec.args:
        container["args"] = list(spec.args)
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    env = plain_env(spec)
    if env:
        container["env"] = env
    if spec.env_from_secret:
        container["envFrom"] = [{"secretRef": {"name": spec.env_from_secret}}]
    resources = resources_per_node(spec)
    if resources:
        container["resources"] = resources
    mounts = shm_mount(spec)
    if mounts:
        container["volumeMounts"] = mounts

    pod_spec: dict[str, Any] = {"containers": [container], **pod_placement(spec)}
    if spec.scheduler_name:
        pod_spec["schedulerName"] = spec.scheduler_name
    template: dict[str, Any] = {"spec": pod_spec}
    if spec.labels:
        template["metadata"] = {"labels": dict(spec.labels)}
    return template


def build_pytorchjob(spec: JobSpec) -> dict[str, Any]:
    """The PyTorchJob object as a plain dict (what `kubectl apply` or CustomObjectsApi takes)."""
    longest = f"-worker-{spec.nodes - 2}" if spec.nodes > 1 else "-master-0"
    check_derived_name_length(spec, longest, "service name")
    argv = spec.command + spec.args
    if (
        spec.nodes > 1
        and argv[0] == "torchrun"
        and not any(
            a.startswith(("--master-addr", "--master_addr", "--rdzv-endpoint", "--rdzv_endpoint")) for a in argv
        )
    ):
        # This operator sets MASTER_ADDR but not PET_MASTER_ADDR: torchrun would rendezvous on 127.0.0.1 and hang.
        raise JobSpecError(
            "JobSpec.command: a multi-node torchrun needs --master-addr=$(MASTER_ADDR) under a PyTorchJob; "
            "build it with torchrun_command(..., backend='pytorchjob')"
        )
    replica_specs: dict[str, Any] = {
        "Master": {"replicas": 1, "restartPolicy": spec.restart_policy, "template": _pod_template(spec)}
    }
    if spec.nodes > 1:
        replica_specs["Worker"] = {
            "replicas": spec.nodes - 1,
            "restartPolicy": spec.restart_policy,
            "template": _pod_template(spec),
        }
    run_policy: dict[str, Any] = {"cleanPodPolicy": spec.clean_pod_policy, "backoffLimit": spec.backoff_limit}
    if spec.ttl_seconds_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    metadata: dict[str, Any] = {"name": spec.name}
    if spec.namespace:
        metadata["namespace"] = spec.namespace
    labels = job_labels(spec)
    if labels:
        metadata["labels"] = labels
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(spec.nproc_per_node),
            "pytorchReplicaSpecs": replica_specs,
            "runPolicy": run_policy,
        },
    }
