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

__all__ = ["parse_arguments", "pipeline_parameters", "submit"]


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


def submit(host: str, package: str | os.PathLike, arguments: Sequence[str] = (), experiment: str = "dinocell",
           run_name: str = "", namespace: str | None = None, client=None):
    """Submit a compiled pipeline to a KFP endpoint (kfp.Client.create_run_from_pipeline_package).

    Arguments are typed by the package's declared parameters before anything is sent. Returns the RunPipelineResult.
    """
    path = Path(package)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline package {path} not found: compile it first (python pipeline.py compile)")
    args = parse_arguments(arguments, pipeline_parameters(path))
    if client is None:
        import kfp

        client = kfp.Client(host=host, namespace=namespace)
    return client.create_run_from_pipeline_package(
        str(path), arguments=args, run_name=run_name or None, experiment_name=experiment, namespace=namespace)
