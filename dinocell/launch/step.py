"""The train step's one entry: `train(...)`, called by `dinocell train`, the KFP component and the demo.

It writes the resolved training config next to the run and gets the training done by a backend: "local" (in this
process via dinocell.train.step.pretrain, or `torchrun --standalone` for several processes), "pytorchjob" (Training
Operator v1) or "trainjob" (Kubeflow Trainer v2): a Kubernetes job this process creates, follows and cleans up.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from dinocell import storage
from dinocell.config.step_args import StepError, load_step_config, parse_json_arg
from dinocell.launch.launcher import DEFAULT_START_TIMEOUT_S
from dinocell.log import get_logger

__all__ = ["BACKENDS", "DEFAULT_SECRET", "TRAIN_RUN_NAME", "TrainOutcome", "train"]

log = get_logger("train")

BACKENDS = ("local", "pytorchjob", "trainjob")
DEFAULT_SECRET = "dinocell-storage"  # the Secret of manifests/base/storage-secret.yaml
TRAIN_RUN_NAME = "train"  # train.run_name inside a pipeline run: the run's checkpoints live at <run>/train/checkpoints


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


def train(
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
    start_timeout_s: float | None = DEFAULT_START_TIMEOUT_S,
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
        from dinocell.train.step import pretrain

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
    from dinocell.launch.jobspec import RESILIENT_MAX_RESTARTS, RESILIENT_RUN_POLICY
    from dinocell.train.distributed import REQUIRED_GPUS_ENV

    if not image:
        raise StepError(f"train: backend {backend!r} needs the training image (image=...)")
    spec = JobSpec(
        name=job_name or unique_job_name("dinocell-pretrain"),
        image=image,
        command=pretrain_command(config_uri, (), nnodes=nodes, nproc_per_node=nproc, backend=backend,
                                 max_restarts=RESILIENT_MAX_RESTARTS),
        namespace=namespace or None,
        nodes=nodes,
        nproc_per_node=nproc,
        gpus_per_node=gpus_per_node,
        cpu=cpu_per_node or None,
        memory=memory_per_node or None,
        node_selector={str(k): str(v) for k, v in parse_json_arg(node_selector, dict, "node_selector").items()},
        tolerations=parse_json_arg(tolerations, list, "tolerations"),
        env_from_secret=secret_name or None,
        # The trainer refuses to start on CPU when the pod asked for GPUs (dinocell.train.distributed).
        env={REQUIRED_GPUS_ENV: str(gpus_per_node)} if gpus_per_node else {},
        labels={"app.kubernetes.io/name": "dinocell", "app.kubernetes.io/component": "pretrain"},
        # Preempted or lost pods restart and resume from `latest`; survivors of a failed job are freed (TrainJob
        # has no such fields: its JobSet restarts the whole job).
        **(RESILIENT_RUN_POLICY if backend == "pytorchjob" else {}),
    )
    # run_dir: a lease there keeps a second live job (a resubmission with the same run name) off this run.
    result = run_job(spec, backend=backend, api_client=api_client, poll_s=poll_s, start_timeout_s=start_timeout_s,
                     timeout_s=timeout_s or None, run_dir=output_uri)
    job = {"kind": result.kind, "name": result.name, "namespace": result.namespace, "state": result.state,
           "elapsed_s": round(result.elapsed_s, 1)}
    log.info("train: %s %s/%s %s after %.0f s", result.kind, result.namespace, result.name, result.state,
             result.elapsed_s)
    return TrainOutcome(_latest_checkpoint(checkpoints), output_uri, config_uri, backend, world, job)
