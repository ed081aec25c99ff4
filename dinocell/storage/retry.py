"""Whole-object reads that survive a truncated or reset response body.

botocore retries a request until its response headers arrive; the body is read afterwards, outside that loop, so one
truncated GET (the connection dropped mid-body, a read timeout) used to fail the whole read: a manifest, an index, a
model, or an image of a field. Here the GET and the body read are retried together with the same attempt budget
(`storage.max_attempts`), with jittered exponential backoff, and the body's length is checked against the response's
Content-Length.
"""

from __future__ import annotations

import random
import time

__all__ = ["TRANSIENT_BODY_ERRORS", "TruncatedBody", "get_object_bytes", "get_object_whole"]

# botocore / urllib3 exception class names that mean "the body did not arrive whole" (names, so that this module
# needs no botocore import; the storage layer imports boto3 lazily).
TRANSIENT_BODY_ERRORS = frozenset({
    "IncompleteReadError", "ResponseStreamingError", "ReadTimeoutError", "ProtocolError",
    "IncompleteRead", "ConnectionResetError", "TruncatedBody",
})


class TruncatedBody(IOError):
    """The body was shorter than its Content-Length."""


def _transient(err: BaseException) -> bool:
    seen = err
    for _ in range(4):  # the cause chain: botocore wraps urllib3's errors
        if seen is None:
            return False
        if type(seen).__name__ in TRANSIENT_BODY_ERRORS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def get_object_bytes(client, bucket: str, key: str, attempts: int, base_delay_s: float = 0.2,
                     on_retry=None) -> bytes:
    """GET s3://bucket/key and read its body whole, retrying truncated / reset bodies up to `attempts` times.

    Errors that are not about the body (no such key, access denied, ...) are raised at once, as botocore gave them.
    `on_retry(attempt, error)` is called before each retry (the caller logs or counts).
    """
    return get_object_whole(client, bucket, key, attempts, base_delay_s, on_retry)[0]


def get_object_whole(client, bucket: str, key: str, attempts: int, base_delay_s: float = 0.2,
                     on_retry=None) -> tuple[bytes, str]:
    """get_object_bytes, with the ETag of the version that was read."""
    attempts = max(1, int(attempts))
    for attempt in range(1, attempts + 1):
        try:
            resp = client.get_object(Bucket=bucket, Key=key)
            body = resp["Body"].read()
            expected = resp.get("ContentLength")
            if expected is not None and len(body) != int(expected):
                raise TruncatedBody(f"got {len(body)} of {expected} bytes")
            return body, resp.get("ETag", "")
        except Exception as e:
            if attempt == attempts or not _transient(e):
                raise
            if on_retry is not None:
                on_retry(attempt, e)
            time.sleep(min(base_delay_s * 2 ** (attempt - 1), 5.0) * (0.5 + random.random()))
    raise AssertionError("unreachable")
