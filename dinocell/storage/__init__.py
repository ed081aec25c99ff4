"""One storage layer for every step: `s3://bucket/key` URIs and local paths behind the same functions.

Why it looks like this:
- one boto3 client per process, created lazily and re-created after fork (a client must not be shared across
  forked DataLoader workers);
- connect/read timeouts and adaptive retries, because parallel boto3 downloads were seen to hang and S3 answers
  bursts with 503 SlowDown;
- atomic writes everywhere: S3 PUTs are atomic by nature; local files are written to a temporary sibling and renamed,
  so a reader never sees half a file;
- keys coming from manifests or CSVs go through `safe_join`, which refuses anything that would escape its root.

Configure once per process with `configure(StorageConfig(...))`; the environment (`AWS_ENDPOINT_URL`,
`DINOCELL_S3_ANONYMOUS`) is honoured when the config leaves a field unset. Credentials come from the standard boto3
chain and are never logged.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from dinocell.log import get_logger
from dinocell.storage.errors import NOT_FOUND_CODES, describe_s3_error, s3_error_code
from dinocell.storage.retry import get_object_bytes

_log = get_logger("storage")

__all__ = [
    "StorageConfig",
    "StorageError",
    "ObjectInfo",
    "configure",
    "get_config",
    "is_s3",
    "split_s3",
    "join",
    "safe_join",
    "read_bytes",
    "write_bytes",
    "read_text",
    "write_text",
    "exists",
    "list_objects",
    "list_prefixes",
    "read_many",
    "upload_file",
    "download_file",
    "delete",
    "local_path",
    "map_parallel",
    "open_read",
    "NotFound",
]


class StorageError(RuntimeError):
    """An object could not be read or written; the message names the URI."""


@dataclass(frozen=True)
class StorageConfig:
    endpoint_url: str | None = None  # None -> AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) -> AWS default
    anonymous: bool | None = None  # unsigned requests for public buckets; None -> DINOCELL_S3_ANONYMOUS
    region: str | None = None  # None -> AWS_DEFAULT_REGION -> us-east-1 (where cellpainting-gallery lives)
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_attempts: int = 10  # adaptive retry mode: backoff with jitter + client-side rate limiting on throttling
    max_workers: int = 16  # bounded thread pool for parallel fetches
    max_pool_connections: int = 64
    # Per-bucket overrides of endpoint_url / anonymous / region, e.g. read the public gallery anonymously from AWS
    # while writing outputs to an in-cluster MinIO with credentials:
    #   buckets: {cellpainting-gallery: {anonymous: true, endpoint_url: "https://s3.amazonaws.com"}}
    buckets: dict = field(default_factory=dict, hash=False, compare=False)

    def validate(self) -> None:
        allowed = {"endpoint_url", "anonymous", "region"}
        for bucket, over in self.buckets.items():
            if not isinstance(over, dict):
                raise ValueError(f"buckets.{bucket}: expected a mapping of {sorted(allowed)}, got {over!r}")
            unknown = set(over) - allowed
            if unknown:
                raise ValueError(f"buckets.{bucket}: unknown field(s) {sorted(unknown)} (allowed: {sorted(allowed)})")
            if "anonymous" in over and not isinstance(over["anonymous"], bool):
                raise ValueError(f"buckets.{bucket}.anonymous: expected true/false, got {over['anonymous']!r}")

    def for_bucket(self, bucket: str) -> "StorageConfig":
        """The resolved settings that apply to one bucket (its override on top of the global ones)."""
        over = self.buckets.get(bucket)
        if not over:
            return self.resolved()
        rest = {k: v for k, v in over.items() if k != "endpoint_url"}
        out = replace(self, buckets={}, **rest).resolved()
        if "endpoint_url" in over:  # explicit, even "" (= AWS itself), wins over AWS_ENDPOINT_URL
            out = replace(out, endpoint_url=over["endpoint_url"] or None)
        return out

    def resolved(self) -> "StorageConfig":
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        anonymous = self.anonymous
        if anonymous is None:
            anonymous = os.environ.get("DINOCELL_S3_ANONYMOUS", "").lower() in ("1", "true", "yes")
        region = self.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
        return replace(self, endpoint_url=endpoint or None, anonymous=anonymous, region=region)


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int


_config = StorageConfig()
_UMASK = os.umask(0)
os.umask(_UMASK)
_state = threading.local()
_client_lock = threading.Lock()
_client_cache: dict[tuple, object] = {}


def configure(cfg: StorageConfig) -> None:
    """Set the process-wide storage configuration (drops cached clients so the next call uses it)."""
    global _config
    with _client_lock:
        _config = cfg
        _client_cache.clear()


def get_config() -> StorageConfig:
    return _config.resolved()


# --------------------------------------------------------------------------- URIs


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[5:]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join URI/path parts with '/' (no traversal check: use `safe_join` for untrusted parts)."""
    base = str(base)
    if is_s3(base):
        out = base
        for p in parts:
            p = str(p)
            out = out.rstrip("/") + "/" + p.lstrip("/") if p else out
        return out
    return str(Path(base, *parts))


def safe_join(root: str | os.PathLike, rel: str) -> str:
    """Join an untrusted relative key (from a manifest or CSV) under `root`, refusing anything that escapes it.

    Rejects absolute paths, `..` segments that climb above the root, backslashes and NUL bytes.
    """
    rel = str(rel)
    if "\x00" in rel or "\\" in rel:
        raise ValueError(f"refusing key {rel!r}: contains a NUL byte or backslash")
    if rel.startswith("/") or is_s3(rel) or "://" in rel:
        raise ValueError(f"refusing key {rel!r}: must be relative to {root}")
    norm = posixpath.normpath(rel)
    if norm == ".." or norm.startswith("../"):
        raise ValueError(f"refusing key {rel!r}: escapes the root {root}")
    if norm == ".":
        raise ValueError(f"refusing key {rel!r}: empty")
    return join(root, norm)


def local_path(uri: str | os.PathLike) -> Path:
    """Local path of a `file://` URI or plain path."""
    s = str(uri)
    if s.startswith("file://"):
        s = s[7:]
    if is_s3(s):
        raise ValueError(f"expected a local path, got {s!r}")
    return Path(s)


# --------------------------------------------------------------------------- S3 client


def _client(bucket: str = ""):
    """The boto3 S3 client for this process and the bucket's settings, created lazily; re-created after fork."""
    cfg = _config.for_bucket(bucket)
    key = (os.getpid(), cfg)
    client = _client_cache.get(key)
    if client is not None:
        return client
    with _client_lock:
        client = _client_cache.get(key)
        if client is None:
            try:
                import boto3
                from botocore import UNSIGNED
                from botocore.config import Config
            except ImportError as e:  # pragma: no cover - depends on the install
                raise StorageError("s3:// URIs need boto3: pip install 'dinocell[s3]'") from e
            bcfg = Config(
                connect_timeout=cfg.connect_timeout_s,
                read_timeout=cfg.read_timeout_s,
                retries={"max_attempts": cfg.max_attempts, "mode": "adaptive"},
                max_pool_connections=cfg.max_pool_connections,
                signature_version=UNSIGNED if cfg.anonymous else None,
            )
            # A fresh session per client: boto3's default session is not fork/thread safe.
            session = boto3.session.Session()
            client = session.client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region, config=bcfg)
            # Forget clients of other pids (a forked child must not reuse its parent's connections).
            for k in [k for k in _client_cache if k[0] != os.getpid()]:
                del _client_cache[k]
            _client_cache[key] = client
    return client


def _s3_error(uri: str, op: str, err: Exception) -> StorageError:
    cfg = _config.for_bucket(split_s3(uri)[0]) if is_s3(uri) else get_config()
    return StorageError(describe_s3_error(uri, op, err, cfg))


# --------------------------------------------------------------------------- read / write


def read_bytes(uri: str | os.PathLike) -> bytes:
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return get_object_bytes(_client(bucket), bucket, key, _config.for_bucket(bucket).max_attempts,
                                    on_retry=lambda n, e: _log.warning("read %s: body retry %d (%s)", uri, n, e))
        except Exception as e:  # botocore raises many types; normalise them into one message with the URI
            raise _s3_error(uri, "read", e) from e
    try:
        return local_path(uri).read_bytes()
    except OSError as e:
        raise StorageError(f"read {uri} failed: {e.strerror or e}") from e


class NotFound(StorageError):
    """The object does not exist (retrying cannot help)."""


def open_read(uri: str | os.PathLike):
    """A binary stream (with `read`/`readinto`) over an object, for large objects read sequentially (tar shards).

    Raises NotFound for a missing object, StorageError for other failures.
    """
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return _client(bucket).get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as e:
            err = _s3_error(uri, "read", e)
            raise (NotFound(str(err)) if "no such object" in str(err) else err) from e
    try:
        return open(local_path(uri), "rb")
    except FileNotFoundError as e:
        raise NotFound(f"read {uri} failed: no such file") from e
    except OSError as e:
        raise StorageError(f"read {uri} failed: {e.strerror or e}") from e


def read_text(uri: str | os.PathLike, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_bytes(uri: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Write atomically: S3 PUT is all-or-nothing; local files go through a temp file + rename.

    fsync=False skips flushing a local file to disk before the rename (S3: no effect). The write is still atomic
    (readers see the old or the new file, never part of one) but may not survive a power cut; use it for bulk
    writes that can simply be redone, where one fsync per file would make the run I/O-bound.
    """
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            _client(bucket).put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as e:
            raise _s3_error(uri, "write", e) from e
        return
    path = local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the permissions a plain open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(uri: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def upload_file(local: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy a local file to a URI (multipart for large files on S3; atomic either way)."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            _client(bucket).upload_file(str(local), bucket, key)
        except Exception as e:
            raise _s3_error(uri, "upload", e) from e
        return
    dst = local_path(uri)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(local, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def download_file(uri: str | os.PathLike, local: str | os.PathLike) -> None:
    """Copy a URI to a local file atomically."""
    uri = str(uri)
    dst = Path(local)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                _client(bucket).download_file(bucket, key, tmp)
            except Exception as e:
                raise _s3_error(uri, "download", e) from e
        else:
            shutil.copyfile(local_path(uri), tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def exists(uri: str | os.PathLike) -> bool:
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            _client(bucket).head_object(Bucket=bucket, Key=key)
            return True
        except Exception as e:
            if s3_error_code(e) in NOT_FOUND_CODES:
                return False
            raise _s3_error(uri, "stat", e) from e
    return local_path(uri).exists()


def delete(uri: str | os.PathLike) -> None:
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            _client(bucket).delete_object(Bucket=bucket, Key=key)
        except Exception as e:
            raise _s3_error(uri, "delete", e) from e
        return
    local_path(uri).unlink(missing_ok=True)


# --------------------------------------------------------------------------- listing


def list_objects(prefix: str | os.PathLike) -> Iterator[ObjectInfo]:
    """Every object under a prefix (recursive), paginated (S3 returns at most 1,000 keys a page).

    For a local directory, every regular file below it (hidden temp files of in-flight atomic writes are skipped).
    """
    prefix = str(prefix)
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        paginator = _client(bucket).get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=key):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]))
        except StorageError:
            raise
        except Exception as e:
            raise _s3_error(prefix, "list", e) from e
        return
    root = local_path(prefix)
    if root.is_file():
        yield ObjectInfo(str(root), root.stat().st_size)
        return
    if not root.exists():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith(".") and name.endswith(".tmp"):
                continue
            p = Path(dirpath, name)
            yield ObjectInfo(str(p), p.stat().st_size)


def list_prefixes(prefix: str | os.PathLike) -> list[str]:
    """The immediate 'sub-directories' of a prefix (S3 common prefixes with delimiter '/'), as URIs ending in '/'."""
    prefix = str(prefix)
    if is_s3(prefix):
        if not prefix.endswith("/"):
            prefix += "/"
        bucket, key = split_s3(prefix)
        out: list[str] = []
        paginator = _client(bucket).get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=key, Delimiter="/"):
                out.extend(f"s3://{bucket}/{p['Prefix']}" for p in page.get("CommonPrefixes", []))
        except Exception as e:
            raise _s3_error(prefix, "list", e) from e
        return out
    root = local_path(prefix)
    if not root.is_dir():
        return []
    return [str(p) + "/" for p in sorted(root.iterdir()) if p.is_dir()]


# --------------------------------------------------------------------------- parallel


def read_many(
    uris: Sequence[str], max_workers: int | None = None, return_exceptions: bool = False
) -> list[bytes | Exception]:
    """Fetch many objects in parallel with a bounded thread pool; results in input order.

    With `return_exceptions=True` a failed fetch yields its StorageError in place of the bytes (so the caller can count and
    report skipped objects); otherwise the first failure raises.
    """
    uris = list(uris)
    if not uris:
        return []
    workers = max(1, min(max_workers or get_config().max_workers, len(uris)))

    def fetch(u: str) -> bytes | Exception:
        try:
            return read_bytes(u)
        except StorageError as e:
            if return_exceptions:
                return e
            raise

    if workers == 1:
        return [fetch(u) for u in uris]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dinocell-fetch") as pool:
        return list(pool.map(fetch, uris))


def map_parallel(fn, items: Iterable, max_workers: int | None = None) -> list:
    """Apply `fn` to items on the storage thread pool (for listing many prefixes at once), results in order."""
    items = list(items)
    workers = max(1, min(max_workers or get_config().max_workers, len(items) or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dinocell-io") as pool:
        return list(pool.map(fn, items))
