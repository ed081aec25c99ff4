"""Training checkpoints on a local directory or an s3:// prefix, safe against crashes and bit rot.

Layout under the root:

    ckpt-00001000.pt        torch.save of the state dict (written atomically)
    ckpt-00001000.pt.json   its integrity record {iteration, size, sha256}, written after the data
    latest.json             the pointer naming the checkpoint to resume from, written LAST

Why: a crash at any moment leaves either the previous pointer (naming an intact older checkpoint) or the new one
(naming a checkpoint whose data and record are already complete). The sha256 catches files that were truncated or
altered after the fact; `load()` then falls back to the newest older checkpoint that verifies, with a warning.

Unreadable is not absent: a record or checkpoint whose read fails after the storage layer's retries (5xx, timeouts,
resets) raises CheckpointUnreadable instead of falling back or starting over, and so does a root whose records exist
but name nothing usable (corrupt JSON everywhere, every checkpoint corrupt). Only a root with no checkpoint record at
all is a fresh run. `resolve()` says exactly which checkpoint it loaded and which newer ones it passed over (why).
The first save of a manager removes the temp files of earlier killed saves (dead owner pid, or older than a grace
period; shard_format.clean_stale_temps).

Pruning keeps the newest `keep_last` checkpoints (0 keeps everything). Milestones (`iteration % milestone_every == 0`,
when milestone_every > 0) stay in place, exempt from pruning (no copies). The checkpoint just saved is never pruned,
even when newer ones exist (a run restarted from an older checkpoint).

Everything is loaded with `torch.load(weights_only=True)`: a checkpoint can hold tensors, dicts, lists, tuples and
Python scalars/strings, never arbitrary pickled objects. `save()` checks that up front so an unloadable checkpoint is
refused when it is written, not discovered when a run tries to resume. RNG states go through `capture_rng_state()`,
which uses only such types (numpy's key array becomes an int64 tensor).

Only rank 0 writes; other ranks get the would-be URI back so every rank can log the same thing.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import io
import json
import os
import pickle
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dinocell import storage
from dinocell.data.fields import storage_error_kind
from dinocell.data.shard_format import clean_stale_temps, temp_prefix
from dinocell.log import get_logger
from dinocell.storage.multipart import abort_incomplete_uploads

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointUnreadable",
    "LoadedCheckpoint",
    "capture_rng_state",
    "check_weights_only_types",
    "restore_rng_state",
]

log = get_logger(__name__)

POINTER_NAME = "latest.json"
_CKPT_RE = re.compile(r"^ckpt-(\d{8,})\.pt$")
_RECORD_SUFFIX = ".json"  # record of ckpt-N.pt is ckpt-N.pt.json
_FORMAT_VERSION = 1
# the storage layer's hidden sibling of an interrupted local atomic write of a checkpoint, record or pointer
_DOT_TMP_RE = r"^\.(?:ckpt-\d{8,}\.pt(?:\.json)?|latest\.json)\..+\.tmp$"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, verified or loaded; the message names the URI and the reason."""


class CheckpointUnreadable(CheckpointError):
    """Checkpoints exist under the root but none can be resumed from, or reading them failed after the storage
    layer's retries: starting from iteration 0 would overwrite them. One line for the CLI; `uris` names them."""

    def __init__(self, message: str, uris=()):
        super().__init__(message)
        self.uris = list(uris)


# ----------------------------------------------------------------------------------------------- type check

_SCALAR_TYPES = (bool, int, float, complex, str, bytes, bytearray, type(None), torch.dtype, torch.device, torch.Size)
_CONTAINER_TYPES = (dict, list, tuple, set, collections.OrderedDict, collections.Counter)


def check_weights_only_types(obj, where: str = "state") -> None:
    """Raise TypeError naming the first value (by its key path) that torch.load(weights_only=True) would refuse."""
    extra = tuple(t for t in torch.serialization.get_safe_globals() if isinstance(t, type))
    stack = [(obj, where)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, torch.Tensor):
            continue
        if isinstance(value, _SCALAR_TYPES) or (extra and isinstance(value, extra)):
            continue
        if isinstance(value, dict):
            for k, v in value.items():
                stack.append((k, f"{path} key {k!r}"))
                stack.append((v, f"{path}[{k!r}]"))
            continue
        if isinstance(value, _CONTAINER_TYPES):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value))
            continue
        hint = " (convert numpy arrays to torch tensors)" if isinstance(value, (np.ndarray, np.generic)) else ""
        raise TypeError(
            f"{path}: a {type(value).__module__}.{type(value).__qualname__} cannot be loaded back with "
            f"torch.load(weights_only=True){hint}; checkpoints may hold tensors, dicts, lists, tuples, "
            "numbers, strings and None only"
        )


# ----------------------------------------------------------------------------------------------- manager


class CheckpointManager:
    def __init__(
        self,
        root_uri: str | os.PathLike,
        keep_last: int = 3,
        milestone_every: int = 0,
        rank: int = 0,
        upload_threshold_bytes: int = 256 * 1024**2,
    ):
        """`upload_threshold_bytes`: on S3, checkpoints at least this large go through a local temporary file and a
        multipart upload (boto3's managed transfer) instead of one PUT."""
        if not isinstance(keep_last, int) or keep_last < 0:
            raise ValueError(f"CheckpointManager: keep_last must be an integer >= 0 (0 keeps all), got {keep_last!r}")
        if not isinstance(milestone_every, int) or milestone_every < 0:
            raise ValueError(f"CheckpointManager: milestone_every must be an integer >= 0, got {milestone_every!r}")
        self.root = str(root_uri)
        self.keep_last = keep_last
        self.milestone_every = milestone_every
        self.rank = rank
        self.upload_threshold_bytes = upload_threshold_bytes
        self.cleaned_temps: int | None = None  # stale temp files removed before this manager's first save
        # S3 multipart uploads under the root started before this manager are killed saves (one writer per run dir)
        self._created = dt.datetime.now(dt.timezone.utc)

    # ------------------------------------------------------------------ names
    def uri_for(self, iteration: int) -> str:
        if not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"checkpoint iteration must be an integer >= 0, got {iteration!r}")
        return storage.join(self.root, f"ckpt-{iteration:08d}.pt")

    @property
    def pointer_uri(self) -> str:
        return storage.join(self.root, POINTER_NAME)

    def is_milestone(self, iteration: int) -> bool:
        return self.milestone_every > 0 and iteration % self.milestone_every == 0

    def _listing(self) -> dict[str, int]:
        """Names directly under the root -> size (one LIST call on S3)."""
        prefix = self.root if not storage.is_s3(self.root) else self.root.rstrip("/") + "/"
        out = {}
        base = prefix if storage.is_s3(prefix) else str(Path(prefix))
        for info in storage.list_objects(prefix):
            rel = info.uri[len(base) :].lstrip("/")
            if rel and "/" not in rel:
                out[rel] = info.size
        return out

    def list(self) -> list[tuple[int, str]]:
        """Every checkpoint data file under the root (complete or not), oldest first, as (iteration, uri)."""
        found = []
        for name in self._listing():
            m = _CKPT_RE.match(name)
            if m:
                found.append((int(m.group(1)), storage.join(self.root, name)))
        return sorted(found)

    # ------------------------------------------------------------------ save
    def save(self, iteration: int, state: dict) -> str:
        uri = self.uri_for(iteration)
        if self.rank != 0:
            return uri
        if not isinstance(state, dict):
            raise TypeError(f"checkpoint {uri}: state must be a dict, got {type(state).__name__}")
        check_weights_only_types(state, where=f"checkpoint {iteration} state")
        if self.cleaned_temps is None:  # the writer of this run: remove what killed saves of earlier runs left
            self.cleaned_temps = self._clean_stale_temps()
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getbuffer()
        record = {
            "format": _FORMAT_VERSION,
            "checkpoint": _basename(uri),
            "iteration": iteration,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        t0 = time.perf_counter()
        self._write_data(uri, data)
        record_json = json.dumps(record, indent=1).encode()
        storage.write_bytes(uri + _RECORD_SUFFIX, record_json)
        storage.write_bytes(self.pointer_uri, record_json)  # last: from here on, resumes use this checkpoint
        log.info("saved checkpoint %s (%.1f MiB, %.2f s)", uri, len(data) / 2**20, time.perf_counter() - t0)
        self._prune(keep=iteration)
        return uri

    def _write_data(self, uri: str, data) -> None:
        if storage.is_s3(uri) and len(data) >= self.upload_threshold_bytes:
            fd, tmp = tempfile.mkstemp(prefix=temp_prefix("ckpt"), suffix=".pt")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                storage.upload_file(tmp, uri)
            finally:
                Path(tmp).unlink(missing_ok=True)
        elif storage.is_s3(uri):
            storage.write_bytes(uri, bytes(data))
        else:  # the local atomic write takes the buffer as is: no extra copy of a multi-GB state
            storage.write_bytes(uri, data)

    def _clean_stale_temps(self) -> int:
        """Temp files of killed saves: multipart staging files in the temp dir (owner pid in the name); for a local
        root, the storage layer's hidden siblings of interrupted atomic writes (by age); on S3, the incomplete
        multipart uploads of killed saves (their parts are billed until aborted). Counted, logged."""
        n = clean_stale_temps("ckpt")
        if storage.is_s3(self.root):
            n += abort_incomplete_uploads(self.root, self._created)
        else:
            n += clean_stale_temps("ckpt", str(storage.local_path(self.root)), dot_pattern=_DOT_TMP_RE)
        return n

    def _prune(self, keep: int) -> None:
        if self.keep_last == 0:
            return
        older = self.list()[: -self.keep_last]  # everything but the newest keep_last
        doomed = [(it, uri) for it, uri in older if not self.is_milestone(it) and it != keep]
        for _it, uri in doomed:
            # the record goes first: a crash mid-prune leaves data without a record, which counts as incomplete
            storage.delete(uri + _RECORD_SUFFIX)
            storage.delete(uri)
        if doomed:
            log.info("pruned %d old checkpoint(s): iterations %s", len(doomed), [it for it, _ in doomed])

    # ------------------------------------------------------------------ find
    def _unreadable(self, uri: str, err: Exception) -> CheckpointUnreadable:
        return CheckpointUnreadable(
            f"cannot read {uri} after the storage layer's retries ({err}); not starting over, which would overwrite "
            f"the checkpoints under {self.root}: rerun once storage answers", [uri])

    def _read_json(self, uri: str) -> tuple[dict | None, str]:
        """(record, "") or (None, why it is unusable). A storage error other than a missing object raises
        CheckpointUnreadable: a record we cannot read is not a record that is absent."""
        try:
            raw = storage.read_bytes(uri)
        except storage.StorageError as e:
            if _is_missing(e):
                return None, "missing"
            raise self._unreadable(uri, e) from e
        try:
            rec = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            log.warning("checkpoint record %s is not valid JSON: ignored", uri)
            return None, "not valid JSON"
        if not isinstance(rec, dict) or not {"checkpoint", "iteration", "size", "sha256"} <= set(rec):
            log.warning("checkpoint record %s lacks checkpoint/iteration/size/sha256: ignored", uri)
            return None, "lacks checkpoint/iteration/size/sha256"
        return rec, ""

    def _pointer(self) -> dict | None:
        return self._read_json(self.pointer_uri)[0]

    def _candidates(self) -> tuple[list[tuple[str, dict]], list[tuple[str, str]], list[str]]:
        """(candidates, passed_over, records). Candidates to resume from, best first: the pointer's target (when its
        file is there with the recorded size), then complete checkpoints (data + record, sizes agreeing) newest first
        — only those older than the pointer's iteration when there is a pointer, since newer ones were never
        committed. passed_over: (uri, why) of committed checkpoints that cannot be used. records: every record file
        (pointer included) under the root: when there is one, "no checkpoint" is never the answer."""
        try:
            listing = self._listing()
        except storage.StorageError as e:
            raise self._unreadable(self.root, e) from e
        records = [storage.join(self.root, n) for n in sorted(listing)
                   if n == POINTER_NAME or (n.endswith(_RECORD_SUFFIX) and _CKPT_RE.match(n[: -len(_RECORD_SUFFIX)]))]
        pointer = self._read_json(self.pointer_uri)[0] if POINTER_NAME in listing else None
        out: list[tuple[str, dict]] = []
        passed: list[tuple[str, str]] = []
        below = None
        if pointer is not None:
            name = pointer["checkpoint"]
            below = pointer["iteration"]
            if not _CKPT_RE.match(str(name)):
                log.warning("pointer %s names %r, not a checkpoint file: ignored", self.pointer_uri, name)
                passed.append((self.pointer_uri, f"names {name!r}, not a checkpoint file"))
            elif listing.get(name) == pointer["size"]:
                out.append((storage.join(self.root, name), pointer))
            else:
                got = "missing" if name not in listing else f"{listing[name]} bytes, expected {pointer['size']}"
                log.warning("pointer %s names %s, which is %s: falling back", self.pointer_uri, name, got)
                passed.append((storage.join(self.root, str(name)), got))
        elif POINTER_NAME in listing:
            log.warning("pointer %s is unreadable: falling back to the newest complete checkpoint", self.pointer_uri)
            passed.append((self.pointer_uri, "unreadable pointer"))
        named = out[0][0] if out else None
        for it, uri in reversed(self.list()):
            if uri == named or (below is not None and it >= below):
                continue
            name = _basename(uri)
            if name + _RECORD_SUFFIX not in listing:
                log.warning("checkpoint %s has no integrity record (interrupted save?): skipped", uri)
                continue
            rec, why = self._read_json(uri + _RECORD_SUFFIX)
            if rec is None or rec["size"] != listing[name]:
                why = why or f"{listing[name]} bytes, its record says {rec['size']}"
                log.warning("checkpoint %s does not match its integrity record (%s): skipped", uri, why)
                passed.append((uri, f"record {why}"))
                continue
            out.append((uri, rec))
        return out, passed, records

    def latest(self) -> str | None:
        """URI of the checkpoint to resume from, or None when there is none. Cheap: one LIST and one small read;
        the sha256 is verified by `load()`. CheckpointUnreadable when records exist but cannot be read."""
        cands, _, _ = self._candidates()
        if not cands:
            return None
        return cands[0][0]

    # ------------------------------------------------------------------ load
    def load(self, uri: str | None = None, map_location="cpu") -> dict | None:
        """Load a checkpoint. With a URI: that one, verified against its record (never another). With none: what
        `resolve()` picks (its state), None only when the root holds no checkpoint record at all."""
        if uri is not None:
            record = self._record_for(str(uri))
            data = self._read(str(uri))
            if record is not None:
                problem = _verify(data, record)
                if problem:
                    raise CheckpointError(f"checkpoint {uri} is corrupt: {problem}")
            return _deserialize(data, str(uri), map_location)
        found = self.resolve(map_location)
        return None if found is None else found.state

    def resolve(self, map_location="cpu") -> LoadedCheckpoint | None:
        """The newest checkpoint that verifies and loads: the pointer target first, then older complete ones (each
        fallback past a corrupt one logged and listed in `passed_over`). None when the root holds no checkpoint
        record at all (data files of saves that never committed do not count). CheckpointUnreadable when records
        exist but nothing can be resumed from, or when a read fails after the storage layer's retries (a transient
        failure must not send a run back to an older checkpoint, let alone to iteration 0)."""
        cands, passed, records = self._candidates()
        if not cands:
            if records:
                why = "; ".join(f"{u}: {w}" for u, w in passed) or "no usable record"
                raise CheckpointUnreadable(
                    f"{self.root} holds checkpoint records ({', '.join(_basename(r) for r in records)}) but no "
                    f"checkpoint that can be resumed from ({why}); refusing to start from scratch over them",
                    [u for u, _ in passed] or records)
            leftovers = self.list()
            if leftovers:  # data files of saves that never committed (no record, no pointer): nothing to resume
                log.warning("no committed checkpoint under %s; ignoring incomplete %s", self.root, leftovers)
            return None
        for cand_uri, record in cands:
            data = self._read(cand_uri, missing_ok=True)
            problem = "missing" if data is None else _verify(data, record)
            state = None
            if not problem:
                try:
                    state = _deserialize(data, cand_uri, map_location)
                except CheckpointError as e:
                    problem = str(e)
            if problem:
                log.warning("checkpoint %s is unusable (%s): trying an older checkpoint", cand_uri, problem)
                passed.append((cand_uri, problem))
                continue
            if passed:
                log.warning("resuming from %s instead of the newer unusable %s", cand_uri, passed)
            return LoadedCheckpoint(state, cand_uri, int(record["iteration"]), passed)
        raise CheckpointUnreadable(
            f"no intact checkpoint under {self.root}: every candidate failed verification: "
            + "; ".join(f"{u}: {w}" for u, w in passed), [u for u, _ in passed])

    def _record_for(self, uri: str) -> dict | None:
        pointer = self._pointer()
        if pointer is not None and storage.join(self.root, pointer["checkpoint"]) == uri:
            return pointer
        return self._read_json(uri + _RECORD_SUFFIX)[0]

    def _read(self, uri: str, missing_ok: bool = False) -> bytes | None:
        try:
            return storage.read_bytes(uri)
        except storage.StorageError as e:
            if missing_ok and _is_missing(e):
                return None
            if _is_missing(e):
                raise CheckpointError(f"cannot read checkpoint: {e}") from e
            raise self._unreadable(uri, e) from e


@dataclass
class LoadedCheckpoint:
    """What `resolve()` loaded: the state, exactly which checkpoint it is, and the newer ones passed over (why)."""

    state: dict
    uri: str
    iteration: int
    passed_over: list[tuple[str, str]] = field(default_factory=list)


def _is_missing(err: BaseException) -> bool:
    """The storage error says the object is not there (retrying cannot help); anything else may be transient."""
    return storage_error_kind(err) == "missing"


def _basename(uri: str) -> str:
    return uri.rsplit("/", 1)[-1] if storage.is_s3(uri) else Path(uri).name


def _verify(data: bytes, record: dict) -> str | None:
    if len(data) != record["size"]:
        return f"{len(data)} bytes, its record says {record['size']}"
    digest = hashlib.sha256(data).hexdigest()
    if digest != record["sha256"]:
        return f"sha256 {digest[:12]}..., its record says {str(record['sha256'])[:12]}..."
    return None


def _deserialize(data: bytes, uri: str, map_location) -> dict:
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {uri}: refusing to load it: it holds objects that torch.load(weights_only=True) does not "
            f"allow (only tensors, containers and plain values are accepted) -- {first}"
        ) from e
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"checkpoint {uri} is not a readable torch checkpoint: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {uri} holds a {type(state).__name__}, expected a dict")
    return state


# ----------------------------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict:
    """Every global RNG a training step may touch, in types that torch.load(weights_only=True) accepts.

    Per process: under torchrun each rank has its own RNG streams; capture and store them per rank if exact
    resumption of every rank matters.
    """
    np_state = np.random.get_state(legacy=True)  # ('MT19937', uint32[624], pos, has_gauss, cached_gaussian)
    if np_state[0] != "MT19937":  # pragma: no cover - numpy's global RNG is always MT19937
        raise RuntimeError(f"unexpected numpy global bit generator {np_state[0]!r}")
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # Only this process's current device: get_rng_state_all() would create a CUDA context on every visible GPU
        # in every rank (8 contexts per process on an 8-GPU node).
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": {
            "bit_generator": np_state[0],
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_version), "internal": list(py_internal), "gauss_next": py_gauss},
    }


def restore_rng_state(state: dict) -> None:
    """Restore what capture_rng_state() returned (e.g. after a checkpoint round trip)."""
    if not isinstance(state, dict):
        raise TypeError(f"restore_rng_state: expected a dict, got {type(state).__name__}")
    missing = [k for k in ("torch", "numpy", "python") if k not in state]
    if missing:
        raise KeyError(f"restore_rng_state: RNG state lacks {missing} (keys present: {sorted(state)})")
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda = state.get("cuda")
    if cuda is not None:
        if not torch.cuda.is_available():
            log.warning("checkpoint carries a CUDA RNG state but CUDA is not available: not restored")
        else:
            torch.cuda.set_rng_state(cuda.cpu().to(torch.uint8))  # the current device (LOCAL_RANK's)
    npd = state["numpy"]
    key = npd["key"].numpy() if isinstance(npd["key"], torch.Tensor) else np.asarray(npd["key"])
    np.random.set_state(
        (npd["bit_generator"], key.astype(np.uint32), npd["pos"], npd["has_gauss"], npd["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
