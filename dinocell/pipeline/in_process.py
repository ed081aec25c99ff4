"""The five steps in a row in this process, without KFP: the same step entries and object-storage layout as the
pipeline (`python pipeline.py demo --steps`; quicker to debug than kfp.local)."""

from __future__ import annotations

import os
import time
from typing import Any

from dinocell import storage
from dinocell.data.step import shard
from dinocell.eval.step import evaluate
from dinocell.jump.step import discover
from dinocell.launch.step import train
from dinocell.pipeline import data_keys
from dinocell.pipeline.layout import RunLayout
from dinocell.pipeline.outcome import PipelineOutcome, collect_outcome
from dinocell.publish.step import publish

__all__ = ["run_all_steps"]


def run_all_steps(
    source: str,
    outputs: str,
    workdir: str | os.PathLike,
    config: str = "tiny",
    overrides: Any = (),
    endpoint_url: str = "",
    *,
    run_name: str = "",
    anonymous: bool | None = None,
    model_name: str = "dinocell-demo",
    model_version: str = "",
    models_prefix: str = "",
    backend: str = "local",
    **train_kwargs: Any,
) -> PipelineOutcome:
    """discover -> shard -> train -> evaluate -> publish without KFP, writing the same layout as the pipeline.

    `source`: the source root of a JUMP-layout bucket (`.../cpg0000-jump-pilot/source_4`); `outputs`: the output
    root (models go to `models_prefix`, default `<outputs>/models`). The run id is `run_name` or
    `steps-<UTC timestamp>`; the model version defaults to the run id. Extra keyword arguments go to the train step (dinocell.launch.step.train).
    """
    run_id = run_name or time.strftime("steps-%Y%m%d-%H%M%S", time.gmtime())
    layout = RunLayout(outputs, run_id, models_prefix)
    version = layout.model_version(model_version)
    common = {"endpoint_url": endpoint_url, "anonymous": anonymous}
    images_prefix = storage.join(source, "images") + "/"
    # The data go where the pipeline puts them: content-addressed under <outputs>/data/, shared by runs.
    key = data_keys.discovery_key(config, overrides, images_prefix=images_prefix, **common)
    d = discover(config, overrides, manifest_uri=data_keys.manifest_uri(outputs, key), images_prefix=images_prefix,
                 **common)
    print(d.summary_text)
    key = data_keys.shard_key(config, overrides, manifest_uri=d.manifest_uri, **common)
    s = shard(config, overrides, manifest_uri=d.manifest_uri, shards_prefix=data_keys.shards_prefix(outputs, key),
              **common)
    t = train(config, overrides, output_dir=layout.train_output_dir, shards_index_uri=s.index_uri,
                   manifest_uri=d.manifest_uri, config_uri=layout.train_config, backend=backend, **common,
                   **train_kwargs)
    e = evaluate(config, overrides, checkpoint_uri=t.checkpoint_uri, manifest_uri=d.manifest_uri,
                      out_uri=layout.eval, **common)
    p = publish(t.checkpoint_uri, dest_prefix=layout.models, name=model_name, version=version,
                     metrics_uri=e.metrics_uri, config=config, overrides=overrides, **common)
    print(p.summary)
    return collect_outcome(layout, model_name, version, workdir)
