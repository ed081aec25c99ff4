"""The launcher against a fake API server over real HTTP: logs, cleanup, failures, timeouts, queued and pending jobs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_k8s import FakeKubernetes, Scenario
from k8s_common import POLL, spec_for

from dinocell.launch import (
    KUEUE_QUEUE_LABEL,
    JobFailed,
    JobSubmitError,
    JobTimeout,
    build_job,
    make_api_client,
    resolve_namespace,
    run_job,
)
from dinocell.launch.logs import parse_log_timestamp

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
