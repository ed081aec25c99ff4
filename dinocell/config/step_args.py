"""Arguments of the pipeline steps in every form a caller holds them: CLI flags, Python values, KFP parameters.

A step takes its config as a packaged name, path or URI plus `key=value` overrides (`parse_overrides` accepts a list,
a mapping, or a JSON/YAML string of either), so the same arguments work from Python, the CLI and a pipeline
parameter. `load_step_config` resolves them and points the storage layer at the right endpoint first (the config
file itself may live in object storage).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from dinocell import storage

__all__ = ["StepError", "configure_storage", "load_step_config", "parse_json_arg", "parse_overrides", "str_list"]


class StepError(ValueError):
    """A step argument is unusable; the message names the argument and the value."""


def _flatten(mapping: Mapping, prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out += _flatten(value, name + ".")
        else:
            # JSON is YAML: parse_override reads the value back with yaml.safe_load, types intact (a string stays
            # quoted, so "yes" or "1.0" remain strings instead of turning into a bool or a number).
            out.append(f"{name}={json.dumps(value)}")
    return out


def parse_overrides(value: Any, where: str = "overrides") -> list[str]:
    """Config overrides in any of the forms a pipeline parameter or a caller may hold, as `key=value` strings.

    Accepted: None / "" (none); a list of "key=value" strings; a mapping (nested or dotted keys -> values); a JSON or
    YAML string holding either; or plain text with one "key=value" per line.
    """
    if value is None:
        return []
    if isinstance(value, Mapping):
        return _flatten(value)
    if isinstance(value, (list, tuple)):
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or "=" not in item or item.startswith("="):
                raise StepError(f"{where}[{i}]: expected a 'key=value' string, got {item!r}")
            out.append(item.strip())
        return out
    if not isinstance(value, str):
        raise StepError(f"{where}: expected a list, a mapping or a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        return []
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = None
    if isinstance(parsed, (list, Mapping)):
        return parse_overrides(parsed, where)
    return parse_overrides([line.strip() for line in text.splitlines() if line.strip()], where)


def parse_json_arg(value: Any, kind: type, where: str) -> Any:
    """A dict or list argument given as itself, as a JSON/YAML string, or empty (-> an empty one)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return kind()
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise StepError(f"{where}: not valid JSON/YAML: {e}") from None
        if value is None:
            return kind()
    if kind is dict and not isinstance(value, Mapping):
        raise StepError(f"{where}: expected a mapping, got {value!r}")
    if kind is list and isinstance(value, Mapping):
        value = [value]  # one toleration given on its own
    if kind is list and not isinstance(value, (list, tuple)):
        raise StepError(f"{where}: expected a list, got {value!r}")
    return kind(value)


def str_list(value: Any, where: str) -> list[str]:
    """A list of URIs given as a list, a JSON/YAML list string, or a comma/newline separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return str_list(parse_json_arg(text, list, where), where)
        return [p.strip() for p in re.split(r"[,\n]", text) if p.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise StepError(f"{where}: expected a list of strings, got {value!r}")
    return [v.strip() for v in value if v.strip()]


def configure_storage(endpoint_url: str = "", anonymous: bool | None = None, base=None):
    """Point the storage layer (and child processes, through AWS_ENDPOINT_URL) at an S3 endpoint.

    Precedence: the explicit arguments (an empty endpoint and anonymous None/False count as not given; to turn
    anonymous access off against a config that sets it, override `storage.anonymous=false`), then `base` (a StorageConfig,
    e.g. the config's `storage` section), then what this process already uses (an earlier `storage.configure` or the
    environment). Returns the StorageConfig now in force.
    """
    current = storage.get_config()
    cfg = base if base is not None else current
    changes: dict[str, Any] = {}
    if endpoint_url:
        changes["endpoint_url"] = endpoint_url
        os.environ["AWS_ENDPOINT_URL"] = endpoint_url  # torchrun children and anything else spawned from here
    elif cfg.endpoint_url is None and current.endpoint_url:
        changes["endpoint_url"] = current.endpoint_url
    if anonymous:
        changes["anonymous"] = True
    elif cfg.anonymous is None and current.anonymous is not None:
        changes["anonymous"] = current.anonymous
    cfg = dataclasses.replace(cfg, **changes) if changes else cfg
    storage.configure(cfg)
    return cfg


def load_step_config(config: str, overrides: Any = (), endpoint_url: str = "", anonymous: bool | None = None):
    """The resolved Config of a step (packaged name, path or URI + overrides), with storage configured from it."""
    from dinocell.config import load_config, resolve_config_path

    # The config file itself may live in object storage: configure the endpoint before reading it.
    configure_storage(endpoint_url, anonymous)
    path = resolve_config_path(config) if config else None
    cfg = load_config(path, parse_overrides(overrides))
    cfg.storage = configure_storage(endpoint_url, anonymous, base=cfg.storage)
    return cfg
