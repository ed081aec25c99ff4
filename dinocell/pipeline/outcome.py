"""What a finished pipeline run left in object storage, gathered for the person who ran it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dinocell import storage
from dinocell.config.step_args import StepError
from dinocell.eval.step import read_eval_outputs
from dinocell.pipeline.layout import RunLayout

__all__ = ["PipelineOutcome", "collect_outcome", "copy_prefix", "run_data"]


@dataclass
class PipelineOutcome:
    """What a whole run produced, gathered from object storage (the same whether KFP ran it or not)."""

    layout: RunLayout
    model_uri: str
    scalars: dict[str, float]
    summary_md: str
    report_uri: str
    local_report: Path | None = None
    manifest_uri: str = ""  # the content-addressed data the run trained on (from its resolved training config)
    shards_uri: str = ""
    cached_tasks: list[str] = field(default_factory=list)  # tasks answered from KFP's cache (kfp.local runs)

    def format(self) -> str:
        lines = [short_summary(self.summary_md), "", f"published model: {self.model_uri}",
                 f"run outputs:     {self.layout.root}"]
        if self.manifest_uri:
            lines.append(f"data:            {self.manifest_uri}, {self.shards_uri or '(raw mode: no shards)'}")
        if self.cached_tasks:
            lines.append(f"from the cache:  {', '.join(self.cached_tasks)} (inputs unchanged since an earlier run)")
        if self.local_report is not None:
            lines.append(f"HTML report:     {self.local_report}")
        return "\n".join(lines)


def short_summary(summary_md: str) -> str:
    """What a person reads at the end of a run: the evaluation's headline sentences and the profiling table (the
    full tables are in summary.md / report.html)."""
    out, in_code = [], False
    for line in summary_md.splitlines():
        if line.startswith("# ") or line.startswith("- "):
            out.append(line)
        elif line.startswith("## Profiling"):
            out += ["", line]
        elif line.strip() == "```":
            in_code = not in_code
        elif in_code or line.startswith("Profiling not scored"):
            out.append(line)
    return "\n".join(out).strip() or summary_md.rstrip()


def copy_prefix(prefix: str, dest: Path) -> int:
    """Copy every object under `prefix` into `dest`, keeping relative paths; returns the count."""
    base = prefix.rstrip("/") + "/"
    n = 0
    for obj in storage.list_objects(base):
        rel = obj.uri[len(base):] if obj.uri.startswith(base) else Path(obj.uri).name
        storage.download_file(obj.uri, Path(storage.safe_join(str(dest), rel)))
        n += 1
    return n


def collect_outcome(layout: RunLayout, model_name: str, model_version: str, workdir: str | os.PathLike | None = None
                    ) -> PipelineOutcome:
    """Read a finished run's evaluation and published model; copy the evaluation folder (report.html and its
    images) into `<workdir>/eval/` so the report opens locally."""
    ev = read_eval_outputs(layout.eval)
    local_report = None
    if workdir is not None:
        dest = Path(workdir) / "eval"
        n = copy_prefix(layout.eval, dest)
        local_report = (dest / "report.html").resolve()
        if not local_report.is_file():
            raise StepError(f"copied {n} file(s) from {layout.eval} but no report.html among them")
    model_uri = storage.join(layout.models, model_name, model_version)
    manifest_uri, shards_uri = run_data(layout)
    return PipelineOutcome(layout, model_uri, ev.scalars, ev.summary_md, ev.report_uri, local_report, manifest_uri,
                           shards_uri)


def run_data(layout: RunLayout) -> tuple[str, str]:
    """The manifest and shard index a run trained on, read from the training config it wrote ("" where absent)."""
    import yaml

    if not storage.exists(layout.train_config):
        return "", ""
    cfg = yaml.safe_load(storage.read_text(layout.train_config)) or {}
    return str((cfg.get("data") or {}).get("manifest") or ""), str((cfg.get("loader") or {}).get("shards") or "")
