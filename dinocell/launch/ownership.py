"""The launcher pod owns the job it creates, so deleting that pod (a cancelled KFP run) deletes the job too.

KFP gives the train task its pod's name, uid and namespace through the downward API (POD_NAME, POD_UID,
POD_NAMESPACE: pipeline.py). With both name and uid present, the job gets an ownerReference to that Pod and the
garbage collector deletes the job (and through the operator's own references, its pods) once the pod is gone.
Without them (a laptop, `dinocell train` by hand, a local run) the job has no owner. An owner must live in the job's
namespace: the garbage collector treats a reference it cannot resolve as a deleted owner and would delete the job at
once, so a job sent to another namespace gets no reference (logged). The reference is not a controller reference and
does not block the owner's deletion (that would need update rights on pods/finalizers).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from dinocell.launch.cluster import SA_NAMESPACE_FILE

log = logging.getLogger(__name__)

POD_NAME_ENV, POD_UID_ENV, POD_NAMESPACE_ENV = "POD_NAME", "POD_UID", "POD_NAMESPACE"
_UID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def launcher_pod_owner(job_namespace: str, env: Mapping[str, str] | None = None,
                       sa_file: Path = SA_NAMESPACE_FILE) -> dict | None:
    """The ownerReference to the pod this process runs in, or None (no pod identity, or another namespace)."""
    env = os.environ if env is None else env
    name, uid = env.get(POD_NAME_ENV, "").strip(), env.get(POD_UID_ENV, "").strip()
    if not name and not uid:
        return None
    if not (name and uid):
        missing = POD_UID_ENV if name else POD_NAME_ENV
        log.warning("%s is set but %s is not: the job gets no owner (deleting this pod will not delete it)",
                    POD_NAME_ENV if name else POD_UID_ENV, missing)
        return None
    if not _UID_RE.match(uid):
        raise ValueError(f"{POD_UID_ENV}={uid!r} is not a Kubernetes uid (the downward API's metadata.uid)")
    pod_ns = env.get(POD_NAMESPACE_ENV, "").strip()
    if not pod_ns and sa_file.is_file():
        pod_ns = sa_file.read_text().strip()
    if pod_ns != job_namespace:
        log.warning("the launcher pod %s is in namespace %r, the job in %r: no owner reference (an owner must share "
                    "the job's namespace); cancelling the run still deletes the job through SIGTERM",
                    name, pod_ns or "unknown", job_namespace)
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


def add_owner(obj: dict, owner: dict | None) -> dict:
    """Put `owner` in the job object's metadata.ownerReferences (kept as is when None)."""
    if owner is not None:
        refs = obj["metadata"].setdefault("ownerReferences", [])
        if not any(r.get("uid") == owner["uid"] for r in refs):
            refs.append(dict(owner))
    return obj
