"""The tar bytes of a shard, both ways: writing members (dinocell.data.shards) and streaming them back (shard_reader).

Writing: plain USTAR headers with fixed mtime/owner/mode, payloads written from any buffer without a copy, zero
padding to 512-byte blocks and the end-of-archive padded to a whole tar record, so the same members always make
byte-identical archives (same sha256 on every rerun) that any tar tool or WebDataset can read. `HashingWriter`
hashes the archive while it is written.

Reading: `read_shard` streams a shard from storage (local file or S3 GET body) member by member; each member's bytes
are read (`readinto`) straight into their own uninitialised numpy buffer, which the reader turns into a tensor with
no decode and no copy. The sha256 is computed on the fly (verify="sha256") or only size and structure are checked
(verify="size"); a truncated archive, a size or hash mismatch or a malformed member raises CorruptShardError.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterator

import numpy as np

from dinocell import storage

__all__ = [
    "CorruptShardError",
    "HashingWriter",
    "finish_tar",
    "iter_tar",
    "open_stream",
    "read_shard",
    "write_tar_member",
]

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_RECORD = tarfile.RECORDSIZE  # tarfile pads archives to 20 blocks; we do the same so `tar` sees a normal archive


class CorruptShardError(RuntimeError):
    """A shard whose bytes are not what the index says (truncated, bad hash, malformed members); names the shard."""


# --------------------------------------------------------------------------- writing


def write_tar_member(f, name: str, payload) -> int:
    """Append one regular-file member (USTAR header, payload, zero padding to 512). Returns the bytes written.

    `payload` is anything with the buffer protocol (bytes, a C-contiguous ndarray): it is written without a copy.
    Fixed mtime/owner/mode make the archive a pure function of its contents.
    """
    mv = memoryview(payload).cast("B")
    info = tarfile.TarInfo(name)
    info.size = mv.nbytes
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    pad = (-mv.nbytes) % _BLOCK
    f.write(header)
    f.write(mv)
    if pad:
        f.write(b"\0" * pad)
    return len(header) + mv.nbytes + pad


def finish_tar(f, written: int) -> int:
    """End-of-archive: two zero blocks, then zero padding to a whole tar record. Returns the bytes written."""
    end = 2 * _BLOCK
    end += (-(written + end)) % _RECORD
    f.write(b"\0" * end)
    return end


class HashingWriter:
    """File wrapper that feeds every written byte to sha256 (so the tar is hashed once, while it is written)."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> None:
        self.sha.update(data)
        self.f.write(data)
        self.size += memoryview(data).nbytes


# --------------------------------------------------------------------------- reading


def open_stream(uri: str):
    """A binary file-like object with `readinto` over the object at `uri` (local file or S3 GET body).

    A missing object raises CorruptShardError (retrying cannot help); other failures raise StorageError.
    """
    try:
        return storage.open_read(uri)
    except storage.NotFound as e:
        raise CorruptShardError(f"{uri}: missing ({e})") from e


class _CountingReader:
    """Wraps a stream: counts bytes and (optionally) hashes them as they are read; `readinto` only."""

    def __init__(self, raw, hash_it: bool):
        self.raw = raw
        self.sha = hashlib.sha256() if hash_it else None
        self.size = 0

    def readinto(self, buf) -> int:
        n = self.raw.readinto(buf)
        if n:
            if self.sha is not None:
                self.sha.update(memoryview(buf)[:n])  # hashlib releases the GIL on large buffers
            self.size += n
        return n or 0


def _read_exact(r, buf, source: str, what: str) -> None:
    mv = memoryview(buf)
    pos = 0
    while pos < len(mv):
        n = r.readinto(mv[pos:])
        if not n:
            raise CorruptShardError(f"{source}: truncated: end of data inside {what} ({pos} of {len(mv)} bytes)")
        pos += n


def _parse_pax(data: bytes, source: str) -> dict[str, str]:
    """PAX extended header records: '<len> <key>=<value>\\n' ..."""
    out, pos = {}, 0
    while pos < len(data) and data[pos : pos + 1] not in (b"\0", b""):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        if length <= 0:
            raise CorruptShardError(f"{source}: malformed PAX header")
        key, _, value = data[sp + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def iter_tar(r, source: str) -> Iterator[tuple[str, np.ndarray]]:
    """Stream the regular-file members of a tar as (name, payload) from a `readinto` stream; each payload is its own
    uint8 1-D array (writable, so it can become a tensor without a copy).

    Reads USTAR / GNU / PAX headers (long names, PAX path/size); directories and global headers are skipped, links
    and devices refused. Ends at the end-of-archive marker (and reads the padding after it, so a hashing reader sees
    every byte); a stream that ends without the marker is truncated.
    """
    header = bytearray(_BLOCK)
    next_name: str | None = None
    next_size: int | None = None
    while True:
        first = r.readinto(header)
        if not first:
            raise CorruptShardError(f"{source}: truncated: no end-of-archive marker")
        if first < _BLOCK:
            _read_exact(r, memoryview(header)[first:], source, "a tar header")
        if header == _ZERO_BLOCK:  # end of archive: drain the zero padding that follows
            sink = bytearray(64 * 1024)
            while r.readinto(sink):
                pass
            return
        try:
            info = tarfile.TarInfo.frombuf(bytes(header), "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise CorruptShardError(f"{source}: bad tar header: {e}") from e
        size = next_size if next_size is not None else info.size
        name = next_name if next_name is not None else info.name
        payload = np.empty(size, np.uint8)  # not bytearray: no zero-fill before the read overwrites it
        _read_exact(r, payload, source, f"member {name}")
        pad = (-size) % _BLOCK
        if pad:
            _read_exact(r, bytearray(pad), source, f"padding of {name}")
        if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE):
            next_name = next_size = None
            yield name, payload
        elif info.type == tarfile.XHDTYPE:
            pax = _parse_pax(payload.tobytes(), source)
            next_name = pax.get("path", next_name)
            next_size = int(pax["size"]) if "size" in pax else next_size
        elif info.type == tarfile.GNUTYPE_LONGNAME:
            next_name = payload.tobytes().rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type in (tarfile.XGLTYPE, tarfile.DIRTYPE):
            next_name = next_size = None
        else:
            raise CorruptShardError(f"{source}: unexpected tar member type {info.type!r} ({name})")


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first '.' of the base name; the rest is the extension."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return name, ""
    return (f"{head}/{stem}" if head else stem), ext


def _decode_sample(key: str, parts: dict[str, np.ndarray], source: str) -> tuple[dict, np.ndarray]:
    if "json" not in parts or "u8" not in parts:
        raise CorruptShardError(f"{source}: sample {key} lacks {'.json' if 'json' not in parts else '.u8'}")
    try:
        meta = json.loads(parts["json"].tobytes())
        shape = tuple(int(x) for x in meta["shape"])
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptShardError(f"{source}: sample {key}: unreadable metadata: {e}") from e
    data = parts["u8"]
    if meta.get("dtype", "uint8") != "uint8" or len(shape) != 3 or int(np.prod(shape)) != data.size:
        raise CorruptShardError(f"{source}: sample {key}: {data.size} bytes do not hold uint8 {list(shape)}")
    return meta, data.reshape(shape)  # a view over the read buffer: no copy


def read_shard(
    uri: str,
    expected_bytes: int | None = None,
    expected_sha256: str | None = None,
    verify: str = "sha256",
) -> list[tuple[dict, np.ndarray]]:
    """All (metadata, uint8 [C,H,W]) samples of one shard, in tar order, after the whole shard checked out.

    Raises CorruptShardError (truncated, wrong size, sha256 mismatch, malformed members) or StorageError (I/O).
    """
    if verify not in ("sha256", "size"):
        raise ValueError(f"verify must be 'sha256' or 'size', got {verify!r}")
    raw = open_stream(uri)
    try:
        r = _CountingReader(raw, hash_it=verify == "sha256" and expected_sha256 is not None)
        samples: list[tuple[dict, np.ndarray]] = []
        key, parts = None, {}
        for name, payload in iter_tar(r, uri):
            k, ext = _split_key(name)
            if k != key:
                if key is not None:
                    samples.append(_decode_sample(key, parts, uri))
                key, parts = k, {}
            parts[ext] = payload
        if key is not None:
            samples.append(_decode_sample(key, parts, uri))
    finally:
        raw.close()
    if expected_bytes is not None and r.size != expected_bytes:
        raise CorruptShardError(f"{uri}: {r.size} bytes, the index records {expected_bytes} (truncated or replaced?)")
    if r.sha is not None and r.sha.hexdigest() != expected_sha256:
        raise CorruptShardError(f"{uri}: sha256 {r.sha.hexdigest()} does not match the index ({expected_sha256})")
    return samples
