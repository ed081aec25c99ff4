"""KFP caching of the data steps: discover and shard take no per-run value, so two runs with the same inputs give
them identical task inputs (and KFP's cache hits), while train / evaluate / publish differ per run and are never
cached; the content-addressed data keys; the shard step's reuse of a complete shard set at the same key.
Two real kfp.local runs where the second takes discover and shard from the cache: bench/bench_cache.py (1.5 to
2.5 minutes on the 2-core development machine, too long for the suite)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pipeline as pl  # noqa: E402  (the repo-root pipeline.py)
from dinocell import storage  # noqa: E402
from dinocell.config import step_args  # noqa: E402
from dinocell.data.step import shard as shard_step  # noqa: E402
from dinocell.jump.step import discover as discover_step  # noqa: E402
from dinocell.pipeline import data_keys  # noqa: E402

JOB_ID = "{{$.pipeline_job_uuid}}"


def _compiled(path: Path) -> dict:
    return list(yaml.safe_load_all(pl.compile_pipeline(path).read_text()))[0]


def _resolve(value: dict, run: dict, job_id: str):
    """One task input as KFP resolves it before computing the cache key."""
    if "componentInputParameter" in value:
        return run[value["componentInputParameter"]]
    if "runtimeValue" in value:
        return json.loads(json.dumps(value["runtimeValue"]["constant"]).replace(JOB_ID, job_id))
    if "taskOutputParameter" in value or "taskOutputArtifact" in value:
        return value  # an upstream output: the same for both runs when the upstream task was a cache hit
    raise AssertionError(f"unexpected input form {value}")


def cache_material(spec: dict, task: str, run: dict, job_id: str) -> dict:
    """What KFP's cache key covers for one task of one run: the component interface, the container (image, command,
    args) and every resolved input."""
    t = spec["root"]["dag"]["tasks"][task]
    comp = spec["components"][t["componentRef"]["name"]]
    container = spec["deploymentSpec"]["executors"][comp["executorLabel"]]["container"]
    inputs = t.get("inputs", {})
    return {
        "component": comp,
        "image": container["image"],
        "command": container["command"],
        "args": container["args"],
        "parameters": {k: _resolve(v, run, job_id) for k, v in inputs.get("parameters", {}).items()},
        "artifacts": {k: _resolve(v, run, job_id) for k, v in inputs.get("artifacts", {}).items()},
    }


def test_discover_and_shard_task_specs_are_identical_across_runs_train_is_not(tmp_path):
    first, second = _compiled(tmp_path / "a.yaml"), _compiled(tmp_path / "b.yaml")  # two compilations
    defaults = {k: v.get("defaultValue") for k, v in first["root"]["inputDefinitions"]["parameters"].items()}
    run_a = {**defaults, "output_root": "s3://b/runs", "run_name": "run-a"}
    run_b = {**run_a, "run_name": ""}  # named by its KFP job id instead
    for task in ("discover", "shard"):
        a = cache_material(first, task, run_a, "11111111-aaaa")
        b = cache_material(second, task, run_b, "22222222-bbbb")
        assert a == b, task
        assert first["root"]["dag"]["tasks"][task]["cachingOptions"] == {"enableCache": True}
    for task in ("train", "evaluate", "publish"):
        a = cache_material(first, task, run_a, "11111111-aaaa")
        b = cache_material(second, task, run_b, "22222222-bbbb")
        assert a["parameters"]["run_name"] != b["parameters"]["run_name"], task
        assert a["parameters"]["job_id"] != b["parameters"]["job_id"], task
        assert first["root"]["dag"]["tasks"][task]["cachingOptions"] == {}, task  # enableCache false
    # The same run name with another job id (a resubmission) still gives train a new cache key.
    assert cache_material(first, "train", run_a, "1") != cache_material(first, "train", run_a, "2")
    # A real input of the data steps does change their key.
    run_c = {**run_a, "images_prefix": "s3://other/source/images/"}
    assert cache_material(first, "discover", run_a, "1") != cache_material(first, "discover", run_c, "1")


def test_data_keys_follow_the_real_inputs_only(tmp_path, buckets):
    report = buckets.synth(tmp_path / "src" / "cpg0000-jump-pilot" / "source_4", plates_per_batch=2)
    images = storage.join(report.source_root, "images") + "/"

    def dkey(*overrides, **kw):
        return data_keys.discovery_key("tiny", list(overrides), images_prefix=kw.get("images", images),
                                       mode=kw.get("mode", "auto"))

    base = dkey()
    assert base == dkey("train.max_iters=7", "optim.lr=0.1", "data.list_workers=3", "data.manifest=s3://x/m.parquet")
    assert len(base) == data_keys.KEY_CHARS and base != dkey("data.val_fraction=0.5") != dkey(mode="listing")
    assert base != dkey(images=storage.join(report.source_root, "other") + "/")

    uri = data_keys.manifest_uri(str(tmp_path / "out"), base)
    assert uri == str(tmp_path / "out" / "data" / f"manifest-{base}" / "manifest.parquet")
    first = discover_step("tiny", manifest_uri=uri, images_prefix=images)
    sha = data_keys.file_sha256(uri)
    # Rediscovering (a KFP cache miss) rewrites byte-identical bytes, so the shard key stays put.
    discover_step("tiny", manifest_uri=uri, images_prefix=images)
    assert data_keys.file_sha256(uri) == sha and first.n_fields == 4

    skey = data_keys.shard_key("tiny", manifest_uri=uri)
    assert skey == data_keys.shard_key("tiny", ["train.max_iters=7", "shard.workers=1", "shard.output=x"],
                                       manifest_uri=uri)
    assert skey != data_keys.shard_key("tiny", ["preprocess.clahe=false"], manifest_uri=uri)
    other = str(tmp_path / "other.parquet")
    discover_step("tiny", ["data.max_fields=2"], manifest_uri=other, images_prefix=images)
    assert skey != data_keys.shard_key("tiny", manifest_uri=other)  # another manifest, other shards
    with pytest.raises(step_args.StepError, match="output_root is empty"):
        data_keys.shards_prefix("", skey)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_shard_step_reuses_a_complete_shard_set_at_the_same_content_key(tmp_path, buckets):
    """A cache miss with unchanged content (another training override): same key, every shard reused, none built."""
    report = buckets.synth(tmp_path / "src" / "cpg0000-jump-pilot" / "source_4", plates_per_batch=2)
    images = storage.join(report.source_root, "images") + "/"
    out = str(tmp_path / "out")
    manifest = discover_step("tiny", manifest_uri=data_keys.manifest_uri(out, data_keys.discovery_key(
        "tiny", images_prefix=images)), images_prefix=images).manifest_uri
    keys, outcomes, logged = [], [], _Lines()
    logger = logging.getLogger("dinocell")
    level = logger.level
    logger.addHandler(logged)
    logger.setLevel(logging.INFO)
    try:
        for overrides in ([], ["train.max_iters=3"]):
            key = data_keys.shard_key("tiny", overrides, manifest_uri=manifest)
            keys.append(key)
            outcomes.append(shard_step("tiny", overrides, manifest_uri=manifest,
                                       shards_prefix=data_keys.shards_prefix(out, key)))
    finally:
        logger.removeHandler(logged)
        logger.setLevel(level)
    assert keys[0] == keys[1] and outcomes[0].index_uri == outcomes[1].index_uri
    first, second = outcomes
    assert first.written >= 1 and first.reused == 0
    assert (second.written, second.reused) == (0, first.written)  # counted in the step's outcome metadata
    assert f"shard: {first.written} shards already complete, 0 to build" in logged.lines, logged.lines  # and logged
