"""Kubernetes side of training: job description, PyTorchJob / TrainJob builders, schema validation, launcher.

Modules: jobspec (JobSpec, torchrun command), pytorchjob / trainjob (builders), validate (vendored CRD schemas),
backends (the job kinds), cluster (API client, namespace), launcher (run_job), status (conditions, queued/pending),
logs (master log streaming), cleanup (deleting the job), results (JobResult and the errors), ownership (the launcher
pod owns the job), cancel (SIGTERM deletes the job), lease (one live job per run directory), step (the train step).

The builders and validation need only the standard library and jsonschema; the launcher imports the `kubernetes`
client lazily (extra `dinocell[pipeline]`).
"""

from dinocell.launch.backends import get_backend
from dinocell.launch.cancel import JobCancelled
from dinocell.launch.cluster import make_api_client, resolve_namespace
from dinocell.launch.jobspec import (
    BACKENDS,
    KUEUE_QUEUE_LABEL,
    RESILIENT_MAX_RESTARTS,
    RESILIENT_RUN_POLICY,
    JobSpec,
    JobSpecError,
    pretrain_command,
    torchrun_command,
    unique_job_name,
)
from dinocell.launch.launcher import DEFAULT_START_TIMEOUT_S, run_job
from dinocell.launch.lease import RunDirLeased
from dinocell.launch.pytorchjob import build_pytorchjob
from dinocell.launch.results import JobFailed, JobResult, JobSubmitError, JobTimeout
from dinocell.launch.trainjob import build_trainjob
from dinocell.launch.validate import ManifestInvalid, validate_object


def build_job(spec: JobSpec, backend: str = "pytorchjob") -> dict:
    """The job object for `backend` ('pytorchjob' or 'trainjob')."""
    return get_backend(backend).build(spec)


__all__ = [
    "BACKENDS",
    "DEFAULT_START_TIMEOUT_S",
    "JobCancelled",
    "JobFailed",
    "JobResult",
    "JobSpec",
    "JobSpecError",
    "JobSubmitError",
    "JobTimeout",
    "KUEUE_QUEUE_LABEL",
    "ManifestInvalid",
    "RESILIENT_MAX_RESTARTS",
    "RESILIENT_RUN_POLICY",
    "RunDirLeased",
    "build_job",
    "build_pytorchjob",
    "build_trainjob",
    "make_api_client",
    "pretrain_command",
    "resolve_namespace",
    "run_job",
    "torchrun_command",
    "unique_job_name",
    "validate_object",
]
