"""Kubernetes side of training: job description, PyTorchJob / TrainJob builders, schema validation, launcher.

The builders and validation need only the standard library and jsonschema; the launcher imports the `kubernetes`
client lazily (extra `dinocell[pipeline]`).
"""

from dinocell.launch.jobspec import (
    BACKENDS,
    JobSpec,
    JobSpecError,
    pretrain_command,
    torchrun_command,
    unique_job_name,
)
from dinocell.launch.launcher import (
    JobFailed,
    JobResult,
    JobSubmitError,
    JobTimeout,
    make_api_client,
    resolve_namespace,
    run_job,
)
from dinocell.launch.pytorchjob import build_pytorchjob
from dinocell.launch.trainjob import build_trainjob
from dinocell.launch.validate import ManifestInvalid, validate_object


def build_job(spec: JobSpec, backend: str = "pytorchjob") -> dict:
    """The job object for `backend` ('pytorchjob' or 'trainjob')."""
    from dinocell.launch.launcher import get_backend

    return get_backend(backend).build(spec)


__all__ = [
    "BACKENDS",
    "JobFailed",
    "JobResult",
    "JobSpec",
    "JobSpecError",
    "JobSubmitError",
    "JobTimeout",
    "ManifestInvalid",
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
