"""dinocell.launch: JobSpec checks, PyTorchJob/TrainJob builders against the vendored CRD schemas, the torchrun command
as torchrun itself parses it, the kustomize manifests, and the launcher against a fake API server over real HTTP."""

from __future__ import annotations

import copy
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_k8s import FakeKubernetes, Scenario

from dinocell.launch import (
    KUEUE_QUEUE_LABEL,
    RESILIENT_MAX_RESTARTS,
    RESILIENT_RUN_POLICY,
    JobFailed,
    JobSpec,
    JobSpecError,
    JobSubmitError,
    JobTimeout,
    ManifestInvalid,
    build_job,
    build_pytorchjob,
    build_trainjob,
    make_api_client,
    pretrain_command,
    resolve_namespace,
    run_job,
    torchrun_command,
    unique_job_name,
    validate_object,
)
from dinocell.launch.logs import parse_log_timestamp

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


# ---- builders + vendored schemas ------------------------------------------------------------------------------


def test_pytorchjob_single_node_is_master_only_and_valid():
    job = build_pytorchjob(spec_for("pytorchjob", cpu="4", memory="16Gi"))
    validate_object(job)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert list(replicas) == ["Master"] and replicas["Master"]["replicas"] == 1
    container = replicas["Master"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"
    assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}]
    # no GPU asked for: no GPU resource at all (a 0 request would still need the device plugin's resource name)
    assert container["resources"] == {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "16Gi"}}
    assert job["spec"]["nprocPerNode"] == "1"
    assert job["spec"]["runPolicy"] == {"cleanPodPolicy": "None", "backoffLimit": 0}


def test_pytorchjob_multi_node_puts_gpus_placement_secret_and_shm_on_every_training_pod():
    spec = spec_for(
        "pytorchjob",
        nodes=3,
        gpus=8,
        node_selector=H100,
        tolerations=[GPU_TOLERATION],
        service_account="trainer",
        labels=LABELS,
        ttl_seconds_after_finished=3600,
        shm_size="32Gi",
    )
    job = build_pytorchjob(spec)
    validate_object(job)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 2)
    assert job["spec"]["nprocPerNode"] == "8"
    assert job["spec"]["runPolicy"]["ttlSecondsAfterFinished"] == 3600
    for rtype in ("Master", "Worker"):
        template = replicas[rtype]["template"]
        pod = template["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 8
        assert container["envFrom"] == [{"secretRef": {"name": "dinocell-storage"}}]
        assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
        assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}}]
        assert pod["nodeSelector"] == H100 and pod["tolerations"] == [GPU_TOLERATION]
        assert pod["serviceAccountName"] == "trainer"
        assert template["metadata"]["labels"] == LABELS
        assert "--master-addr=$(MASTER_ADDR)" in container["command"]


@pytest.mark.parametrize("nodes", [1, 2])
def test_trainjob_schema_valid_and_fields(nodes):
    spec = spec_for(
        "trainjob",
        nodes=nodes,
        gpus=8,
        cpu="32",
        memory="256Gi",
        node_selector=H100,
        tolerations=[GPU_TOLERATION],
        service_account="trainer",
        labels=LABELS,
        env={"WANDB_MODE": "offline"},
    )
    job = build_trainjob(spec)
    validate_object(job)
    assert job["spec"]["runtimeRef"] == {
        "name": "torch-distributed",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (nodes, 8)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    assert trainer["command"][:3] == ["torchrun", f"--nnodes={nodes}", "--nproc-per-node=8"]
    assert not any("$(" in a for a in trainer["command"])  # Trainer v2 sets PET_* only
    # credentials: one secretKeyRef per key (no envFrom in this API); only the endpoint may be absent
    env = {e["name"]: e for e in trainer["env"]}
    assert env["WANDB_MODE"] == {"name": "WANDB_MODE", "value": "offline"}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {
        "secretKeyRef": {"name": "dinocell-storage", "key": "AWS_ACCESS_KEY_ID"}
    }
    assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True
    (override,) = job["spec"]["podTemplateOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    assert override["metadata"] == {"labels": LABELS}
    pod = override["spec"]
    assert pod["nodeSelector"] == H100 and pod["tolerations"] == [GPU_TOLERATION]
    assert pod["serviceAccountName"] == "trainer"
    assert pod["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert pod["containers"] == [{"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}]


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_both_backends_hand_the_wandb_key_of_the_secret_to_the_training_container(backend):
    """W&B logging (train.wandb_mode: online) reads WANDB_API_KEY: the PyTorchJob takes the whole Secret (envFrom), the
    TrainJob, whose API has no envFrom, reads it key by key, optional like the endpoint (a Secret without it is fine)."""
    job = build_job(spec_for(backend, gpus=1, env_from_secret="team-secrets"), backend)
    validate_object(job)
    if backend == "pytorchjob":
        (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "team-secrets"}}]  # every key, WANDB_API_KEY too
        return
    env = {e["name"]: e for e in job["spec"]["trainer"]["env"]}
    assert env["WANDB_API_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "team-secrets", "key": "WANDB_API_KEY", "optional": True}}
    assert "optional" not in env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]  # credentials stay required
    # Without a Secret there is nothing to read, for either key.
    bare = build_trainjob(spec_for("trainjob", env_from_secret=None))
    assert not any(e["name"] == "WANDB_API_KEY" for e in bare["spec"]["trainer"].get("env", []))


def test_build_job_dispatches_by_backend():
    assert build_job(spec_for("trainjob"), "trainjob")["kind"] == "TrainJob"
    assert build_job(spec_for("pytorchjob"))["kind"] == "PyTorchJob"
    with pytest.raises(ValueError, match="backend 'mpijob'"):
        build_job(spec_for("pytorchjob"), "mpijob")


def test_pytorchjob_resilient_policy_queue_and_scheduler_render_and_validate():
    command = pretrain_command(CONFIG, {}, 2, 8, "pytorchjob", max_restarts=MAX_RESTARTS)
    spec = spec_for(
        "pytorchjob",
        nodes=2,
        gpus=8,
        labels=LABELS,
        queue_name="gpu-queue",
        scheduler_name="volcano",
        command=command,
        **RESILIENT,
    )
    job = build_pytorchjob(spec)
    validate_object(job)
    assert job["metadata"]["labels"] == {**LABELS, KUEUE_QUEUE_LABEL: "gpu-queue"}
    assert job["spec"]["runPolicy"] == {"cleanPodPolicy": "Running", "backoffLimit": 3}
    for rtype in ("Master", "Worker"):
        replica = job["spec"]["pytorchReplicaSpecs"][rtype]
        assert replica["restartPolicy"] == "OnFailure"
        assert replica["template"]["metadata"]["labels"] == LABELS  # the queue label stays off the pods
        assert replica["template"]["spec"]["schedulerName"] == "volcano"
        assert "--max-restarts=3" in replica["template"]["spec"]["containers"][0]["command"]
    # unset: no queue label, no schedulerName
    plain = build_pytorchjob(spec_for("pytorchjob", labels=LABELS))
    assert plain["metadata"]["labels"] == LABELS
    assert "schedulerName" not in plain["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert RESILIENT_RUN_POLICY == RESILIENT and RESILIENT_MAX_RESTARTS == MAX_RESTARTS


def test_trainjob_queue_label_on_the_job_only_and_max_restarts_in_the_command():
    command = pretrain_command(CONFIG, {}, 2, 8, "trainjob", max_restarts=MAX_RESTARTS)
    spec = spec_for("trainjob", nodes=2, gpus=8, labels=LABELS, queue_name="gpu-queue", command=command)
    job = build_trainjob(spec)
    validate_object(job)
    assert job["metadata"]["labels"] == {**LABELS, KUEUE_QUEUE_LABEL: "gpu-queue"}
    assert job["spec"]["labels"] == LABELS  # the JobSet's labels: Kueue would queue it a second time
    assert job["spec"]["podTemplateOverrides"][0]["metadata"] == {"labels": LABELS}
    assert job["spec"]["trainer"]["command"][:4] == ["torchrun", "--nnodes=2", "--nproc-per-node=8", "--max-restarts=3"]
    # the runtime's JobSet owns restarts, cleanup and the scheduler: refused, not dropped
    with pytest.raises(JobSpecError, match="scheduler_name"):
        build_trainjob(spec_for("trainjob", scheduler_name="volcano"))
    with pytest.raises(JobSpecError, match="restart_policy.*runtime 'torch-distributed'"):
        build_trainjob(spec_for("trainjob", restart_policy="OnFailure"))


def test_builders_refuse_commands_and_fields_of_the_other_backend():
    with pytest.raises(JobSpecError, match=r"\$\(RANK\).*backend='trainjob'"):
        build_trainjob(spec_for("pytorchjob"))  # v1 rendezvous vars would reach torchrun unexpanded
    with pytest.raises(JobSpecError, match="ttl_seconds_after_finished"):
        build_trainjob(spec_for("trainjob", ttl_seconds_after_finished=60))
    with pytest.raises(JobSpecError, match="--master-addr"):
        build_pytorchjob(spec_for("trainjob", nodes=2, gpus=2))  # would rendezvous on 127.0.0.1 and hang


def test_name_must_leave_room_for_derived_names():
    name = "a" * 54
    build_pytorchjob(spec_for("pytorchjob", name=name, nodes=11))  # service '<name>-worker-9': 63 chars
    with pytest.raises(JobSpecError, match=r"service name '.*-worker-10' exceeds 63.*<= 53"):
        build_pytorchjob(spec_for("pytorchjob", name=name, nodes=12))
    build_trainjob(spec_for("trainjob", name=name, nodes=2, command=["python"]))  # host '<name>-node-0-1'
    with pytest.raises(JobSpecError, match=r"pod hostname '.*-node-0-1' exceeds 63"):
        build_trainjob(spec_for("trainjob", name=name + "b", nodes=2, command=["python"]))


# ---- validation reports the JSON path -----------------------------------------------------------------------


def _master(job):
    return job["spec"]["pytorchReplicaSpecs"]["Master"]


@pytest.mark.parametrize(
    "mutate, path, text",
    [
        (lambda j: j["spec"].__setitem__("nprocsPerNode", "8"), "$.spec.nprocsPerNode", "unknown field"),
        (
            lambda j: _master(j).__setitem__("replicas", "one"),
            "$.spec.pytorchReplicaSpecs.Master.replicas",
            "not of type 'integer'",
        ),
        (
            lambda j: _master(j)["template"]["spec"]["containers"][0]["resources"]["limits"].__setitem__(
                "nvidia.com/gpu", "eight"
            ),
            '$.spec.pytorchReplicaSpecs.Master.template.spec.containers[0].resources.limits["nvidia.com/gpu"]',
            "does not match",
        ),
        (
            lambda j: _master(j)["template"]["spec"]["containers"][0].__setitem__(
                "env", [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]
            ),
            "$.spec.pytorchReplicaSpecs.Master.template.spec.containers[0].env[1]",
            "duplicate entry (name='A')",
        ),
        (
            lambda j: j["spec"]["runPolicy"].__setitem__("backoffLimit", 2**31),
            "$.spec.runPolicy.backoffLimit",
            "does not fit int32",
        ),
        (
            lambda j: _master(j).__setitem__("replicas", 2),
            "$.spec.pytorchReplicaSpecs.Master.replicas",
            "exactly 1 replica",
        ),
        (
            lambda j: _master(j)["template"]["spec"]["containers"][0].__setitem__("name", "main"),
            "$.spec.pytorchReplicaSpecs.Master.template.spec.containers",
            "no container named 'pytorch'",
        ),
        (
            lambda j: j["spec"]["pytorchReplicaSpecs"].__setitem__("Chief", copy.deepcopy(_master(j))),
            "$.spec.pytorchReplicaSpecs.Chief",
            "must be 'Master' or 'Worker'",
        ),
        (lambda j: j["metadata"].__setitem__("name", "Dino_Pre"), "$.metadata.name", "RFC 1035"),
        (
            lambda j: (
                _master(j)["template"]
                .setdefault("metadata", {})
                .setdefault("labels", {})
                .__setitem__(KUEUE_QUEUE_LABEL, "gpus")
            ),
            '$.spec.pytorchReplicaSpecs.Master.template.metadata.labels["kueue.x-k8s.io/queue-name"]',
            "job's metadata only",
        ),
        (
            lambda j: _master(j)["template"]["spec"]["volumes"][0].pop("name"),
            "$.spec.pytorchReplicaSpecs.Master.template.spec.volumes[0]",
            "'name' is a required property",
        ),
    ],
)
def test_pytorchjob_validation_names_the_path(mutate, path, text):
    job = build_pytorchjob(spec_for("pytorchjob", gpus=1))
    mutate(job)
    with pytest.raises(ManifestInvalid) as info:
        validate_object(job)
    assert info.value.path == path
    assert text in info.value.errors[0][1]
    assert path in str(info.value)


@pytest.mark.parametrize(
    "mutate, path, text",
    [
        (lambda j: j["spec"].pop("runtimeRef"), "$.spec", "'runtimeRef' is a required property"),
        (
            lambda j: j["spec"]["trainer"].__setitem__("numNodes", 2.5),
            "$.spec.trainer.numNodes",
            "not of type 'integer'",
        ),
        (
            lambda j: j["spec"]["podTemplateOverrides"][0].pop("targetJobs"),
            "$.spec.podTemplateOverrides[0]",
            "'targetJobs' is a required property",
        ),
        (
            lambda j: j["spec"]["trainer"].__setitem__("numProcPerNode", 0),
            "$.spec.trainer.numProcPerNode",
            "positive integer",
        ),
        (lambda j: j["metadata"].__setitem__("name", "9lives"), "$.metadata.name", "RFC 1035"),
        (lambda j: j["spec"]["trainer"].__setitem__("envFrom", []), "$.spec.trainer.envFrom", "unknown field"),
        (
            lambda j: j["spec"].__setitem__("labels", {KUEUE_QUEUE_LABEL: "gpus"}),
            '$.spec.labels["kueue.x-k8s.io/queue-name"]',
            "job's metadata only",
        ),
    ],
)
def test_trainjob_validation_names_the_path(mutate, path, text):
    job = build_trainjob(spec_for("trainjob", node_selector=H100))
    mutate(job)
    with pytest.raises(ManifestInvalid) as info:
        validate_object(job)
    assert info.value.path == path and text in info.value.errors[0][1]


def test_non_strict_validation_allows_unknown_fields_like_a_pruning_api_server():
    job = build_pytorchjob(spec_for("pytorchjob"))
    job["spec"]["nprocsPerNode"] = "8"
    validate_object(job, strict=False)
    with pytest.raises(ManifestInvalid, match="no vendored schema"):
        validate_object({**job, "kind": "MPIJob"})


# ---- JobSpec ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, text",
    [
        ("name", "Dino", "JobSpec.name"),
        ("nodes", 0, "JobSpec.nodes: must be >= 1"),
        ("nproc_per_node", 4, "JobSpec.nproc_per_node: 4 processes per node but only 2 GPUs"),
        ("memory", "16GB", "JobSpec.memory: '16GB' is not a Kubernetes quantity"),
        ("env", {"RANK": "0"}, "JobSpec.env['RANK']: is set by the training operator"),
        (
            "tolerations",
            [{"key": "x", "operator": "Exists", "value": "y"}],
            "JobSpec.tolerations[0]: operator 'Exists' takes no value",
        ),
        ("tolerations", [{"key": "x", "effects": "NoSchedule"}], "unknown key(s) ['effects']"),
        (
            "node_selector",
            {"nvidia.com/gpu.product": "H100 80GB"},
            "JobSpec.node_selector['nvidia.com/gpu.product']: label value",
        ),
        ("clean_pod_policy", "Always", "JobSpec.clean_pod_policy"),
        ("optional_secret_keys", ("AWS_REGION",), "not in secret_keys"),
        ("command", [], "JobSpec.command"),
        ("queue_name", "gpu queue", "JobSpec.queue_name['kueue.x-k8s.io/queue-name']: label value"),
        ("labels", {KUEUE_QUEUE_LABEL: "gpus"}, "set JobSpec.queue_name instead"),
        ("scheduler_name", "My_Scheduler", "JobSpec.scheduler_name: 'My_Scheduler' is not a scheduler name"),
        ("restart_policy", "Sometimes", "JobSpec.restart_policy"),
    ],
)
def test_jobspec_rejects_bad_fields_by_name(field, value, text):
    kw = {"name": "dino", "image": "img:1", "command": ["python", "-V"], "gpus_per_node": 2, "nproc_per_node": 2}
    kw[field] = value
    with pytest.raises(JobSpecError) as info:
        JobSpec(**kw)
    assert text in str(info.value)


def test_jobspec_from_dict_names_unknown_and_missing_keys():
    ok = JobSpec.from_dict({"name": "dino", "image": "img:1", "command": ["python"], "nodes": 2}, where="cfg.k8s")
    assert ok.nodes == 2 and ok.world_size == 2
    with pytest.raises(JobSpecError, match=r"cfg\.k8s: unknown key\(s\) \['gpus'\]"):
        JobSpec.from_dict({"name": "dino", "image": "img:1", "command": ["python"], "gpus": 8}, where="cfg.k8s")
    with pytest.raises(JobSpecError, match=r"cfg\.k8s: .*'image'"):
        JobSpec.from_dict({"name": "dino", "command": ["python"]}, where="cfg.k8s")


def test_unique_job_name_is_a_short_valid_label():
    a, b = unique_job_name("DinoCell_Pretrain!"), unique_job_name("DinoCell_Pretrain!")
    assert a != b and len(a) <= 40
    assert re.fullmatch(r"dinocell-pretrain-\d{12}-[0-9a-f]{4}", a)
    assert unique_job_name("123")[0] == "j"


# ---- the torchrun command, as torchrun parses it ------------------------------------------------------------------


def test_torchrun_command_exact():
    assert torchrun_command(2, 8, "trainjob", module_args=["pretrain"]) == [
        "torchrun",
        "--nnodes=2",
        "--nproc-per-node=8",
        "-m",
        "dinocell.cli",
        "pretrain",
    ]
    assert pretrain_command("s3://b/c.yaml", {"optim.lr": 1e-4, "data.cache": True}, 1, 1, "pytorchjob") == [
        "torchrun",
        "--nnodes=1",
        "--nproc-per-node=1",
        "--node-rank=$(RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "-m",
        "dinocell.cli",
        "pretrain",
        "--config",
        "s3://b/c.yaml",
        "--set",
        "optim.lr=0.0001",
        "--set",
        "data.cache=true",
    ]
    with pytest.raises(JobSpecError, match="key=value"):
        pretrain_command("s3://b/c.yaml", ["lr"])


def test_torchrun_max_restarts_flag():
    assert torchrun_command(1, 1, "pytorchjob", module_args=["pretrain"], max_restarts=2) == [
        "torchrun",
        "--nnodes=1",
        "--nproc-per-node=1",
        "--max-restarts=2",
        "--node-rank=$(RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "-m",
        "dinocell.cli",
        "pretrain",
    ]
    assert "--max-restarts=0" not in torchrun_command(1, 1, "trainjob", max_restarts=0)
    for bad in (-1, True, "3"):
        with pytest.raises(JobSpecError, match="max_restarts must be an integer >= 0"):
            torchrun_command(1, 1, "trainjob", max_restarts=bad)
    run = pytest.importorskip("torch.distributed.run")
    args = run.get_args_parser().parse_args(pretrain_command(CONFIG, {}, 2, 8, "trainjob", max_restarts=3)[1:])
    assert args.max_restarts == 3 and args.training_script_args == ["pretrain", "--config", CONFIG]


def _kubelet_expand(arg: str, env: dict) -> str:
    """$(VAR) -> value for defined VARs, $$ -> $ (the kubelet's expansion of container command/args)."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        arg,
    )


def test_torchrun_reads_what_each_operator_injects(monkeypatch):
    run = pytest.importorskip("torch.distributed.run")
    # Training Operator v1, worker 1 of a 2-node job: MASTER_ADDR/PORT and RANK only (no PET_MASTER_*)
    for var in ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    v1_env = {"MASTER_ADDR": "dino-master-0", "MASTER_PORT": "23456", "RANK": "1", "WORLD_SIZE": "16"}
    argv = [_kubelet_expand(a, v1_env) for a in pretrain_command(CONFIG, {}, 2, 8, "pytorchjob")]
    args = run.get_args_parser().parse_args(argv[1:])
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert (args.master_addr, args.master_port, args.module, args.training_script) == (
        "dino-master-0",
        23456,
        True,
        "dinocell.cli",
    )
    assert args.training_script_args == ["pretrain", "--config", CONFIG]
    # Trainer v2, node 1: PET_* variables, no $(...) in the command
    for var, value in {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "8",
        "PET_NODE_RANK": "1",
        "PET_MASTER_ADDR": "dino-node-0-0.dino",
        "PET_MASTER_PORT": "29400",
    }.items():
        monkeypatch.setenv(var, value)
    args = run.get_args_parser().parse_args(pretrain_command(CONFIG, {}, 2, 8, "trainjob")[1:])
    assert (args.node_rank, args.master_addr, int(args.master_port)) == (1, "dino-node-0-0.dino", 29400)


# ---- manifests ----------------------------------------------------------------------------------------------------

# What the overlays run: a failed job frees its GPUs (surviving replicas deleted), a lost process or node is retried.
RESILIENT = {"restart_policy": "OnFailure", "backoff_limit": 3, "clean_pod_policy": "Running"}
MAX_RESTARTS = 3
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


# ---- launcher against the fake API server -------------------------------------------------------------------------

BACKEND_FAILURE = {
    "pytorchjob": ("PyTorchJobFailed", "1 Master replica(s) failed."),
    "trainjob": ("FailedJobs", "jobset dino-pre failed: job node-0 backoff limit reached"),
}


@pytest.fixture
def fake():
    with FakeKubernetes() as server:
        yield server


def _client(fake):
    return make_api_client(host=fake.url)


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_run_job_success_streams_each_log_line_once_and_cleans_up(fake, backend):
    lines = [f"step {i} loss {1 / (i + 1):.4f}" for i in range(7)] + ['{"step": 7, "loss": 0.125}']
    fake.script("dino-pre", Scenario(start_after=2, run_polls=3, log_lines=lines))
    seen = []
    spec = spec_for(backend, nodes=2, gpus=2, namespace="team-a")
    result = run_job(spec, backend, _client(fake), poll_s=POLL, start_timeout_s=30, log_sink=seen.append)
    assert seen == lines  # in order, none twice, JSON-looking lines untouched
    assert (result.log_lines, result.log_tail[-1], result.namespace) == (len(lines), lines[-1], "team-a")
    assert result.state == ("Succeeded" if backend == "pytorchjob" else "Complete")
    assert result.master_pod.startswith("dino-pre-master-0" if backend == "pytorchjob" else "dino-pre-node-0-0-")
    assert result.deleted and fake.deleted == [(f"{backend}s", "team-a", "dino-pre")]
    created = fake.created[0]
    expected = build_job(spec, backend)
    assert created["spec"] == expected["spec"] and created["kind"] == expected["kind"]
    log_calls = [q for m, p, q in fake.requests if p.endswith("/log")]
    assert log_calls and all(q["container"] == ("pytorch" if backend == "pytorchjob" else "node") for q in log_calls)
    assert "sinceSeconds" not in log_calls[0] and all("sinceSeconds" in q for q in log_calls[1:])


def test_cleanup_never_keeps_a_succeeded_job(fake):
    result = run_job(
        spec_for("pytorchjob", namespace="ns1"),
        "pytorchjob",
        _client(fake),
        poll_s=POLL,
        cleanup="never",
        log_sink=lambda line: None,
    )
    assert not result.deleted and fake.deleted == [] and ("pytorchjobs", "ns1", "dino-pre") in fake.jobs


@pytest.mark.parametrize("backend, cleanup", [("pytorchjob", "on_success"), ("trainjob", "always")])
def test_failed_job_raises_with_reason_and_log_tail(fake, backend, cleanup):
    reason, message = BACKEND_FAILURE[backend]
    fake.script(
        "dino-pre",
        Scenario(
            outcome="fail",
            reason=reason,
            message=message,
            log_lines=["step 0 loss 1.0", "Traceback (most recent call last):", "CUDA error: out of memory"],
        ),
    )
    with pytest.raises(JobFailed) as info:
        run_job(
            spec_for(backend, namespace="ns1"),
            backend,
            _client(fake),
            poll_s=POLL,
            cleanup=cleanup,
            log_sink=lambda line: None,
        )
    err = info.value
    assert (err.reason, err.message) == (reason, message) and not isinstance(err, JobTimeout)
    assert err.log_tail[-1] == "CUDA error: out of memory" and "CUDA error: out of memory" in str(err)
    assert f"ns1/dino-pre failed: {reason}" in str(err)
    assert err.deleted is (cleanup == "always")
    assert (("pytorchjobs" if backend == "pytorchjob" else "trainjobs", "ns1", "dino-pre") in fake.jobs) is (
        cleanup != "always"
    )


@pytest.mark.parametrize(
    "backend, last_condition",
    [
        ("pytorchjob", "Created=True reason=PyTorchJobCreated"),
        ("trainjob", "no condition reported yet"),
    ],
)
def test_job_that_never_starts_hits_the_start_timeout(fake, backend, last_condition):
    fake.script(
        "dino-pre",
        Scenario(outcome="never_start", pending_message="0/4 nodes are available: 4 Insufficient nvidia.com/gpu."),
    )
    with pytest.raises(JobTimeout) as info:
        run_job(
            spec_for(backend, gpus=8, namespace="ns1"),
            backend,
            _client(fake),
            poll_s=POLL,
            start_timeout_s=0.4,
            timeout_s=10,
            cleanup="always",
            log_sink=lambda line: None,
        )
    err = info.value
    text = str(err)
    assert err.reason == "StartTimeout" and err.deleted
    assert "ns1/dino-pre did not start within 0.4 s" in text
    assert last_condition in text
    assert "unscheduled (Unschedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu.)" in text


def test_overall_timeout_stops_a_job_that_runs_too_long(fake):
    fake.script("dino-pre", Scenario(run_polls=10_000))
    with pytest.raises(JobTimeout) as info:
        run_job(
            spec_for("pytorchjob", namespace="ns1"),
            "pytorchjob",
            _client(fake),
            poll_s=POLL,
            timeout_s=0.4,
            cleanup="on_success",
            log_sink=lambda line: None,
        )
    assert info.value.reason == "Timeout" and "still running after the 0.4 s timeout" in str(info.value)
    assert not info.value.deleted and ("pytorchjobs", "ns1", "dino-pre") in fake.jobs


def test_submit_errors_explain_conflict_and_missing_crd(fake):
    spec = spec_for("pytorchjob", namespace="ns1")
    run_job(spec, "pytorchjob", _client(fake), poll_s=POLL, cleanup="never", log_sink=lambda line: None)
    with pytest.raises(JobSubmitError, match="HTTP 409.*already exists.*unique_job_name"):
        run_job(spec, "pytorchjob", _client(fake), poll_s=POLL, log_sink=lambda line: None)
    with (
        FakeKubernetes(kinds={("kubeflow.org", "v1", "pytorchjobs"): "PyTorchJob"}) as no_trainer,
        pytest.raises(JobSubmitError, match="HTTP 404.*TrainJob CRD installed"),
    ):
        run_job(spec_for("trainjob", namespace="ns1"), "trainjob", make_api_client(host=no_trainer.url), poll_s=POLL)


def test_default_kubeconfig_is_used_outside_a_cluster(fake, tmp_path, monkeypatch):
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u", "namespace": "ns1"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    result = run_job(spec_for("pytorchjob", namespace="ns1"), "pytorchjob", poll_s=POLL, log_sink=lambda line: None)
    assert result.state == "Succeeded"
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="no Kubernetes credentials"):
        make_api_client()


def test_namespace_resolution_order(tmp_path):
    sa = tmp_path / "namespace"
    spec_ns, spec_plain = spec_for("pytorchjob", namespace="from-spec"), spec_for("pytorchjob")
    sa.write_text("kubeflow-user\n")
    assert resolve_namespace("explicit", spec_ns, sa) == "explicit"
    assert resolve_namespace(None, spec_ns, sa) == "from-spec"
    assert resolve_namespace(None, spec_plain, sa) == "kubeflow-user"
    with pytest.raises(ValueError, match="no namespace for the job"):
        resolve_namespace(None, spec_plain, tmp_path / "absent")


def test_run_job_rejects_bad_arguments_before_contacting_the_cluster():
    spec = spec_for("pytorchjob", namespace="ns1")
    with pytest.raises(ValueError, match="cleanup 'sometimes'"):
        run_job(spec, cleanup="sometimes", api_client=object())
    with pytest.raises(ValueError, match="backend 'tfjob'"):
        run_job(spec, "tfjob", api_client=object())


def test_log_timestamps_compare_numerically_despite_trimmed_fractions():
    a = parse_log_timestamp("2026-01-02T03:04:05.5Z")
    b = parse_log_timestamp("2026-01-02T03:04:05.123456789Z")
    c = parse_log_timestamp("2026-01-02T05:04:05.5+02:00")
    assert b < a == c and a - b == 376_543_211
    assert parse_log_timestamp("2026-01-02T03:04:05Z") % 1_000_000_000 == 0
    assert parse_log_timestamp("step 3") is None


# ---- queued / pending jobs ----------------------------------------------------------------------------------------


@pytest.fixture
def launch_log():
    """Records of the dinocell.launch loggers (a handler of its own: the 'dinocell' logger may not propagate)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("dinocell.launch")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _messages(records) -> list[str]:
    return [r.getMessage() for r in records]


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
@pytest.mark.parametrize("kueue_api", [True, False])
def test_job_waiting_in_a_kueue_queue_is_reported_queued_then_runs(backend, kueue_api, launch_log):
    with FakeKubernetes(kueue=kueue_api) as fake:
        fake.script("dino-pre", Scenario(queued_polls=5))
        spec = spec_for(backend, gpus=8, queue_name="gpu-queue", namespace="ns1")
        result = run_job(spec, backend, _client(fake), poll_s=POLL, start_timeout_s=30, log_sink=lambda line: None)
    assert result.state == ("Succeeded" if backend == "pytorchjob" else "Complete") and result.deleted
    assert result.start_wait_s >= 4 * POLL and result.start_wait_s < result.elapsed_s
    assert fake.created[0]["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-queue"
    messages = _messages(launch_log)
    queued = [m for m in messages if m.startswith(f"{build_job(spec, backend)['kind']} ns1/dino-pre queued after")]
    assert len(queued) == 1, messages  # one line per change, not one per poll
    assert "waiting for admission to Kueue queue 'gpu-queue'" in queued[0]
    assert "(waiting up to 30 s for it to start)" in queued[0]
    if kueue_api:  # the Workload says why
        assert "QuotaReserved=False (Pending: couldn't assign flavors" in queued[0]
        uid = fake.created[0]["metadata"]["uid"]
        workload_calls = [
            q for m, p, q in fake.requests if p == "/apis/kueue.x-k8s.io/v1beta1/namespaces/ns1/workloads"
        ]
        assert workload_calls and all(q["labelSelector"] == f"kueue.x-k8s.io/job-uid={uid}" for q in workload_calls)
    else:  # no Kueue API: the Suspended condition says it
        assert "Suspended" in queued[0] and "is suspended" in queued[0]
    assert not any("failed" in m for m in messages)
    assert messages.index(queued[0]) < next(i for i, m in enumerate(messages) if "started after" in m)


def test_job_queued_past_the_start_timeout_times_out_as_queued_and_is_deleted(fake, launch_log):
    fake.script("dino-pre", Scenario(queued_polls=10_000))
    spec = spec_for("pytorchjob", gpus=8, queue_name="gpu-queue", namespace="ns1")
    with pytest.raises(JobTimeout) as info:
        run_job(spec, "pytorchjob", _client(fake), poll_s=POLL, start_timeout_s=0.3, log_sink=lambda line: None)
    err = info.value
    assert (err.reason, err.state) == ("StartTimeout", "queued")
    text = str(err)
    assert (
        "ns1/dino-pre did not start within 0.3 s, still queued: waiting for admission to Kueue queue 'gpu-queue'"
        in text
    )
    assert "insufficient unused quota for nvidia.com/gpu in flavor h100, 8 more needed" in text
    assert "last condition: Suspended=True reason=PyTorchJobSuspended" in text
    # never started: deleted even under cleanup='on_success', so it cannot start later, unwatched
    assert err.deleted and ("pytorchjobs", "ns1", "dino-pre") not in fake.jobs
    assert any("queued after" in m for m in _messages(launch_log))


def test_unschedulable_job_is_queued_not_failed_and_cleanup_never_keeps_it(fake, launch_log):
    fake.script("dino-pre", Scenario(outcome="never_start"))
    with pytest.raises(JobTimeout) as info:
        run_job(
            spec_for("trainjob", gpus=8, namespace="ns1"),
            "trainjob",
            _client(fake),
            poll_s=POLL,
            start_timeout_s=0.3,
            cleanup="never",
            log_sink=lambda line: None,
        )
    err = info.value
    assert (err.reason, err.state, err.deleted) == ("StartTimeout", "queued", False)
    assert ("trainjobs", "ns1", "dino-pre") in fake.jobs
    (line,) = [m for m in _messages(launch_log) if "queued after" in m]
    assert "master pod dino-pre-node-0-0-" in line and "unscheduled (Unschedulable: 0/4 nodes are available" in line
    assert err.message.startswith("master pod dino-pre-node-0-0-")
    assert not any(r.levelno >= logging.WARNING for r in launch_log)
    assert not any("workloads" in p for m, p, q in fake.requests)  # no queue label: Kueue is not asked


def test_no_start_timeout_waits_as_long_as_the_job_is_queued(fake, launch_log):
    fake.script("dino-pre", Scenario(queued_polls=8))
    result = run_job(
        spec_for("pytorchjob", queue_name="gpu-queue", namespace="ns1"),
        "pytorchjob",
        _client(fake),
        poll_s=POLL,
        start_timeout_s=None,
        timeout_s=30,
        log_sink=lambda line: None,
    )
    assert result.state == "Succeeded" and result.start_wait_s >= 7 * POLL
    assert any("queued after" in m and "(no start timeout)" in m for m in _messages(launch_log))
    with pytest.raises(ValueError, match="start_timeout_s"):
        run_job(spec_for("pytorchjob", namespace="ns1"), start_timeout_s=0, api_client=object())


def test_waiting_state_tells_queued_from_pending():
    from kubernetes.client import (
        V1ContainerState,
        V1ContainerStateWaiting,
        V1ContainerStatus,
        V1ObjectMeta,
        V1Pod,
        V1PodCondition,
        V1PodStatus,
    )

    from dinocell.launch.backends import get_backend
    from dinocell.launch.status import waiting_state

    bk, job = get_backend("pytorchjob"), {"metadata": {"name": "j"}, "spec": {}}

    def pod(**status):
        return V1Pod(metadata=V1ObjectMeta(name="j-master-0"), status=V1PodStatus(phase="Pending", **status))

    pulling = pod(
        conditions=[V1PodCondition(type="PodScheduled", status="True")],
        container_statuses=[
            V1ContainerStatus(
                name="pytorch",
                image="x",
                image_id="",
                ready=False,
                restart_count=0,
                state=V1ContainerState(
                    waiting=V1ContainerStateWaiting(reason="ImagePullBackOff", message="no such tag")
                ),
            )
        ],
    )
    assert waiting_state(bk, job, pulling) == (
        "pending",
        "master pod j-master-0: container pytorch waiting (ImagePullBackOff: no such tag)",
    )
    gated = pod(conditions=[V1PodCondition(type="PodScheduled", status="False", reason="SchedulingGated", message="")])
    assert waiting_state(bk, job, gated)[0] == "queued"
    assert waiting_state(bk, job, None) == ("pending", "no master pod created yet")
    suspended = {"metadata": {"name": "j"}, "spec": {"runPolicy": {"suspend": True}}}
    assert waiting_state(bk, suspended, None) == ("queued", "waiting for the job to be resumed (it is suspended)")


def test_launcher_module_still_offers_its_old_names():
    from dinocell.launch import launcher, logs

    assert launcher.parse_log_timestamp is logs.parse_log_timestamp
    assert launcher.get_backend("trainjob").kind == "TrainJob" and launcher.run_job is run_job
    assert launcher.JobTimeout is JobTimeout and issubclass(launcher.JobTimeout, launcher.JobFailed)
    assert set(launcher.CLEANUP_POLICIES) == {"always", "on_success", "never"}
