"""Submit a training job to Kubernetes, follow it to the end, stream its master log, clean up.

    result = run_job(spec, backend="pytorchjob")          # or "trainjob"

Flow: build the object for the backend, validate it against the vendored CRD schema, create it with the official
`kubernetes` client's CustomObjectsApi, then poll its conditions every `poll_s` seconds. Each poll also finds the master
pod (node rank 0) by the operator's labels and prints the log lines it wrote since the previous poll (timestamped
requests with sinceSeconds, de-duplicated by timestamp; no long-lived stream to break). The job ends as:
- success (PyTorchJob condition Succeeded / TrainJob condition Complete): a JobResult;
- failure (condition Failed): JobFailed carrying the condition's reason and message and the last log lines;
- no start within start_timeout_s (pending: unschedulable, image pull, quota, suspended): JobTimeout naming the job,
  its last condition and why the master pod waits;
- still running after timeout_s: JobTimeout.
`cleanup` decides whether the job object (and, through owner references, its pods) is deleted afterwards.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinocell.launch import pytorchjob as _pytorchjob
from dinocell.launch import trainjob as _trainjob
from dinocell.launch.jobspec import BACKENDS, JobSpec
from dinocell.launch.validate import validate_object

log = logging.getLogger(__name__)

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
CLEANUP_POLICIES = ("always", "on_success", "never")
STARTED_POD_PHASES = ("Running", "Succeeded", "Failed")


@dataclass(frozen=True)
class Backend:
    name: str
    group: str
    version: str
    kind: str
    plural: str
    container: str  # the training container, whose log is streamed
    build: Callable[[JobSpec], dict]
    master_pod_selector: Callable[[str], str]
    success_condition: str
    running_condition: str | None  # TrainJob has no Running condition: a running master pod tells instead


BACKEND_TABLE = {
    "pytorchjob": Backend(
        "pytorchjob",
        _pytorchjob.GROUP,
        _pytorchjob.VERSION,
        _pytorchjob.KIND,
        _pytorchjob.PLURAL,
        _pytorchjob.CONTAINER,
        _pytorchjob.build_pytorchjob,
        _pytorchjob.master_pod_selector,
        "Succeeded",
        "Running",
    ),
    "trainjob": Backend(
        "trainjob",
        _trainjob.GROUP,
        _trainjob.VERSION,
        _trainjob.KIND,
        _trainjob.PLURAL,
        _trainjob.CONTAINER,
        _trainjob.build_trainjob,
        _trainjob.master_pod_selector,
        "Complete",
        None,
    ),
}


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
    ):
        super().__init__(text)
        self.kind, self.name, self.namespace = kind, name, namespace
        self.reason, self.message = reason, message
        self.conditions, self.log_tail = conditions, log_tail
        self.deleted = False  # set once cleanup has run


class JobTimeout(JobFailed):
    """reason 'StartTimeout': never started within start_timeout_s; reason 'Timeout': ran past timeout_s."""


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


# ---- configuration ------------------------------------------------------------------------------------------------


def make_api_client(host: str | None = None):
    """ApiClient for: an explicit `host` (tests, proxies), else in-cluster config, else the default kubeconfig."""
    from kubernetes import client, config

    cfg = client.Configuration()
    if host:
        cfg.host = host
        return client.ApiClient(cfg)
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        try:
            # KUBECONFIG read now: the client's own default is frozen when the module is first imported.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, client_configuration=cfg)
        except (config.ConfigException, OSError) as e:
            raise RuntimeError(
                "no Kubernetes credentials: not running in a pod (no service-account token) and no usable kubeconfig "
                f"({e}); pass api_client=... or host=..."
            ) from e
    return client.ApiClient(cfg)


def resolve_namespace(
    namespace: str | None = None, spec: JobSpec | None = None, sa_file: Path = SA_NAMESPACE_FILE
) -> str:
    """Explicit argument, else JobSpec.namespace, else the namespace of the pod we run in (a KFP step's own)."""
    if namespace:
        return namespace
    if spec is not None and spec.namespace:
        return spec.namespace
    if sa_file.is_file():
        text = sa_file.read_text().strip()
        if text:
            return text
    raise ValueError(
        f"no namespace for the job: pass namespace=..., set JobSpec.namespace, or run inside a pod ({sa_file} is absent)"
    )


def get_backend(name: str) -> Backend:
    try:
        return BACKEND_TABLE[name]
    except KeyError:
        raise ValueError(f"backend {name!r} not in {BACKENDS}") from None


# ---- status -------------------------------------------------------------------------------------------------------


def _conditions(obj: dict) -> list[dict]:
    return list(((obj or {}).get("status") or {}).get("conditions") or [])


def _true(conditions: list[dict], ctype: str | None) -> dict | None:
    if ctype is None:
        return None
    hits = [c for c in conditions if c.get("type") == ctype and str(c.get("status")) == "True"]
    return hits[-1] if hits else None


def job_state(backend: Backend, obj: dict) -> tuple[str, dict | None]:
    """('succeeded'|'failed'|'running'|'pending', the deciding or latest condition)."""
    conds = _conditions(obj)
    for state, ctype in (
        ("failed", "Failed"),
        ("succeeded", backend.success_condition),
        ("running", backend.running_condition),
    ):
        cond = _true(conds, ctype)
        if cond is not None:
            return state, cond
    return "pending", (conds[-1] if conds else None)


def _describe_condition(cond: dict | None) -> str:
    if not cond:
        return "no condition reported yet (is the operator running and watching this namespace?)"
    return f"{cond.get('type')}={cond.get('status')} reason={cond.get('reason') or '-'}: {cond.get('message') or '-'}"


def _pod_waiting_reason(pod) -> str:
    """Why a pod is not running: scheduler message, or container waiting reason (e.g. ImagePullBackOff)."""
    status = pod.status
    if status is None:
        return "no status"
    for cond in status.conditions or []:
        if cond.type == "PodScheduled" and cond.status != "True":
            return f"unscheduled ({cond.reason}: {cond.message})"
    for cs in status.container_statuses or []:
        waiting = cs.state.waiting if cs.state else None
        if waiting is not None:
            return f"container {cs.name} waiting ({waiting.reason}: {waiting.message or '-'})"
    return f"phase {status.phase}"


# ---- logs ---------------------------------------------------------------------------------------------------------

_TS_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def parse_log_timestamp(text: str) -> int | None:
    """RFC3339(Nano) -> integer nanoseconds since the epoch. The kubelet trims trailing zeros of the fraction, so
    the strings do not sort as text; integers do."""
    m = _TS_RE.match(text)
    if not m:
        return None
    base, frac, zone = m.groups()
    zone = "+00:00" if zone == "Z" else zone
    seconds = int(_dt.datetime.fromisoformat(base + zone).timestamp())
    return seconds * 1_000_000_000 + int((frac or "0").ljust(9, "0"))


class LogFollower:
    """Emit the master pod's new log lines on each poll, once each, in order."""

    SLACK_S = 5  # extra look-back: request latency and whole-second rounding of sinceSeconds

    def __init__(
        self,
        core_api,
        namespace: str,
        container: str,
        sink: Callable[[str], None],
        request_timeout_s: float,
        tail: int = 50,
    ):
        self.core, self.namespace, self.container, self.sink = core_api, namespace, container, sink
        self.request_timeout_s = request_timeout_s
        self.pod: str | None = None
        self.lines = 0
        self.tail: deque[str] = deque(maxlen=tail)
        self._reset()

    def _reset(self) -> None:
        self._last_ts = -1
        self._at_last: set[str] = set()
        self._last_fetch: float | None = None

    def follow(self, pod_name: str) -> None:
        if pod_name != self.pod:  # a new pod (first, or a restart): its log starts from the beginning
            self.pod = pod_name
            self._reset()

    def poll(self) -> int:
        """Fetch and emit new lines; returns how many were emitted. Log errors are reported, never fatal."""
        if self.pod is None:
            return 0
        from kubernetes.client.rest import ApiException

        kwargs: dict[str, Any] = {"container": self.container, "timestamps": True}
        started = time.monotonic()
        if self._last_fetch is not None:
            kwargs["since_seconds"] = max(1, math.ceil(started - self._last_fetch) + self.SLACK_S)
        try:
            # _preload_content=False: the client would json-decode a log that happens to parse as JSON.
            resp = self.core.read_namespaced_pod_log(
                self.pod, self.namespace, _preload_content=False, _request_timeout=self.request_timeout_s, **kwargs
            )
            text = resp.data.decode("utf-8", errors="replace")
        except ApiException as e:
            if e.status in (400, 404):  # container not started yet / pod gone: nothing to read now
                return 0
            log.warning("reading the log of pod %s/%s failed: HTTP %s %s", self.namespace, self.pod, e.status, e.reason)
            return 0
        self._last_fetch = started
        emitted = 0
        for raw in text.splitlines():
            stamp, _, line = raw.partition(" ")
            ts = parse_log_timestamp(stamp)
            if ts is None:  # not timestamped (should not happen with timestamps=true): de-duplicate by text
                ts, line = self._last_ts, raw
            if ts < self._last_ts or (ts == self._last_ts and line in self._at_last):
                continue
            if ts > self._last_ts:
                self._last_ts, self._at_last = ts, set()
            self._at_last.add(line)
            self.sink(line)
            self.tail.append(line)
            self.lines += 1
            emitted += 1
        return emitted


def _print_line(line: str) -> None:
    print(line, flush=True)


# ---- the launcher -------------------------------------------------------------------------------------------------


def _api_error_text(e) -> str:
    import json

    try:
        return json.loads(e.body).get("message") or str(e.reason)
    except (TypeError, ValueError, AttributeError):
        return str(e.body or e.reason)


def run_job(
    spec: JobSpec,
    backend: str = "pytorchjob",
    api_client=None,
    *,
    namespace: str | None = None,
    poll_s: float = 10.0,
    start_timeout_s: float = 1800.0,
    timeout_s: float | None = None,
    cleanup: str = "on_success",
    log_sink: Callable[[str], None] | None = None,
    validate: bool = True,
    request_timeout_s: float = 60.0,
    host: str | None = None,
) -> JobResult:
    """Create the job, follow it to the end, stream the master log, clean up per `cleanup`; see the module docstring."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    bk = get_backend(backend)
    if cleanup not in CLEANUP_POLICIES:
        raise ValueError(f"cleanup {cleanup!r} not in {CLEANUP_POLICIES}")
    if poll_s <= 0 or start_timeout_s <= 0 or (timeout_s is not None and timeout_s <= 0):
        raise ValueError(
            f"poll_s, start_timeout_s, timeout_s must be > 0 (got {poll_s}, {start_timeout_s}, {timeout_s})"
        )
    ns = resolve_namespace(namespace, spec)
    obj = bk.build(spec)
    obj["metadata"]["namespace"] = ns
    if validate:
        validate_object(obj)

    api_client = api_client or make_api_client(host)
    custom = client.CustomObjectsApi(api_client)
    core = client.CoreV1Api(api_client)
    name, what = spec.name, f"{bk.kind} {ns}/{spec.name}"
    rt = request_timeout_s

    try:
        custom.create_namespaced_custom_object(bk.group, bk.version, ns, bk.plural, obj, _request_timeout=rt)
    except ApiException as e:
        hint = {
            404: f" (is the {bk.kind} CRD installed? {bk.group}/{bk.version} {bk.plural} was not found)",
            409: " (a job of that name exists: delete it or pick another name, e.g. jobspec.unique_job_name)",
            403: " (the service account lacks RBAC to create it: see manifests/base/rbac.yaml)",
        }.get(e.status, "")
        raise JobSubmitError(f"creating {what} failed: HTTP {e.status}: {_api_error_text(e)}{hint}") from e
    log.info("created %s", what)

    follower = LogFollower(core, ns, bk.container, log_sink or _print_line, rt)
    try:
        result = _follow_job(custom, core, bk, ns, name, follower, poll_s, start_timeout_s, timeout_s, rt)
    except JobFailed as e:
        if cleanup == "always":
            e.deleted = _delete(custom, bk, ns, name, rt)
        raise
    except BaseException:  # interrupted, API unreachable, ...: honour "always" so no job is left behind
        if cleanup == "always":
            _delete(custom, bk, ns, name, rt)
        raise
    if cleanup in ("always", "on_success"):
        result.deleted = _delete(custom, bk, ns, name, rt)
    return result


def _newest(pods):
    epoch = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)
    return max(pods, key=lambda p: (p.metadata.creation_timestamp or epoch, p.metadata.name)) if pods else None


def _follow_job(
    custom,
    core,
    bk: Backend,
    ns: str,
    name: str,
    follower: LogFollower,
    poll_s: float,
    start_timeout_s: float,
    timeout_s: float | None,
    rt: float,
) -> JobResult:
    """Poll until the job succeeds (JobResult), fails (JobFailed) or times out (JobTimeout)."""
    from kubernetes.client.rest import ApiException

    what = f"{bk.kind} {ns}/{name}"
    t0 = time.monotonic()
    started = False
    while True:
        try:
            job = custom.get_namespaced_custom_object(bk.group, bk.version, ns, bk.plural, name, _request_timeout=rt)
        except ApiException as e:
            if e.status == 404:
                raise JobFailed(
                    f"{what} disappeared while running (deleted by someone else, or its TTL ran out)",
                    kind=bk.kind,
                    name=name,
                    namespace=ns,
                    reason="Deleted",
                    message="job object not found",
                    conditions=[],
                    log_tail=list(follower.tail),
                ) from e
            raise
        state, cond = job_state(bk, job)
        pod = _newest(
            core.list_namespaced_pod(ns, label_selector=bk.master_pod_selector(name), _request_timeout=rt).items
        )
        phase = pod.status.phase if pod is not None and pod.status is not None else None
        if pod is not None:
            follower.follow(pod.metadata.name)
            if phase in STARTED_POD_PHASES:
                follower.poll()
        if not started and (state != "pending" or phase in STARTED_POD_PHASES):
            started = True
            log.info("%s started after %.1f s", what, time.monotonic() - t0)

        conditions = _conditions(job)
        if state == "succeeded":
            follower.poll()  # the last lines written before the pod exited
            return JobResult(
                name=name,
                namespace=ns,
                kind=bk.kind,
                backend=bk.name,
                state=cond.get("type"),
                reason=cond.get("reason") or "",
                message=cond.get("message") or "",
                conditions=conditions,
                master_pod=follower.pod,
                log_lines=follower.lines,
                log_tail=list(follower.tail),
                elapsed_s=time.monotonic() - t0,
            )
        if state == "failed":
            follower.poll()
            tail = list(follower.tail)
            last = "\n".join(f"    {line}" for line in tail[-20:])
            raise JobFailed(
                f"{what} failed: {cond.get('reason') or '-'}: {cond.get('message') or '-'}"
                + (f"\n  last log lines of {follower.pod}:\n{last}" if tail else ""),
                kind=bk.kind,
                name=name,
                namespace=ns,
                reason=cond.get("reason") or "Failed",
                message=cond.get("message") or "",
                conditions=conditions,
                log_tail=tail,
            )
        elapsed = time.monotonic() - t0
        if not started and elapsed > start_timeout_s:
            pod_text = (
                f"master pod {pod.metadata.name}: {_pod_waiting_reason(pod)}"
                if pod is not None
                else "no master pod created yet"
            )
            raise JobTimeout(
                f"{what} did not start within {start_timeout_s:g} s; last condition: {_describe_condition(cond)}; {pod_text}",
                kind=bk.kind,
                name=name,
                namespace=ns,
                reason="StartTimeout",
                message=pod_text,
                conditions=conditions,
                log_tail=list(follower.tail),
            )
        if timeout_s is not None and elapsed > timeout_s:
            raise JobTimeout(
                f"{what} still {state} after the {timeout_s:g} s timeout; last condition: {_describe_condition(cond)}",
                kind=bk.kind,
                name=name,
                namespace=ns,
                reason="Timeout",
                message=f"ran past {timeout_s:g} s",
                conditions=conditions,
                log_tail=list(follower.tail),
            )
        time.sleep(poll_s)


def _delete(custom, bk: Backend, ns: str, name: str, request_timeout_s: float) -> bool:
    """Delete the job; its pods and services go with it (owner references, background propagation)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    try:
        custom.delete_namespaced_custom_object(
            bk.group,
            bk.version,
            ns,
            bk.plural,
            name,
            body=client.V1DeleteOptions(propagation_policy="Background"),
            _request_timeout=request_timeout_s,
        )
        log.info("deleted %s %s/%s", bk.kind, ns, name)
        return True
    except ApiException as e:
        if e.status == 404:
            return True
        log.warning("deleting %s %s/%s failed: HTTP %s %s", bk.kind, ns, name, e.status, _api_error_text(e))
        return False
