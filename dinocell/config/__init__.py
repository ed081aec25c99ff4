"""One YAML config system for every step.

A config is a tree of dataclasses (`Config` below). YAML files and `--set key.sub=value` overrides are merged onto the
defaults and validated: an unknown or ill-typed field fails with one line naming the field and the file, e.g.
`config error: unknown field 'optim.lrr' in configs/tiny.yaml (did you mean 'lr'?)`.

Sections are defined next to the code that uses them and registered here, so there is one place that knows the tree.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from dinocell.channels import BRIGHTFIELD_CHANNELS, FLUORESCENT_CHANNELS
from dinocell.config.augment import AugmentConfig
from dinocell.config.errors import ConfigError
from dinocell.config.training import LossConfig, ModelConfig, OptimConfig, TrainConfig
from dinocell.storage import StorageConfig

# --------------------------------------------------------------------------- data-path sections


@dataclass
class DataConfig:
    """Where fields come from and how they are split."""

    # Images prefix of a JUMP source (listing mode), and/or load_data CSVs (canonical mode): CSV URIs or prefixes to search.
    images_prefix: str = "s3://cellpainting-gallery/cpg0000-jump-pilot/source_4/images/"
    load_data: list[str] = field(default_factory=list)
    # Re-root stale URL prefixes found in load_data CSVs onto images_prefix.
    reroot_urls: bool = True
    batches: list[str] = field(default_factory=list)  # empty = all
    plates: list[str] = field(default_factory=list)  # empty = all
    channels: list[str] = field(default_factory=lambda: list(FLUORESCENT_CHANNELS))
    # Channels discovery also records (load_data mode) when every field has them, for the evaluation only (the
    # brightfield transfer rows); training and shards use data.channels. A CSV without them is not an error.
    eval_channels: list[str] = field(default_factory=lambda: list(BRIGHTFIELD_CHANNELS))
    max_fields: int = 0  # 0 = no limit
    # Held-out plates for evaluation: explicit list, else this fraction of plates chosen deterministically.
    val_plates: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    split_seed: int = 0
    manifest: str = ""  # URI of the field manifest written by `dinocell discover`
    list_workers: int = 16  # parallel listing across plate prefixes
    # Plate-map metadata for the manifest's perturbation / control_type / target columns: a CSV (URI) with columns
    # plate (or Metadata_Plate), well (or Metadata_Well / well_position), perturbation, control_type, target; when set it
    # replaces the gallery's workspace/metadata/platemaps + external_metadata. Empty: read the gallery's maps.
    plate_metadata: str = ""
    # Batch of load_data rows that name none (no load_data_csv/<BATCH>/ folder, Metadata_Batch or images/<BATCH>/
    # path); empty: the CSV's parent folder name.
    default_batch: str = ""


@dataclass
class PreprocessConfig:
    """16-bit raw channel -> uint8, as the shards and the raw stream both do it."""

    illum_correction: bool = False  # divide by the plate's Illum .npy (needs images/<batch>/illum/<plate>/...)
    percentile_low: float = 0.1
    percentile_high: float = 99.9
    percentile_subsample: int = 4  # estimate percentiles on every 4th pixel in each axis (16x fewer pixels)
    clahe: bool = True
    clahe_clip: float = 3.0
    clahe_tiles: int = 8
    # 2x area downsampling 1080 -> 540: every crop of the augmentation is shrunk >= 2.5x anyway (global 224 from
    # >= 0.32 * 1080^2 area ~ 611 px side), so half resolution loses nothing the model sees and quarters I/O and decode.
    downsample: int = 2


@dataclass
class ShardConfig:
    output: str = ""  # URI prefix for shards + index
    target_bytes: int = 256 * 1024 * 1024
    workers: int = 2  # process pool
    include_brightfield: bool = False
    split: str = "train"  # which manifest split to shard ("train", "val" or "all")


@dataclass
class LoaderConfig:
    mode: Literal["shards", "raw"] = "shards"
    shards: str = ""  # shard index URI (shards mode)
    batch_size: int = 64  # per rank
    num_workers: int = 8
    shuffle_buffer: int = 512
    cache_bytes: int = 2 * 1024**3  # raw mode: per-worker LRU of preprocessed channels
    fetch_workers: int = 8  # raw mode: parallel channel fetches per field
    seed: int = 0


# --------------------------------------------------------------------------- the tree

_SECTIONS: dict[str, type] = {}


def register_section(name: str, cls: type) -> None:
    """Register a section dataclass under a top-level key (used by modules that own a section)."""
    _SECTIONS[name] = cls


# Every section, in the order a resolved config is written. The training sections are plain dataclasses too
# (dinocell.config.training / .augment import no torch), so they are registered here like the data sections.
for _name, _cls in (
    ("storage", StorageConfig),
    ("data", DataConfig),
    ("preprocess", PreprocessConfig),
    ("shard", ShardConfig),
    ("loader", LoaderConfig),
    ("model", ModelConfig),
    ("augment", AugmentConfig),
    ("loss", LossConfig),
    ("optim", OptimConfig),
    ("train", TrainConfig),
):
    register_section(_name, _cls)


class Config:
    """The whole config: one attribute per registered section (`cfg.data.batches`, `cfg.optim.lr`, ...)."""

    def __init__(self, **sections: Any):
        for name, cls in _SECTIONS.items():
            setattr(self, name, sections.pop(name, None) or cls())
        if sections:
            raise ConfigError(f"unknown config section(s): {', '.join(sorted(sections))}")

    def to_dict(self) -> dict:
        return {name: _to_plain(getattr(self, name)) for name in _SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Config({self.to_dict()!r})"


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints are accepted for floats, lists for tuples)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type, data: Any, where: str, base: Any = None) -> Any:
    """Build dataclass `cls` from a mapping, on top of `base` (an instance) or the defaults."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {} if base is None else {n: getattr(base, n) for n in names}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown field '{where + '.' if where else ''}{key}'{hint}")
        tp = hints[key]
        sub = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            kwargs[key] = _build(tp, value, sub, base=kwargs.get(key))
        else:
            kwargs[key] = _coerce(value, tp, sub)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from e
    return obj


def _merge(cfg: Config, data: dict, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"config error in {source}: the top level must be a mapping of sections")
    for name, value in data.items():
        if name not in _SECTIONS:
            close = difflib.get_close_matches(str(name), list(_SECTIONS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known sections: {', '.join(_SECTIONS)})"
            raise ConfigError(f"config error in {source}: unknown section '{name}'{hint}")
        try:
            setattr(cfg, name, _build(_SECTIONS[name], value, name, base=getattr(cfg, name)))
        except ConfigError as e:
            raise ConfigError(f"config error in {source}: {e}") from None


def parse_override(item: str) -> dict:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.lr=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value: {e}") from None
    # YAML 1.1 reads '1e-4' as a string; take it as a number when it is one.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") and value.strip() not in ("", ".") else value
        except ValueError:
            pass
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _read_yaml(path: str) -> dict:
    from dinocell import storage

    try:
        text = storage.read_text(path)
    except storage.StorageError as e:
        raise ConfigError(f"config error: cannot read {path}: {e}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config error in {path}: invalid YAML: {e}") from None
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file (local path or s3:// URI; `base:` key chains another file) <- `key=value` overrides."""
    cfg = Config()
    if path:
        path = str(path)
        data = _read_yaml(path)
        base = data.pop("base", None) if isinstance(data, dict) else None
        if base:
            base_path = base if ("://" in base or Path(base).is_absolute()) else str(Path(path).parent / base)
            cfg = load_config(base_path)
        _merge(cfg, data, path)
    for item in overrides:
        _merge(cfg, parse_override(item), f"--set {item}")
    return cfg


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    cfg = Config()
    _merge(cfg, data, source)
    return cfg


def packaged_config(name: str) -> str:
    """Path of a config shipped inside the package (`dinocell/configs/<name>.yaml`)."""
    p = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    if not p.exists():
        raise ConfigError(f"no packaged config named {name!r} (looked for {p})")
    return str(p)


def resolve_config_path(name_or_path: str) -> str:
    """A path/URI as given, or the name of a packaged config (`tiny`, `vits8_jump`)."""
    if "://" in name_or_path or Path(name_or_path).exists():
        return name_or_path
    if "/" not in name_or_path and not name_or_path.endswith((".yaml", ".yml")):
        return packaged_config(name_or_path)
    raise ConfigError(f"config file not found: {name_or_path}")


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "PreprocessConfig",
    "ShardConfig",
    "LoaderConfig",
    "StorageConfig",
    "load_config",
    "config_from_dict",
    "parse_override",
    "register_section",
    "resolve_config_path",
]
_ = typing  # keep typing imported for get_type_hints on string annotations
