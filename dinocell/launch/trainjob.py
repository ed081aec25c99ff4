"""Build a Kubeflow Trainer v2 `trainer.kubeflow.org/v1alpha1` TrainJob from a JobSpec.

The TrainJob names a runtime (`torch-distributed` by default) and overrides its trainer: image, command, numNodes,
numProcPerNode, resourcesPerNode, env. The trainer injects PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
PET_MASTER_ADDR and PET_MASTER_PORT, which a bare torchrun reads. Placement (node selector, tolerations, service
account) and the /dev/shm volume go through `podTemplateOverrides` targeting the runtime's `node` job. The schema
forbids env on the `node` container in overrides and has no envFrom, so credentials are read key by key from the
Secret in `trainer.env` (secretKeyRef). A Kueue queue (JobSpec.queue_name) labels the TrainJob object only, never
`spec.labels` (those reach the JobSet, which Kueue would queue a second time). Restart policy, backoff limit, pod
cleanup and scheduler name belong to the runtime's JobSet template; torchrun's --max-restarts goes in the command.
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
    secret_key_env,
    shm_mount,
)

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
KIND = "TrainJob"
PLURAL = "trainjobs"
TRAINER_JOB = "node"  # replicated job of the torch runtimes
CONTAINER = "node"  # trainer container of the torch runtimes
RUNTIME_KIND = "ClusterTrainingRuntime"

# JobSet labels on every pod; node rank 0 carries job-completion-index 0.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


def master_pod_selector(job_name: str) -> str:
    return f"{JOBSET_NAME_LABEL}={job_name},{REPLICATED_JOB_LABEL}={TRAINER_JOB},{COMPLETION_INDEX_LABEL}=0"


def _overrides(spec: JobSpec) -> list[dict[str, Any]]:
    pod_spec = pod_placement(spec)
    if "volumes" in pod_spec:
        pod_spec["containers"] = [{"name": CONTAINER, "volumeMounts": shm_mount(spec)}]
    if not pod_spec and not spec.labels:
        return []
    override: dict[str, Any] = {"targetJobs": [{"name": TRAINER_JOB}]}
    if spec.labels:
        override["metadata"] = {"labels": dict(spec.labels)}
    if pod_spec:
        override["spec"] = pod_spec
    return [override]


def build_trainjob(spec: JobSpec) -> dict[str, Any]:
    """The TrainJob object as a plain dict."""
    # JobSet pod hostnames are <jobset>-<replicatedjob>-<job index>-<pod index>.
    check_derived_name_length(spec, f"-{TRAINER_JOB}-0-{spec.nodes - 1}", "pod hostname")
    # The runtime's JobSet owns these in Trainer v2; dropping a non-default value silently would surprise the caller.
    pytorchjob_only = {
        "restart_policy": (spec.restart_policy, "Never"),
        "clean_pod_policy": (spec.clean_pod_policy, "None"),
        "backoff_limit": (spec.backoff_limit, 0),
        "ttl_seconds_after_finished": (spec.ttl_seconds_after_finished, None),
        "scheduler_name": (spec.scheduler_name, None),  # podTemplateOverrides has no schedulerName
    }
    set_fields = {k: v for k, (v, default) in pytorchjob_only.items() if v != default}
    if set_fields:
        raise JobSpecError(
            f"JobSpec fields {set_fields} are PyTorchJob settings that a TrainJob cannot carry; set them in the "
            f"runtime {spec.runtime_ref!r} instead, or leave them at their defaults"
        )
    v1_vars = sorted(
        {v for a in spec.command + spec.args for v in ("$(RANK)", "$(MASTER_ADDR)", "$(MASTER_PORT)") if v in a}
    )
    if v1_vars:
        # The trainer sets PET_* only; the kubelet would pass these references through unexpanded.
        raise JobSpecError(
            f"JobSpec.command: {v1_vars} are set by the v1 Training Operator, not by Trainer v2; build the command "
            "with torchrun_command(..., backend='trainjob')"
        )
    trainer: dict[str, Any] = {
        "image": spec.image,
        "command": list(spec.command),
        "numNodes": spec.nodes,
        "numProcPerNode": spec.nproc_per_node,
    }
    if spec.args:
        trainer["args"] = list(spec.args)
    env = plain_env(spec) + secret_key_env(spec)
    if env:
        trainer["env"] = env
    resources = resources_per_node(spec)
    if resources:
        trainer["resourcesPerNode"] = resources
    job_spec: dict[str, Any] = {
        "runtimeRef": {"name": spec.runtime_ref, "apiGroup": GROUP, "kind": RUNTIME_KIND},
        "trainer": trainer,
    }
    if spec.labels:
        job_spec["labels"] = dict(spec.labels)
    overrides = _overrides(spec)
    if overrides:
        job_spec["podTemplateOverrides"] = overrides
    metadata: dict[str, Any] = {"name": spec.name}
    if spec.namespace:
        metadata["namespace"] = spec.namespace
    labels = job_labels(spec)
    if labels:
        metadata["labels"] = labels
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": metadata, "spec": job_spec}
