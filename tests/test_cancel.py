"""Cancelling a run stops its training job, and two jobs never write the same run directory: the job is owned by the
launcher pod (downward-API env), SIGTERM to a launcher process deletes the job it created, and the run-dir lease
refuses a second live job and takes over stale ones. Against the fake API server (real HTTP, the real client), with
the lease on a local directory and on the loopback S3 server."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_k8s import FakeKubernetes, Scenario

from dinocell.launch import JobSpec, build_job, make_api_client, pretrain_command, run_job
from dinocell.launch.lease import LEASE_NAME, Lease, RunDirLeased, read_lease, write_lease
from dinocell.launch.ownership import launcher_pod_owner

POLL = 0.02
NS = "team-a"


def spec(name: str = "dino-pre", backend: str = "pytorchjob") -> JobSpec:
    return JobSpec(name=name, image="ghcr.io/example/dinocell-train:1", namespace=NS,
                   command=pretrain_command("s3://b/config.yaml", (), 1, 1, backend=backend))


@pytest.fixture
def fake():
    with FakeKubernetes() as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def run_dir(request, tmp_path):
    """A run directory on a local path or in a fresh bucket of the loopback S3 server."""
    if request.param == "local":
        yield str(tmp_path / "run" / "train")
    else:
        bucket = request.getfixturevalue("s3_bucket")
        yield f"s3://{bucket}/runs/r1/train"


def _pod_env(monkeypatch, namespace: str = NS) -> dict:
    pod = {"POD_NAME": "dinocell-pretrain-x7k2-system-container-impl-1", "POD_UID": str(uuid.uuid4()),
           "POD_NAMESPACE": namespace}
    for k, v in pod.items():
        monkeypatch.setenv(k, v)
    return pod


# ---- ownership ----------------------------------------------------------------------------------------------------


def test_job_is_owned_by_the_launcher_pod(fake, monkeypatch):
    pod = _pod_env(monkeypatch)
    fake.default_scenario = Scenario(start_after=0, run_polls=1)
    run_job(spec(), "pytorchjob", make_api_client(host=fake.url), poll_s=POLL, start_timeout_s=10)
    (created,) = fake.created
    assert created["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": pod["POD_NAME"], "uid": pod["POD_UID"]}]


def test_no_owner_without_pod_identity_or_in_another_namespace(fake, monkeypatch, tmp_path, caplog):
    for k in ("POD_NAME", "POD_UID", "POD_NAMESPACE"):
        monkeypatch.delenv(k, raising=False)
    fake.default_scenario = Scenario(start_after=0, run_polls=1)
    run_job(spec("local-run", "trainjob"), "trainjob", make_api_client(host=fake.url), poll_s=POLL, start_timeout_s=10)
    assert "ownerReferences" not in fake.created[0]["metadata"]  # e.g. `dinocell train` from a laptop
    # A job sent to another namespace than the pod's: the garbage collector would delete it at once, so no owner.
    env = {"POD_NAME": "p", "POD_UID": str(uuid.uuid4()), "POD_NAMESPACE": "kubeflow"}
    with caplog.at_level(logging.WARNING, logger="dinocell.launch.ownership"):
        assert launcher_pod_owner(NS, env) is None
    assert "namespace 'kubeflow', the job in 'team-a'" in caplog.text
    # Without POD_NAMESPACE the service-account namespace file tells.
    sa = tmp_path / "namespace"
    sa.write_text(NS)
    assert launcher_pod_owner(NS, {**env, "POD_NAMESPACE": ""}, sa)["name"] == "p"
    with pytest.raises(ValueError, match="POD_UID='42' is not a Kubernetes uid"):
        launcher_pod_owner(NS, {**env, "POD_UID": "42"})


# ---- SIGTERM ------------------------------------------------------------------------------------------------------

LAUNCHER = textwrap.dedent("""
    import sys
    from dinocell.launch import JobSpec, make_api_client, pretrain_command, run_job
    from dinocell.log import setup_logging

    setup_logging()
    url, backend, run_dir = sys.argv[1:4]
    spec = JobSpec(name="dino-cancel", image="img:1", namespace="team-a",
                   command=pretrain_command("s3://b/c.yaml", (), 1, 1, backend=backend))
    run_job(spec, backend, make_api_client(host=url), poll_s=0.05, start_timeout_s=None, run_dir=run_dir)
    print("run_job returned", flush=True)
""")


def _wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_sigterm_to_a_waiting_launcher_deletes_its_job_and_exits_143(fake, backend, tmp_path):
    fake.default_scenario = Scenario(outcome="never_start")  # waits, as a job queued for GPUs does
    run_dir = str(tmp_path / "run" / "train")
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, fake.url, backend, run_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: fake.created or proc.poll() is not None, "the job to be created")
        assert proc.poll() is None, proc.communicate()
        polls = lambda: sum(1 for m, p, _ in fake.requests if m == "GET" and p.endswith("/dino-cancel"))  # noqa: E731
        _wait_for(lambda: polls() >= 2, "the launcher to poll the job")  # it is in its wait loop
        assert read_lease(run_dir).job == "dino-cancel"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert fake.deleted == [(f"{backend}s", NS, "dino-cancel")] and not fake.jobs
    assert "run_job returned" not in out and "SIGTERM: cancelled" in err and "deleted" in err
    assert read_lease(run_dir) is None  # the job is gone, so is its lease


# ---- the run-dir lease ----------------------------------------------------------------------------------------------


def _create_other(fake, name: str, scenario: Scenario) -> dict:
    """A job some other launcher created (straight through the API)."""
    from kubernetes import client

    fake.script(name, scenario)
    obj = build_job(spec(name), "pytorchjob")
    return client.CustomObjectsApi(make_api_client(host=fake.url)).create_namespaced_custom_object(
        "kubeflow.org", "v1", NS, "pytorchjobs", obj)


def test_a_live_job_holding_the_run_dir_refuses_a_second_one(fake, run_dir):
    other = _create_other(fake, "dino-first", Scenario(outcome="never_start"))
    write_lease(Lease(run_dir, "pytorchjob", "PyTorchJob", NS, "dino-first", "launcher-1", "2026-01-02T03:04:05Z",
                      other["metadata"]["uid"]))
    with pytest.raises(RunDirLeased) as err:
        run_job(spec("dino-second"), "pytorchjob", make_api_client(host=fake.url), poll_s=POLL, run_dir=run_dir)
    text = str(err.value)
    assert "\n" not in text and f"run dir {run_dir} is in use by PyTorchJob team-a/dino-first (pending" in text
    assert [c["metadata"]["name"] for c in fake.created] == ["dino-first"]  # nothing was created
    assert read_lease(run_dir).job == "dino-first"  # and the lease is untouched


def test_stale_leases_are_taken_over_and_released_after_the_job(fake, run_dir, caplog):
    client_ = make_api_client(host=fake.url)
    fake.default_scenario = Scenario(start_after=0, run_polls=1)
    # 1. A finished job, kept (cleanup=never), holds a lease left behind by a launcher that was killed.
    run_job(spec("dino-old"), "pytorchjob", client_, poll_s=POLL, cleanup="never")
    uid = fake.created[0]["metadata"]["uid"]
    write_lease(Lease(run_dir, "pytorchjob", "PyTorchJob", NS, "dino-old", "launcher-0", "2026-01-02T03:04:05Z", uid))
    with caplog.at_level(logging.INFO, logger="dinocell.launch.lease"):
        run_job(spec("dino-new"), "pytorchjob", client_, poll_s=POLL, run_dir=run_dir)
    assert f"run dir {run_dir}: taking over the stale lease of PyTorchJob team-a/dino-old" in caplog.text
    assert read_lease(run_dir) is None  # released once dino-new succeeded
    # 2. The lease names a job that no longer exists; 3. or a later job of the same name (another uid).
    for name, lease_uid in (("dino-gone", "0c5e7b1c-2a8e-4c69-9a0e-000000000001"),
                            ("dino-old", "0c5e7b1c-2a8e-4c69-9a0e-000000000002")):
        write_lease(Lease(run_dir, "pytorchjob", "PyTorchJob", NS, name, "l", "2026-01-02T03:04:05Z", lease_uid))
        run_job(spec(f"dino-after-{lease_uid[-1]}"), "pytorchjob", client_, poll_s=POLL, run_dir=run_dir)
        assert read_lease(run_dir) is None
    # The lease a launcher writes names its job, with the uid once created (read while the job is followed).
    seen = []
    run_job(spec("dino-watched"), "pytorchjob", client_, poll_s=POLL, run_dir=run_dir,
            log_sink=lambda line: seen.append(read_lease(run_dir)))
    job_uid = next(c for c in fake.created if c["metadata"]["name"] == "dino-watched")["metadata"]["uid"]
    assert seen and {(s.job, s.uid, s.namespace, s.backend) for s in seen} == {
        ("dino-watched", job_uid, NS, "pytorchjob")}


def test_a_fresh_lease_whose_job_is_being_created_holds_an_old_one_does_not(fake, tmp_path):
    run_dir = str(tmp_path / "run")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_lease(Lease(run_dir, "trainjob", "TrainJob", NS, "dino-creating", "launcher-1", now))  # no uid yet
    with pytest.raises(RunDirLeased, match="TrainJob team-a/dino-creating \\(being created"):
        run_job(spec("dino-b", "trainjob"), "trainjob", make_api_client(host=fake.url), poll_s=POLL, run_dir=run_dir)
    write_lease(Lease(run_dir, "trainjob", "TrainJob", NS, "dino-creating", "launcher-1", "2026-01-02T03:04:05Z"))
    fake.default_scenario = Scenario(start_after=0, run_polls=1)
    run_job(spec("dino-b", "trainjob"), "trainjob", make_api_client(host=fake.url), poll_s=POLL, run_dir=run_dir)
    (Path(run_dir) / LEASE_NAME).write_text('{"format": "something-else"}')
    with pytest.raises(Exception, match=f"run dir lease {run_dir}/lease.json is unreadable"):
        run_job(spec("dino-c", "trainjob"), "trainjob", make_api_client(host=fake.url), poll_s=POLL, run_dir=run_dir)
    assert os.path.exists(Path(run_dir) / LEASE_NAME)
