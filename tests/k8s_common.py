"""Shared by the tests/test_k8s_*.py files: constants and the JobSpec they build from."""

from __future__ import annotations

from pathlib import Path

from dinocell.launch import JobSpec, pretrain_command

REPO = Path(__file__).resolve().parents[1]
CONFIG = "s3://CHANGE-ME-bucket/dinocell/configs/pretrain.yaml"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
H100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
LABELS = {"app.kubernetes.io/name": "dinocell", "app.kubernetes.io/component": "pretrain"}
POLL = 0.05


def spec_for(backend: str, nodes: int = 1, gpus: int = 0, **kw) -> JobSpec:
    nproc = max(1, gpus)
    base = {
        "name": "dino-pre",
        "image": "ghcr.io/example/dinocell:0.1.0",
        "command": pretrain_command(CONFIG, {"train.epochs": 2}, nodes, nproc, backend=backend),
        "nodes": nodes,
        "nproc_per_node": nproc,
        "gpus_per_node": gpus,
        "env_from_secret": "dinocell-storage",
    }
    base.update(kw)
    return JobSpec(**base)


# What the overlays run: a failed job frees its GPUs (surviving replicas deleted), a lost process or node is retried.
RESILIENT = {"restart_policy": "OnFailure", "backoff_limit": 3, "clean_pod_policy": "Running"}
MAX_RESTARTS = 3
