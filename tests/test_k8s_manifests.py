"""The kustomize manifests: overlays render valid jobs equal to the builder's, on the CUDA training image; the base
holds RBAC and shared objects only."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from k8s_common import CONFIG, GPU_TOLERATION, H100, LABELS, MAX_RESTARTS, REPO, RESILIENT

from dinocell.launch import (
    JobSpec,
    build_pytorchjob,
    pretrain_command,
    validate_object,
)

# ---- manifests ----------------------------------------------------------------------------------------------------

TRAIN_IMAGE = "ghcr.io/CHANGE-ME/dinocell-train:0.1.0-cuda12.8"


def _kustomize(path: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _dockerfile_tag(name: str) -> str:
    """The image tag in the `docker build ... -t TAG` line of images/<name>."""
    (tag,) = re.findall(r"docker build -f images/\S+ -t (\S+)", (REPO / "images" / name).read_text())
    return tag


OVERLAY_SPECS = {
    "single-gpu": {
        "name": "dinocell-pretrain-1gpu",
        "nodes": 1,
        "nproc_per_node": 1,
        "gpus_per_node": 1,
        "cpu": "12",
        "memory": "96Gi",
        "shm_size": "16Gi",
        "tolerations": [GPU_TOLERATION],
        **RESILIENT,
    },
    "multi-node": {
        "name": "dinocell-pretrain-2x8",
        "nodes": 2,
        "nproc_per_node": 8,
        "gpus_per_node": 8,
        "cpu": "96",
        "memory": "960Gi",
        "shm_size": "64Gi",
        "node_selector": H100,
        "tolerations": [GPU_TOLERATION],
        **RESILIENT,
    },
}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: cannot run `kubectl kustomize`")
@pytest.mark.parametrize("overlay", sorted(OVERLAY_SPECS))
def test_kustomize_overlay_renders_a_valid_job_equal_to_the_builder(overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "manifests" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(out.stdout) if d}
    assert set(docs) == {"PyTorchJob", "Role", "RoleBinding"}
    job = docs["PyTorchJob"]
    validate_object(job)
    o = OVERLAY_SPECS[overlay]
    expected = build_pytorchjob(
        JobSpec(
            image=TRAIN_IMAGE,
            namespace="kubeflow",
            command=pretrain_command(
                CONFIG, {}, o["nodes"], o["nproc_per_node"], "pytorchjob", max_restarts=MAX_RESTARTS
            ),
            env_from_secret="dinocell-storage",
            labels=LABELS,
            ttl_seconds_after_finished=604800,
            **o,
        )
    )
    assert job == expected
    rules = {tuple(r["apiGroups"]): r for r in docs["Role"]["rules"]}
    assert rules[("kubeflow.org",)]["resources"] == ["pytorchjobs"]
    assert rules[("trainer.kubeflow.org",)]["resources"] == ["trainjobs"]
    for rule in rules[("kubeflow.org",)], rules[("trainer.kubeflow.org",)]:
        assert set(rule["verbs"]) == {"create", "get", "list", "watch", "delete"}
    assert set(rules[("",)]["resources"]) == {"pods", "pods/log"} and set(rules[("",)]["verbs"]) == {"get", "list"}
    binding = docs["RoleBinding"]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: cannot run `kubectl kustomize`")
def test_kustomize_base_holds_rbac_only_and_starts_no_pod():
    docs = _kustomize(REPO / "manifests" / "base")
    assert sorted(d["kind"] for d in docs) == ["Role", "RoleBinding"]
    assert all(d["metadata"]["namespace"] == "kubeflow" for d in docs)
    (role,) = [d for d in docs if d["kind"] == "Role"]
    rules = {tuple(r["apiGroups"]): r for r in role["rules"]}
    assert rules[("kueue.x-k8s.io",)]["resources"] == ["workloads"]
    assert set(rules[("kueue.x-k8s.io",)]["verbs"]) == {"get", "list"}


def test_base_kustomization_lists_no_job():
    base = REPO / "manifests" / "base"
    assert yaml.safe_load((base / "kustomization.yaml").read_text())["resources"] == ["rbac.yaml"]
    for path in base.glob("*.yaml"):
        kinds = {d.get("kind") for d in yaml.safe_load_all(path.read_text()) if d}
        assert not kinds & {"PyTorchJob", "TrainJob", "Job", "Pod"}, path


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: cannot run `kubectl kustomize`")
@pytest.mark.parametrize("overlay", sorted(OVERLAY_SPECS))
def test_overlays_run_the_cuda_training_image_and_free_gpus_on_failure(overlay):
    (job,) = [d for d in _kustomize(REPO / "manifests" / "overlays" / overlay) if d["kind"] == "PyTorchJob"]
    # the image of images/train.Dockerfile (CUDA torch), never that of images/cpu.Dockerfile (the KFP steps)
    train_tag, cpu_tag = _dockerfile_tag("train.Dockerfile"), _dockerfile_tag("cpu.Dockerfile")
    assert train_tag.rsplit("/", 1)[1] == TRAIN_IMAGE.rsplit("/", 1)[1] == "dinocell-train:0.1.0-cuda12.8"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == ({"Master", "Worker"} if OVERLAY_SPECS[overlay]["nodes"] > 1 else {"Master"})
    for replica in replicas.values():
        assert replica["restartPolicy"] == "OnFailure"
        (container,) = replica["template"]["spec"]["containers"]
        assert container["image"] == TRAIN_IMAGE
        assert container["image"].rsplit("/", 1)[1] != cpu_tag.rsplit("/", 1)[1]
        assert f"--max-restarts={MAX_RESTARTS}" in container["command"]
    run_policy = job["spec"]["runPolicy"]
    assert run_policy["cleanPodPolicy"] in ("All", "Running") and run_policy["backoffLimit"] >= 1


def test_example_secret_and_configmap_hold_placeholders_and_stay_out_of_the_kustomization():
    base = REPO / "manifests" / "base"
    secret = yaml.safe_load((base / "storage-secret.yaml").read_text())
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
    assert all("CHANGE-ME" in v for v in secret["stringData"].values())
    cm = yaml.safe_load((base / "pipeline-root-configmap.yaml").read_text())
    assert cm["metadata"]["name"] == "kfp-launcher" and cm["data"]["defaultPipelineRoot"].startswith("s3://")
    resources = yaml.safe_load((base / "kustomization.yaml").read_text())["resources"]
    assert "storage-secret.yaml" not in resources and "pipeline-root-configmap.yaml" not in resources


