"""Turning botocore's many exception types into one line that names the object and what to check."""

from __future__ import annotations

import os

__all__ = ["NOT_FOUND_CODES", "describe_s3_error", "s3_error_code"]

# botocore's codes for "no such object" (a GET says NoSuchKey, a HEAD only its status)
NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


def s3_error_code(err: BaseException) -> str:
    """botocore's error code of a failed call ("NoSuchKey", "404", "PreconditionFailed", ...), "" for other errors."""
    resp = getattr(err, "response", None)
    return str(resp.get("Error", {}).get("Code", "")) if isinstance(resp, dict) else ""


def describe_s3_error(uri: str, op: str, err: Exception, cfg) -> str:  # noqa: C901 - a flat table of hints
    """One line for a failed S3 call: the URI, botocore's code and a hint a person can act on (never credentials).

    `cfg`: the StorageConfig in force for the URI's bucket (to tell anonymous from signed access, name the endpoint).
    """
    code = s3_error_code(err)
    hint = ""
    if code in ("AccessDenied", "403", "Forbidden"):
        hint = (
            " (access denied: the bucket is private; anonymous access only works on public-read buckets)"
            if cfg.anonymous
            else " (access denied: check the credentials in the environment / object-storage secret)"
        )
    elif code in NOT_FOUND_CODES:
        hint = " (no such object)"
    elif code == "NoSuchBucket":
        hint = " (no such bucket)"
    elif type(err).__name__ in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
        hint = f" (cannot reach the S3 endpoint {endpoint}: check storage.endpoint_url / AWS_ENDPOINT_URL)"
    elif type(err).__name__ == "NoCredentialsError":
        hint = (" (no credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or storage.anonymous: true for a "
                "public bucket)")
    return f"{op} {uri} failed: {code or type(err).__name__}{hint}"
