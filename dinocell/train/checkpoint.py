"""Training checkpoints on a local directory or an s3:// prefix, safe against crashes and bit rot.

Layout under the root:

    ckpt-00001000.pt        torch.save of the state dict (written atomically)
    ckpt-00001000.pt.json   its integrity record {iteration, size, sha256}, written after the data
    latest.json             the pointer naming the checkpoint to resume from, written LAST

Why: a crash at any moment leaves either the previous pointer (naming an intact older checkpoint) or the new one
(naming a checkpoint whose data and record are already complete). The sha256 catches files that were truncated or
altered after the fact; `load()` then falls back to the newest older checkpoint that verifies, with a warning.

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
import hashlib
import io
import json
import os
import pickle
import random
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dinocell import storage
from dinocell.log import get_logger

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "capture_rng_state",
    "check_weights_only_types",
    "restore_rng_state",
]

log = get_logger(__name__)

POINTER_NAME = "latest.json"
_CKPT_RE = re.compile(r"^ckpt-(\d{8,})\.pt$")
_RECORD_SUFFIX = ".json"  # record of ckpt-N.pt is ckpt-N.pt.json
_FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, verified or loaded; the message names the URI and the reason."""


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
            fd, tmp = tempfile.mkstemp(prefix="dinocell-ckpt-", suffix=".pt")
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
    def _read_json(self, uri: str) -> dict | None:
        try:
            rec = json.loads(storage.read_bytes(uri))
        except storage.StorageError:
            return None
        except (ValueError, UnicodeDecodeError):
            log.warning("checkpoint record %s is not valid JSON: ignored", uri)
            return None
        if not isinstance(rec, dict) or not {"checkpoint", "iteration", "size", "sha256"} <= set(rec):
            log.warning("checkpoint record %s lacks checkpoint/iteration/size/sha256: ignored", uri)
            return None
        return rec

    def _pointer(self) -> dict | None:
        return self._read_json(self.pointer_uri)

    def _candidates(self) -> list[tuple[str, dict]]:
        """Checkpoints to resume from, best first: the pointer's target (when its file is there with the recorded
        size), then complete checkpoints (data + record, sizes agreeing) newest first — only those older than the
        pointer's iteration when there is a pointer, since newer ones were never committed."""
        listing = self._listing()
        pointer = self._pointer()
        out: list[tuple[str, dict]] = []
        below = None
        if pointer is not None:
            name = pointer["checkpoint"]
            below = pointer["iteration"]
            if not _CKPT_RE.match(str(name)):
                log.warning("pointer %s names %r, not a checkpoint file: ignored", self.pointer_uri, name)
            elif listing.get(name) == pointer["size"]:
                out.append((storage.join(self.root, name), pointer))
            else:
                got = "missing" if name not in listing else f"{listing[name]} bytes, expected {pointer['size']}"
                log.warning("pointer %s names %s, which is %s: falling back", self.pointer_uri, name, got)
        elif POINTER_NAME in listing:
            log.warning("pointer %s is unreadable: falling back to the newest complete checkpoint", self.pointer_uri)
        named = out[0][0] if out else None
        for it, uri in reversed(self.list()):
            if uri == named or (below is not None and it >= below):
                continue
            name = _basename(uri)
            if name + _RECORD_SUFFIX not in listing:
                log.warning("checkpoint %s has no integrity record (interrupted save?): skipped", uri)
                continue
            rec = self._read_json(uri + _RECORD_SUFFIX)
            if rec is None or rec["size"] != listing[name]:
                log.warning("checkpoint %s does not match its integrity record (size): skipped", uri)
                continue
            out.append((uri, rec))
        return out

    def latest(self) -> str | None:
        """URI of the checkpoint to resume from, or None when there is none. Cheap: one LIST and one small read;
        the sha256 is verified by `load()`."""
        cands = self._candidates()
        if not cands:
            return None
        return cands[0][0]

    # ------------------------------------------------------------------ load
    def load(self, uri: str | None = None, map_location="cpu") -> dict | None:
        """Load a checkpoint. With no URI: the newest one that verifies (pointer target first, then older complete
        ones, each fallback logged as a warning); None when the root holds no checkpoint at all; CheckpointError
        when checkpoints exist but none verifies (a run must not silently start from scratch)."""
        if uri is not None:
            record = self._record_for(str(uri))
            data = self._read(str(uri))
            if record is not None:
                problem = _verify(data, record)
                if problem:
                    raise CheckpointError(f"checkpoint {uri} is corrupt: {problem}")
            return _deserialize(data, str(uri), map_location)
        cands = self._candidates()
        if not cands:
            pointer = self._pointer()
            if pointer is not None:
                raise CheckpointError(
                    f"{self.pointer_uri} names {pointer['checkpoint']}, which is missing or incomplete, and no older "
                    f"complete checkpoint exists under {self.root}"
                )
            leftovers = self.list()
            if leftovers:  # data files of saves that never committed (no record, no pointer): nothing to resume
                log.warning("no committed checkpoint under %s; ignoring incomplete %s", self.root, leftovers)
            return None
        tried = []
        for cand_uri, record in cands:
            try:
                data = self._read(cand_uri)
            except CheckpointError as e:
                log.warning("%s: trying an older checkpoint", e)
                tried.append(cand_uri)
                continue
            problem = _verify(data, record)
            if problem:
                log.warning("checkpoint %s is corrupt (%s): trying an older checkpoint", cand_uri, problem)
                tried.append(cand_uri)
                continue
            if tried:
                log.warning("resuming from %s instead of the newer corrupt %s", cand_uri, tried)
            return _deserialize(data, cand_uri, map_location)
        raise CheckpointError(f"no intact checkpoint under {self.root}: every candidate failed verification: {tried}")

    def _record_for(self, uri: str) -> dict | None:
        pointer = self._pointer()
        if pointer is not None and storage.join(self.root, pointer["checkpoint"]) == uri:
            return pointer
        return self._read_json(uri + _RECORD_SUFFIX)

    @staticmethod
    def _read(uri: str) -> bytes:
        try:
            return storage.read_bytes(uri)
        except storage.StorageError as e:
            raise CheckpointError(f"cannot read checkpoint: {e}") from e


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
