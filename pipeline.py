"""The dinocell Kubeflow pipeline (KFP v2): discover -> shard -> train -> evaluate -> publish.

    python pipeline.py compile [--output pipeline.yaml] [--local-gpus N --local-node-selector K=V ...]
    python pipeline.py run --local [--endpoint URL --source S3_ROOT --outputs S3_PREFIX [--cache]] [--config tiny] [--set k=v]
    python pipeline.py submit --host URL [--experiment E] [--run-name R] [--package pipeline.yaml] [key=value ...]
    python pipeline.py demo [--steps] [...]      (`make demo`)

This file holds the pipeline definition and its compilation; running it locally (dinocell.pipeline.local), submitting
it (dinocell.pipeline.submit) and the demo (dinocell.pipeline.demo) live in the package and take the pipeline
function from here.

`submit` is the Python twin of the KFP CLI line (both need a live endpoint):

    kfp --endpoint URL run create -e EXPERIMENT -r RUN -f pipeline.yaml output_root=s3://bucket/dinocell backend=pytorchjob

Values are JSON where the parameter is a list or mapping, e.g. `overrides='["train.max_iters=100"]'`,
`node_selector='{"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}'`.

The pipeline is flat (five tasks, no nested pipelines or exit handlers). Steps exchange object-storage URIs: each
puts the URI of its data in its output artifact's metadata and in a small pointer file.
- discover and shard write under `<output_root>/data/`, at prefixes named by a hash of their real inputs (config,
  source, channels, the manifest's bytes: dinocell.pipeline.data_keys). They take no run name or job id and have
  caching on, so a rerun with unchanged inputs reuses both from KFP's cache; if the cache misses, the shard step
  still finds its complete shard set under the same key and reuses it.
- train, evaluate and publish write per run, under `<output_root>/<run id>/` (dinocell.pipeline.layout.RunLayout),
  with caching off. Run id = `run_name`, or the KFP run's id when that is empty (a rerun with the same run_name
  resumes the training run).

Cancelling a run stops the training job: the train task gets its pod's name, uid and namespace (downward API, env
POD_NAME / POD_UID / POD_NAMESPACE), the launcher makes the job an owned object of that pod (deleted with it by the
garbage collector) and deletes the job itself on SIGTERM. A lease in the run directory (`<run>/train/lease.json`)
keeps a second job from writing the same run while the first one is alive.

Training: `backend=pytorchjob|trainjob` (default) makes the train task a launcher that creates a Kubernetes job whose
pods request `gpus_per_node` GPUs on `nodes` nodes (image `train_image`, placed by `node_selector`/`tolerations`,
credentials from the Secret `secret_name`); the launcher pod requests no GPU. `backend=local` trains inside the train
task's own pod: compile with `--local-gpus N` (plus `--local-node-selector` / `--local-toleration`) so that the pod
gets the GPUs and runs on the CUDA training image, e.g.

    python pipeline.py compile --local-gpus 1 --local-node-selector nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3 \\
        --local-toleration nvidia.com/gpu:NoSchedule

Every step pod gets AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (required) and AWS_ENDPOINT_URL (optional) from the
Secret named by the `secret_name` parameter (kfp-kubernetes use_secret_as_env); `--no-secret` leaves that out for
clusters that provide credentials otherwise (e.g. IAM roles for service accounts).

Storage: `s3_endpoint` (else AWS_ENDPOINT_URL from the Secret, else AWS) and `s3_anonymous` are the defaults for every
bucket. To read the public gallery anonymously from AWS while writing outputs to an in-cluster MinIO, give per-bucket
settings in the training config's `storage.buckets` (or as an override), e.g.
`storage.buckets={cellpainting-gallery: {anonymous: true, endpoint_url: ""}}` ("" = AWS itself).

Locally (`run --local`, `demo`: dinocell.pipeline.local / dinocell.pipeline.demo), kfp.local runs each component in a subprocess of this Python
(SubprocessRunner(use_venv=False)); cluster-only settings (secrets, GPUs, placement) are ignored there.
(No `from __future__ import annotations` here or in components/: KFP reads the real type annotations.)
"""

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfp import compiler, dsl
from kfp import kubernetes as kfp_k8s

from components import TRAIN_IMAGE, discover, evaluate, publish, shard, train
from dinocell.launch.step import DEFAULT_SECRET

PIPELINE_NAME = "dinocell-pretrain"
DEFAULT_IMAGES_PREFIX = "s3://cellpainting-gallery/cpg0000-jump-pilot/source_4/images/"
DEFAULT_OUTPUT_ROOT = "s3://dinocell/runs"
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_CREDENTIAL_KEYS = ("AWS_ENDPOINT_URL",)  # absent for AWS S3 itself
# The train task trains in its own pod with backend=local: W&B logging there needs the key as well (optional).
OPTIONAL_TRAIN_KEYS = ("WANDB_API_KEY",)
# Downward API env of the train launcher: the pod the training job is owned by (dinocell.launch.ownership).
POD_FIELD_ENV = {"POD_NAME": "metadata.name", "POD_UID": "metadata.uid", "POD_NAMESPACE": "metadata.namespace"}
# Per-task KFP caching: the data steps are pure functions of their inputs; the others have per-run outputs, and the
# train task's side effect is the training job itself, which a cache hit must never skip.
CACHED_TASKS = ("discover", "shard")


# step -> (cpu request, cpu limit, memory request, memory limit)
TASK_RESOURCES = {
    "discover": ("2", "4", "8G", "12G"),
    "shard": ("8", "16", "16G", "32G"),
    "train": ("1", "2", "2G", "4G"),
    "evaluate": ("4", "8", "16G", "24G"),
    "publish": ("1", "2", "4G", "8G"),
}
RETRIED_TASKS = ("discover", "shard", "evaluate", "publish")


@dataclass
class TaskOptions:
    """Compile-time settings of the step pods themselves (not of the training job's pods, which are parameters)."""

    use_secret: bool = True  # storage credentials from the `secret_name` Secret as env on every step
    local_gpus: int = 0  # accelerator on the train task: for backend=local on a cluster
    accelerator_type: str = "nvidia.com/gpu"
    local_image: str = ""  # image of the train task when it has GPUs (default: the CUDA training image)
    local_node_selector: dict[str, str] = field(default_factory=dict)  # train task placement (backend=local)
    local_tolerations: list[dict[str, Any]] = field(default_factory=list)
    # CPU / memory (request, limit) of each step pod. Discovery of 3M fields peaks near 6 GB (bench_discovery.py);
    # shard runs a process pool of preprocessing workers; the train launcher only follows a job (unless local GPUs).
    resources: dict[str, tuple[str, str, str, str]] = field(default_factory=lambda: dict(TASK_RESOURCES))
    retries: int = 2  # for the steps whose failures are usually transient (storage, API); never the train task

    def __post_init__(self) -> None:
        if isinstance(self.local_gpus, bool) or not isinstance(self.local_gpus, int) or self.local_gpus < 0:
            raise ValueError(f"TaskOptions.local_gpus must be an integer >= 0, got {self.local_gpus!r}")
        for i, tol in enumerate(self.local_tolerations):
            unknown = set(tol) - {"key", "operator", "value", "effect", "toleration_seconds"}
            if unknown:
                raise ValueError(f"TaskOptions.local_tolerations[{i}]: unknown key(s) {sorted(unknown)}")


def make_pipeline(options: TaskOptions | None = None) -> Callable:
    """The pipeline function, with the step pods configured by `options`."""
    opts = options or TaskOptions()

    def pod_settings(task, secret_name, name: str) -> None:
        if opts.use_secret:
            optional = OPTIONAL_CREDENTIAL_KEYS + (OPTIONAL_TRAIN_KEYS if name == "train" else ())
            kfp_k8s.use_secret_as_env(task, secret_name=secret_name,
                                      secret_key_to_env={k: k for k in CREDENTIAL_KEYS})
            kfp_k8s.use_secret_as_env(task, secret_name=secret_name,
                                      secret_key_to_env={k: k for k in optional}, optional=True)
        if name == "train":
            for env, path in POD_FIELD_ENV.items():
                kfp_k8s.use_field_path_as_env(task, env_name=env, field_path=path)

    @dsl.pipeline(name=PIPELINE_NAME, description=(
        "Continued DINOv3 pretraining on JUMP Cell Painting with multi-view channel consistency: discover fields, "
        "shard, train (local / PyTorchJob / TrainJob), evaluate, publish."))
    def dinocell_pipeline(
        images_prefix: str = DEFAULT_IMAGES_PREFIX,
        load_data: list = [],  # noqa: B006 - KFP reads the default from the signature
        discovery_mode: str = "auto",
        s3_endpoint: str = "",
        s3_anonymous: bool = False,
        config: str = "vits8_jump",
        overrides: list = [],  # noqa: B006
        output_root: str = DEFAULT_OUTPUT_ROOT,
        run_name: str = "",
        backend: str = "pytorchjob",
        nodes: int = 1,
        gpus_per_node: int = 1,
        nproc_per_node: int = 0,
        train_image: str = TRAIN_IMAGE,
        node_selector: dict = {},  # noqa: B006
        tolerations: list = [],  # noqa: B006
        secret_name: str = DEFAULT_SECRET,
        namespace: str = "",
        cpu_per_node: str = "",
        memory_per_node: str = "",
        train_timeout_hours: float = 0.0,
        eval_baseline: str = "init",
        models_prefix: str = "",
        model_name: str = "dinocell-vits8",
        model_version: str = "",
    ):
        run = {"output_root": output_root, "run_name": run_name, "job_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
        s3 = {"s3_endpoint": s3_endpoint, "s3_anonymous": s3_anonymous}
        cfg = {"config": config, "overrides": overrides}

        # The data steps get no run name or job id (their outputs are content-addressed): see the module docstring.
        d = discover(images_prefix=images_prefix, load_data=load_data, mode=discovery_mode, output_root=output_root,
                     **cfg, **s3)
        d.set_display_name("discover fields")
        s = shard(manifest=d.outputs["manifest"], output_root=output_root, **cfg, **s3)
        s.set_display_name("shard")
        t = train(manifest=d.outputs["manifest"], shards=s.outputs["shards"], backend=backend, nodes=nodes,
                  gpus_per_node=gpus_per_node, nproc_per_node=nproc_per_node, train_image=train_image,
                  node_selector=node_selector, tolerations=tolerations, secret_name=secret_name,
                  namespace=namespace, cpu_per_node=cpu_per_node, memory_per_node=memory_per_node,
                  timeout_hours=train_timeout_hours, **cfg, **run, **s3)
        t.set_display_name("train")
        if opts.local_gpus:
            # Training in the task's own pod: it needs the GPUs and the CUDA image (which holds kfp too).
            t.set_accelerator_type(opts.accelerator_type).set_accelerator_limit(opts.local_gpus)
            t.set_container_image(opts.local_image or TRAIN_IMAGE)
        for key, value in opts.local_node_selector.items():
            kfp_k8s.add_node_selector(t, label_key=key, label_value=value)
        for tol in opts.local_tolerations:
            kfp_k8s.add_toleration(t, **tol)
        e = evaluate(manifest=d.outputs["manifest"], checkpoint=t.outputs["checkpoint"], baseline=eval_baseline,
                     **cfg, **run, **s3)
        e.set_display_name("evaluate")
        p = publish(checkpoint=t.outputs["checkpoint"], metrics_uri=e.outputs["Output"], models_prefix=models_prefix,
                    model_name=model_name, model_version=model_version, **cfg, **run, **s3)
        p.set_display_name("publish")
        for name, task in (("discover", d), ("shard", s), ("train", t), ("evaluate", e), ("publish", p)):
            task.set_caching_options(name in CACHED_TASKS)
            pod_settings(task, secret_name, name)
            cpu_req, cpu_lim, mem_req, mem_lim = opts.resources[name]
            if not (name == "train" and opts.local_gpus):  # a local-GPU train task trains itself: no small limits
                task.set_cpu_request(cpu_req).set_cpu_limit(cpu_lim)
                task.set_memory_request(mem_req).set_memory_limit(mem_lim)
            if name in RETRIED_TASKS and opts.retries:
                task.set_retry(num_retries=opts.retries, backoff_duration="60s", backoff_factor=2.0)

    return dinocell_pipeline


dinocell_pipeline = make_pipeline()


def compile_pipeline(output: str | os.PathLike = "pipeline.yaml", options: TaskOptions | None = None) -> Path:
    """Write the KFP IR YAML; returns its path."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(make_pipeline(options), package_path=str(out))
    return out


# --------------------------------------------------------------------------- command line


def _kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    k, v = text.split("=", 1)
    return k, v


def _toleration(text: str) -> dict:
    """KEY[=VALUE][:EFFECT] -> a toleration (operator Equal with a value, Exists without)."""
    spec, _, effect = text.partition(":")
    key, eq, value = spec.partition("=")
    tol: dict[str, Any] = {"key": key or None, "operator": "Equal" if eq else "Exists"}
    if eq:
        tol["value"] = value
    if effect:
        if effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise argparse.ArgumentTypeError(f"{text!r}: effect must be NoSchedule, PreferNoSchedule or NoExecute")
        tol["effect"] = effect
    return tol


def _options(args) -> TaskOptions:
    return TaskOptions(use_secret=not args.no_secret, local_gpus=args.local_gpus, local_image=args.local_image,
                       local_node_selector=dict(args.local_node_selector), local_tolerations=list(args.local_toleration))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python pipeline.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def task_options(p):
        p.add_argument("--no-secret", action="store_true", help="do not mount the storage Secret into the step pods")
        p.add_argument("--local-gpus", type=int, default=0, help="GPUs for the train task itself (backend=local)")
        p.add_argument("--local-image", default="", help="image of the train task when --local-gpus is set "
                       f"(default: {TRAIN_IMAGE})")
        p.add_argument("--local-node-selector", type=_kv, action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--local-toleration", type=_toleration, action="append", default=[],
                       metavar="KEY[=VALUE][:EFFECT]")

    p = sub.add_parser("compile", help="write the pipeline IR YAML")
    p.add_argument("--output", default="pipeline.yaml")
    task_options(p)

    p = sub.add_parser("run", help="run the pipeline on this machine (kfp.local)")
    p.add_argument("--local", action="store_true", required=True, help="run locally (the only mode here)")
    p.add_argument("--endpoint", default="", help="S3 endpoint holding --source and --outputs; "
                   "without it a local S3 server is started with a synthetic bucket (as `make demo`)")
    p.add_argument("--source", default="", help="source root, e.g. s3://bucket/cpg0000-jump-pilot/source_4")
    p.add_argument("--outputs", default="", help="output root, e.g. s3://bucket/dinocell")
    p.add_argument("--anonymous", action="store_true", help="unsigned S3 requests (public buckets only)")
    p.add_argument("--workdir", default="demo")
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-name", default="")
    p.add_argument("--model-name", default="dinocell-demo")
    p.add_argument("--model-version", default="")
    p.add_argument("--cache", action="store_true", help="kfp.local's task cache: a rerun with unchanged inputs "
                   "reuses discover and shard (needs --endpoint: the demo's in-memory bucket does not outlive a run)")

    p = sub.add_parser("submit", help="submit a compiled pipeline to a KFP endpoint")
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    p.add_argument("--experiment", default="dinocell")
    p.add_argument("--run-name", default="")
    p.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")
    p.add_argument("--package", default="pipeline.yaml",
                   help="the compiled pipeline (default pipeline.yaml): the images baked in at compile time are the "
                   "ones that run, so compile with DINOCELL_IMAGE / DINOCELL_TRAIN_IMAGE set first")
    p.add_argument("arguments", nargs="*", metavar="KEY=VALUE", help="pipeline parameters")

    sub.add_parser("demo", add_help=False, help="`make demo`: the whole pipeline on a synthetic bucket served by a "
                   "local S3 server (options: python pipeline.py demo --help)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:
        from dinocell.pipeline import demo

        return demo.main(argv[1:], pipeline_func=dinocell_pipeline)
    args = build_parser().parse_args(argv)
    if args.command == "compile":
        out = compile_pipeline(args.output, _options(args))
        print(f"wrote {out}")
        return 0
    if args.command == "run":
        if not args.endpoint:
            if args.cache:
                raise SystemExit("pipeline.py run --cache: needs --endpoint (the demo's bucket lives in memory, so a "
                                 "cached URI from an earlier run would point at nothing)")
            if args.source or args.outputs:
                raise SystemExit("pipeline.py run: --source/--outputs need --endpoint (without it the demo bucket is used)")
            from dinocell.pipeline import demo

            demo_args = ["--workdir", args.workdir, "--config", args.config, "--model-name", args.model_name]
            demo_args += [a for o in args.overrides for a in ("--set", o)]
            if args.run_name:
                demo_args += ["--run-name", args.run_name]
            if args.model_version:
                demo_args += ["--model-version", args.model_version]
            return demo.main(demo_args, pipeline_func=dinocell_pipeline)
        if not (args.source and args.outputs):
            raise SystemExit("pipeline.py run --endpoint: give --source and --outputs")
        from dinocell.pipeline.local import run_local

        outcome = run_local(dinocell_pipeline, args.source, args.outputs, args.workdir, args.config, args.overrides,
                            args.endpoint, run_name=args.run_name, model_name=args.model_name,
                            model_version=args.model_version, anonymous=args.anonymous, cache=args.cache)
        print(outcome.format())
        return 0
    from dinocell.pipeline.submit import submit

    try:
        result = submit(args.host, args.package, args.arguments, args.experiment, args.run_name, args.namespace)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"pipeline.py submit: {e}") from None
    print(f"submitted run {getattr(result, 'run_id', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
