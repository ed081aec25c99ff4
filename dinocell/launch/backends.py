"""The job kinds the launcher can submit: API coordinates, builder, master-pod selector and condition names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dinocell.launch import pytorchjob as _pytorchjob
from dinocell.launch import trainjob as _trainjob
from dinocell.launch.jobspec import BACKENDS, JobSpec


@dataclass(frozen=True)
class Backend:
    name: str
    group: str
    version: str
    kind: str
    plural: str
    container: str  # the training container, whose log is streamed
    build: Callable[[JobSpec], dict]
    master_pod_selector: Callable[[str], str]
    success_condition: str
    running_condition: str | None  # TrainJob has no Running condition: a running master pod tells instead
    suspend_path: tuple[str, ...] = ()  # where the job's suspend flag lives (set by Kueue while it is queued)


BACKEND_TABLE = {
    "pytorchjob": Backend(
        "pytorchjob",
        _pytorchjob.GROUP,
        _pytorchjob.VERSION,
        _pytorchjob.KIND,
        _pytorchjob.PLURAL,
        _pytorchjob.CONTAINER,
        _pytorchjob.build_pytorchjob,
        _pytorchjob.master_pod_selector,
        "Succeeded",
        "Running",
        ("spec", "runPolicy", "suspend"),
    ),
    "trainjob": Backend(
        "trainjob",
        _trainjob.GROUP,
        _trainjob.VERSION,
        _trainjob.KIND,
        _trainjob.PLURAL,
        _trainjob.CONTAINER,
        _trainjob.build_trainjob,
        _trainjob.master_pod_selector,
        "Complete",
        None,
        ("spec", "suspend"),
    ),
}


def get_backend(name: str) -> Backend:
    try:
        return BACKEND_TABLE[name]
    except KeyError:
        raise ValueError(f"backend {name!r} not in {BACKENDS}") from None
