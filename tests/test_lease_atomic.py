"""The run-dir lease is a compare-and-swap: of launchers racing for one run directory exactly one wins.

dinocell.storage.conditional on a local directory (flock + content hash) and on the loopback S3 server (ETags with
If-None-Match / If-Match, which the server enforces like AWS S3), then the lease built on it: a create race between
threads, a stale lease judged stale by two launchers at once, a release that never deletes another launcher's lease.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_k8s import FakeKubernetes

from dinocell.launch import lease as lease_mod
from dinocell.launch.backends import BACKEND_TABLE
from dinocell.launch.lease import Lease, RunDirLeased, acquire_lease, read_lease, record_uid, release_lease, write_lease
from dinocell.storage.conditional import (
    ConditionalWritesUnsupported,
    PreconditionFailed,
    delete_if,
    read_versioned,
    write_if,
)

NS = "team-a"
BK = BACKEND_TABLE["pytorchjob"]


@pytest.fixture(params=["local", "s3"])
def run_dir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run" / "train")
    return f"s3://{request.getfixturevalue('s3_bucket')}/runs/r1/train"


def test_conditional_writes_create_replace_and_delete_only_what_was_read(run_dir):
    uri = f"{run_dir}/obj.json"
    assert read_versioned(uri) is None
    t1 = write_if(uri, b"one", None)  # create: only if absent
    with pytest.raises(PreconditionFailed, match="exists already"):
        write_if(uri, b"other", None)
    assert read_versioned(uri) == (b"one", t1)
    t2 = write_if(uri, b"two", t1)  # replace what was read
    assert t2 != t1 and read_versioned(uri) == (b"two", t2)
    with pytest.raises(PreconditionFailed, match="changed since it was read"):
        write_if(uri, b"three", t1)  # t1 is stale now
    with pytest.raises(PreconditionFailed):
        delete_if(uri, t1)
    assert read_versioned(uri) == (b"two", t2)  # neither stale call changed it
    delete_if(uri, t2)
    assert read_versioned(uri) is None


def _stale(run_dir: str, name: str = "dino-old") -> None:
    write_lease(Lease(run_dir, "pytorchjob", "PyTorchJob", NS, name, "launcher-0", "2026-01-02T03:04:05Z",
                      "0c5e7b1c-2a8e-4c69-9a0e-000000000009"))


def test_threads_racing_for_an_empty_run_dir_one_wins(run_dir):
    """Late launchers find the winner's lease (its job not created yet: "being created"), early ones lose the write."""
    from kubernetes import client

    from dinocell.launch import make_api_client

    n = 8
    start = threading.Barrier(n)
    won, refused = [], []
    with FakeKubernetes() as fake:
        custom = client.CustomObjectsApi(make_api_client(host=fake.url))

        def launcher(i: int) -> None:
            start.wait()
            try:
                won.append(acquire_lease(custom, run_dir, BK, NS, f"dino-{i}", 5.0).job)
            except RunDirLeased as e:
                refused.append(str(e))

        threads = [threading.Thread(target=launcher, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(won) == 1 and len(refused) == n - 1, (won, refused)
    assert read_lease(run_dir).job == won[0]
    assert all(f"lost the lease to PyTorchJob {NS}/{won[0]}" in r
               or f"is in use by PyTorchJob {NS}/{won[0]} (being created" in r for r in refused), refused


def test_two_launchers_judging_one_stale_lease_cannot_both_take_it(run_dir, monkeypatch):
    """A and B both find the old lease stale; B writes first. Writing and reading back let A overwrite B (both
    believed they held the run dir); the conditional write refuses A, naming B."""
    _stale(run_dir)
    calls = []

    def live_state(custom, old, rt):
        calls.append(old.job)
        if len(calls) == 1:  # A asks about the old job; meanwhile B judges it stale too and takes the lease
            acquire_lease(None, run_dir, BK, NS, "dino-b", rt)
        return None  # the old job is over

    monkeypatch.setattr(lease_mod, "_live_state", live_state)
    with pytest.raises(RunDirLeased) as err:
        acquire_lease(None, run_dir, BK, NS, "dino-a", 5.0)
    assert calls == ["dino-old", "dino-old"]
    assert f"lost the lease to PyTorchJob {NS}/dino-b" in str(err.value) and "\n" not in str(err.value)
    assert read_lease(run_dir).job == "dino-b"


def test_a_launcher_whose_lease_was_taken_over_leaves_the_new_one_alone(run_dir, monkeypatch, caplog):
    a = acquire_lease(None, run_dir, BK, NS, "dino-a", 5.0)
    monkeypatch.setattr(lease_mod, "_live_state", lambda custom, old, rt: None)  # dino-a judged over by B
    b = acquire_lease(None, run_dir, BK, NS, "dino-b", 5.0)
    with caplog.at_level(logging.INFO, logger="dinocell.launch.lease"):
        record_uid(a, "uid-a")  # A's job was created after all: it must not overwrite B's lease
        release_lease(a)
    assert "replaced by another launcher while the job was being created" in caplog.text
    assert "no longer ours" in caplog.text
    assert read_lease(run_dir) == b  # B's lease, untouched
    record_uid(b, "uid-b")
    assert read_lease(run_dir).uid == "uid-b"
    release_lease(b)
    assert read_lease(run_dir) is None


def test_a_store_without_conditional_requests_falls_back_and_says_so(tmp_path, monkeypatch, caplog):
    run_dir = str(tmp_path / "run")

    def unsupported(*args, **kwargs):
        raise ConditionalWritesUnsupported("write x: this object store does not implement conditional requests")

    monkeypatch.setattr(lease_mod, "write_if", unsupported)
    monkeypatch.setattr(lease_mod, "delete_if", unsupported)
    with caplog.at_level(logging.WARNING, logger="dinocell.launch.lease"):
        held = acquire_lease(None, run_dir, BK, NS, "dino-a", 5.0)
        record_uid(held, "uid-a")
        assert read_lease(run_dir).uid == "uid-a"
        release_lease(held)
    assert read_lease(run_dir) is None
    warnings = [r for r in caplog.records if "falls back to write-and-read-back" in r.getMessage()]
    assert len(warnings) == 1  # said once per run dir
