import json
import logging
import os
import random
import subprocess
import tempfile
import time

import numpy as np
import pytest
import torch
from fault_proxy import FaultProxy
from torch import nn

from dinocell import storage
from dinocell.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointUnreadable,
    capture_rng_state,
    check_weights_only_types,
    restore_rng_state,
)

torch.set_num_threads(1)


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))
    model.register_buffer("counter", torch.tensor([seed], dtype=torch.int64))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.04}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2
    )
    return model, opt


def _train_steps(model, opt, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 6, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _assert_same(a, b, path="state"):
    """Exact structural equality: every tensor bit-identical (dtype included), every plain value equal."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def _roundtrip(root, **manager_kwargs):
    model, opt = _model_and_optimizer(0)
    _train_steps(model, opt, 3, seed=1)
    mgr = CheckpointManager(root, **manager_kwargs)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": 3, "rng": capture_rng_state()}
    uri = mgr.save(3, state)
    assert uri == storage.join(root, "ckpt-00000003.pt")
    assert mgr.latest() == uri

    loaded = CheckpointManager(root).load()
    model2, opt2 = _model_and_optimizer(99)  # different init: everything must come from the checkpoint
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    _assert_same(model.state_dict(), model2.state_dict(), "model")
    _assert_same(opt.state_dict(), opt2.state_dict(), "optimizer")
    steps = [s["step"] for s in opt2.state_dict()["state"].values()]
    assert all(torch.equal(s, torch.tensor(3.0)) for s in steps), steps
    assert loaded["iteration"] == 3
    # resuming gives exactly the same trajectory as never stopping
    _train_steps(model, opt, 2, seed=7)
    _train_steps(model2, opt2, 2, seed=7)
    _assert_same(model.state_dict(), model2.state_dict(), "model after 2 more steps")
    _assert_same(opt.state_dict(), opt2.state_dict(), "optimizer after 2 more steps")


def test_roundtrip_bit_exact_local(tmp_path):
    _roundtrip(str(tmp_path / "ckpt"))
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["ckpt-00000003.pt", "ckpt-00000003.pt.json", "latest.json"]


def test_roundtrip_bit_exact_s3(s3_bucket):
    _roundtrip(f"s3://{s3_bucket}/run/ckpt")


def test_s3_multipart_path(s3_bucket):
    """A checkpoint above the upload threshold goes through a temp file + managed upload and still verifies."""
    root = f"s3://{s3_bucket}/run/ckpt"
    mgr = CheckpointManager(root, upload_threshold_bytes=1)
    big = torch.arange(3_000_000, dtype=torch.int32)  # 12 MB: above boto3's 8 MB multipart threshold
    mgr.save(10, {"x": big})
    assert torch.equal(mgr.load()["x"], big)
    assert mgr.list() == [(10, f"{root}/ckpt-00000010.pt")]


def test_prune_keeps_last_and_milestones(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, milestone_every=100)
    for it in (50, 100, 150, 200, 250, 300, 350):
        mgr.save(it, {"it": torch.tensor(it)})
    assert [it for it, _ in mgr.list()] == [100, 200, 300, 350]  # milestones 100/200/300 + last 2 regular (300 is both)
    mgr.save(400, {"it": torch.tensor(400)})
    assert [it for it, _ in mgr.list()] == [100, 200, 300, 350, 400]
    # pruned checkpoints lose their records too
    assert sorted(p.name for p in tmp_path.glob("*.json")) == sorted(
        [f"ckpt-{i:08d}.pt.json" for i in (100, 200, 300, 350, 400)] + ["latest.json"]
    )
    assert mgr.load()["it"].item() == 400


def test_keep_last_zero_keeps_everything(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=0)
    for it in range(5):
        mgr.save(it, {"it": it})
    assert [it for it, _ in mgr.list()] == [0, 1, 2, 3, 4]


def test_crash_before_pointer_keeps_previous(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    good = mgr.save(100, {"it": torch.tensor(100)})
    real_write = storage.write_bytes

    def crash_on_pointer(uri, data):
        if str(uri).endswith("latest.json"):
            raise KeyboardInterrupt("simulated preemption")
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", crash_on_pointer)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(200, {"it": torch.tensor(200)})
    monkeypatch.undo()
    assert (tmp_path / "ckpt-00000200.pt").exists()  # the data landed, the pointer did not
    fresh = CheckpointManager(tmp_path)
    assert fresh.latest() == good
    assert fresh.load()["it"].item() == 100


def test_crash_between_data_and_record_on_first_save_starts_fresh(tmp_path, monkeypatch, caplog):
    real_write = storage.write_bytes

    def die_before_record(uri, data):
        if str(uri).endswith(".json"):
            raise SystemExit("simulated kill after the data write")
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", die_before_record)
    with pytest.raises(SystemExit):
        CheckpointManager(tmp_path).save(5, {"it": 5})
    monkeypatch.undo()
    mgr = CheckpointManager(tmp_path)
    with caplog.at_level(logging.WARNING, logger="dinocell"):
        assert mgr.latest() is None and mgr.load() is None
    assert "ignoring incomplete" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_newest_falls_back(tmp_path, caplog, damage):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for it in (10, 20, 30):
        mgr.save(it, {"it": torch.tensor(it), "w": torch.randn(100)})
    newest = tmp_path / "ckpt-00000030.pt"
    raw = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":  # same size, one byte changed: only the sha256 can tell
        i = len(raw) // 2
        newest.write_bytes(raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1 :])
    else:
        newest.unlink()
    with caplog.at_level(logging.WARNING, logger="dinocell"):
        state = CheckpointManager(tmp_path).load()
    assert state["it"].item() == 20
    assert "ckpt-00000030.pt" in caplog.text
    if damage != "flip":  # size/presence damage is seen by the cheap latest() too
        assert mgr.latest() == str(tmp_path / "ckpt-00000020.pt")
    else:
        with pytest.raises(CheckpointError, match="corrupt: sha256"):
            mgr.load(str(newest))  # an explicitly named checkpoint never falls back


def test_unreadable_pointer_falls_back(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"it": 1})
    mgr.save(2, {"it": 2})
    (tmp_path / "latest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="dinocell"):
        assert mgr.latest() == str(tmp_path / "ckpt-00000002.pt")
        assert mgr.load()["it"] == 2
    assert "latest.json" in caplog.text


def test_all_corrupt_raises_instead_of_starting_fresh(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"it": 1})
    (tmp_path / "ckpt-00000001.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="ckpt-00000001.pt"):
        mgr.load()


def test_empty_root_and_other_ranks(tmp_path):
    assert CheckpointManager(tmp_path / "none").latest() is None
    assert CheckpointManager(tmp_path / "none").load() is None
    worker = CheckpointManager(tmp_path / "r1", rank=1)
    assert worker.save(7, {"x": 1}) == str(tmp_path / "r1" / "ckpt-00000007.pt")
    assert not (tmp_path / "r1").exists()


class _Custom:
    pass


def test_weights_only_refuses_pickled_objects(tmp_path):
    mgr = CheckpointManager(tmp_path)
    # refused when saving, naming the offending key
    with pytest.raises(TypeError, match=r"\['extra'\]\['fn'\].*weights_only"):
        mgr.save(1, {"w": torch.zeros(2), "extra": {"fn": lambda x: x}})
    with pytest.raises(TypeError, match="convert numpy arrays"):
        mgr.save(1, {"w": np.zeros(2)})
    assert mgr.list() == []
    # and a file written behind the manager's back with a custom class is refused when loading
    bad = tmp_path / "ckpt-00000002.pt"
    torch.save({"obj": _Custom()}, bad)
    with pytest.raises(CheckpointError, match="refusing to load.*weights_only"):
        mgr.load(str(bad))


def test_type_check_accepts_what_weights_only_loads(tmp_path):
    state = {"a": [1, 2.5, "s", None, True], "b": (torch.float32, torch.Size([2])), "c": {3: torch.ones(1)}}
    check_weights_only_types(state)
    mgr = CheckpointManager(tmp_path)
    mgr.save(0, state)
    _assert_same(mgr.load(), state)


def _draws():
    return (
        torch.rand(5),
        torch.randn(3),
        np.random.rand(4),
        np.random.normal(size=3),
        random.random(),
        random.gauss(0, 1),
    )


def test_rng_capture_restore_through_checkpoint(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's legacy state
    random.gauss(0, 1)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"rng": capture_rng_state()})
    expected = _draws()
    _draws()  # move every generator further on
    restore_rng_state(mgr.load()["rng"])
    got = _draws()
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    assert np.array_equal(expected[2], got[2]) and np.array_equal(expected[3], got[3])
    assert expected[4] == got[4] and expected[5] == got[5]


def test_rng_state_types_are_weights_only_safe():
    state = capture_rng_state()
    check_weights_only_types(state)
    assert json.dumps(sorted(state))  # plain string keys
    with pytest.raises(KeyError, match="numpy"):
        restore_rng_state({"torch": state["torch"], "python": state["python"]})


def test_save_older_iteration_is_never_pruned(tmp_path):
    """A run restarted from an older checkpoint saves below existing newer ones: its save must survive pruning."""
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(200, {"it": 200})
    mgr.save(100, {"it": 100})
    assert [it for it, _ in mgr.list()] == [100, 200]
    assert mgr.latest() == str(tmp_path / "ckpt-00000100.pt") and mgr.load()["it"] == 100


# ----------------------------------------------------------------------------------------------- unreadable != absent


def test_records_that_cannot_be_parsed_are_an_error_never_a_fresh_start(tmp_path):
    """Corrupt JSON in the pointer and in every record used to read as "no checkpoint": a run restarted at
    iteration 0 and overwrote them. It must fail naming them; only a root without any record is fresh."""
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"it": 1})
    mgr.save(2, {"it": 2})
    for name in ("latest.json", "ckpt-00000001.pt.json", "ckpt-00000002.pt.json"):
        (tmp_path / name).write_text("{truncated")
    with pytest.raises(CheckpointUnreadable, match=r"ckpt-00000002\.pt\.json.*refusing to start from scratch") as e:
        CheckpointManager(tmp_path).load()
    assert "\n" not in str(e.value) and str(tmp_path / "ckpt-00000002.pt") in e.value.uris
    with pytest.raises(CheckpointUnreadable):
        CheckpointManager(tmp_path).latest() or CheckpointManager(tmp_path).load()


def test_a_checkpoint_that_fails_to_load_falls_back_and_says_so(tmp_path):
    """Data that matches its record but is no torch checkpoint: the older one is used, named in passed_over."""
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"it": 1})
    mgr.save(2, {"it": 2})
    junk = b"not a torch checkpoint"
    (tmp_path / "ckpt-00000002.pt").write_bytes(junk)
    rec = {"checkpoint": "ckpt-00000002.pt", "iteration": 2, "size": len(junk),
           "sha256": __import__("hashlib").sha256(junk).hexdigest()}
    for name in ("latest.json", "ckpt-00000002.pt.json"):
        (tmp_path / name).write_text(json.dumps(rec))
    found = CheckpointManager(tmp_path).resolve()
    assert (found.uri, found.iteration, found.state["it"]) == (str(tmp_path / "ckpt-00000001.pt"), 1, 1)
    assert [u for u, _ in found.passed_over] == [str(tmp_path / "ckpt-00000002.pt")]
    assert "ckpt-00000002.pt" in found.passed_over[0][1] and "torch" in found.passed_over[0][1]


@pytest.fixture
def s3_run(s3_server, s3_bucket):
    root = f"s3://{s3_bucket}/run/checkpoints"
    mgr = CheckpointManager(root)
    mgr.save(1, {"it": 1})
    mgr.save(2, {"it": 2})
    yield s3_server, root
    storage.configure(storage.StorageConfig(endpoint_url=s3_server.endpoint_url, anonymous=False))


def _via(proxy, attempts=2):
    storage.configure(storage.StorageConfig(endpoint_url=proxy.url, anonymous=False, max_attempts=attempts,
                                            connect_timeout_s=2, read_timeout_s=5))


@pytest.mark.parametrize("fault", ["503", "500", "reset", "truncate"])
def test_a_pointer_unreadable_after_the_retries_is_an_error_not_a_fresh_run(s3_run, fault):
    server, root = s3_run
    with FaultProxy(server.endpoint_url, [fault] * 200) as proxy:  # every object GET fails
        _via(proxy)
        with pytest.raises(CheckpointUnreadable, match=r"latest\.json after the storage layer's retries") as e:
            CheckpointManager(root).load()
    assert proxy.injected[fault] >= 2  # retried by the storage layer first (botocore counts retries, not attempts)
    assert e.value.uris == [f"{root}/latest.json"] and "\n" not in str(e.value)


def test_a_transient_failure_of_the_newest_data_never_falls_back_to_an_older_checkpoint(s3_run):
    """Falling back would redo work and, at the next save, overwrite the intact newest checkpoint."""
    server, root = s3_run
    with FaultProxy(server.endpoint_url, ["truncate"] * 50, match="ckpt-00000002.pt") as proxy:
        _via(proxy)
        with pytest.raises(CheckpointUnreadable, match=r"ckpt-00000002\.pt after the storage layer's retries"):
            CheckpointManager(root).load()
        # once storage answers, the newest is there, intact
        proxy.plan.clear()
        assert CheckpointManager(root).load()["it"] == 2


def test_the_first_save_removes_stale_temp_files_of_killed_saves(tmp_path, monkeypatch, caplog):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is free now: the owner of this staging file is provably dead
    root = tmp_path / "ckpt"
    root.mkdir()
    files = {
        tmp / f"dinocell-ckpt-{dead.pid}-a1.pt": False,  # dead owner: removed
        tmp / f"dinocell-ckpt-{os.getpid()}-b2.pt": True,  # a live writer's: kept
        tmp / "dinocell-ckpt-old.txt": True,  # not our pattern
        root / ".ckpt-00000005.pt.x7.tmp": False,  # an interrupted local atomic write, past the grace period
        root / ".latest.json.q1.tmp": True,  # the same, but fresh: may be in flight
    }
    for p in files:
        p.write_bytes(b"partial")
    old = time.time() - 7 * 3600
    os.utime(root / ".ckpt-00000005.pt.x7.tmp", (old, old))
    mgr = CheckpointManager(root)
    with caplog.at_level(logging.INFO, logger="dinocell"):
        mgr.save(6, {"it": 6})
    assert {p.name for p, keep in files.items() if p.exists()} == {p.name for p, keep in files.items() if keep}
    assert mgr.cleaned_temps == 2 and "removed 1 stale temp file" in caplog.text
    mgr.save(7, {"it": 7})  # once per manager (run), not at every save
    assert mgr.cleaned_temps == 2
