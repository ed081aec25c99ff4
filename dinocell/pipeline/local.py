"""Running the compiled pipeline's steps on this machine: kfp.local with the SubprocessRunner.

Each component runs in a subprocess of this Python (SubprocessRunner(use_venv=False)), so the code is the installed
package's; cluster-only task settings (secrets, GPUs, placement, caching) have no effect here.
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
              **params: Any) -> PipelineOutcome:
    """Run `pipeline_func` (pipeline.py's pipeline) on this machine with kfp.local (one subprocess per step, this
    Python's packages).

    `source`: source root of a JUMP-layout bucket (its `images/` and `workspace/` live under it); `outputs`: the output
    root; KFP's own local outputs go to `<workdir>/kfp`, and the evaluation folder (report.html + images) is copied to
    `<workdir>/eval`. Extra keyword arguments are further pipeline parameters. `log_file`: kfp.local's own output
    (every task's executor input and streamed log) goes there instead of stdout; its tail is shown if a step fails.
    """
    from kfp import local

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run_name = run_name or time.strftime("local-%Y%m%d-%H%M%S", time.gmtime())
    configure_storage(endpoint_url, anonymous)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "kfp"))
    args = local_arguments(source, outputs, config, overrides, endpoint_url, run_name, model_name, model_version,
                           anonymous, **params)
    with warnings.catch_warnings():
        # The subprocess runner warns about image names without "python"; locally the image is not used at all.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        # Cluster-only task settings (display names, caching, secrets, GPUs) are no-ops here, as documented.
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
    return collect_outcome(layout, model_name, layout.model_version(model_version), workdir)
