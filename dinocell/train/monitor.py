"""Run monitoring: local logs that always exist, Weights & Biases when asked for, and the diagnostic images.

`RunLogger` writes, on rank 0 only:
- `run_dir/config.yaml`: the run's configuration;
- `run_dir/metrics.jsonl`: one JSON object per `log_scalars` call: {"step", "time" (unix s), "elapsed_s", values...};
  non-finite floats are written as the strings "nan", "inf", "-inf" (strict JSON has no NaN, and a NaN loss must not
  vanish from the log);
- `run_dir/images/<name>/<step:08d>.png` for every `log_image` call;
- W&B, mirrored from the same calls, when the mode is not "disabled".

W&B mode precedence: an explicit "online" / "offline" / "disabled" argument wins; "env" (or None) reads the
`WANDB_MODE` environment variable (online, offline, disabled; wandb's aliases "run" and "dryrun" too) and means
"disabled" when it is unset. W&B is never required: when wandb cannot be imported or its init fails, one warning is
logged and the local logs carry on. Offline runs go to `$WANDB_DIR` when set, else inside the run directory (so
`sync_to` ships them along). The W&B run id is kept in `run_dir/wandb_id.txt`, so a restarted job resumes the same
W&B run.

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
import torch.nn.functional as F

from dinocell import storage
from dinocell.log import get_logger

__all__ = ["RunLogger", "attention_maps_image", "encode_png", "matrix_image", "pca_rgb_image"]

log = get_logger(__name__)

_WANDB_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}
_IMAGE_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
_warned_no_wandb = False


def resolve_wandb_mode(mode: str | None) -> str:
    """The effective W&B mode (see the module docstring for the precedence)."""
    if mode is None or mode == "env":
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        if not env:
            return "disabled"
        if env not in _WANDB_MODES:
            raise ValueError(f"WANDB_MODE={env!r} is not one of {sorted(_WANDB_MODES)}")
        return _WANDB_MODES[env]
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"wandb_mode must be 'online', 'offline', 'disabled' or 'env', got {mode!r}")
    return mode


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
            self._run.log(scalars, step=int(step))

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


# ----------------------------------------------------------------------------------------------- images


def _as_images(images, n: int, where: str) -> torch.Tensor:
    """[B, C, H, W] float -> [n, H, W] in [0, 1]: channels averaged, each image min-max scaled on its own."""
    images = torch.as_tensor(images).detach().float().cpu()
    if images.ndim != 4 or images.shape[0] < n:
        raise ValueError(f"{where}: images must be [B >= {n}, C, H, W], got {tuple(images.shape)}")
    grey = images[:n].mean(dim=1)
    return _minmax(grey.reshape(n, -1)).reshape(grey.shape)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Scale each row of [N, K] to [0, 1] (constant rows -> 0)."""
    lo = x.min(dim=1, keepdim=True).values
    span = x.max(dim=1, keepdim=True).values - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), torch.zeros_like(x))


def _grid_maps(values: torch.Tensor, grid_hw, size_hw, where: str) -> torch.Tensor:
    """[N, HW] patch values -> [N, H, W] by nearest upsampling (each patch stays a visible square)."""
    gh, gw = (int(g) for g in grid_hw)
    if values.shape[-1] != gh * gw:
        raise ValueError(f"{where}: {values.shape[-1]} patch values do not match grid_hw {gh}x{gw} = {gh * gw}")
    maps = values.reshape(-1, 1, gh, gw)
    return F.interpolate(maps, size=tuple(size_hw), mode="nearest")[:, 0]


def _colormap(name: str) -> torch.Tensor:
    import matplotlib

    lut = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]
    return torch.from_numpy(lut).float()


def _tile(rows: list[list[torch.Tensor]], pad: int = 2) -> np.ndarray:
    """Rows of equally sized [H, W, 3] tiles in [0, 1] -> one uint8 image with `pad` white pixels between tiles."""
    h, w = rows[0][0].shape[:2]
    ncols = max(len(r) for r in rows)
    out = torch.ones(pad + len(rows) * (h + pad), pad + ncols * (w + pad), 3)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = tile
    return (out.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()


def attention_maps_image(
    attn, grid_hw, images, n_heads: int = 3, max_images: int = 8, alpha: float = 0.6
) -> np.ndarray:
    """One row per image: the input (grey), the head-averaged CLS attention over it, then `n_heads` single heads.

    attn [B, heads, HW] (from `get_last_self_attention`), images [B, C, H, W] float (channels averaged for display).
    Every map is min-max scaled on its own (attention weights are tiny and skewed) and drawn with 'inferno' over the
    grey input at opacity `alpha`.
    """
    attn = torch.as_tensor(attn).detach().float().cpu()
    if attn.ndim != 3:
        raise ValueError(f"attention_maps_image: attn must be [B, heads, HW], got {tuple(attn.shape)}")
    n = min(attn.shape[0], max_images)
    heads = min(max(int(n_heads), 0), attn.shape[1])
    grey = _as_images(images, n, "attention_maps_image")
    hw = grey.shape[1:]
    maps = torch.cat([attn[:n].mean(dim=1, keepdim=True), attn[:n, :heads]], dim=1)  # [n, 1 + heads, HW]
    maps = _minmax(maps.reshape(n * (1 + heads), -1))
    up = _grid_maps(maps, grid_hw, hw, "attention_maps_image").reshape(n, 1 + heads, *hw)
    lut = _colormap("inferno")
    rows = []
    for i in range(n):
        base = grey[i, :, :, None].expand(*hw, 3)
        row = [base]
        for k in range(1 + heads):
            heat = lut[(up[i, k] * 255).round().long()]
            row.append((1 - alpha) * base + alpha * heat)
        rows.append(row)
    return _tile(rows)


def pca_rgb_image(patch_tokens, grid_hw, images, max_images: int = 8) -> np.ndarray:
    """One row per image: the input (grey) and its patch features' first 3 principal components as RGB.

    The PCA is fitted jointly over the shown images' patches, and each component is min-max scaled over all of them,
    so equal colours mean similar features across images too. Component signs are fixed (largest loading positive)
    so the colours do not flip between calls on similar features.
    """
    tokens = torch.as_tensor(patch_tokens).detach().double().cpu()
    if tokens.ndim != 3:
        raise ValueError(f"pca_rgb_image: patch_tokens must be [B, HW, D], got {tuple(tokens.shape)}")
    n = min(tokens.shape[0], max_images)
    grey = _as_images(images, n, "pca_rgb_image")
    hw = grey.shape[1:]
    x = tokens[:n].reshape(-1, tokens.shape[2])
    x = x - x.mean(dim=0, keepdim=True)
    k = min(3, x.shape[1])
    if x.shape[0] > 1:
        _, vecs = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
        vecs = vecs[:, -k:].flip(1)
        signs = torch.sign(vecs.gather(0, vecs.abs().argmax(dim=0, keepdim=True)))
        comps = x @ (vecs * signs)
    else:
        comps = torch.zeros(x.shape[0], k, dtype=x.dtype)
    if k < 3:
        comps = torch.cat([comps, comps.new_zeros(comps.shape[0], 3 - k)], dim=1)
    rgb = _minmax(comps.T).T.float()  # [n * HW, 3], each component over all patches
    per_image = rgb.reshape(n, -1, 3).permute(0, 2, 1).reshape(n * 3, -1)
    up = _grid_maps(per_image, grid_hw, hw, "pca_rgb_image").reshape(n, 3, *hw).permute(0, 2, 3, 1)
    rows = [[grey[i, :, :, None].expand(*hw, 3), up[i]] for i in range(n)]
    return _tile(rows)


def matrix_image(
    matrix, labels, title: str = "", fmt: str = ".2f", vmin: float | None = None, vmax: float | None = None,
    cmap: str = "viridis",
) -> np.ndarray:  # fmt: skip
    """A [V, V] matrix as an annotated heatmap (rows and columns labelled), rendered with matplotlib's Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.asarray(torch.as_tensor(matrix).detach().cpu().double() if isinstance(matrix, torch.Tensor) else matrix,
                   dtype=np.float64)  # fmt: skip
    labels = [str(x) for x in labels]
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(labels):
        raise ValueError(f"matrix_image: expected a [V, V] matrix with V = {len(labels)} labels, got {m.shape}")
    v = len(labels)
    side = max(3.5, 0.65 * v + 2.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = m[np.isfinite(m)]
    lo = vmin if vmin is not None else (finite.min() if finite.size else 0.0)
    hi = vmax if vmax is not None else (finite.max() if finite.size else 1.0)
    im = ax.imshow(m, cmap=cmap, vmin=lo, vmax=hi)
    ax.set_xticks(range(v), labels=labels, rotation=45, ha="right")
    ax.set_yticks(range(v), labels=labels)
    mid = (lo + hi) / 2
    for i in range(v):
        for j in range(v):
            val = m[i, j]
            text = format(val, fmt) if np.isfinite(val) else "nan"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if val > mid else "white")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
