import json
import logging
import random

import numpy as np
import pytest
import torch
from torch import nn

from dinocell import storage
from dinocell.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
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
