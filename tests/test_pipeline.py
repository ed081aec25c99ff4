"""The Kubeflow pipeline: compiled IR structure, task-level cluster settings, argument typing, the step helpers, the
train launcher against a fake Kubernetes API, and one real local run of the whole
pipeline (kfp.local subprocesses, local S3 server, tiny config) whose published model must load and verify."""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipeline as pl  # noqa: E402  (the repo-root pipeline.py)
from components import IMAGE, TRAIN_IMAGE  # noqa: E402
from dinocell import storage  # noqa: E402
from dinocell.config import step_args  # noqa: E402
from dinocell.data.step import shard as shard_step  # noqa: E402
from dinocell.eval.step import inline_images  # noqa: E402
from dinocell.jump.step import discover as discover_step  # noqa: E402
from dinocell.launch.step import DEFAULT_SECRET  # noqa: E402
from dinocell.launch.step import train as train_step  # noqa: E402
from dinocell.pipeline import submit as pipeline_submit  # noqa: E402
from dinocell.pipeline.layout import RunLayout  # noqa: E402
from dinocell.pipeline.outcome import collect_outcome  # noqa: E402
from dinocell.pipeline.pointers import read_pointer, write_pointer  # noqa: E402

COMPONENTS = ("discover", "shard", "train", "evaluate", "publish")
EXPECTED_PARAMETERS = {
    "images_prefix": "STRING", "load_data": "LIST", "discovery_mode": "STRING", "s3_endpoint": "STRING",
    "s3_anonymous": "BOOLEAN", "config": "STRING", "overrides": "LIST", "output_root": "STRING", "run_name": "STRING",
    "backend": "STRING", "nodes": "NUMBER_INTEGER", "gpus_per_node": "NUMBER_INTEGER",
    "nproc_per_node": "NUMBER_INTEGER", "train_image": "STRING", "node_selector": "STRUCT", "tolerations": "LIST",
    "secret_name": "STRING", "namespace": "STRING", "cpu_per_node": "STRING", "memory_per_node": "STRING",
    "train_timeout_hours": "NUMBER_DOUBLE", "eval_baseline": "STRING", "models_prefix": "STRING",
    "model_name": "STRING", "model_version": "STRING",
}


def _compile(tmp_path, options=None, name="pipeline.yaml"):
    path = pl.compile_pipeline(tmp_path / name, options)
    docs = list(yaml.safe_load_all(path.read_text()))
    spec = docs[0]
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    return path, spec, platform


# ---- compiled IR ------------------------------------------------------------------------------------------------


def test_compiled_pipeline_structure(tmp_path):
    path, spec, platform = _compile(tmp_path)
    assert spec["pipelineInfo"]["name"] == "dinocell-pretrain"
    assert set(spec["components"]) == {f"comp-{c}" for c in COMPONENTS}

    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {k: v["parameterType"] for k, v in params.items()} == EXPECTED_PARAMETERS
    assert params["backend"]["defaultValue"] == "pytorchjob"
    assert params["secret_name"]["defaultValue"] == DEFAULT_SECRET
    assert params["train_image"]["defaultValue"] == TRAIN_IMAGE

    # Flat DAG: five tasks, each data dependency an artifact edge.
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == set(COMPONENTS)
    deps = {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()}
    assert deps == {"discover": set(), "shard": {"discover"}, "train": {"discover", "shard"},
                    "evaluate": {"discover", "train"}, "publish": {"train", "evaluate"}}
    arts = tasks["evaluate"]["inputs"]["artifacts"]
    assert arts["checkpoint"]["taskOutputArtifact"] == {"outputArtifactKey": "checkpoint", "producerTask": "train"}
    assert arts["manifest"]["taskOutputArtifact"] == {"outputArtifactKey": "manifest", "producerTask": "discover"}
    assert tasks["publish"]["inputs"]["parameters"]["metrics_uri"]["taskOutputParameter"] == {
        "outputParameterKey": "Output", "producerTask": "evaluate"}
    for name in ("train", "evaluate", "publish"):  # per-run steps name their run by the job id when run_name is empty
        params = tasks[name]["inputs"]["parameters"]
        assert params["job_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
        assert params["run_name"]["componentInputParameter"] == "run_name"
        assert tasks[name]["cachingOptions"] == {}, name  # caching off: a run is never replayed from cache
    for name in ("discover", "shard"):  # content-addressed data: nothing per run, cached (tests/test_caching.py)
        assert not {"job_id", "run_name"} & set(tasks[name]["inputs"]["parameters"]), name
        assert tasks[name]["cachingOptions"] == {"enableCache": True}, name

    # Typed outputs.
    def out_types(comp):
        return {k: v["artifactType"]["schemaTitle"]
                for k, v in spec["components"][f"comp-{comp}"]["outputDefinitions"]["artifacts"].items()}

    assert out_types("discover") == {"manifest": "system.Dataset", "summary": "system.Markdown"}
    assert out_types("shard") == {"shards": "system.Dataset"}
    assert out_types("train") == {"checkpoint": "system.Model"}
    assert out_types("evaluate") == {"metrics": "system.Metrics", "report": "system.HTML", "summary": "system.Markdown"}
    assert out_types("publish") == {"model": "system.Model"}

    # Thin components on the one image: no pip install at run time, the package does the work.
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) == {f"exec-{c}" for c in COMPONENTS}
    for name, ex in executors.items():
        c = ex["container"]
        assert c["image"] == IMAGE, name
        text = " ".join(c["command"])
        assert "pip install" not in text and re.search(r"from dinocell\.\w+ import step\b", text), name
        assert "accelerator" not in c.get("resources", {}), name  # no GPU on any step pod by default (the training pods get them)

    # Storage credentials from the secret named by the parameter, on every step; the endpoint key optional (and the
    # W&B key on the train task, which trains itself with backend=local).
    assert set(platform) == set(executors)
    for name, cfg in platform.items():
        assert set(cfg) == ({"secretAsEnv", "fieldPathAsEnv"} if name == "exec-train" else {"secretAsEnv"}), name
        required, optional = cfg["secretAsEnv"]
        assert required["secretNameParameter"] == {"componentInputParameter": "secret_name"}
        assert [m["secretKey"] for m in required["keyToEnv"]] == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
        assert required["optional"] is False
        expected = ["AWS_ENDPOINT_URL", "WANDB_API_KEY"] if name == "exec-train" else ["AWS_ENDPOINT_URL"]
        assert [m["envVar"] for m in optional["keyToEnv"]] == expected and optional["optional"] is True
    # The launcher learns its own pod (downward API) to own the training job it creates (tests/test_cancel.py).
    assert platform["exec-train"]["fieldPathAsEnv"] == [
        {"name": "POD_NAME", "fieldPath": "metadata.name"}, {"name": "POD_UID", "fieldPath": "metadata.uid"},
        {"name": "POD_NAMESPACE", "fieldPath": "metadata.namespace"}]

    # It loads back as a component with the same interface.
    from kfp.components import load_component_from_file

    loaded = load_component_from_file(str(path))
    assert loaded.name == "dinocell-pretrain"
    assert set(loaded.component_spec.inputs) == set(EXPECTED_PARAMETERS)


def test_task_options_put_gpu_placement_on_the_train_task_only(tmp_path):
    tol = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    sel = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    opts = pl.TaskOptions(local_gpus=2, local_node_selector=sel, local_tolerations=[tol])
    _, spec, platform = _compile(tmp_path, opts)
    executors = spec["deploymentSpec"]["executors"]
    train = executors["exec-train"]["container"]
    assert train["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert train["resources"]["accelerator"]["resourceCount"] == "2"
    assert train["image"] == TRAIN_IMAGE
    assert platform["exec-train"]["nodeSelector"] == {"labels": sel}
    assert platform["exec-train"]["tolerations"] == [tol]
    for name in ("exec-discover", "exec-shard", "exec-evaluate", "exec-publish"):
        assert "accelerator" not in executors[name]["container"].get("resources", {})
        assert executors[name]["container"]["image"] == IMAGE
        assert set(platform[name]) == {"secretAsEnv"}


def test_compile_cli_options_and_no_secret(tmp_path):
    out = tmp_path / "p.yaml"
    assert pl.main(["compile", "--output", str(out), "--no-secret", "--local-gpus", "1",
                    "--local-node-selector", "pool=gpu", "--local-toleration", "dedicated=ml:NoExecute"]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(platform) == {"exec-train"}  # --no-secret: only the train task's placement (and pod env) remain
    assert "secretAsEnv" not in platform["exec-train"] and "fieldPathAsEnv" in platform["exec-train"]
    assert platform["exec-train"]["nodeSelector"] == {"labels": {"pool": "gpu"}}
    assert platform["exec-train"]["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"}]
    assert docs[0]["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["accelerator"][
        "resourceCount"] == "1"
    with pytest.raises(ValueError, match="local_gpus"):
        pl.TaskOptions(local_gpus=-1)


def test_submit_arguments_are_typed_by_the_declared_parameters(tmp_path):
    path, _, _ = _compile(tmp_path)
    params = pipeline_submit.pipeline_parameters(path)
    args = pipeline_submit.parse_arguments(
        ["model_version=1.0", "nodes=2", "s3_anonymous=true", "train_timeout_hours=1.5",
         'overrides=["train.max_iters=100"]', 'node_selector={"pool": "h100"}', "output_root=s3://b/x=y"], params)
    assert args == {"model_version": "1.0", "nodes": 2, "s3_anonymous": True, "train_timeout_hours": 1.5,
                    "overrides": ["train.max_iters=100"], "node_selector": {"pool": "h100"},
                    "output_root": "s3://b/x=y"}
    with pytest.raises(ValueError, match="not a pipeline parameter.*backend"):
        pipeline_submit.parse_arguments(["bakend=local"], params)
    with pytest.raises(ValueError, match="nodes='two'.*NUMBER_INTEGER"):
        pipeline_submit.parse_arguments(["nodes=two"], params)
    with pytest.raises(ValueError, match="expected a JSON list"):
        pipeline_submit.parse_arguments(['tolerations={"key": "a"}'], params)
    with pytest.raises(ValueError, match="key=value"):
        pipeline_submit.parse_arguments(["backend"], params)


class _RecordingClient:
    """Stands where kfp.Client would: records the request submit() would send (no KFP API server here)."""

    def __init__(self):
        self.calls = []

    def create_run_from_pipeline_package(self, package, **kw):
        self.calls.append((package, kw))
        return "run"


def test_submit_refuses_random_weights_before_anything_runs(tmp_path):
    from dinocell.config import ConfigError

    path, _, _ = _compile(tmp_path)
    client = _RecordingClient()
    with pytest.raises(ConfigError, match="model.pretrained"):
        pipeline_submit.submit("http://kfp", path, ["config=vits8_jump", "output_root=s3://b/x"], client=client)
    assert client.calls == []  # refused before the request
    weights = "s3://b/weights/dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    pipeline_submit.submit("http://kfp", path, ["config=vits8_jump", "output_root=s3://b/x",
                                                f'overrides=["model.pretrained={weights}"]'], client=client)
    [(package, kw)] = client.calls
    assert kw["arguments"]["overrides"] == [f"model.pretrained={weights}"]
    pipeline_submit.submit("http://kfp", path, ["config=vits8_jump", 'overrides=["model.init=random"]'], client=client)
    assert len(client.calls) == 2


# ---- the step helpers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    (None, []),
    ("", []),
    (["train.max_iters=4", " optim.lr=1e-3 "], ["train.max_iters=4", "optim.lr=1e-3"]),
    ({"train": {"max_iters": 4, "device": "cpu"}, "data.batches": ["b1", "b2"]},
     ["train.max_iters=4", 'train.device="cpu"', 'data.batches=["b1", "b2"]']),
    ('["train.max_iters=4"]', ["train.max_iters=4"]),
    ("train:\n  max_iters: 4\n", ["train.max_iters=4"]),
    ("- train.max_iters=4\n- optim.lr=0.001\n", ["train.max_iters=4", "optim.lr=0.001"]),
    ("train.max_iters=4\ndata.images_prefix=s3://b/p/\n", ["train.max_iters=4", "data.images_prefix=s3://b/p/"]),
])
def test_parse_overrides_forms(value, expected):
    assert step_args.parse_overrides(value) == expected


def test_parse_overrides_round_trips_through_the_config_and_names_bad_items():
    from dinocell.config import load_config

    items = step_args.parse_overrides({"train": {"max_iters": 4, "run_name": "yes"}, "data": {"batches": ["a", "1.0"]},
                                   "optim.lr": 0.002})
    cfg = load_config(None, items)
    assert (cfg.train.max_iters, cfg.train.run_name, cfg.data.batches, cfg.optim.lr) == (4, "yes", ["a", "1.0"], 0.002)
    with pytest.raises(step_args.StepError, match=r"overrides\[1\].*'oops'"):
        step_args.parse_overrides(["a=1", "oops"])
    with pytest.raises(step_args.StepError, match="expected a list, a mapping or a string"):
        step_args.parse_overrides(3)


def test_parse_json_arg():
    assert step_args.parse_json_arg('{"a": "b"}', dict, "node_selector") == {"a": "b"}
    assert step_args.parse_json_arg("", dict, "node_selector") == {}
    assert step_args.parse_json_arg({"key": "k", "operator": "Exists"}, list, "tolerations") == [
        {"key": "k", "operator": "Exists"}]
    with pytest.raises(step_args.StepError, match="node_selector: expected a mapping"):
        step_args.parse_json_arg("[1, 2]", dict, "node_selector")


def test_run_layout_and_run_id():
    lay = RunLayout.for_run("s3://b/runs", "", "1234-abcd")
    assert lay.root == "s3://b/runs/1234-abcd"
    assert (lay.eval, lay.train_run) == ("s3://b/runs/1234-abcd/eval", "s3://b/runs/1234-abcd/train")
    assert lay.checkpoints == "s3://b/runs/1234-abcd/train/checkpoints"
    assert lay.models == "s3://b/runs/models" and lay.model_version("") == "1234-abcd"
    assert RunLayout.for_run("s3://b/runs", "mine", "1234", "s3://m").root == "s3://b/runs/mine"
    with pytest.raises(step_args.StepError, match="placeholder"):
        RunLayout.for_run("s3://b", "", "{{$.pipeline_job_uuid}}")
    with pytest.raises(step_args.StepError, match="without '/'"):
        RunLayout("s3://b", "a/b")


def test_pointer_round_trip_and_errors(tmp_path):
    meta = write_pointer(tmp_path / "a" / "ptr", "s3://b/m.parquet", n_fields=3)
    assert meta == {"uri": "s3://b/m.parquet", "n_fields": 3}
    assert read_pointer({}, tmp_path / "a" / "ptr") == "s3://b/m.parquet"  # from the file
    assert read_pointer({"uri": "s3://x"}, None) == "s3://x"  # from the metadata
    (tmp_path / "junk").write_text('{"format": "other"}')
    with pytest.raises(step_args.StepError, match="manifest: .*holds no 'uri'"):
        read_pointer({}, tmp_path / "junk", "manifest")
    with pytest.raises(step_args.StepError, match="checkpoint: no 'uri'"):
        read_pointer(None, tmp_path / "absent", "checkpoint")


def test_inline_images_embeds_relative_images_exactly_and_reports_missing(tmp_path):
    png = b"\x89PNG\r\n\x1a\nnot-really-a-png"
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(png)
    html = ('<img src="figures/a.png"><img src=\'missing.png\'>'
            '<img src="https://example.org/x.png"><a href="figures/a.png">link</a>')
    out, missing = inline_images(html, str(tmp_path))
    b64 = base64.b64encode(png).decode()
    assert out == (f'<img src="data:image/png;base64,{b64}"><img src=\'missing.png\'>'
                   '<img src="https://example.org/x.png"><a href="figures/a.png">link</a>')
    assert len(missing) == 1 and missing[0].startswith("missing.png")
    out2, missing2 = inline_images('<img src="../../etc/passwd.png">', str(tmp_path))
    assert out2 == '<img src="../../etc/passwd.png">' and "escapes" in missing2[0]


# ---- the train launcher against a fake Kubernetes API -----------------------------------------------------------


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_train_step_launches_a_job_with_the_gpus_placement_and_secret(tmp_path, backend):
    import torch
    from fake_k8s import FakeKubernetes, Scenario

    from dinocell.config import load_config
    from dinocell.launch import make_api_client
    from dinocell.train.checkpoint import CheckpointManager

    out = tmp_path / "run"
    # What the training pods would leave: the run's checkpoints (the launcher reports the newest).
    ckpt = CheckpointManager(str(out / "train" / "checkpoints"))
    ckpt.save(5, {"w": torch.zeros(2)})
    expected = ckpt.save(10, {"w": torch.ones(2)})
    tol = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    with FakeKubernetes() as fake:
        fake.default_scenario = Scenario(start_after=1, run_polls=1, log_lines=["iteration 10 loss 1.0"])
        result = train_step(
            "tiny", ["train.max_iters=10"], output_dir=str(out), shards_index_uri="s3://b/shards/index.json",
            manifest_uri="s3://b/manifest.parquet", backend=backend, nodes=2, gpus_per_node=4,
            image="registry.example/dinocell-train:1", node_selector='{"pool": "h100"}', tolerations=tol,
            secret_name="my-s3", namespace="team-a", memory_per_node="64Gi", job_name="dino-test",
            poll_s=0.02, start_timeout_s=20, api_client=make_api_client(host=fake.url))
        created = fake.created[0]
    assert result.checkpoint_uri == expected
    assert (result.backend, result.world_size, result.job["name"], result.job["namespace"]) == (
        backend, 8, "dino-test", "team-a")
    # The config every training process reads: the resolved one, with the data and output locations filled in.
    cfg = load_config(result.config_uri)
    assert (cfg.loader.shards, cfg.data.manifest, cfg.train.output_dir, cfg.train.run_name, cfg.train.max_iters) == (
        "s3://b/shards/index.json", "s3://b/manifest.parquet", str(out), "train", 10)
    text = json.dumps(created)
    assert result.config_uri in text and "registry.example/dinocell-train:1" in text
    assert '"nvidia.com/gpu": 4' in text and '"pool": "h100"' in text and '"my-s3"' in text
    assert json.dumps(tol[0]) in text
    assert "--nnodes=2" in text and "--nproc-per-node=4" in text
    # Preemption and node loss: torchrun restarts the workers, which resume from `latest`.
    assert "--max-restarts=3" in text
    assert '"name": "DINOCELL_REQUIRED_GPUS", "value": "4"' in text  # the trainer refuses CPU in these pods
    if backend == "pytorchjob":
        replicas = created["spec"]["pytorchReplicaSpecs"]
        assert {r["restartPolicy"] for r in replicas.values()} == {"OnFailure"}
        assert created["spec"]["runPolicy"]["backoffLimit"] == 3
        assert created["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"


def test_train_step_rejects_bad_backend_settings(tmp_path):
    with pytest.raises(step_args.StepError, match="backend 'slurm'"):
        train_step("tiny", output_dir=str(tmp_path), backend="slurm")
    with pytest.raises(step_args.StepError, match="nodes=2 needs pytorchjob"):
        train_step("tiny", output_dir=str(tmp_path), backend="local", nodes=2)
    with pytest.raises(step_args.StepError, match="needs the training image"):
        train_step("tiny", output_dir=str(tmp_path), shards_index_uri="s3://b/i.json", backend="pytorchjob")
    from dinocell.config import ConfigError

    with pytest.raises(ConfigError, match="loader.shards is empty"):  # checked before anything is launched
        train_step("tiny", output_dir=str(tmp_path), backend="pytorchjob", image="x")


@pytest.mark.slow
def test_train_step_local_backend_with_two_processes_runs_torchrun(tmp_path):
    """backend=local with nproc_per_node=2: `torchrun --standalone` (gloo on CPU), both ranks, one final checkpoint."""
    from dinocell.synth.bucket import synth_bucket
    from dinocell.train.checkpoint import CheckpointManager

    source = tmp_path / "src" / "cpg0000-jump-pilot" / "source_4"
    synth_bucket(str(source), batches=1, plates_per_batch=2, wells_per_plate=2, sites_per_well=2, size=128, seed=3)
    lay = RunLayout(str(tmp_path / "out"), "r1")
    d = discover_step("tiny", manifest_uri=str(tmp_path / "data" / "manifest.parquet"),
                      images_prefix=str(source / "images") + "/")
    s = shard_step("tiny", manifest_uri=d.manifest_uri, shards_prefix=str(tmp_path / "data" / "shards"))
    # head_bn: the heads' BatchNorm under DDP on CPU (SyncBatchNorm is CUDA-only: rank 0's buffers are broadcast)
    t = train_step("tiny", ["train.max_iters=2", "loader.batch_size=2", "model.head_bn=true"],
                   output_dir=lay.train_output_dir, config_uri=lay.train_config, shards_index_uri=s.index_uri,
                   manifest_uri=d.manifest_uri, backend="local", nproc_per_node=2)
    assert (t.world_size, t.config_uri) == (2, lay.train_config)
    assert t.checkpoint_uri == CheckpointManager(lay.checkpoints).latest()
    assert t.checkpoint_uri.endswith("ckpt-00000002.pt")
    state = CheckpointManager(lay.checkpoints).load()
    assert state["world_size"] == 2 and len(state["ranks"]) == 2  # really two ranks, not one process


# ---- the whole pipeline, locally --------------------------------------------------------------------------------


@pytest.mark.slow
def test_local_pipeline_run_end_to_end(tmp_path, s3_server, monkeypatch, capsys):
    """kfp.local runs the five components as subprocesses against the local S3 server; the published model loads
    and verifies, and what KFP recorded (metrics, pointers, HTML) matches what the steps wrote to object storage."""
    from dinocell import load_pretrained
    from dinocell.storage.local_server import create_bucket
    from dinocell.synth.bucket import synth_bucket

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)  # restored after the test
    old = storage._config
    try:
        step_args.configure_storage(s3_server.endpoint_url)
        src_bucket, out_bucket = f"src-{tmp_path.name}".lower()[:60], f"out-{tmp_path.name}".lower()[:60]
        create_bucket(s3_server.endpoint_url, src_bucket, public_read=True)
        create_bucket(s3_server.endpoint_url, out_bucket)
        source = f"s3://{src_bucket}/cpg0000-jump-pilot/source_4"
        synth_bucket(source, batches=1, plates_per_batch=3, wells_per_plate=3, sites_per_well=2, size=128, seed=1)

        # `python pipeline.py run --local --endpoint ...`, in-process (the components still run as subprocesses).
        assert pl.main([
            "run", "--local", "--endpoint", s3_server.endpoint_url, "--source", source,
            "--outputs", f"s3://{out_bucket}/runs", "--workdir", str(tmp_path / "work"), "--config", "tiny",
            "--set", "train.max_iters=4", "--set", "train.log_every=2", "--set", "train.vis_every=0",
            "--set", "train.ckpt_every=0", "--run-name", "e2e", "--model-name", "tiny-cell", "--model-version", "0.0.1",
        ]) == 0
        printed = capsys.readouterr().out
        outcome = collect_outcome(RunLayout(f"s3://{out_bucket}/runs", "e2e"), "tiny-cell", "0.0.1")
        assert f"HTML report:     {(tmp_path / 'work' / 'eval' / 'report.html').resolve()}" in printed
        from dinocell.pipeline.outcome import short_summary

        assert short_summary(outcome.summary_md) in printed  # the evaluation's headline is printed

        assert outcome.model_uri == f"s3://{out_bucket}/runs/models/tiny-cell/0.0.1"
        model = load_pretrained(outcome.model_uri)  # verifies every file's sha256 against the manifest
        assert sum(p.numel() for p in model.parameters()) > 0
        manifest = json.loads(storage.read_text(outcome.model_uri + "/manifest.json"))
        assert "metrics.json" in json.dumps(manifest)  # the evaluation travelled with the model

        assert outcome.scalars and (tmp_path / "work" / "eval" / "report.html").is_file()
        assert "|" in outcome.summary_md  # the evaluation table

        # What kfp.local recorded under <workdir>/kfp/<pipeline>-<time>/<task>/<output>.
        runs = list((tmp_path / "work" / "kfp").glob("dinocell-pretrain-*"))
        assert len(runs) == 1
        run = runs[0]
        lay = RunLayout(f"s3://{out_bucket}/runs", "e2e")
        # The data are content-addressed under <outputs>/data/, the run's own outputs under <outputs>/e2e/.
        assert outcome.manifest_uri.startswith(f"s3://{out_bucket}/runs/data/manifest-")
        assert outcome.shards_uri.startswith(f"s3://{out_bucket}/runs/data/shards-")
        pointers = {"discover/manifest": outcome.manifest_uri, "shard/shards": outcome.shards_uri,
                    "publish/model": outcome.model_uri}
        for rel, uri in pointers.items():
            assert read_pointer({}, run / rel) == uri, rel
        ckpt_uri = read_pointer({}, run / "train" / "checkpoint")
        assert ckpt_uri.startswith(lay.checkpoints + "/ckpt-") and storage.exists(ckpt_uri)
        ev = json.loads((run / "evaluate" / "executor_output.json").read_text())
        metrics_meta = ev["artifacts"]["metrics"]["artifacts"][0]["metadata"]
        assert metrics_meta == pytest.approx(outcome.scalars)  # one KFP metric per scalar, same values
        html = (run / "evaluate" / "report").read_text()
        assert "<html" in html.lower() and 'src="figures/' not in html  # images embedded for the KFP UI
        assert (run / "discover" / "summary").read_text().startswith("# Field discovery")
    finally:
        storage.configure(old)


@pytest.mark.slow
def test_demo_steps_mode_runs_the_same_steps_without_kfp(tmp_path, monkeypatch, capsys):
    """`python pipeline.py demo --steps`: own S3 server, synthetic bucket, the five steps in-process."""
    from dinocell.pipeline import demo

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # demo.main overrides it; restored afterwards
    old = storage._config
    try:
        assert demo.main(["--steps", "--workdir", str(tmp_path), "--plates", "2", "--wells", "2", "--sites", "2",
                          "--size", "128", "--set", "train.max_iters=2", "--run-name", "steps-test"]) == 0
    finally:
        storage.configure(old)
    printed = capsys.readouterr().out
    report = (tmp_path / "eval" / "report.html").resolve()
    assert report.is_file() and f"HTML report:     {report}" in printed
    assert "independent views" in printed and "best pixel baseline" in printed  # the evaluation's headline
    assert "published model: s3://dinocell-demo/models/dinocell-demo/steps-test" in printed
    # training continued from the shipped tiny start, uploaded to the demo's S3 server like a DINOv3 checkpoint
    assert "pretrained start: s3://dinocell-demo/pretrained/tiny-start/" in printed
    run_cfg = yaml.safe_load((tmp_path / "run" / "train" / "config.yaml").read_text())
    assert run_cfg["model"]["pretrained"].startswith("s3://dinocell-demo/pretrained/tiny-start/")
    assert run_cfg["model"]["untie_cls_and_patch_norms"] is True
    # publish_step loaded the model back (hashes verified) before the demo's server went away; the local copy of
    # the evaluation is what remains to check.
    scalars = json.loads((tmp_path / "eval" / "scalars.json").read_text())
    assert scalars and all(isinstance(v, (int, float)) for v in scalars.values())
    # The demo's S3 server is gone now, but the model and the run stayed on disk, and the printed line loads it.
    from dinocell import load_pretrained

    model = load_pretrained(str(tmp_path / "models" / "dinocell-demo"))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert "load it:" in printed and "dinocell.load_pretrained(" in printed
    assert list((tmp_path / "run" / "train" / "checkpoints").glob("ckpt-*.pt"))
    assert (tmp_path / "run" / "manifest.parquet").is_file()


def test_step_pods_have_resources_and_transient_steps_retry(tmp_path):
    """Every step pod requests and limits CPU / memory (discovery of 3M fields peaks near 6 GB); the transient steps
    retry with backoff; the train launcher never retries (a retry could start a second training job)."""
    _, spec, _ = _compile(tmp_path)
    executors = spec["deploymentSpec"]["executors"]
    for step, (cpu_req, cpu_lim, mem_req, mem_lim) in pl.TASK_RESOURCES.items():
        res = executors[f"exec-{step}"]["container"]["resources"]
        assert (res["cpuRequest"], res["cpuLimit"]) == (float(cpu_req), float(cpu_lim)), step
        assert res["memoryRequest"] == float(mem_req.rstrip("G")) and res["memoryLimit"] == float(mem_lim.rstrip("G"))
    assert float(pl.TASK_RESOURCES["discover"][3].rstrip("G")) >= 8  # headroom over the measured 5.7 GB peak
    tasks = spec["root"]["dag"]["tasks"]
    for name, task in tasks.items():
        if name in pl.RETRIED_TASKS:
            assert task["retryPolicy"]["maxRetryCount"] == 2 and task["retryPolicy"]["backoffDuration"] == "60s"
        else:
            assert "retryPolicy" not in task, name
