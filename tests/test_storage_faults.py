"""Object reads survive truncated bodies, resets and 503s from a fault-injecting proxy on loopback; a body that
never arrives whole fails with one error naming the object, after the configured attempts."""

from __future__ import annotations

import os

import pytest
from fault_proxy import FaultProxy

from dinocell import storage
from dinocell.storage.local_server import create_bucket


@pytest.fixture
def bucket_behind_proxy(s3_server):
    name = f"faults-{os.getpid()}-{os.urandom(3).hex()}"
    create_bucket(s3_server.endpoint_url, name)
    old = storage._config
    storage.configure(storage.StorageConfig(endpoint_url=s3_server.endpoint_url, anonymous=False))
    data = os.urandom(300_000)
    storage.write_bytes(f"s3://{name}/blob.bin", data)
    yield s3_server, name, data, old
    storage.configure(old)


def _through(proxy: FaultProxy, max_attempts: int = 10) -> None:
    storage.configure(storage.StorageConfig(endpoint_url=proxy.url, anonymous=False, max_attempts=max_attempts,
                                            connect_timeout_s=2, read_timeout_s=5))


def test_read_bytes_retries_truncated_bodies_resets_and_503s(bucket_behind_proxy):
    server, name, data, _ = bucket_behind_proxy
    with FaultProxy(server.endpoint_url, ["truncate", "503", "reset", "truncate"]) as proxy:
        _through(proxy)
        assert storage.read_bytes(f"s3://{name}/blob.bin") == data
    assert proxy.injected == {"truncate": 2, "503": 1, "reset": 1}
    assert proxy.object_gets == 5  # four faults, then the whole body


def test_a_body_that_never_arrives_whole_fails_naming_the_object(bucket_behind_proxy):
    server, name, _, _ = bucket_behind_proxy
    with FaultProxy(server.endpoint_url, ["truncate"] * 50) as proxy:
        _through(proxy, max_attempts=3)
        with pytest.raises(storage.StorageError, match=rf"read s3://{name}/blob.bin failed"):
            storage.read_bytes(f"s3://{name}/blob.bin")
    assert proxy.injected["truncate"] == 3  # exactly the attempt budget, then the error


def test_missing_objects_are_not_retried(bucket_behind_proxy):
    server, name, _, _ = bucket_behind_proxy
    with FaultProxy(server.endpoint_url) as proxy:
        _through(proxy)
        with pytest.raises(storage.StorageError, match="no such object"):
            storage.read_bytes(f"s3://{name}/absent.bin")
    assert proxy.object_gets == 1
