"""Incomplete multipart uploads: what a killed writer leaves on S3.

A large object (a checkpoint, a shard) goes up as a multipart upload; a writer killed in the middle (preemption, OOM,
node loss) leaves its uploaded parts behind, invisible to listings and billed until somebody aborts the upload. A
writer that owns a prefix (one training job per run directory, see dinocell.launch.lease) aborts, before its first
write, every upload under the prefix that was started before it. A bucket lifecycle rule
(AbortIncompleteMultipartUpload) is the store-side safety net for prefixes nobody writes again.
"""

from __future__ import annotations

import datetime as dt

from dinocell.log import get_logger
from dinocell.storage import StorageError, _client, _s3_error, is_s3, split_s3

__all__ = ["abort_incomplete_uploads", "incomplete_uploads"]

_log = get_logger("storage")


def incomplete_uploads(prefix: str) -> list[tuple[str, str, dt.datetime]]:
    """(key, upload id, initiated) of every multipart upload in progress under an s3:// prefix ([] for local)."""
    prefix = str(prefix)
    if not is_s3(prefix):
        return []
    bucket, key_prefix = split_s3(prefix)
    if key_prefix and not key_prefix.endswith("/"):
        key_prefix += "/"
    out, kw = [], {"Bucket": bucket, "Prefix": key_prefix}
    try:
        while True:
            page = _client(bucket).list_multipart_uploads(**kw)
            out += [(u["Key"], u["UploadId"], u["Initiated"]) for u in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                return out
            kw.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])
    except StorageError:
        raise
    except Exception as e:
        raise _s3_error(prefix, "list multipart uploads", e) from e


def abort_incomplete_uploads(prefix: str, started_before: dt.datetime) -> int:
    """Abort the uploads under `prefix` started before `started_before` (timezone-aware); returns how many.

    Logged one line each. A listing or abort the store refuses (no permission) is a warning, never a failed step:
    the leftovers cost storage, not correctness.
    """
    try:
        uploads = incomplete_uploads(prefix)
    except StorageError as e:
        _log.warning("cannot list incomplete multipart uploads under %s: %s", prefix, e)
        return 0
    n = 0
    bucket = split_s3(str(prefix))[0] if uploads else ""
    for key, upload_id, initiated in uploads:
        if initiated >= started_before:
            continue
        try:
            _client(bucket).abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception as e:
            _log.warning("cannot abort the incomplete upload of s3://%s/%s (started %s): %s", bucket, key,
                         initiated.isoformat(), _s3_error(f"s3://{bucket}/{key}", "abort upload", e))
            continue
        n += 1
        _log.info("aborted the incomplete upload of s3://%s/%s started %s (a killed writer's parts)", bucket, key,
                  initiated.isoformat())
    return n
