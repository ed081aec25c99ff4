"""Deleting a finished (or abandoned) job: its pods and services go with it through owner references."""

from __future__ import annotations

import logging

from dinocell.launch.backends import Backend
from dinocell.launch.cluster import api_error_text

log = logging.getLogger(__name__)

CLEANUP_POLICIES = ("always", "on_success", "never")


def should_delete(cleanup: str, outcome: str) -> bool:
    """outcome: 'succeeded'; 'failed' (failed, ran past timeout_s, interrupted); 'never_started' (start timeout).

    A job that never started is deleted unless cleanup is 'never': it holds no log to read, and left in a Kueue queue
    or pending it would start later, unwatched, on GPUs nobody collects the result of."""
    if cleanup == "always":
        return True
    if cleanup == "on_success":
        return outcome in ("succeeded", "never_started")
    return False


def delete_job(custom, bk: Backend, ns: str, name: str, request_timeout_s: float) -> bool:
    """Delete the job (background propagation); True when it is gone (also when it already was)."""
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
        log.warning("deleting %s %s/%s failed: HTTP %s %s", bk.kind, ns, name, e.status, api_error_text(e))
        return False
