"""A small fake Kubernetes API server for launcher tests: real HTTP on 127.0.0.1, in a thread.

It serves only what dinocell.launch.run_job calls, with the API server's wire format, so the real `kubernetes` client
talks to it unchanged:
  POST/GET/DELETE /apis/{group}/{version}/namespaces/{ns}/{plural}[/{name}]   (pytorchjobs, trainjobs)
  GET /api/v1/namespaces/{ns}/pods?labelSelector=k=v,k2=v2                     (equality selectors)
  GET /api/v1/namespaces/{ns}/pods/{pod}/log?container=&timestamps=&sinceSeconds=
  GET /apis/kueue.x-k8s.io/v1beta1/namespaces/{ns}/workloads?labelSelector=kueue.x-k8s.io/job-uid=UID  (kueue=True)
Created objects are checked against the vendored CRD schema (422 Invalid, like a structural-schema rejection).
A stand-in "operator" creates the pods the real one would (names and labels of the Training Operator / JobSet) and
moves each job through a scripted Scenario, one step per GET of the job (one launcher poll):
  succeed: pending for `start_after` polls, running for `run_polls` polls (the master logs a share of
           `log_lines` per poll), then the success condition;
  fail:    as succeed, then condition Failed with `reason`/`message`;
  never_start: pods stay Pending (unschedulable) forever.
Before any of these, a job can wait `queued_polls` polls in a Kueue queue: suspended (the suspend flag set, as Kueue's
webhook does, and condition Suspended), no pods, and, when it carries the queue label, a Workload whose QuotaReserved
condition is False with `queue_message`; then it is admitted (resumed, pods created) and the outcome's clock starts.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from dinocell.launch.validate import ManifestInvalid, validate_object

KINDS = {
    ("kubeflow.org", "v1", "pytorchjobs"): "PyTorchJob",
    ("trainer.kubeflow.org", "v1alpha1", "trainjobs"): "TrainJob",
}
TRAINING_CONTAINER = {"PyTorchJob": "pytorch", "TrainJob": "node"}


@dataclass
class Scenario:
    outcome: str = "succeed"  # succeed | fail | never_start
    start_after: int = 1
    run_polls: int = 3
    log_lines: list[str] = field(default_factory=lambda: [f"step {i} loss {1.0 / (i + 1):.4f}" for i in range(6)])
    reason: str = "PyTorchJobFailed"
    message: str = "PyTorchJob train is failed because 1 Master replica(s) failed."
    pending_message: str = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    queued_polls: int = 0
    queue_message: str = (
        "couldn't assign flavors to pod set master: insufficient unused quota for nvidia.com/gpu in flavor h100, "
        "8 more needed"
    )


KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
WORKLOADS = ("kueue.x-k8s.io", "v1beta1", "workloads")


def _go_bool(text: str | None) -> bool:
    """Query booleans as the API server reads them (Go strconv.ParseBool); the Python client sends 'True'."""
    return text in ("1", "t", "T", "TRUE", "true", "True")


def _now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _rfc3339_nano(ns: int) -> str:
    """Like the kubelet: nanosecond fraction with trailing zeros trimmed."""
    seconds, frac = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    frac_text = f"{frac:09d}".rstrip("0")
    return f"{text}.{frac_text}Z" if frac_text else f"{text}Z"


class _Job:
    def __init__(self, kind: str, obj: dict, scenario: Scenario):
        self.kind, self.obj, self.scenario = kind, obj, scenario
        self.polls = 0
        self.pods: list[dict] = []
        self.log: list[tuple[int, str]] = []  # (ns timestamp, line) of the master pod
        self.logged = 0
        self.admitted = scenario.queued_polls <= 0
        self.workload: dict | None = None  # the Kueue Workload, for a queued job with the queue label


class FakeKubernetes:
    def __init__(self, validate: bool = True, kinds: dict | None = None, kueue: bool = True):
        self.validate = validate
        self.kueue = kueue  # Kueue installed: its workloads API answers
        self.kinds = dict(KINDS if kinds is None else kinds)  # the CRDs "installed" in this cluster
        self.default_scenario = Scenario()
        self.scenarios: dict[str, Scenario] = {}
        self.jobs: dict[tuple[str, str, str], _Job] = {}  # (plural, namespace, name)
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, query)
        self.created: list[dict] = []
        self.deleted: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                fake._dispatch(self, "GET")

            def do_POST(self):
                fake._dispatch(self, "POST")

            def do_DELETE(self):
                fake._dispatch(self, "DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeKubernetes:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def script(self, name: str, scenario: Scenario) -> None:
        self.scenarios[name] = scenario

    # ---- HTTP plumbing ---------------------------------------------------------------------------------------
    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = None
        if method in ("POST", "DELETE"):
            length = int(h.headers.get("Content-Length") or 0)
            raw = h.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
        with self.lock:
            self.requests.append((method, url.path, query))
            code, payload = self._route(method, url.path, query, body)
        if isinstance(payload, str):
            data, ctype = payload.encode(), "text/plain"
        else:
            data, ctype = json.dumps(payload).encode(), "application/json"
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _status(code: int, reason: str, message: str) -> tuple[int, dict]:
        return code, {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }

    def _route(self, method: str, path: str, query: dict, body):
        m = re.fullmatch(r"/apis/([^/]+)/([^/]+)/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?", path)
        if m:
            group, version, ns, plural, name = m.groups()
            if (group, version, plural) == WORKLOADS and self.kueue and method == "GET" and name is None:
                return self._list_workloads(ns, query.get("labelSelector", ""))
            kind = self.kinds.get((group, version, plural))
            if kind is None:
                return self._status(404, "NotFound", "the server could not find the requested resource")
            if method == "POST" and name is None:
                return self._create(kind, plural, ns, body)
            if method == "GET" and name:
                return self._get(kind, plural, ns, name)
            if method == "DELETE" and name:
                return self._delete(kind, plural, ns, name)
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", path)
        if m and method == "GET":
            return self._list_pods(m.group(1), query.get("labelSelector", ""))
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log", path)
        if m and method == "GET":
            return self._pod_log(m.group(1), m.group(2), query)
        return self._status(404, "NotFound", f"fake API server: no route for {method} {path}")

    # ---- custom objects --------------------------------------------------------------------------------------
    def _create(self, kind: str, plural: str, ns: str, obj: dict):
        if not isinstance(obj, dict) or obj.get("kind") != kind:
            return self._status(
                400, "BadRequest", f"body kind {obj.get('kind') if isinstance(obj, dict) else obj!r} != {kind}"
            )
        name = obj.get("metadata", {}).get("name")
        if obj["metadata"].get("namespace", ns) != ns:
            return self._status(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        if self.validate:
            try:
                validate_object(obj, strict=False)
            except ManifestInvalid as e:
                return self._status(422, "Invalid", f"{kind}.{obj.get('apiVersion')} {name!r} is invalid: {e}")
        key = (plural, ns, name)
        if key in self.jobs:
            return self._status(
                409, "AlreadyExists", f'{plural}.{obj["apiVersion"].split("/")[0]} "{name}" already exists'
            )
        stored = json.loads(json.dumps(obj))
        stored["metadata"].update(
            namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_now_rfc3339(), resourceVersion="1", generation=1
        )
        job = _Job(kind, stored, self.scenarios.get(name, self.default_scenario))
        if kind == "PyTorchJob":
            self._set_condition(job, "Created", "PyTorchJobCreated", f"PyTorchJob {name} is created.")
        if job.admitted:
            job.pods = self._make_pods(kind, stored)
        else:
            self._queue(job)
        self.jobs[key] = job
        self.created.append(stored)
        return 201, stored

    def _get(self, kind: str, plural: str, ns: str, name: str):
        job = self.jobs.get((plural, ns, name))
        if job is None:
            return self._status(404, "NotFound", f'{plural} "{name}" not found')
        self._advance(job)
        return 200, job.obj

    def _delete(self, kind: str, plural: str, ns: str, name: str):
        job = self.jobs.pop((plural, ns, name), None)
        if job is None:
            return self._status(404, "NotFound", f'{plural} "{name}" not found')
        self.deleted.append((plural, ns, name))
        return 200, {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {"name": name, "kind": plural, "uid": job.obj["metadata"]["uid"]},
        }

    # ---- the stand-in operator -------------------------------------------------------------------------------
    def _make_pods(self, kind: str, obj: dict) -> list[dict]:
        name, ns = obj["metadata"]["name"], obj["metadata"]["namespace"]
        pods = []
        if kind == "PyTorchJob":
            for rtype, rspec in obj["spec"]["pytorchReplicaSpecs"].items():
                for i in range(rspec.get("replicas", 1)):
                    labels = {
                        "training.kubeflow.org/job-name": name,
                        "training.kubeflow.org/replica-type": rtype.lower(),
                        "training.kubeflow.org/replica-index": str(i),
                        "training.kubeflow.org/operator-name": "pytorchjob-controller",
                    }
                    if rtype == "Master":
                        labels["training.kubeflow.org/job-role"] = "master"
                    pods.append(self._pod(f"{name}-{rtype.lower()}-{i}", ns, labels, "pytorch"))
        else:
            for i in range(obj["spec"]["trainer"].get("numNodes", 1)):
                labels = {
                    "jobset.sigs.k8s.io/jobset-name": name,
                    "jobset.sigs.k8s.io/replicatedjob-name": "node",
                    "jobset.sigs.k8s.io/job-index": "0",
                    "batch.kubernetes.io/job-completion-index": str(i),
                    "trainer.kubeflow.org/trainjob-ancestor-step": "trainer",
                }
                pods.append(self._pod(f"{name}-node-0-{i}-{uuid.uuid4().hex[:5]}", ns, labels, "node"))
        return pods

    @staticmethod
    def _pod(name: str, ns: str, labels: dict, container: str) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": labels,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": _now_rfc3339(),
            },
            "spec": {"containers": [{"name": container, "image": "fake"}]},
            "status": {"phase": "Pending"},
        }

    # ---- the stand-in Kueue ----------------------------------------------------------------------------------
    def _suspend_flag(self, job: _Job, value: bool) -> None:
        if job.kind == "PyTorchJob":
            job.obj["spec"].setdefault("runPolicy", {})["suspend"] = value
        else:
            job.obj["spec"]["suspend"] = value

    def _queue(self, job: _Job) -> None:
        """Held in the queue: suspended, no pods; a Workload if the job names a queue."""
        self._suspend_flag(job, True)
        reason = "PyTorchJobSuspended" if job.kind == "PyTorchJob" else "Suspended"
        self._set_condition(job, "Suspended", reason, f"{job.kind} {job.obj['metadata']['name']} is suspended.")
        queue = job.obj["metadata"].get("labels", {}).get(KUEUE_QUEUE_LABEL)
        if queue:
            meta = job.obj["metadata"]
            job.workload = {
                "apiVersion": "kueue.x-k8s.io/v1beta1",
                "kind": "Workload",
                "metadata": {
                    "name": f"{job.kind.lower()}-{meta['name']}-{meta['uid'][:5]}",
                    "namespace": meta["namespace"],
                    "labels": {"kueue.x-k8s.io/job-uid": meta["uid"]},
                },
                "spec": {"queueName": queue},
                "status": {
                    "conditions": [
                        {
                            "type": "QuotaReserved",
                            "status": "False",
                            "reason": "Pending",
                            "message": job.scenario.queue_message,
                            "lastTransitionTime": _now_rfc3339(),
                        }
                    ]
                },
            }

    def _admit(self, job: _Job) -> None:
        self._suspend_flag(job, False)
        for c in job.obj["status"]["conditions"]:
            if c["type"] == "Suspended":
                c.update(status="False", reason="Resumed", message=f"{job.kind} is resumed.")
        if job.workload is not None:
            job.workload["status"]["conditions"] = [
                {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": _now_rfc3339()}
                for t, r, m in (
                    ("QuotaReserved", "QuotaReserved", "Quota reserved in ClusterQueue gpus"),
                    ("Admitted", "Admitted", "The workload is admitted"),
                )
            ]
        job.pods = self._make_pods(job.kind, job.obj)
        job.admitted = True

    def _list_workloads(self, ns: str, selector: str):
        wanted = dict(term.split("=", 1) for term in filter(None, selector.split(",")))
        items = [
            job.workload
            for job in self.jobs.values()
            if job.workload is not None
            and job.workload["metadata"]["namespace"] == ns
            and all(job.workload["metadata"]["labels"].get(k) == v for k, v in wanted.items())
        ]
        return 200, {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "WorkloadList", "metadata": {}, "items": items}

    def _set_condition(self, job: _Job, ctype: str, reason: str, message: str) -> None:
        conds = job.obj.setdefault("status", {}).setdefault("conditions", [])
        now = _now_rfc3339()
        if job.kind == "PyTorchJob" and ctype in ("Succeeded", "Failed"):
            for c in conds:  # the operator flips Running off when the job finishes
                if c["type"] == "Running":
                    c["status"] = "False"
        conds.append(
            {
                "type": ctype,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastTransitionTime": now,
                "lastUpdateTime": now,
            }
        )

    def _set_phase(self, job: _Job, phase: str, pending_message: str | None = None) -> None:
        for pod in job.pods:
            pod["status"] = {"phase": phase}
            if pending_message:
                pod["status"]["conditions"] = [
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": pending_message}
                ]

    def _log(self, job: _Job, count: int) -> None:
        lines = job.scenario.log_lines
        for line in lines[job.logged : job.logged + count]:
            stamp = time.time_ns()
            if job.log and stamp <= job.log[-1][0]:
                stamp = job.log[-1][0] + 1
            job.log.append((stamp, line))
        job.logged = min(len(lines), job.logged + count)

    def _advance(self, job: _Job) -> None:
        """One poll of the job: move its scripted lifecycle one step."""
        sc, name = job.scenario, job.obj["metadata"]["name"]
        job.polls += 1
        if not job.admitted:
            if job.polls <= sc.queued_polls:
                return
            self._admit(job)
        polls = job.polls - max(0, sc.queued_polls)  # polls since admission
        if sc.outcome == "never_start":
            self._set_phase(job, "Pending", sc.pending_message)
            return
        done = any(
            c["type"] in ("Succeeded", "Complete", "Failed") for c in job.obj.get("status", {}).get("conditions", [])
        )
        if done or polls <= sc.start_after:
            return
        running_for = polls - sc.start_after  # 1 .. run_polls while running
        if running_for == 1:
            self._set_phase(job, "Running")
            if job.kind == "PyTorchJob":
                self._set_condition(job, "Running", "PyTorchJobRunning", f"PyTorchJob {name} is running.")
        per_poll = math.ceil(len(sc.log_lines) / max(1, sc.run_polls))
        self._log(job, per_poll)
        if running_for < sc.run_polls:
            return
        self._log(job, len(sc.log_lines))
        if sc.outcome == "succeed":
            self._set_phase(job, "Succeeded")
            if job.kind == "PyTorchJob":
                self._set_condition(
                    job, "Succeeded", "PyTorchJobSucceeded", f"PyTorchJob {name} is successfully completed."
                )
            else:
                self._set_condition(job, "Complete", "JobsCompleted", "jobset completed successfully")
        else:
            self._set_phase(job, "Failed")
            self._set_condition(job, "Failed", sc.reason, sc.message)

    # ---- pods --------------------------------------------------------------------------------------------------
    def _all_pods(self, ns: str):
        for job in self.jobs.values():
            for pod in job.pods:
                if pod["metadata"]["namespace"] == ns:
                    yield job, pod

    def _list_pods(self, ns: str, selector: str):
        wanted = {}
        for term in filter(None, selector.split(",")):
            m = re.fullmatch(r"([A-Za-z0-9./_-]+)==?([A-Za-z0-9._-]*)", term)
            if not m:
                return self._status(400, "BadRequest", f"fake API server: unsupported label selector term {term!r}")
            wanted[m.group(1)] = m.group(2)
        items = [
            pod
            for _, pod in self._all_pods(ns)
            if all(pod["metadata"]["labels"].get(k) == v for k, v in wanted.items())
        ]
        return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}

    def _pod_log(self, ns: str, pod_name: str, query: dict):
        for job, pod in self._all_pods(ns):
            if pod["metadata"]["name"] != pod_name:
                continue
            container = pod["spec"]["containers"][0]["name"]
            if query.get("container", container) != container:
                return self._status(
                    400, "BadRequest", f"container {query['container']} is not valid for pod {pod_name}"
                )
            if pod["status"]["phase"] == "Pending":
                return self._status(
                    400,
                    "BadRequest",
                    f'container "{container}" in pod "{pod_name}" is waiting to start: ContainerCreating',
                )
            if _go_bool(query.get("follow")):
                return self._status(400, "BadRequest", "fake API server: follow is not supported")
            is_master = pod is job.pods[0]
            entries = job.log if is_master else []
            if "sinceSeconds" in query:
                cutoff = time.time_ns() - int(query["sinceSeconds"]) * 1_000_000_000
                entries = [e for e in entries if e[0] >= cutoff]
            stamps = _go_bool(query.get("timestamps"))
            return 200, "".join(f"{_rfc3339_nano(ts)} {line}\n" if stamps else f"{line}\n" for ts, line in entries)
        return self._status(404, "NotFound", f'pods "{pod_name}" not found')
