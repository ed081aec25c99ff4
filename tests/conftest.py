"""Shared fixtures: a real S3 server on loopback and a fresh bucket per test, wired into the storage layer."""

from __future__ import annotations

import itertools
import os

import pytest

from dinocell import storage
from dinocell.storage.local_server import LOCAL_CREDENTIALS, create_bucket, local_s3_server

_bucket_ids = itertools.count()


@pytest.fixture(scope="session")
def s3_server():
    for k, v in LOCAL_CREDENTIALS.items():
        os.environ.setdefault(k, v)
    with local_s3_server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server):
    """A new private bucket; the storage layer is pointed at the local endpoint for the test's duration.

    Yields the bucket name; objects live at s3://<name>/...
    """
    name = f"test-bucket-{os.getpid()}-{next(_bucket_ids)}"
    create_bucket(s3_server.endpoint_url, name)
    old = storage._config
    storage.configure(storage.StorageConfig(endpoint_url=s3_server.endpoint_url, anonymous=False))
    try:
        yield name
    finally:
        storage.configure(old)


@pytest.fixture
def public_bucket(s3_server):
    """A public-read bucket (for anonymous-access tests); storage is configured signed, tests switch as needed."""
    name = f"public-bucket-{os.getpid()}-{next(_bucket_ids)}"
    create_bucket(s3_server.endpoint_url, name, public_read=True)
    old = storage._config
    storage.configure(storage.StorageConfig(endpoint_url=s3_server.endpoint_url, anonymous=False))
    try:
        yield name
    finally:
        storage.configure(old)
