"""dinocell.progress: status lines off a terminal (rate, ETA, at most one per interval, a final line), a tqdm bar on
a pseudo-terminal, the environment switches, thread-safe counting."""

import fcntl
import io
import logging
import os
import pty
import select
import struct
import termios
import threading

import pytest

from dinocell import storage
from dinocell.progress import ENV_EVERY, ENV_MODE, Progress, format_duration, resolve_mode, track


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def lines(monkeypatch):
    """The messages the dinocell logger gets from dinocell.progress (handler on that logger: the package root
    logger does not propagate to the root once setup_logging ran)."""
    for name in (ENV_MODE, ENV_EVERY, "RANK"):
        monkeypatch.delenv(name, raising=False)
    got: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())

    logger = logging.getLogger("dinocell.progress")
    handler, old_level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield got
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_log_mode_lines_have_rate_and_eta_at_most_one_per_interval(lines):
    clock = FakeClock()
    p = Progress("shard", total=100, unit="fields", every=30, stream=io.StringIO(), clock=clock)
    assert p.mode == "log"  # a StringIO is no terminal
    for t, n in ((10, 10), (20, 10), (29.9, 5)):
        clock.t = 1000 + t
        p.update(n)
    assert lines == []  # under 30 s since the start: nothing yet
    clock.t = 1031
    p.update(5)  # 30 done in 31 s
    assert lines == ["shard: 30/100 fields (30.0%), 0.968 fields/s, ETA 1m12s, elapsed 31s"]
    for k in range(20):  # a burst inside the next interval: no line
        clock.t = 1031 + k
        p.update(1)
    assert len(lines) == 1
    clock.t = 1061
    p.set_postfix(loss="0.52")
    p.update(10)  # 60 done in 61 s, 30 s after the last line
    assert lines[1] == "shard: 60/100 fields (60.0%), 0.984 fields/s, ETA 41s, elapsed 1m01s  loss=0.52"
    clock.t = 1080
    p.update(40)  # the total, 19 s after the last line: no line yet
    clock.t = 1101
    p.close()
    p.close()  # idempotent: one final line
    assert lines[2:] == ["shard: done, 100/100 fields (100.0%), 0.99 fields/s, elapsed 1m41s  loss=0.52"]
    assert p.lines == 3


def test_unknown_total_has_no_eta_and_a_failure_says_stopped(lines):
    clock = FakeClock()
    with pytest.raises(RuntimeError, match="boom"):
        with Progress("discover: load_data CSVs", unit="csv", every=5, mode="log", clock=clock) as p:
            clock.t += 6
            p.update(12)
            raise RuntimeError("boom")
    assert lines == ["discover: load_data CSVs: 12 csv, 2 csv/s, elapsed 6s",
                     "discover: load_data CSVs: stopped, 12 csv, 2 csv/s, elapsed 6s"]
    assert "ETA" not in "".join(lines)


def test_resumed_progress_rates_only_the_new_work(lines):
    clock = FakeClock()
    p = Progress("pretrain", total=1000, initial=900, every=10, mode="log", clock=clock)
    clock.t += 10
    p.update(20)  # 20 iterations in 10 s, 80 to go
    assert lines == ["pretrain: 920/1000 it (92.0%), 2 it/s, ETA 40s, elapsed 10s"]
    clock.t += 1
    p.close()
    assert lines[-1].startswith("pretrain: stopped, 920/1000 it")  # short of the total


def test_environment_switches(lines, monkeypatch):
    clock = FakeClock()
    monkeypatch.setenv(ENV_MODE, "0")
    p = Progress("x", total=3, mode="bar", clock=clock)  # the environment wins over the argument
    assert p.mode == "off"
    p.update(3)
    p.close()
    assert lines == [] and p.done == 3  # off still counts
    monkeypatch.setenv(ENV_MODE, "log")
    monkeypatch.setenv(ENV_EVERY, "5")
    p = Progress("x", total=10, every=600, clock=clock)
    assert (p.mode, p.every) == ("log", 5.0)
    clock.t += 5
    p.update(1)
    assert len(lines) == 1
    monkeypatch.setenv(ENV_EVERY, "soon")
    with pytest.raises(ValueError, match=f"{ENV_EVERY}='soon'"):
        Progress("x")
    monkeypatch.setenv(ENV_EVERY, "-1")
    with pytest.raises(ValueError, match=f"{ENV_EVERY}='-1'.*>= 0"):
        Progress("x")
    monkeypatch.delenv(ENV_EVERY)
    monkeypatch.setenv(ENV_MODE, "sometimes")
    with pytest.raises(ValueError, match=f"{ENV_MODE}='sometimes'"):
        Progress("x")
    monkeypatch.delenv(ENV_MODE)
    with pytest.raises(ValueError, match="progress mode"):
        Progress("x", mode="loud")
    # train.progress's values: True = a bar, False = nothing; non-zero ranks stay quiet
    assert resolve_mode(True) == "bar" and resolve_mode(False) == "off"
    monkeypatch.setenv("RANK", "1")
    assert resolve_mode("log") == "off" and resolve_mode("log", rank0_only=False) == "log"


def test_counts_from_many_threads_are_exact(lines):
    clock = FakeClock()
    p = Progress("discover: plate listings", total=8 * 500, mode="log", every=30, clock=clock)
    # the way discover uses it: storage.map_parallel(progress.counted(fn), items) on the storage thread pool
    results = storage.map_parallel(p.counted(lambda i: i * 2), range(8 * 500), max_workers=8)
    assert results == [2 * i for i in range(8 * 500)] and p.done == 4000
    assert lines == []  # the clock never moved: no interval elapsed
    # the interval check and the line happen under the lock: many threads crossing it together write one line
    clock.t += 31
    barrier = threading.Barrier(8)

    def racer():
        barrier.wait()
        p.update(0)

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(lines) == 1


def test_counted_does_not_count_a_call_that_raises(lines):
    p = Progress("x", total=2, mode="off")

    def fail():
        raise OSError("no")

    with pytest.raises(OSError):
        p.counted(fail)()
    assert p.done == 0


def test_track_wraps_an_iterable(lines):
    clock = FakeClock()
    seen = []
    for x in track(["a", "b", "c"], "evaluate: fields", unit="field", mode="log", every=30, clock=clock):
        clock.t += 1
        seen.append(x)
    assert seen == ["a", "b", "c"]
    assert lines == ["evaluate: fields: done, 3/3 field (100.0%), 1 field/s, elapsed 3s"]
    lines.clear()
    gen = track(range(10), "early exit", mode="log", clock=clock)
    for x in gen:
        if x == 4:
            break
    gen.close()
    assert lines == ["early exit: stopped, 4/10 it (40.0%), 0 it/s, ETA ?, elapsed 0s"]


def test_terminal_gets_a_tqdm_bar(lines):
    master, slave = pty.openpty()
    # a fresh pty has 0 columns, which tqdm's dynamic width takes literally: give it a terminal's size
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    stream = os.fdopen(slave, "w")
    try:
        p = Progress("shard", total=10, unit="shard", stream=stream)
        assert p.mode == "bar"  # a pseudo-terminal is a terminal
        for _ in range(10):
            p.update(1)
        p.set_postfix(loss="0.5")
        p.close()
        stream.flush()
        out = b""
        while select.select([master], [], [], 0.5)[0]:
            chunk = os.read(master, 65536)
            if not chunk:
                break
            out += chunk
    finally:
        stream.close()
        os.close(master)
    text = out.decode(errors="replace")
    assert "shard: 100%" in text and "10/10" in text and "shard/s" in text, text
    assert "\r" in text  # redrawn in place: what a log file must not get
    assert lines == []  # nothing through the logger on a terminal


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 60, 3599, 3600, 7322, float("inf"))] == [
        "0s", "59s", "1m00s", "59m59s", "1h00m", "2h02m", "?"]
