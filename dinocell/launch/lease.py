"""A lease on a run directory, so that two training jobs never write the same run.

Before creating a job, the launcher writes `<run_dir>/lease.json` (storage layer: S3 or a local path) naming the job
(backend, kind, namespace, name, later its uid), the launcher (pod name or host) and the time. A launcher that finds
a lease asks the API server about the job it names:
- the job exists, is the one the lease names (same uid) and has not finished: refused, with one line naming it;
- the lease has no uid yet and is younger than CREATE_GRACE_S: its launcher is creating the job right now, refused;
- otherwise (job gone, finished, replaced by another of the same name, or a lease whose launcher died before creating
  anything): stale, taken over (logged).
The launcher releases its lease once its job has finished or been deleted; a lease left behind (launcher killed) is
taken over by the next launcher as soon as its job is over.

Every write is a compare-and-swap (dinocell.storage.conditional): a new lease is created only if none exists, a stale
one is replaced only if it is still the one that was judged stale, the uid is added and the lease released only
while it is still this launcher's. Of two launchers racing for one run directory exactly one wins; the other is
refused with the winner's name. On an object store without conditional requests the launcher says so once and falls
back to writing and reading back, which leaves a window of one round trip between two launchers started together.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass, field

from dinocell import storage
from dinocell.launch.backends import BACKEND_TABLE, Backend
from dinocell.launch.cluster import api_error_text
from dinocell.launch.results import JobSubmitError
from dinocell.launch.status import job_state
from dinocell.storage.conditional import (
    ConditionalWritesUnsupported,
    PreconditionFailed,
    delete_if,
    read_versioned,
    write_if,
)

log = logging.getLogger(__name__)

LEASE_NAME = "lease.json"
LEASE_FORMAT = "dinocell-run-lease"
CREATE_GRACE_S = 120.0  # a lease without a job uid this young belongs to a launcher that is creating its job


class RunDirLeased(JobSubmitError):
    """Another live job holds the run directory."""


@dataclass
class Lease:
    run_dir: str
    backend: str
    kind: str
    namespace: str
    job: str
    holder: str  # the launcher: its pod name (POD_NAME) or host name
    created: str  # RFC 3339, UTC
    uid: str = ""  # the job's uid, once created
    tag: str = field(default="", compare=False)  # the stored object's version (ETag / content hash); not written

    @property
    def uri(self) -> str:
        return lease_uri(self.run_dir)

    def age_s(self, now: dt.datetime | None = None) -> float:
        now = now or dt.datetime.now(dt.timezone.utc)
        return (now - dt.datetime.fromisoformat(self.created.replace("Z", "+00:00"))).total_seconds()


def lease_uri(run_dir: str) -> str:
    return storage.join(run_dir, LEASE_NAME)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_lease(run_dir: str) -> Lease | None:
    """The lease of `run_dir` (with its stored version in `tag`), None when there is none; an unreadable one is an
    error naming the file."""
    uri = lease_uri(run_dir)
    got = read_versioned(uri)
    if got is None:
        return None
    try:
        data = json.loads(got[0].decode("utf-8"))
        if data.pop("format", None) != LEASE_FORMAT:
            raise ValueError(f"'format' is not {LEASE_FORMAT!r}")
        data.pop("tag", None)
        return Lease(**data, tag=got[1])
    except (ValueError, TypeError) as e:
        raise JobSubmitError(f"run dir lease {uri} is unreadable ({e}); delete it if no job writes {run_dir}") from None


def _lease_bytes(lease: Lease) -> bytes:
    data = {"format": LEASE_FORMAT, **asdict(lease)}
    data.pop("tag")
    return (json.dumps(data, indent=1) + "\n").encode("utf-8")


def write_lease(lease: Lease) -> None:
    """Write the lease unconditionally (tests and manual repair; launchers go through acquire_lease)."""
    storage.write_bytes(lease.uri, _lease_bytes(lease))


_warned_unsupported: set[str] = set()


def _unsupported(lease: Lease, e: ConditionalWritesUnsupported) -> None:
    if lease.run_dir not in _warned_unsupported:
        _warned_unsupported.add(lease.run_dir)
        log.warning("run dir %s: %s; the lease falls back to write-and-read-back (two launchers started within "
                    "one round trip could both take it)", lease.run_dir, e)


def _swap(lease: Lease, expect: str | None) -> None:
    """Write `lease` if the stored one is still `expect` (None: absent); sets lease.tag; PreconditionFailed if not."""
    try:
        lease.tag = write_if(lease.uri, _lease_bytes(lease), expect)
    except ConditionalWritesUnsupported as e:
        _unsupported(lease, e)
        write_lease(lease)
        back = read_lease(lease.run_dir)
        if back is None or (back.namespace, back.job, back.holder) != (lease.namespace, lease.job, lease.holder):
            raise PreconditionFailed(f"write {lease.uri}: overwritten by another launcher") from None
        lease.tag = back.tag


def _holder() -> str:
    return os.environ.get("POD_NAME") or socket.gethostname()


def _live_state(custom, lease: Lease, rt: float) -> str | None:
    """The named job's state when it still runs or waits (its lease holds), None when the lease is stale."""
    from kubernetes.client.rest import ApiException

    bk: Backend | None = BACKEND_TABLE.get(lease.backend)
    if bk is None:
        raise JobSubmitError(f"run dir lease {lease.uri} names backend {lease.backend!r}, not one of "
                             f"{sorted(BACKEND_TABLE)}; delete it if no job writes {lease.run_dir}")
    try:
        job = custom.get_namespaced_custom_object(bk.group, bk.version, lease.namespace, bk.plural, lease.job,
                                                  _request_timeout=rt)
    except ApiException as e:
        if e.status != 404:
            raise JobSubmitError(
                f"run dir {lease.run_dir} is leased by {lease.kind} {lease.namespace}/{lease.job}, which cannot be "
                f"checked: HTTP {e.status}: {api_error_text(e)}") from e
        if not lease.uid and lease.age_s() < CREATE_GRACE_S:
            return "being created"
        return None
    uid = (job.get("metadata") or {}).get("uid", "")
    if lease.uid and uid and uid != lease.uid:
        return None  # a later job of the same name, not the lease's
    state, _ = job_state(bk, job)
    return None if state in ("succeeded", "failed") else state


def acquire_lease(custom, run_dir: str, bk: Backend, namespace: str, name: str, rt: float) -> Lease:
    """Take the run directory for job `namespace/name`, or raise RunDirLeased naming the job that holds it."""
    old = read_lease(run_dir)
    if old is not None:
        state = _live_state(custom, old, rt)
        if state is not None:
            raise RunDirLeased(
                f"run dir {run_dir} is in use by {old.kind} {old.namespace}/{old.job} ({state}, lease {old.uri} "
                f"taken {old.created} by {old.holder}): cancel that job or train under another run name")
        log.info("run dir %s: taking over the stale lease of %s %s/%s (taken %s by %s; that job is gone or finished)",
                 run_dir, old.kind, old.namespace, old.job, old.created, old.holder)
    lease = Lease(run_dir, bk.name, bk.kind, namespace, name, _holder(), _now())
    try:
        _swap(lease, old.tag if old is not None else None)
    except PreconditionFailed:
        now = read_lease(run_dir)
        other = (f"{now.kind} {now.namespace}/{now.job} (lease taken {now.created} by {now.holder})" if now
                 else "another launcher (whose lease is already gone)")
        raise RunDirLeased(f"run dir {run_dir}: lost the lease to {other}, which took it at the same time: "
                           "train under another run name or retry once that job is over") from None
    return lease


def record_uid(lease: Lease, uid: str) -> None:
    """Add the created job's uid to the lease (a later job of the same name is then not mistaken for it)."""
    if uid:
        expect = lease.tag
        lease.uid = uid
        try:
            _swap(lease, expect)
        except PreconditionFailed:  # only a launcher that judged it stale can have replaced it: say so, go on
            log.warning("run dir %s: the lease of %s %s/%s was replaced by another launcher while the job was "
                        "being created", lease.run_dir, lease.kind, lease.namespace, lease.job)


def release_lease(lease: Lease) -> None:
    """Delete the lease if it is still ours (never another launcher's)."""
    try:
        try:
            delete_if(lease.uri, lease.tag)
        except ConditionalWritesUnsupported as e:
            _unsupported(lease, e)
            current = read_lease(lease.run_dir)
            if current is None or (current.namespace, current.job) != (lease.namespace, lease.job):
                raise PreconditionFailed(f"delete {lease.uri}: the lease is another launcher's now") from None
            storage.delete(lease.uri)
        log.info("run dir %s: lease released", lease.run_dir)
    except PreconditionFailed:
        log.info("run dir %s: the lease is no longer ours (another launcher took it over): left alone", lease.run_dir)
    except (storage.StorageError, JobSubmitError) as e:  # the job is over either way; the next launcher takes over
        log.warning("run dir %s: could not release the lease: %s", lease.run_dir, e)
