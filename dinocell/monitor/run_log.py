"""Run logging: local logs that always exist and Weights & Biases when asked for (images: dinocell.monitor.figures).

`RunLogger` writes, on rank 0 only:
- `run_dir/config.yaml`: the run's configuration;
- `run_dir/metrics.jsonl`: one JSON object per `log_scalars` call: {"step", "time" (unix s), "elapsed_s", values...}
  under the caller's keys; non-finite floats are written as the strings "nan", "inf", "-inf" (strict JSON has no NaN,
  and a NaN loss must not vanish from the log);
- `run_dir/images/<name>/<step:08d>.png` for every `log_image` call;
- W&B, mirrored from the same calls, when the mode is not "disabled".

W&B keys (`wandb_key`): W&B users read a run by its panel sections, so the trainer's flat keys are renamed for W&B
only (metrics.jsonl keeps the caller's keys): the schedule values go under `training/` (`lr` -> `training/lr`,
`epoch` -> `training/epoch`, `momentum` -> `training/teacher_momentum`, ...), throughput under `perf/`, the skip
counters under `training/`; `loss/*`, `grad_norm/*`, `augment/*`, `data/*`, `consistency/*` and any other key pass
unchanged. The GPU is read here, not in the loop (`gpu_scalars`): every W&B record gets `system/gpu_memory_gb` and
`system/gpu_memory_reserved_gb` (now), `system/gpu_memory_peak_gb` (peak allocated since the start; GB = 1e9 bytes)
and `system/gpu_util` (percent, torch.cuda.utilization(), which needs NVML: without it the key is left out, never a
made-up 0), when CUDA is in use in this process. The trainer's own `gpu_mem_gib` is not sent (the peak above says it).

W&B mode precedence: the `WANDB_MODE` environment variable, when set (online, offline, disabled; wandb's aliases
"run" and "dryrun" too), wins over the mode argument (the config's `train.wandb_mode`): a cluster or CI sets it for
every run without editing configs, as with any other wandb program. Unset, the argument decides ("env" or None then
means "disabled"). W&B is never required: when wandb cannot be imported or its init fails, one warning is logged and
the local logs carry on. Offline runs go to `$WANDB_DIR` when set, else inside the run directory (so `sync_to` ships
them along). The W&B run id is kept in `run_dir/wandb_id.txt`, so a restarted job resumes the same W&B run.

For an s3:// output the trainer logs to a local run directory and calls `sync_to(uri)` now and then: it uploads the
files that changed since the previous sync.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import torch

from dinocell import storage
from dinocell.log import get_logger

__all__ = ["WANDB_KEYS", "RunLogger", "encode_png", "gpu_scalars", "resolve_wandb_mode", "wandb_key"]

log = get_logger(__name__)

_WANDB_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}
_IMAGE_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
_warned_no_wandb = False


def resolve_wandb_mode(mode: str | None) -> str:
    """The effective W&B mode: $WANDB_MODE when set, else `mode` (see the module docstring)."""
    if mode is not None and mode not in ("online", "offline", "disabled", "env"):
        raise ValueError(f"train.wandb_mode must be 'online', 'offline', 'disabled' or 'env', got {mode!r}")
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        if env not in _WANDB_MODES:
            raise ValueError(f"WANDB_MODE={env!r} is not one of {sorted(_WANDB_MODES)}")
        return _WANDB_MODES[env]
    return "disabled" if mode in (None, "env") else mode


# The trainer's keys (dinocell.train.loop) -> W&B's; None: not sent to W&B. Keys not listed pass unchanged.
WANDB_KEYS: dict[str, str | None] = {
    "lr": "training/lr",
    "last_layer_lr": "training/last_layer_lr",
    "wd": "training/weight_decay",
    "momentum": "training/teacher_momentum",
    "teacher_temp": "training/teacher_temp",
    "epoch": "training/epoch",
    "skipped_total": "training/skipped_updates",
    "skipped": "training/skipped_updates",
    "nonfinite/iteration": "training/nonfinite_iteration",
    "fields_per_s": "perf/fields_per_s",
    "s_per_iter": "perf/s_per_iter",
    "data_wait_s_per_iter": "perf/data_wait_s_per_iter",
    "gpu_mem_gib": None,  # the peak allocated memory: system/gpu_memory_peak_gb says it (gpu_scalars)
}


def wandb_key(key: str) -> str | None:
    return WANDB_KEYS.get(key, key)


_gpu_util_broken = False  # torch.cuda.utilization raised once (no NVML): not asked again


def gpu_scalars() -> dict[str, float]:
    """system/gpu_* of this process's current CUDA device (see the module docstring); {} when CUDA is not in use.

    Only a process that already initialised CUDA is asked: a CPU run on a GPU machine must not create a context."""
    global _gpu_util_broken
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    dev = torch.cuda.current_device()
    out = {
        "system/gpu_memory_gb": torch.cuda.memory_allocated(dev) / 1e9,
        "system/gpu_memory_reserved_gb": torch.cuda.memory_reserved(dev) / 1e9,
        "system/gpu_memory_peak_gb": torch.cuda.max_memory_allocated(dev) / 1e9,
    }
    if not _gpu_util_broken:
        try:
            out["system/gpu_util"] = float(torch.cuda.utilization(dev))
        except Exception as e:  # noqa: BLE001 - NVML missing or unsupported: leave the key out, never a fake 0
            _gpu_util_broken = True
            log.info("system/gpu_util not logged: torch.cuda.utilization failed (%s: %s)", type(e).__name__, e)
    return out


def _plain(value, path: str = "config"):
    """Config values as YAML/JSON-safe plain types (tuples -> lists, paths -> str, dataclasses -> dicts)."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{path}: a {type(value).__name__} cannot be written to config.yaml (use plain values)")


def _scalar_values(values: dict) -> dict:
    """Numbers (python, numpy, one-element tensors) -> python numbers; tensors are fetched in one transfer per device."""
    out: dict = {}
    tensors: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for key, v in values.items():
        if not isinstance(key, str):
            raise TypeError(f"log_scalars: key {key!r} is not a string")
        if key in ("step", "time", "elapsed_s"):
            raise ValueError(f"log_scalars: key {key!r} is reserved")
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(f"log_scalars: {key!r} is a tensor of shape {tuple(v.shape)}, expected one value")
            tensors.setdefault(v.device, []).append((key, v.detach().reshape(())))
            out[key] = None  # keeps the caller's key order
        elif isinstance(v, (bool, int, float, np.integer, np.floating, np.bool_)):
            out[key] = v.item() if isinstance(v, np.generic) else v
        else:
            raise TypeError(f"log_scalars: {key!r} is a {type(v).__name__}, expected a number")
    for items in tensors.values():
        fetched = torch.stack([t.double() for _, t in items]).tolist()
        for (key, t), x in zip(items, fetched):
            out[key] = int(x) if not t.is_floating_point() and not t.is_complex() else x
    return out


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def encode_png(rgb: np.ndarray) -> bytes:
    """RGB uint8 [H, W, 3] -> PNG bytes."""
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:  # pragma: no cover - OpenCV only fails here on invalid input, which is checked before
        raise RuntimeError("cv2.imencode failed to encode a PNG")
    return buf.tobytes()


def _check_rgb(rgb, where: str) -> np.ndarray:
    if isinstance(rgb, torch.Tensor):
        rgb = rgb.detach().cpu().numpy()
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"{where}: expected an RGB uint8 array [H, W, 3], got {rgb.dtype} {rgb.shape}")
    return rgb


class RunLogger:
    def __init__(
        self,
        run_dir: str | os.PathLike,
        config_dict: dict,
        wandb_mode: str | None = "disabled",
        wandb_project: str = "dinocell",
        run_name: str | None = None,
        rank: int = 0,
    ):
        self.rank = rank
        self.enabled = rank == 0
        self.run_dir = Path(run_dir)
        self.wandb_mode = resolve_wandb_mode(wandb_mode)
        self._wandb = None  # the wandb module once a run is live
        self._run = None
        self._metrics = None
        self._t0 = time.time()
        self._synced: dict[str, tuple[int, int]] = {}
        if not self.enabled:
            return
        if storage.is_s3(str(run_dir)):
            raise ValueError(f"RunLogger: run_dir must be local, got {run_dir}; log locally and call sync_to(s3 uri)")
        config = _plain(config_dict)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        storage.write_text(str(self.run_dir / "config.yaml"), yaml.safe_dump(config, sort_keys=False))
        # append: a resumed run keeps its earlier lines
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - open for the run
        if self.wandb_mode != "disabled":
            self._start_wandb(config, wandb_project, run_name)

    # ------------------------------------------------------------------ W&B
    def _start_wandb(self, config: dict, project: str, run_name: str | None) -> None:
        global _warned_no_wandb
        try:
            import wandb
        except ImportError:
            if not _warned_no_wandb:
                log.warning("wandb mode %r but wandb is not installed: logging locally only", self.wandb_mode)
                _warned_no_wandb = True
            return
        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        storage.write_text(str(id_file), run_id + "\n")
        wandb_dir = os.environ.get("WANDB_DIR") or str(self.run_dir)
        try:
            self._run = wandb.init(
                project=project,
                name=run_name,
                id=run_id,
                resume="allow",
                config=config,
                dir=wandb_dir,
                mode=self.wandb_mode,
                reinit="create_new",
            )
            self._wandb = wandb
        except Exception as e:  # noqa: BLE001 - W&B must never stop training (no network, bad key, ...)
            log.warning("wandb init failed (%s: %s): logging locally only", type(e).__name__, e)
            self._run = None

    @staticmethod
    def _wandb_record(scalars: dict) -> dict:
        """The W&B record of one log_scalars call: renamed keys (WANDB_KEYS) plus the GPU's system/* values."""
        record = {}
        for key, value in scalars.items():
            name = wandb_key(key)
            if name is not None:
                record[name] = value
        record.update(gpu_scalars())
        return record

    @property
    def wandb_run(self):
        """The live wandb Run, or None."""
        return self._run

    # ------------------------------------------------------------------ logging
    def log_scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        if self._metrics is None:
            raise RuntimeError(f"RunLogger({self.run_dir}) is closed")
        scalars = _scalar_values(values)
        now = time.time()
        record = {"step": int(step), "time": round(now, 3), "elapsed_s": round(now - self._t0, 3)}
        record.update({k: _json_safe(v) for k, v in scalars.items()})
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()  # a crash loses at most the line being written
        if self._run is not None:
            self._run.log(self._wandb_record(scalars), step=int(step))

    def log_image(self, step: int, name: str, rgb_uint8) -> str | None:
        """Write images/<name>/<step:08d>.png (name may have '/'-separated parts); returns the path on rank 0."""
        if not self.enabled:
            return None
        if not isinstance(name, str) or not _IMAGE_NAME_RE.match(name) or ".." in name.split("/"):
            raise ValueError(f"log_image: bad image name {name!r} (letters, digits, _ . - and '/' between parts)")
        rgb = _check_rgb(rgb_uint8, f"log_image({name!r})")
        path = self.run_dir / "images" / name / f"{int(step):08d}.png"
        storage.write_bytes(str(path), encode_png(rgb))
        if self._run is not None:
            self._run.log({name: self._wandb.Image(rgb)}, step=int(step))
        return str(path)

    def sync_to(self, uri: str) -> int:
        """Upload the run directory's files that changed since the last sync to `uri`; returns how many."""
        if not self.enabled:
            return 0
        if self._metrics is not None:
            self._metrics.flush()
        uploaded = vanished = 0
        for path in sorted(p for p in self.run_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(self.run_dir).as_posix()
            try:
                st = path.stat()
                sig = (st.st_mtime_ns, st.st_size)
                if self._synced.get(rel) == sig:
                    continue
                storage.upload_file(path, storage.join(uri, rel))
            except FileNotFoundError:  # a temp file that W&B removed between listing and upload
                vanished += 1
                continue
            self._synced[rel] = sig
            uploaded += 1
        if vanished:
            log.info("sync_to %s: %d file(s) vanished during the sync (temporary files), not uploaded", uri, vanished)
        return uploaded

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._run is not None:
            try:
                self._run.finish()
            finally:
                self._run = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
