"""Where one pipeline run writes: every per-run URI under `<output_root>/<run id>/`, the same for KFP and in-process
runs. The field manifest and the shards are not per run: they live under `<output_root>/data/`, named by their
inputs (dinocell.pipeline.data_keys), so that runs with the same inputs share them.

Run id = the pipeline's `run_name` when given, so a rerun with the same name finds and resumes what an earlier
attempt left (the training run resumes from `latest`); else the KFP job id (unique per run).
"""

from __future__ import annotations

from dataclasses import dataclass

from dinocell import storage
from dinocell.config.step_args import StepError
from dinocell.launch.step import TRAIN_RUN_NAME

__all__ = ["RunLayout", "run_id_of"]


@dataclass(frozen=True)
class RunLayout:
    """Every URI of one pipeline run, under `<output_root>/<run_id>/`."""

    output_root: str
    run_id: str
    models_prefix: str = ""

    def __post_init__(self) -> None:
        if not self.output_root:
            raise StepError("output_root is empty: give the object-storage prefix (or local directory) runs write to")
        if not self.run_id or "/" in self.run_id or self.run_id in (".", ".."):
            raise StepError(f"run id {self.run_id!r} must be a non-empty name without '/'")

    @property
    def root(self) -> str:
        return storage.join(self.output_root, self.run_id)

    @property
    def train_config(self) -> str:
        return storage.join(self.root, "config", "pretrain.yaml")

    @property
    def train_output_dir(self) -> str:
        return self.root

    @property
    def train_run(self) -> str:
        return storage.join(self.root, TRAIN_RUN_NAME)

    @property
    def checkpoints(self) -> str:
        return storage.join(self.train_run, "checkpoints")

    @property
    def eval(self) -> str:
        return storage.join(self.root, "eval")

    @property
    def models(self) -> str:
        return self.models_prefix or storage.join(self.output_root, "models")

    def model_version(self, version: str = "") -> str:
        """The version to publish under: the one given, else the run id (unique per run)."""
        return version or self.run_id

    @classmethod
    def for_run(cls, output_root: str, run_name: str, job_id: str, models_prefix: str = "") -> RunLayout:
        """The layout of a pipeline run: named by `run_name` when given (a rerun resumes), else by the KFP job id."""
        return cls(output_root, run_id_of(run_name, job_id), models_prefix)


def run_id_of(run_name: str, job_id: str) -> str:
    """The pipeline's run name when given (reruns resume), else the KFP job id (unique per run)."""
    rid = (run_name or job_id or "").strip()
    if not rid or rid.startswith("{{"):
        raise StepError("no run id: give run_name (the KFP job id placeholder was not resolved)")
    return rid
