"""Submitting a compiled pipeline to a KFP endpoint, the Python twin of `kfp run create`.

    kfp --endpoint URL run create -e EXPERIMENT -r RUN -f pipeline.yaml output_root=s3://bucket/dinocell ...

Values are typed by the parameters the package declares, so a string parameter stays a string
(`model_version=1.0` is "1.0"), and JSON is read where the parameter is a list or a mapping.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["check_starting_weights", "parse_arguments", "pipeline_parameters", "submit"]


def pipeline_parameters(package: str | os.PathLike) -> dict[str, dict]:
    """The root input parameters of a compiled pipeline: name -> {"type": KFP parameterType, "default": ...}."""
    import yaml

    with open(package) as f:
        docs = list(yaml.safe_load_all(f))
    spec = docs[0]
    params = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    return {name: {"type": p.get("parameterType"), "default": p.get("defaultValue")} for name, p in params.items()}


def parse_arguments(items: Sequence[str], parameters: dict[str, dict]) -> dict[str, Any]:
    """`key=value` strings -> arguments typed by the pipeline's declared parameter types.

    Unlike a blind JSON parse, a string parameter stays a string (`model_version=1.0` is "1.0", not 1.0).
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ValueError(f"argument {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        if key not in parameters:
            raise ValueError(f"argument {key!r} is not a pipeline parameter; known: {', '.join(sorted(parameters))}")
        kind = parameters[key]["type"]
        try:
            if kind == "STRING":
                value: Any = raw
            elif kind == "NUMBER_INTEGER":
                value = int(raw)
            elif kind == "NUMBER_DOUBLE":
                value = float(raw)
            elif kind == "BOOLEAN":
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError("expected true or false")
                value = raw.lower() in ("true", "1", "yes")
            elif kind == "LIST":
                value = json.loads(raw)
                if not isinstance(value, list):
                    raise ValueError("expected a JSON list")
            elif kind == "STRUCT":
                value = json.loads(raw)
                if not isinstance(value, dict):
                    raise ValueError("expected a JSON object")
            else:
                value = raw
        except (ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"argument {key}={raw!r}: parameter type {kind}: {e}") from None
        out[key] = value
    return out


def check_starting_weights(args: dict, params: dict) -> None:
    """Refuse before anything runs on the cluster when the training config would start from random weights without
    saying so (vits8_jump with an empty model.pretrained): otherwise discovery and sharding run first."""
    from dinocell.config import load_config, resolve_config_path
    from dinocell.config.step_args import parse_overrides
    from dinocell.config.training import check_model_init

    if "config" not in params:
        return
    config = args.get("config", params["config"].get("default"))
    overrides = args.get("overrides", params.get("overrides", {}).get("default")) or []
    if not config or str(config).startswith("s3://"):
        return  # an s3:// config is read by the pods (credentials of the cluster); the train step checks it there
    check_model_init(load_config(resolve_config_path(config), parse_overrides(overrides)).model)


def submit(host: str, package: str | os.PathLike, arguments: Sequence[str] = (), experiment: str = "dinocell",
           run_name: str = "", namespace: str | None = None, client=None):
    """Submit a compiled pipeline to a KFP endpoint (kfp.Client.create_run_from_pipeline_package).

    Arguments are typed by the package's declared parameters before anything is sent. Returns the RunPipelineResult.
    """
    path = Path(package)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline package {path} not found: compile it first (python pipeline.py compile)")
    params = pipeline_parameters(path)
    args = parse_arguments(arguments, params)
    check_starting_weights(args, params)
    if client is None:
        import kfp

        client = kfp.Client(host=host, namespace=namespace)
    return client.create_run_from_pipeline_package(
        str(path), arguments=args, run_name=run_name or None, experiment_name=experiment, namespace=namespace)
