"""Running the compiled pipeline's steps on this machine: kfp.local with the SubprocessRunner.

Each component runs in a subprocess of this Python (SubprocessRunner(use_venv=False)), so the code is the installed
package's; cluster-only task settings (secrets, GPUs, placement) have no effect here. Caching does, with `cache=True`:
kfp.local keeps its own cache under `<workdir>/kfp/.kfp_cache` and, like KFP, skips a task whose component, image,
command and inputs match an earlier successful run and whose caching is on (discover and shard: their inputs hold no
per-run value). Off by default: the demo's S3 server lives in memory, so a cached URI from an earlier demo would
point at nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dinocell import storage
from dinocell.config.step_args import configure_storage, parse_overrides
from dinocell.pipeline.layout import RunLayout
from dinocell.pipeline.outcome import PipelineOutcome, collect_outcome

__all__ = ["local_arguments", "run_local"]

def local_arguments(source: str, outputs: str, config: str, overrides: Any, endpoint_url: str, run_name: str,
                    model_name: str, model_version: str, anonymous: bool = False, **extra: Any) -> dict[str, Any]:
    """Pipeline arguments for a run on this machine: the local training backend, no GPUs."""
    args = {
        "images_prefix": storage.join(source, "images") + "/",
        "output_root": outputs,
        "run_name": run_name,
        "config": config,
        "overrides": parse_overrides(overrides),
        "s3_endpoint": endpoint_url or "",
        "s3_anonymous": bool(anonymous),
        "backend": "local",
        "gpus_per_node": 0,
        "model_name": model_name,
        "model_version": model_version,
    }
    args.update(extra)
    return args


def run_local(pipeline_func: Callable, source: str, outputs: str, workdir: str | os.PathLike, config: str = "tiny",
              overrides: Any = (), endpoint_url: str = "", *, run_name: str = "", model_name: str = "dinocell-demo",
              model_version: str = "", anonymous: bool = False, log_file: str | os.PathLike | None = None,
              cache: bool = False, **params: Any) -> PipelineOutcome:
    """Run `pipeline_func` (pipeline.py's pipeline) on this machine with kfp.local (one subprocess per step, this
    Python's packages).

    `source`: source root of a JUMP-layout bucket (its `images/` and `workspace/` live under it); `outputs`: the output
    root; KFP's own local outputs go to `<workdir>/kfp`, and the evaluation folder (report.html + images) is copied to
    `<workdir>/eval`. Extra keyword arguments are further pipeline parameters. `log_file`: kfp.local's own output
    (every task's executor input and streamed log) goes there instead of stdout; its tail is shown if a step fails.
    `cache`: kfp.local's task cache (see the module docstring); the outcome's `cached_tasks` names the tasks it
    skipped.
    """
    from kfp import local

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run_name = run_name or time.strftime("local-%Y%m%d-%H%M%S", time.gmtime())
    configure_storage(endpoint_url, anonymous)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "kfp"),
               enable_caching=bool(cache))
    args = local_arguments(source, outputs, config, overrides, endpoint_url, run_name, model_name, model_version,
                           anonymous, **params)
    before = set(_run_dirs(workdir))
    with warnings.catch_warnings():
        # The subprocess runner warns about image names without "python"; locally the image is not used at all.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        # Cluster-only task settings (display names, secrets, GPUs, resources) are no-ops here, as documented.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*", category=UserWarning)
        if log_file is None:
            pipeline_func(**args)
        else:
            with open(log_file, "w") as log, contextlib.redirect_stdout(log):
                try:
                    pipeline_func(**args)
                except BaseException:
                    log.flush()
                    tail = Path(log_file).read_text().splitlines()[-40:]
                    print("\n".join(tail), file=sys.__stderr__)
                    print(f"(the whole KFP log: {log_file})", file=sys.__stderr__)
                    raise
    layout = RunLayout(outputs, run_name, params.get("models_prefix", ""))
    outcome = collect_outcome(layout, model_name, layout.model_version(model_version), workdir)
    if cache:
        outcome.cached_tasks = _cached_tasks(pipeline_func, [d for d in _run_dirs(workdir) if d not in before])
    return outcome


def _run_dirs(workdir: Path) -> list[Path]:
    """kfp.local's per-run output folders, `<workdir>/kfp/<pipeline name>-<time>/`."""
    root = workdir / "kfp"
    return [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []


def _cached_tasks(pipeline_func: Callable, new_runs: list[Path]) -> list[str]:
    """The tasks of this run that kfp.local answered from its cache: an executed task writes its outputs under
    `<run folder>/<task>/`, a cache hit hands on the earlier run's artifacts and writes nothing (every task of this
    pipeline has an output)."""
    if len(new_runs) != 1:
        raise RuntimeError(f"kfp.local: expected one new run folder, found {[str(p) for p in new_runs]}")
    tasks = list(pipeline_func.pipeline_spec.root.dag.tasks)
    return [t for t in tasks if not (new_runs[0] / t).exists()]
