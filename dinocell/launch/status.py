"""Reading a job's state: its conditions, why it has not started yet (queued or pending), its master pod.

A job that has not started is
- "queued" while it waits for capacity: suspended (Kueue holds every job of a LocalQueue suspended until it admits
  it; the Workload's condition says why, e.g. insufficient quota or a LocalQueue that does not exist), or its master
  pod cannot be scheduled (Unschedulable: no node has the GPUs free; SchedulingGated);
- "pending" otherwise: no master pod yet, image being pulled, container being created, ...
Neither is a failure; run_job gives up only after its start timeout.
"""

from __future__ import annotations

import datetime as _dt
import logging

from dinocell.launch.backends import Backend
from dinocell.launch.jobspec import KUEUE_QUEUE_LABEL

log = logging.getLogger(__name__)

STARTED_POD_PHASES = ("Running", "Succeeded", "Failed")
QUEUED_POD_REASONS = ("Unschedulable", "SchedulingGated")
KUEUE_GROUP, KUEUE_VERSION, KUEUE_WORKLOADS = "kueue.x-k8s.io", "v1beta1", "workloads"
KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"  # Kueue labels a job's Workload with the job's uid


def conditions(obj: dict) -> list[dict]:
    return list(((obj or {}).get("status") or {}).get("conditions") or [])


def true_condition(conds: list[dict], ctype: str | None) -> dict | None:
    if ctype is None:
        return None
    hits = [c for c in conds if c.get("type") == ctype and str(c.get("status")) == "True"]
    return hits[-1] if hits else None


def job_state(backend: Backend, obj: dict) -> tuple[str, dict | None]:
    """('succeeded'|'failed'|'running'|'pending', the deciding or latest condition)."""
    conds = conditions(obj)
    for state, ctype in (
        ("failed", "Failed"),
        ("succeeded", backend.success_condition),
        ("running", backend.running_condition),
    ):
        cond = true_condition(conds, ctype)
        if cond is not None:
            return state, cond
    return "pending", (conds[-1] if conds else None)


def queue_name(obj: dict) -> str | None:
    return (((obj or {}).get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL)


def is_suspended(backend: Backend, obj: dict) -> bool:
    """Suspended condition True, or the suspend flag set (Kueue sets it before the operator reports the condition)."""
    if true_condition(conditions(obj), "Suspended") is not None:
        return True
    node = obj
    for key in backend.suspend_path:
        node = node.get(key) if isinstance(node, dict) else None
    return node is True


def describe_condition(cond: dict | None) -> str:
    if not cond:
        return "no condition reported yet (is the operator running and watching this namespace?)"
    return f"{cond.get('type')}={cond.get('status')} reason={cond.get('reason') or '-'}: {cond.get('message') or '-'}"


def _unscheduled(pod) -> bool:
    status = pod.status
    return status is not None and any(
        c.type == "PodScheduled" and c.status != "True" and c.reason in QUEUED_POD_REASONS
        for c in status.conditions or []
    )


def pod_waiting_reason(pod) -> str:
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


def pod_text(pod) -> str:
    return (
        f"master pod {pod.metadata.name}: {pod_waiting_reason(pod)}" if pod is not None else "no master pod created yet"
    )


def waiting_state(backend: Backend, obj: dict, pod, workload_text: str | None = None) -> tuple[str, str]:
    """('queued'|'pending', why) of a job that is not running; `workload_text` from kueue_workload_text."""
    queue = queue_name(obj)
    if is_suspended(backend, obj):
        where = f"admission to Kueue queue {queue!r}" if queue else "the job to be resumed (it is suspended)"
        cond = true_condition(conditions(obj), "Suspended")
        detail = workload_text or (f"{cond.get('reason') or '-'}: {cond.get('message') or '-'}" if cond else None)
        return "queued", f"waiting for {where}" + (f": {detail}" if detail else "")
    if pod is None and queue and workload_text:
        return "queued", f"waiting for admission to Kueue queue {queue!r}: {workload_text}"
    return ("queued" if pod is not None and _unscheduled(pod) else "pending"), pod_text(pod)


def kueue_workload_text(custom, ns: str, obj: dict, request_timeout_s: float) -> str | None:
    """Why Kueue has not admitted the job yet, from its Workload (None: no Kueue, no Workload, or not readable)."""
    from kubernetes.client.rest import ApiException

    uid = ((obj or {}).get("metadata") or {}).get("uid")
    if not uid:
        return None
    try:
        listing = custom.list_namespaced_custom_object(
            KUEUE_GROUP,
            KUEUE_VERSION,
            ns,
            KUEUE_WORKLOADS,
            label_selector=f"{KUEUE_JOB_UID_LABEL}={uid}",
            _request_timeout=request_timeout_s,
        )
    except ApiException as e:  # 404: Kueue not installed; 403: the Role lacks workloads (manifests/base/rbac.yaml)
        log.debug("reading the Kueue workload of %s/%s: HTTP %s", ns, uid, e.status)
        return None
    items = (listing or {}).get("items") or []
    if not items:
        return None
    conds = conditions(items[-1])
    for ctype in ("QuotaReserved", "Admitted"):
        hits = [c for c in conds if c.get("type") == ctype]
        if hits and str(hits[-1].get("status")) != "True":
            return (
                f"{ctype}={hits[-1].get('status')} ({hits[-1].get('reason') or '-'}: {hits[-1].get('message') or '-'})"
            )
    return None


def newest(pods):
    epoch = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)
    return max(pods, key=lambda p: (p.metadata.creation_timestamp or epoch, p.metadata.name)) if pods else None
