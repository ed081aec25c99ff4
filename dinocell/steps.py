"""The pipeline's steps as plain functions over URIs: what each Kubeflow component calls, and what runs without KFP.

    discover_step  -> field manifest (Parquet) + discovery summary
    shard_step     -> shard set + index.json
    train_step     -> final checkpoint, trained by backend "local" (in this process, or torchrun when nproc > 1),
                      "pytorchjob" (Training Operator v1) or "trainjob" (Kubeflow Trainer v2)
    evaluate_step  -> metrics.json, scalars.json, summary.md, report.html (+ PNGs)
    publish_step   -> <models>/<name>/<version>/ (safetensors + manifest of hashes)
    run_all_steps  -> the five in a row (`python -m dinocell.demo --steps`)

Every step takes the config as a packaged name, path or URI plus `key=value` overrides (`parse_overrides` accepts a
list, a mapping, or a JSON/YAML string of either), so the same arguments work from Python, the CLI and a pipeline
parameter. Where each step writes is fixed by `RunLayout` (one run = one prefix under the output root), so a rerun
with the same run name finds and resumes what an earlier attempt left (shards and training both resume).

Object storage is the only channel between steps: the components pass URIs (in artifact metadata and small pointer
files), never data, because training pods launched as a PyTorchJob get no KFP artifact plumbing.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dinocell import storage
from dinocell.log import get_logger

log = get_logger("steps")

__all__ = [
    "BACKENDS",
    "DEFAULT_SECRET",
    "DiscoverOutcome",
    "EvalOutcome",
    "PipelineOutcome",
    "PublishOutcome",
    "RunLayout",
    "ShardOutcome",
    "StepError",
    "TrainOutcome",
    "collect_outcome",
    "configure_storage",
    "discover_step",
    "evaluate_step",
    "inline_images",
    "load_step_config",
    "parse_json_arg",
    "parse_overrides",
    "publish_step",
    "read_pointer",
    "run_all_steps",
    "shard_step",
    "train_step",
    "write_pointer",
]

BACKENDS = ("local", "pytorchjob", "trainjob")
DEFAULT_SECRET = "dinocell-storage"  # the Secret of manifests/base/storage-secret.yaml
POINTER_FORMAT = "dinocell-pointer"
TRAIN_RUN_NAME = "train"  # train.run_name inside a pipeline run: the run's checkpoints live at <run>/train/checkpoints


class StepError(ValueError):
    """A step argument is unusable; the message names the argument and the value."""


# --------------------------------------------------------------------------- arguments


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


def _str_list(value: Any, where: str) -> list[str]:
    """A list of URIs given as a list, a JSON/YAML list string, or a comma/newline separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return _str_list(parse_json_arg(text, list, where), where)
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


# --------------------------------------------------------------------------- where a run writes


@dataclass(frozen=True)
class RunLayout:
    """Every URI of one pipeline run, under `<output_root>/<run_id>/`."""

    output_root: str
    run_id: str
    models_prefix: str = ""

    def __post_init__(self) -> None:
        if not self.output_root:
            raise StepError("output_root is empty: give the object-storage prefix (or local directory) runs write to")
        if not self.run_id or "/" in self.run_id or self.run_id in (".", ".."):
            raise StepError(f"run id {self.run_id!r} must be a non-empty name without '/'")

    @property
    def root(self) -> str:
        return storage.join(self.output_root, self.run_id)

    @property
    def manifest(self) -> str:
        return storage.join(self.root, "manifest.parquet")

    @property
    def shards(self) -> str:
        return storage.join(self.root, "shards")

    @property
    def train_config(self) -> str:
        return storage.join(self.root, "config", "pretrain.yaml")

    @property
    def train_output_dir(self) -> str:
        return self.root

    @property
    def train_run(self) -> str:
        return storage.join(self.root, TRAIN_RUN_NAME)

    @property
    def checkpoints(self) -> str:
        return storage.join(self.train_run, "checkpoints")

    @property
    def eval(self) -> str:
        return storage.join(self.root, "eval")

    @property
    def models(self) -> str:
        return self.models_prefix or storage.join(self.output_root, "models")

    def model_version(self, version: str = "") -> str:
        """The version to publish under: the one given, else the run id (unique per run)."""
        return version or self.run_id

    @classmethod
    def for_run(cls, output_root: str, run_name: str, job_id: str, models_prefix: str = "") -> RunLayout:
        """The layout of a pipeline run: named by `run_name` when given (a rerun resumes), else by the KFP job id."""
        return cls(output_root, run_id_of(run_name, job_id), models_prefix)


def run_id_of(run_name: str, job_id: str) -> str:
    """The pipeline's run name when given (reruns resume), else the KFP job id (unique per run)."""
    rid = (run_name or job_id or "").strip()
    if not rid or rid.startswith("{{"):
        raise StepError("no run id: give run_name (the KFP job id placeholder was not resolved)")
    return rid


# --------------------------------------------------------------------------- pointers (what KFP artifacts carry)


def write_pointer(path: str | os.PathLike, uri: str, **info: Any) -> dict:
    """Write a small JSON file naming where the real data lives; returns the metadata to put on the artifact."""
    meta = {"uri": uri, **info}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"format": POINTER_FORMAT, **meta}, indent=1, sort_keys=True) + "\n")
    return meta


def read_pointer(metadata: Mapping | None, path: str | os.PathLike | None = None, what: str = "artifact") -> str:
    """The URI an upstream artifact points at: its metadata `uri`, else the pointer file at `path`."""
    if metadata and metadata.get("uri"):
        return str(metadata["uri"])
    if path is not None and Path(path).is_file():
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StepError(f"{what}: {path} is not a dinocell pointer file: {e}") from None
        if isinstance(data, dict) and data.get("format") == POINTER_FORMAT and data.get("uri"):
            return str(data["uri"])
        raise StepError(f"{what}: {path} holds no 'uri' (format {data.get('format') if isinstance(data, dict) else '?'})")
    raise StepError(f"{what}: no 'uri' in its metadata and no pointer file at {path}")


_IMG_SRC_RE = re.compile(r"""(<img\b[^>]*?\bsrc=)(["'])([^"':]+\.(?:png|jpe?g|svg))\2""", re.IGNORECASE)
_MIME = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "svg": "image/svg+xml"}


def inline_images(html: str, base_uri: str) -> tuple[str, list[str]]:
    """Embed images that an HTML report references by relative path as data: URIs.

    The KFP UI shows an HTML artifact as one file; relative image links would be broken there. Returns the new HTML
    and the references that could not be read (left as they were, and reported).
    """
    missing: list[str] = []

    def repl(m: re.Match) -> str:
        rel = m.group(3)
        try:
            data = storage.read_bytes(storage.safe_join(base_uri, rel))
        except (storage.StorageError, ValueError) as e:
            missing.append(f"{rel} ({e})")
            return m.group(0)
        mime = _MIME[rel.rsplit(".", 1)[1].lower()]
        return f'{m.group(1)}{m.group(2)}data:{mime};base64,{base64.b64encode(data).decode()}{m.group(2)}'

    return _IMG_SRC_RE.sub(repl, html), missing


# --------------------------------------------------------------------------- discover


@dataclass
class DiscoverOutcome:
    manifest_uri: str
    summary_uri: str
    n_fields: int
    fields_per_split: dict
    excluded: int
    summary_text: str

    def metadata(self) -> dict:
        return {"n_fields": self.n_fields, "fields_per_split": self.fields_per_split, "excluded": self.excluded,
                "summary_uri": self.summary_uri}

    def markdown(self) -> str:
        return f"# Field discovery\n\nManifest: `{self.manifest_uri}`\n\n```\n{self.summary_text.rstrip()}\n```\n"


def discover_step(
    config: str,
    overrides: Any = (),
    *,
    manifest_uri: str,
    images_prefix: str = "",
    load_data: Any = (),
    mode: str = "auto",
    endpoint_url: str = "",
    anonymous: bool | None = None,
) -> DiscoverOutcome:
    """Find the fields of the source and write the manifest (+ `<manifest>.summary.json`)."""
    from dinocell.jump.discover import discover_fields, write_discovery

    cfg = load_step_config(config, overrides, endpoint_url, anonymous)
    if images_prefix:
        cfg.data.images_prefix = images_prefix if images_prefix.endswith("/") else images_prefix + "/"
    csvs = _str_list(load_data, "load_data")
    if csvs:
        cfg.data.load_data = csvs
    t0 = time.perf_counter()
    result = discover_fields(cfg.data, mode=mode)
    n = len(result.manifest)
    if n == 0:
        raise StepError(
            f"discover: no usable field under {cfg.data.images_prefix} (load_data: {cfg.data.load_data or 'none'}); "
            f"excluded {result.summary.get('excluded_total', 0)}: {result.summary.get('excluded_by_reason', {})}"
        )
    summary_uri = write_discovery(result, manifest_uri)
    log.info("discover: %d fields -> %s in %.1fs", n, manifest_uri, time.perf_counter() - t0)
    return DiscoverOutcome(
        manifest_uri=manifest_uri,
        summary_uri=summary_uri,
        n_fields=n,
        fields_per_split=dict(result.summary.get("fields_per_split", {})),
        excluded=int(result.summary.get("excluded_total", 0)),
        summary_text=result.format_summary(),
    )


# --------------------------------------------------------------------------- shard


@dataclass
class ShardOutcome:
    index_uri: str
    totals: dict
    written: int
    reused: int

    def metadata(self) -> dict:
        return {**self.totals, "written": self.written, "reused": self.reused}


def shard_step(
    config: str,
    overrides: Any = (),
    *,
    manifest_uri: str,
    shards_prefix: str,
    endpoint_url: str = "",
    anonymous: bool | None = None,
) -> ShardOutcome:
    """Preprocess the manifest's training split into tar shards under `shards_prefix` (resumes a partial set)."""
    from dinocell.data.shards import INDEX_NAME, write_shards
    from dinocell.jump.manifest import Manifest

    cfg = load_step_config(config, overrides, endpoint_url, anonymous)
    manifest = Manifest.read(manifest_uri)
    t0 = time.perf_counter()
    index = write_shards(manifest, shards_prefix, cfg.shard, cfg.preprocess)
    index_uri = storage.join(shards_prefix, INDEX_NAME)
    totals = index.totals()
    log.info("shard: %s in %.1fs -> %s", totals, time.perf_counter() - t0, index_uri)
    return ShardOutcome(index_uri=index_uri, totals=totals, written=len(index.written), reused=len(index.reused))


# --------------------------------------------------------------------------- train


@dataclass
class TrainOutcome:
    checkpoint_uri: str
    output_uri: str  # <output_dir>/<run_name>: checkpoints/, metrics, images
    config_uri: str  # the resolved training config the run read
    backend: str
    world_size: int
    job: dict | None = None  # the Kubernetes job's name/namespace/kind/state (k8s backends)

    def metadata(self) -> dict:
        meta = {"output_uri": self.output_uri, "config_uri": self.config_uri, "backend": self.backend,
                "world_size": self.world_size}
        if self.job:
            meta["job"] = self.job
        return meta


def _latest_checkpoint(checkpoints_uri: str) -> str:
    from dinocell.train.checkpoint import CheckpointManager

    uri = CheckpointManager(checkpoints_uri).latest()
    if uri is None:
        raise StepError(f"train: the run finished but {checkpoints_uri} holds no checkpoint")
    return uri


def train_step(
    config: str,
    overrides: Any = (),
    *,
    output_dir: str,
    run_name: str = TRAIN_RUN_NAME,
    shards_index_uri: str = "",
    manifest_uri: str = "",
    config_uri: str = "",
    backend: str = "local",
    nodes: int = 1,
    nproc_per_node: int = 0,
    gpus_per_node: int = 0,
    image: str = "",
    node_selector: Any = None,
    tolerations: Any = None,
    secret_name: str = DEFAULT_SECRET,
    namespace: str = "",
    cpu_per_node: str = "",
    memory_per_node: str = "",
    job_name: str = "",
    timeout_s: float | None = None,
    start_timeout_s: float = 1800.0,
    poll_s: float = 10.0,
    endpoint_url: str = "",
    anonymous: bool | None = None,
    api_client=None,
) -> TrainOutcome:
    """Pretrain on the shards (or the raw manifest) and return the final checkpoint's URI.

    The resolved config (with loader.shards, data.manifest, train.output_dir/run_name filled in) is written to
    `config_uri` (default `<output_dir>/config/pretrain.yaml`) and is what every process reads, in this process or
    in a training pod. Backends:
    - "local": world size 1 trains in this process; nproc_per_node > 1 runs `torchrun --standalone` here;
    - "pytorchjob" / "trainjob": a Kubernetes job of `nodes` pods x `nproc_per_node` processes on `gpus_per_node`
      GPUs each, image `image`, placed by `node_selector` / `tolerations`, credentials from the Secret `secret_name`
      (envFrom). This process only launches, follows and cleans up the job (dinocell.launch.run_job).
    nproc_per_node 0 means: gpus_per_node, or 1 without GPUs. timeout_s 0 or None: no limit on the job's run time.
    """
    if backend not in BACKENDS:
        raise StepError(f"train: backend {backend!r} not in {BACKENDS}")
    for name, value in (("nodes", nodes), ("nproc_per_node", nproc_per_node), ("gpus_per_node", gpus_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise StepError(f"train: {name} must be an integer >= 0, got {value!r}")
    nodes = max(1, nodes)
    nproc = nproc_per_node or max(1, gpus_per_node)
    if backend == "local" and nodes > 1:
        raise StepError(f"train: backend 'local' runs on this machine only; nodes={nodes} needs pytorchjob/trainjob")

    cfg = load_step_config(config, overrides, endpoint_url, anonymous)
    if shards_index_uri:
        cfg.loader.shards = shards_index_uri
    if manifest_uri:
        cfg.data.manifest = manifest_uri
    cfg.train.output_dir = output_dir
    cfg.train.run_name = run_name
    from dinocell.config.training import validate_training_config

    validate_training_config(cfg)  # fail here, naming the field, rather than inside a pod after scheduling
    config_uri = config_uri or storage.join(output_dir, "config", "pretrain.yaml")
    storage.write_text(config_uri, cfg.to_yaml())
    output_uri = storage.join(output_dir, run_name)
    checkpoints = storage.join(output_uri, "checkpoints")
    world = nodes * nproc
    log.info("train: backend %s, %d node(s) x %d process(es), config %s -> %s", backend, nodes, nproc, config_uri,
             output_uri)

    if backend == "local" and nproc == 1:
        from dinocell.train.trainer import pretrain

        result = pretrain(cfg)
        return TrainOutcome(result.final_checkpoint, result.output_uri, config_uri, backend, 1)

    if backend == "local":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc-per-node={nproc}", "-m", "dinocell.cli", "pretrain", "--config", config_uri]
        log.info("train: %s", " ".join(cmd))
        rc = subprocess.run(cmd, check=False, env=dict(os.environ)).returncode
        if rc != 0:
            raise RuntimeError(f"train: torchrun with {nproc} processes exited with status {rc} (its log is above)")
        return TrainOutcome(_latest_checkpoint(checkpoints), output_uri, config_uri, backend, world)

    from dinocell.launch import JobSpec, pretrain_command, run_job, unique_job_name

    if not image:
        raise StepError(f"train: backend {backend!r} needs the training image (image=...)")
    spec = JobSpec(
        name=job_name or unique_job_name("dinocell-pretrain"),
        image=image,
        command=pretrain_command(config_uri, (), nnodes=nodes, nproc_per_node=nproc, backend=backend),
        namespace=namespace or None,
        nodes=nodes,
        nproc_per_node=nproc,
        gpus_per_node=gpus_per_node,
        cpu=cpu_per_node or None,
        memory=memory_per_node or None,
        node_selector={str(k): str(v) for k, v in parse_json_arg(node_selector, dict, "node_selector").items()},
        tolerations=parse_json_arg(tolerations, list, "tolerations"),
        env_from_secret=secret_name or None,
        labels={"app.kubernetes.io/name": "dinocell", "app.kubernetes.io/component": "pretrain"},
    )
    result = run_job(spec, backend=backend, api_client=api_client, poll_s=poll_s, start_timeout_s=start_timeout_s,
                     timeout_s=timeout_s or None)
    job = {"kind": result.kind, "name": result.name, "namespace": result.namespace, "state": result.state,
           "elapsed_s": round(result.elapsed_s, 1)}
    log.info("train: %s %s/%s %s after %.0f s", result.kind, result.namespace, result.name, result.state,
             result.elapsed_s)
    return TrainOutcome(_latest_checkpoint(checkpoints), output_uri, config_uri, backend, world, job)


# --------------------------------------------------------------------------- evaluate


@dataclass
class EvalOutcome:
    out_uri: str
    scalars: dict[str, float]
    metrics_uri: str
    summary_md: str
    report_uri: str

    def report_html(self, inline: bool = True) -> str:
        """The report's HTML, with its images embedded (for places that show one file, like the KFP UI)."""
        html = storage.read_text(self.report_uri)
        if not inline:
            return html
        html, missing = inline_images(html, self.out_uri)
        if missing:
            log.warning("evaluate: %d image(s) of the report could not be embedded: %s", len(missing), missing)
        return html


def _number_scalars(raw: Mapping, where: str) -> dict[str, float]:
    out: dict[str, float] = {}
    bad = []
    for k, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            bad.append(k)
        else:
            out[str(k)] = float(v)
    if bad:
        raise StepError(f"{where}: non-numeric scalar(s) {bad}")
    return out


def evaluate_step(
    config: str,
    overrides: Any = (),
    *,
    checkpoint_uri: str,
    manifest_uri: str,
    out_uri: str,
    baseline: str = "init",
    endpoint_url: str = "",
    anonymous: bool | None = None,
) -> EvalOutcome:
    """Channel-consistency evaluation of the checkpoint (and the baseline) on the manifest's fields."""
    from dinocell.eval.evaluate import evaluate

    cfg = load_step_config(config, overrides, endpoint_url, anonymous)
    t0 = time.perf_counter()
    evaluate(checkpoint_uri, manifest_uri, cfg, out_uri, baseline=baseline)
    log.info("evaluate: %s in %.1fs", out_uri, time.perf_counter() - t0)
    return read_eval_outputs(out_uri)


def read_eval_outputs(out_uri: str) -> EvalOutcome:
    """What an evaluation left under `out_uri` (scalars.json, summary.md, metrics.json, report.html)."""
    scalars_uri = storage.join(out_uri, "scalars.json")
    try:
        raw = json.loads(storage.read_text(scalars_uri))
    except json.JSONDecodeError as e:
        raise StepError(f"{scalars_uri}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise StepError(f"{scalars_uri}: expected a mapping of name -> number")
    return EvalOutcome(
        out_uri=out_uri,
        scalars=_number_scalars(raw, scalars_uri),
        metrics_uri=storage.join(out_uri, "metrics.json"),
        summary_md=storage.read_text(storage.join(out_uri, "summary.md")),
        report_uri=storage.join(out_uri, "report.html"),
    )


# --------------------------------------------------------------------------- publish


@dataclass
class PublishOutcome:
    uri: str
    name: str
    version: str
    manifest_sha256: str
    files: dict = field(default_factory=dict)
    noop: bool = False
    summary: str = ""

    def metadata(self) -> dict:
        return {"name": self.name, "version": self.version, "manifest_sha256": self.manifest_sha256,
                "noop": self.noop, "files": sorted(self.files)}


def publish_step(
    checkpoint_uri: str,
    *,
    dest_prefix: str,
    name: str,
    version: str,
    metrics_uri: str = "",
    config: str = "",
    overrides: Any = (),
    verify: bool = True,
    endpoint_url: str = "",
    anonymous: bool | None = None,
) -> PublishOutcome:
    """Publish the checkpoint's teacher backbone as `<dest_prefix>/<name>/<version>/`, then load it back once
    (`dinocell.load_pretrained`, hashes verified) when `verify`."""
    from dinocell.publish.publish import publish

    cfg = load_step_config(config, overrides, endpoint_url, anonymous) if config else None
    if cfg is None:
        configure_storage(endpoint_url, anonymous)
    result = publish(checkpoint_uri, dest_prefix, name, version, metrics_uri=metrics_uri or None, fallback_cfg=cfg)
    if verify:
        from dinocell import load_pretrained

        load_pretrained(result.uri)
    return PublishOutcome(uri=result.uri, name=result.name, version=result.version,
                          manifest_sha256=result.manifest_sha256, files=dict(result.files), noop=result.noop,
                          summary=result.summary())


# --------------------------------------------------------------------------- all steps, and what a run left


@dataclass
class PipelineOutcome:
    """What a whole run produced, gathered from object storage (the same whether KFP ran it or not)."""

    layout: RunLayout
    model_uri: str
    scalars: dict[str, float]
    summary_md: str
    report_uri: str
    local_report: Path | None = None

    def format(self) -> str:
        lines = [self.summary_md.rstrip(), "", f"published model: {self.model_uri}",
                 f"run outputs:     {self.layout.root}"]
        if self.local_report is not None:
            lines.append(f"HTML report:     {self.local_report}")
        return "\n".join(lines)


def _copy_prefix(prefix: str, dest: Path) -> int:
    """Copy every object under `prefix` into `dest`, keeping relative paths; returns the count."""
    base = prefix.rstrip("/") + "/"
    n = 0
    for obj in storage.list_objects(base):
        rel = obj.uri[len(base):] if obj.uri.startswith(base) else Path(obj.uri).name
        storage.download_file(obj.uri, Path(storage.safe_join(str(dest), rel)))
        n += 1
    return n


def collect_outcome(layout: RunLayout, model_name: str, model_version: str, workdir: str | os.PathLike | None = None
                    ) -> PipelineOutcome:
    """Read a finished run's evaluation and published model; copy the evaluation folder (report.html and its
    images) into `<workdir>/eval/` so the report opens locally."""
    ev = read_eval_outputs(layout.eval)
    local_report = None
    if workdir is not None:
        dest = Path(workdir) / "eval"
        n = _copy_prefix(layout.eval, dest)
        local_report = (dest / "report.html").resolve()
        if not local_report.is_file():
            raise StepError(f"copied {n} file(s) from {layout.eval} but no report.html among them")
    model_uri = storage.join(layout.models, model_name, model_version)
    return PipelineOutcome(layout, model_uri, ev.scalars, ev.summary_md, ev.report_uri, local_report)


def run_all_steps(
    source: str,
    outputs: str,
    workdir: str | os.PathLike,
    config: str = "tiny",
    overrides: Any = (),
    endpoint_url: str = "",
    *,
    run_name: str = "",
    anonymous: bool | None = None,
    model_name: str = "dinocell-demo",
    model_version: str = "",
    models_prefix: str = "",
    backend: str = "local",
    **train_kwargs: Any,
) -> PipelineOutcome:
    """discover -> shard -> train -> evaluate -> publish without KFP, writing the same layout as the pipeline.

    `source`: the source root of a JUMP-layout bucket (`.../cpg0000-jump-pilot/source_4`); `outputs`: the output
    root (models go to `models_prefix`, default `<outputs>/models`). The run id is `run_name` or
    `steps-<UTC timestamp>`; the model version defaults to the run id. Extra keyword arguments go to `train_step`.
    """
    run_id = run_name or time.strftime("steps-%Y%m%d-%H%M%S", time.gmtime())
    layout = RunLayout(outputs, run_id, models_prefix)
    version = layout.model_version(model_version)
    common = {"endpoint_url": endpoint_url, "anonymous": anonymous}
    images_prefix = storage.join(source, "images") + "/"
    d = discover_step(config, overrides, manifest_uri=layout.manifest, images_prefix=images_prefix, **common)
    print(d.summary_text)
    s = shard_step(config, overrides, manifest_uri=d.manifest_uri, shards_prefix=layout.shards, **common)
    t = train_step(config, overrides, output_dir=layout.train_output_dir, shards_index_uri=s.index_uri,
                   manifest_uri=d.manifest_uri, config_uri=layout.train_config, backend=backend, **common,
                   **train_kwargs)
    e = evaluate_step(config, overrides, checkpoint_uri=t.checkpoint_uri, manifest_uri=d.manifest_uri,
                      out_uri=layout.eval, **common)
    p = publish_step(t.checkpoint_uri, dest_prefix=layout.models, name=model_name, version=version,
                     metrics_uri=e.metrics_uri, config=config, overrides=overrides, **common)
    print(p.summary)
    return collect_outcome(layout, model_name, version, workdir)
