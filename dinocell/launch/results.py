"""What run_job returns or raises."""

from __future__ import annotations

from dataclasses import dataclass


class JobSubmitError(RuntimeError):
    """The API server refused to create the job."""


class JobFailed(RuntimeError):
    """The job ended without success. `reason`/`message` come from the job's condition (or the launcher's timeout)."""

    def __init__(
        self,
        text: str,
        *,
        kind: str,
        name: str,
        namespace: str,
        reason: str,
        message: str,
        conditions: list[dict],
        log_tail: list[str],
        state: str = "failed",
    ):
        super().__init__(text)
        self.kind, self.name, self.namespace = kind, name, namespace
        self.reason, self.message = reason, message
        self.conditions, self.log_tail = conditions, log_tail
        self.state = state  # the job's state when the launcher gave up: failed, or (timeouts) queued/pending/running
        self.deleted = False  # set once cleanup has run


class JobTimeout(JobFailed):
    """reason 'StartTimeout': never started within start_timeout_s (`state` 'queued' or 'pending');
    reason 'Timeout': ran past timeout_s."""


@dataclass
class JobResult:
    name: str
    namespace: str
    kind: str
    backend: str
    state: str  # the success condition's type
    reason: str
    message: str
    conditions: list[dict]
    master_pod: str | None
    log_lines: int
    log_tail: list[str]
    elapsed_s: float
    deleted: bool = False
    start_wait_s: float = 0.0  # seconds from creation to start (queued in Kueue / unschedulable / pulling the image)
