"""dinocell.launch builders: PyTorchJob/TrainJob against the vendored CRD schemas (validation names the JSON path),
JobSpec checks, and the torchrun command as torchrun itself parses it."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from k8s_common import CONFIG, GPU_TOLERATION, H100, LABELS, MAX_RESTARTS, RESILIENT, spec_for

from dinocell.launch import (
    KUEUE_QUEUE_LABEL,
    RESILIENT_MAX_RESTARTS,
    RESILIENT_RUN_POLICY,
    JobSpec,
    JobSpecError,
    ManifestInvalid,
    build_job,
    build_pytorchjob,
    build_trainjob,
    pretrain_command,
    torchrun_command,
    unique_job_name,
    validate_object,
)

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


