"""Streaming the master pod's log by polling: timestamped requests with sinceSeconds, de-duplicated by timestamp (no
long-lived stream to break)."""

from __future__ import annotations

import datetime as _dt
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_TS_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def parse_log_timestamp(text: str) -> int | None:
    """RFC3339(Nano) -> integer nanoseconds since the epoch. The kubelet trims trailing zeros of the fraction, so
    the strings do not sort as text; integers do."""
    m = _TS_RE.match(text)
    if not m:
        return None
    base, frac, zone = m.groups()
    zone = "+00:00" if zone == "Z" else zone
    seconds = int(_dt.datetime.fromisoformat(base + zone).timestamp())
    return seconds * 1_000_000_000 + int((frac or "0").ljust(9, "0"))


class LogFollower:
    """Emit the master pod's new log lines on each poll, once each, in order."""

    SLACK_S = 5  # extra look-back: request latency and whole-second rounding of sinceSeconds

    def __init__(
        self,
        core_api,
        namespace: str,
        container: str,
        sink: Callable[[str], None],
        request_timeout_s: float,
        tail: int = 50,
    ):
        self.core, self.namespace, self.container, self.sink = core_api, namespace, container, sink
        self.request_timeout_s = request_timeout_s
        self.pod: str | None = None
        self.lines = 0
        self.tail: deque[str] = deque(maxlen=tail)
        self._reset()

    def _reset(self) -> None:
        self._last_ts = -1
        self._at_last: set[str] = set()
        self._last_fetch: float | None = None

    def follow(self, pod_name: str) -> None:
        if pod_name != self.pod:  # a new pod (first, or a restart): its log starts from the beginning
            self.pod = pod_name
            self._reset()

    def poll(self) -> int:
        """Fetch and emit new lines; returns how many were emitted. Log errors are reported, never fatal."""
        if self.pod is None:
            return 0
        from kubernetes.client.rest import ApiException

        kwargs: dict[str, Any] = {"container": self.container, "timestamps": True}
        started = time.monotonic()
        if self._last_fetch is not None:
            kwargs["since_seconds"] = max(1, math.ceil(started - self._last_fetch) + self.SLACK_S)
        try:
            # _preload_content=False: the client would json-decode a log that happens to parse as JSON.
            resp = self.core.read_namespaced_pod_log(
                self.pod, self.namespace, _preload_content=False, _request_timeout=self.request_timeout_s, **kwargs
            )
            text = resp.data.decode("utf-8", errors="replace")
        except ApiException as e:
            if e.status in (400, 404):  # container not started yet / pod gone: nothing to read now
                return 0
            log.warning("reading the log of pod %s/%s failed: HTTP %s %s", self.namespace, self.pod, e.status, e.reason)
            return 0
        self._last_fetch = started
        emitted = 0
        for raw in text.splitlines():
            stamp, _, line = raw.partition(" ")
            ts = parse_log_timestamp(stamp)
            if ts is None:  # not timestamped (should not happen with timestamps=true): de-duplicate by text
                ts, line = self._last_ts, raw
            if ts < self._last_ts or (ts == self._last_ts and line in self._at_last):
                continue
            if ts > self._last_ts:
                self._last_ts, self._at_last = ts, set()
            self._at_last.add(line)
            self.sink(line)
            self.tail.append(line)
            self.lines += 1
            emitted += 1
        return emitted


def print_line(line: str) -> None:
    print(line, flush=True)
