"""Incomplete multipart uploads (a killed writer's parts, billed until aborted) are aborted by the next writer of the
prefix: the checkpoint manager before its first save, the shard step for uploads older than its grace period.
On the loopback S3 server; the leftovers are made exactly as a killed writer leaves them (upload started, one part
sent, never completed)."""

from __future__ import annotations

import datetime as dt
import logging

import torch

from dinocell import storage
from dinocell.storage.multipart import abort_incomplete_uploads, incomplete_uploads
from dinocell.train.checkpoint import CheckpointManager


def _killed_upload(bucket: str, key: str) -> str:
    c = storage._client(bucket)
    upload = c.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    c.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * (5 * 2**20))
    return upload


def _keys(prefix: str) -> list[str]:
    return sorted(k for k, _, _ in incomplete_uploads(prefix))


def test_abort_only_under_the_prefix_and_only_uploads_started_before(s3_bucket, caplog):
    _killed_upload(s3_bucket, "runs/a/train/checkpoints/ckpt-00000004.pt")
    _killed_upload(s3_bucket, "runs/a/train/checkpoints/ckpt-00000006.pt")
    _killed_upload(s3_bucket, "runs/a/train/checkpoints-other/x.pt")  # a sibling prefix, not below ours
    prefix = f"s3://{s3_bucket}/runs/a/train/checkpoints"
    assert _keys(prefix) == ["runs/a/train/checkpoints/ckpt-00000004.pt", "runs/a/train/checkpoints/ckpt-00000006.pt"]
    # started after the cutoff: somebody's live upload, kept (the loopback server reports every upload as
    # initiated 2010-11-10, so the cutoff is put before that)
    long_ago = dt.datetime(2001, 1, 1, tzinfo=dt.timezone.utc)
    assert [u[2] > long_ago for u in incomplete_uploads(prefix)] == [True, True]
    assert abort_incomplete_uploads(prefix, long_ago) == 0
    with caplog.at_level(logging.INFO, logger="dinocell.storage"):
        n = abort_incomplete_uploads(prefix, dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5))
    assert n == 2 and _keys(prefix) == []
    assert caplog.text.count("aborted the incomplete upload of") == 2
    assert _keys(f"s3://{s3_bucket}/runs/a/train/checkpoints-other") == ["runs/a/train/checkpoints-other/x.pt"]
    assert abort_incomplete_uploads(str(prefix).replace("s3://", "/tmp/not-s3/"), long_ago) == 0  # local: nothing


def test_checkpoint_manager_aborts_a_killed_save_before_its_first_save(s3_bucket):
    root = f"s3://{s3_bucket}/runs/r/train/checkpoints"
    _killed_upload(s3_bucket, "runs/r/train/checkpoints/ckpt-00000010.pt")  # the previous pod died mid-save
    mgr = CheckpointManager(root, upload_threshold_bytes=1)  # every save a multipart upload
    state = {"iteration": 12, "w": torch.arange(6, dtype=torch.float32)}
    uri = mgr.save(12, state)
    assert mgr.cleaned_temps == 1 and _keys(root) == []
    loaded = mgr.load()
    assert loaded["iteration"] == 12 and torch.equal(loaded["w"], state["w"]) and uri.endswith("ckpt-00000012.pt")
    # a second manager (the restarted job) leaves completed checkpoints alone and finds nothing to abort
    again = CheckpointManager(root)
    again.save(14, {"iteration": 14})
    assert again.cleaned_temps == 0 and [it for it, _ in again.list()] == [12, 14]
