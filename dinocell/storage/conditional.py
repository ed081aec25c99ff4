"""Compare-and-swap writes of small objects: what a lease needs so that two writers can never both win.

Every object read here comes with a tag that changes whenever the object does; a conditional write or delete
names the tag it expects and fails with PreconditionFailed when the object changed (or, for a create, exists):

- S3: the tag is the ETag, and the condition travels with the request (`If-None-Match: *` to create,
  `If-Match: <etag>` to replace or delete), so the store decides atomically. AWS S3 and MinIO honour them (AWS
  since 2024 for writes; conditional deletes are newer). A store that answers NotImplemented raises
  ConditionalWritesUnsupported, so the caller can fall back and say so; a store that silently ignores the headers
  cannot be detected here (the lease also reads its write back).
- local paths: the tag is the sha256 of the content, and the compare and the write happen under an exclusive
  `flock` of the parent directory (one host; NFS locks are only as good as the NFS server's).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os

from dinocell.storage import (
    StorageError,
    _client,
    _s3_error,
    get_config,
    is_s3,
    local_path,
    split_s3,
    write_bytes,
)
from dinocell.storage.errors import NOT_FOUND_CODES, s3_error_code
from dinocell.storage.retry import get_object_whole

__all__ = ["ConditionalWritesUnsupported", "PreconditionFailed", "delete_if", "read_versioned", "write_if"]


class PreconditionFailed(StorageError):
    """The object changed since it was read (or exists, for a create): somebody else wrote it."""


class ConditionalWritesUnsupported(StorageError):
    """The object store does not implement conditional requests."""


_PRECONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_UNSUPPORTED_CODES = {"NotImplemented", "501"}


def _precondition_failed(op: str, uri: str, expect: str | None) -> PreconditionFailed:
    what = "exists already" if expect is None else f"changed since it was read (expected {expect})"
    return PreconditionFailed(f"{op} {uri}: the object {what}")


def _raise_s3(uri: str, op: str, err: Exception, expect: str | None):
    code = s3_error_code(err)
    if code in _PRECONDITION_CODES:
        raise _precondition_failed(op, uri, expect) from err
    if code in _UNSUPPORTED_CODES:
        raise ConditionalWritesUnsupported(
            f"{op} {uri}: this object store does not implement conditional requests ({code})") from err
    raise _s3_error(uri, op, err) from err


def _content_tag(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _dir_lock(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _local_current(path) -> tuple[bytes, str] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StorageError(f"read {path} failed: {e.strerror or e}") from e
    return data, _content_tag(data)


def _local_tag(path) -> str | None:
    current = _local_current(path)
    return current[1] if current is not None else None  # None: absent, what a create expects


def read_versioned(uri: str) -> tuple[bytes, str] | None:
    """(content, tag) of a small object, None when it does not exist."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:  # the storage layer's GET: truncated or reset bodies retried, length checked
            return get_object_whole(_client(bucket), bucket, key, get_config().for_bucket(bucket).max_attempts)
        except Exception as e:
            if s3_error_code(e) in NOT_FOUND_CODES:
                return None
            raise _s3_error(uri, "read", e) from e
    path = local_path(uri)
    if not path.parent.is_dir():  # nothing there, and a read must not create the directory
        return None
    with _dir_lock(path):
        return _local_current(path)


def write_if(uri: str, data: bytes, expect: str | None) -> str:
    """Write `data` only if the object is still the one tagged `expect` (None: only if it does not exist).

    Returns the new tag. Raises PreconditionFailed when somebody else got there first.
    """
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        cond = {"IfNoneMatch": "*"} if expect is None else {"IfMatch": expect}
        try:
            return _client(bucket).put_object(Bucket=bucket, Key=key, Body=data, **cond)["ETag"]
        except Exception as e:
            if s3_error_code(e) in _PRECONDITION_CODES:
                # botocore retries a PUT whose answer was lost; the retry then fails on our own first write
                now = read_versioned(uri)
                if now is not None and now[0] == data:
                    return now[1]
            _raise_s3(uri, "write", e, expect)
    path = local_path(uri)
    with _dir_lock(path):
        if _local_tag(path) != expect:
            raise _precondition_failed("write", uri, expect)
        write_bytes(uri, data)
    return _content_tag(data)


def delete_if(uri: str, expect: str) -> None:
    """Delete the object only if it is still the one tagged `expect`; PreconditionFailed otherwise (gone included)."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            _client(bucket).delete_object(Bucket=bucket, Key=key, IfMatch=expect)
            return
        except Exception as e:
            _raise_s3(uri, "delete", e, expect)
    path = local_path(uri)
    with _dir_lock(path):
        if _local_tag(path) != expect:
            raise _precondition_failed("delete", uri, expect)
        path.unlink()
