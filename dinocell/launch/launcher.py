"""Submit a training job to Kubernetes, follow it to the end, stream its master log, clean up.

    result = run_job(spec, backend="pytorchjob")          # or "trainjob"

Flow: build the object for the backend (backends.py), validate it against the vendored CRD schema, create it with the
official `kubernetes` client's CustomObjectsApi, then poll its conditions every `poll_s` seconds (status.py). Each poll
also finds the master pod (node rank 0) by the operator's labels and prints the log lines it wrote since the previous
poll (logs.py). Until it starts, a job is reported as "queued" (waiting in a Kueue queue, or its pods unschedulable:
no free GPUs) or "pending" (pulling the image, ...), with a log line whenever that changes; neither is a failure.
The job ends as:
- success (PyTorchJob condition Succeeded / TrainJob condition Complete): a JobResult;
- failure (condition Failed): JobFailed carrying the condition's reason and message and the last log lines;
- no start within start_timeout_s (None: wait as long as timeout_s allows): JobTimeout 'StartTimeout' naming the job,
  its state (queued/pending), its last condition and why the master pod waits;
- still running after timeout_s: JobTimeout 'Timeout'.
`cleanup` decides whether the job object (and, through owner references, its pods) is deleted afterwards
(cleanup.py); a job that never started is deleted unless cleanup is 'never'.

Cancellation: SIGTERM while run_job runs (KFP terminating the run) deletes the job unless cleanup is 'never', then
the process exits 143 (cancel.py); and in a pod that knows itself (POD_NAME / POD_UID), the job is owned by that pod,
so deleting the pod deletes the job (ownership.py). `run_dir`: the directory the job writes; a lease there
(lease.py) refuses a second live job on the same run and is released once the job is over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from dinocell.launch.backends import BACKEND_TABLE, Backend, get_backend
from dinocell.launch.cancel import JobCancelled, cancel_on_signals
from dinocell.launch.cleanup import CLEANUP_POLICIES, delete_job, should_delete
from dinocell.launch.cluster import SA_NAMESPACE_FILE, api_error_text, make_api_client, resolve_namespace
from dinocell.launch.jobspec import JobSpec
from dinocell.launch.lease import Lease, acquire_lease, record_uid, release_lease
from dinocell.launch.logs import LogFollower, parse_log_timestamp, print_line
from dinocell.launch.ownership import add_owner, launcher_pod_owner
from dinocell.launch.results import JobFailed, JobResult, JobSubmitError, JobTimeout
from dinocell.launch.status import (
    STARTED_POD_PHASES,
    conditions,
    describe_condition,
    is_suspended,
    job_state,
    kueue_workload_text,
    newest,
    pod_text,
    queue_name,
    waiting_state,
)
from dinocell.launch.validate import validate_object

__all__ = [  # the names this module has always offered; they live in the modules named above
    "BACKEND_TABLE",
    "CLEANUP_POLICIES",
    "DEFAULT_START_TIMEOUT_S",
    "SA_NAMESPACE_FILE",
    "STARTED_POD_PHASES",
    "Backend",
    "JobFailed",
    "JobResult",
    "JobSubmitError",
    "JobTimeout",
    "LogFollower",
    "get_backend",
    "job_state",
    "make_api_client",
    "parse_log_timestamp",
    "resolve_namespace",
    "run_job",
]

log = logging.getLogger(__name__)

DEFAULT_START_TIMEOUT_S = 1800.0
WAIT_REPORT_EVERY_S = 300.0  # while queued/pending, the state is logged again this often even if unchanged


def run_job(
    spec: JobSpec,
    backend: str = "pytorchjob",
    api_client=None,
    *,
    namespace: str | None = None,
    poll_s: float = 10.0,
    start_timeout_s: float | None = DEFAULT_START_TIMEOUT_S,
    timeout_s: float | None = None,
    cleanup: str = "on_success",
    log_sink: Callable[[str], None] | None = None,
    validate: bool = True,
    request_timeout_s: float = 60.0,
    host: str | None = None,
    run_dir: str | None = None,
) -> JobResult:
    """Create the job, follow it to the end, stream the master log, clean up per `cleanup`; see the module docstring."""
    from kubernetes import client

    bk = get_backend(backend)
    if cleanup not in CLEANUP_POLICIES:
        raise ValueError(f"cleanup {cleanup!r} not in {CLEANUP_POLICIES}")
    if (
        poll_s <= 0
        or (start_timeout_s is not None and start_timeout_s <= 0)
        or (timeout_s is not None and timeout_s <= 0)
    ):
        raise ValueError(
            f"poll_s, start_timeout_s, timeout_s must be > 0 (got {poll_s}, {start_timeout_s}, {timeout_s})"
        )
    ns = resolve_namespace(namespace, spec)
    obj = add_owner(bk.build(spec), launcher_pod_owner(ns))
    obj["metadata"]["namespace"] = ns
    if validate:
        validate_object(obj)

    api_client = api_client or make_api_client(host)
    custom = client.CustomObjectsApi(api_client)
    core = client.CoreV1Api(api_client)
    name, what = spec.name, f"{bk.kind} {ns}/{spec.name}"
    rt = request_timeout_s
    lease = acquire_lease(custom, run_dir, bk, ns, name, rt) if run_dir else None

    with cancel_on_signals():
        try:
            result = _create_and_follow(custom, core, bk, obj, ns, name, what, poll_s, start_timeout_s, timeout_s,
                                        cleanup, log_sink, rt, lease)
        except JobCancelled as e:  # the run was cancelled: the job must not go on unwatched
            log.warning("%s: %s: cancelled", what, e.signal_name)
            if cleanup != "never" and delete_job(custom, bk, ns, name, rt) and lease is not None:
                release_lease(lease)
            raise
        except JobFailed as e:
            # Released once the job is over: failed, or deleted; a job past timeout_s that was kept still runs.
            if lease is not None and (e.deleted or not isinstance(e, JobTimeout)):
                release_lease(lease)
            raise
    if lease is not None:
        release_lease(lease)
    return result


def _create_and_follow(custom, core, bk: Backend, obj: dict, ns: str, name: str, what: str, poll_s: float,
                       start_timeout_s: float | None, timeout_s: float | None, cleanup: str,
                       log_sink: Callable[[str], None] | None, rt: float, lease: Lease | None) -> JobResult:
    from kubernetes.client.rest import ApiException

    try:
        created = custom.create_namespaced_custom_object(bk.group, bk.version, ns, bk.plural, obj, _request_timeout=rt)
    except ApiException as e:
        hint = {
            404: f" (is the {bk.kind} CRD installed? {bk.group}/{bk.version} {bk.plural} was not found)",
            409: " (a job of that name exists: delete it or pick another name, e.g. jobspec.unique_job_name)",
            403: " (the service account lacks RBAC to create it: see manifests/base/rbac.yaml)",
        }.get(e.status, "")
        if lease is not None:
            release_lease(lease)
        raise JobSubmitError(f"creating {what} failed: HTTP {e.status}: {api_error_text(e)}{hint}") from e
    owners = [f"{r['kind']} {r['name']}" for r in obj["metadata"].get("ownerReferences", [])]
    log.info("created %s%s", what, f" (owned by {', '.join(owners)})" if owners else "")
    if lease is not None:
        record_uid(lease, ((created or {}).get("metadata") or {}).get("uid", ""))

    follower = LogFollower(core, ns, bk.container, log_sink or print_line, rt)
    try:
        result = _follow_job(custom, core, bk, ns, name, follower, poll_s, start_timeout_s, timeout_s, rt)
    except JobFailed as e:
        outcome = "never_started" if isinstance(e, JobTimeout) and e.reason == "StartTimeout" else "failed"
        if should_delete(cleanup, outcome):
            e.deleted = delete_job(custom, bk, ns, name, rt)
        raise
    except JobCancelled:
        raise
    except BaseException:  # interrupted, API unreachable, ...: honour "always" so no job is left behind
        if cleanup == "always":
            delete_job(custom, bk, ns, name, rt)
        raise
    if should_delete(cleanup, "succeeded"):
        result.deleted = delete_job(custom, bk, ns, name, rt)
    return result


class _WaitReport:
    """Logs the queued/pending state of a job that is not running: on every change, and every WAIT_REPORT_EVERY_S."""

    def __init__(self, what: str, start_timeout_s: float | None):
        self.what, self.start_timeout_s = what, start_timeout_s
        self.last: tuple[str, str] | None = None
        self.logged_at = 0.0

    def update(self, state: str, why: str, elapsed: float, started: bool) -> None:
        if (state, why) == self.last and elapsed - self.logged_at < WAIT_REPORT_EVERY_S:
            return
        if started:
            limit = "it ran before; waiting for it to run again"
        elif self.start_timeout_s is None:
            limit = "no start timeout"
        else:
            limit = f"waiting up to {self.start_timeout_s:g} s for it to start"
        log.info("%s %s after %.0f s: %s (%s)", self.what, state, elapsed, why, limit)
        self.last, self.logged_at = (state, why), elapsed


def _get_job(custom, bk: Backend, ns: str, name: str, follower: LogFollower, rt: float) -> dict:
    from kubernetes.client.rest import ApiException

    try:
        return custom.get_namespaced_custom_object(bk.group, bk.version, ns, bk.plural, name, _request_timeout=rt)
    except ApiException as e:
        if e.status == 404:
            raise JobFailed(
                f"{bk.kind} {ns}/{name} disappeared while running (deleted by someone else, or its TTL ran out)",
                kind=bk.kind,
                name=name,
                namespace=ns,
                reason="Deleted",
                message="job object not found",
                conditions=[],
                log_tail=list(follower.tail),
            ) from e
        raise


def _follow_job(
    custom,
    core,
    bk: Backend,
    ns: str,
    name: str,
    follower: LogFollower,
    poll_s: float,
    start_timeout_s: float | None,
    timeout_s: float | None,
    rt: float,
) -> JobResult:
    """Poll until the job succeeds (JobResult), fails (JobFailed) or times out (JobTimeout)."""
    what = f"{bk.kind} {ns}/{name}"
    t0 = time.monotonic()
    started_at: float | None = None
    report = _WaitReport(what, start_timeout_s)
    while True:
        job = _get_job(custom, bk, ns, name, follower, rt)
        state, cond = job_state(bk, job)
        pod = newest(
            core.list_namespaced_pod(ns, label_selector=bk.master_pod_selector(name), _request_timeout=rt).items
        )
        phase = pod.status.phase if pod is not None and pod.status is not None else None
        if pod is not None:
            follower.follow(pod.metadata.name)
            if phase in STARTED_POD_PHASES:
                follower.poll()
        elapsed = time.monotonic() - t0
        suspended = is_suspended(bk, job)
        if started_at is None and not suspended and (state != "pending" or phase in STARTED_POD_PHASES):
            started_at = elapsed
            log.info("%s started after %.1f s", what, elapsed)
        waiting: tuple[str, str] | None = None
        if state == "pending" and (started_at is None or suspended):  # suspended after a start: preempted by Kueue
            workload = (
                kueue_workload_text(custom, ns, job, rt) if queue_name(job) and (suspended or pod is None) else None
            )
            waiting = waiting_state(bk, job, pod, workload)
            report.update(*waiting, elapsed, started=started_at is not None)

        conditions_ = conditions(job)
        common = {"kind": bk.kind, "name": name, "namespace": ns, "conditions": conditions_}
        if state == "succeeded":
            follower.poll()  # the last lines written before the pod exited
            return JobResult(
                **common,
                backend=bk.name,
                state=cond.get("type"),
                reason=cond.get("reason") or "",
                message=cond.get("message") or "",
                master_pod=follower.pod,
                log_lines=follower.lines,
                log_tail=list(follower.tail),
                elapsed_s=elapsed,
                start_wait_s=elapsed if started_at is None else started_at,
            )
        if state == "failed":
            follower.poll()
            tail = list(follower.tail)
            last = "\n".join(f"    {line}" for line in tail[-20:])
            raise JobFailed(
                f"{what} failed: {cond.get('reason') or '-'}: {cond.get('message') or '-'}"
                + (f"\n  last log lines of {follower.pod}:\n{last}" if tail else ""),
                **common,
                reason=cond.get("reason") or "Failed",
                message=cond.get("message") or "",
                log_tail=tail,
            )
        if started_at is None and start_timeout_s is not None and elapsed > start_timeout_s:
            wait_state, why = waiting or waiting_state(bk, job, pod)
            pods = pod_text(pod)
            raise JobTimeout(
                f"{what} did not start within {start_timeout_s:g} s, still {wait_state}: {why}; "
                f"last condition: {describe_condition(cond)}" + (f"; {pods}" if pods != why else ""),
                **common,
                reason="StartTimeout",
                message=why,
                log_tail=list(follower.tail),
                state=wait_state,
            )
        if timeout_s is not None and elapsed > timeout_s:
            shown = waiting[0] if waiting else ("running" if state == "pending" and started_at is not None else state)
            raise JobTimeout(
                f"{what} still {shown} after the {timeout_s:g} s timeout; last condition: {describe_condition(cond)}",
                **common,
                reason="Timeout",
                message=f"ran past {timeout_s:g} s",
                log_tail=list(follower.tail),
                state=shown,
            )
        time.sleep(poll_s)
