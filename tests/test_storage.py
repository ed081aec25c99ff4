import os
import threading

import pytest

from dinocell import storage


def test_local_roundtrip_atomic_and_listing(tmp_path):
    uri = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.exists(uri)
    # No temporary siblings left behind by the atomic write.
    assert sorted(os.listdir(tmp_path / "a")) == ["b.bin"]
    storage.write_text(str(tmp_path / "a" / "c.txt"), "x")
    assert [o.uri for o in storage.list_objects(str(tmp_path))] == [str(tmp_path / "a" / "b.bin"), str(tmp_path / "a" / "c.txt")]
    assert storage.list_prefixes(str(tmp_path)) == [str(tmp_path / "a") + "/"]
    with pytest.raises(storage.StorageError, match="missing"):
        storage.read_bytes(str(tmp_path / "missing"))


def test_local_write_fsyncs_by_default_and_can_opt_out(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    storage.write_bytes(str(tmp_path / "d" / "durable.bin"), b"1")
    assert len(synced) == 1
    # fsync=False: no fsync, but still atomic (temp file + rename: no sibling left) and the same permissions.
    storage.write_bytes(str(tmp_path / "d" / "bulk.bin"), b"22", fsync=False)
    storage.write_text(str(tmp_path / "d" / "text.txt"), "x")
    assert len(synced) == 2
    assert sorted(os.listdir(tmp_path / "d")) == ["bulk.bin", "durable.bin", "text.txt"]
    assert storage.read_bytes(str(tmp_path / "d" / "bulk.bin")) == b"22"
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "d").iterdir()}
    assert modes["bulk.bin"] == modes["durable.bin"] == modes["text.txt"]
    with pytest.raises(TypeError):
        storage.write_bytes(str(tmp_path / "d" / "x.bin"), b"3", False)  # keyword only: never by accident


@pytest.mark.parametrize("bad", ["../etc/passwd", "/etc/passwd", "a/../../x", "s3://other/x", "a\\..\\b", "..", "a\x00b"])
def test_safe_join_refuses_escape(bad, tmp_path):
    with pytest.raises(ValueError, match="refusing"):
        storage.safe_join(str(tmp_path), bad)


def test_safe_join_keeps_inside(tmp_path):
    assert storage.safe_join(str(tmp_path), "a/./b/../c.tiff") == str(tmp_path / "a" / "c.tiff")
    assert storage.safe_join("s3://bkt/root/", "x/y.tiff") == "s3://bkt/root/x/y.tiff"


def test_s3_roundtrip_pagination_parallel(s3_bucket):
    base = f"s3://{s3_bucket}/p"
    uris = [f"{base}/d{i % 3}/obj{i:04d}" for i in range(1105)]  # > 1,000: forces a second listing page
    storage.map_parallel(lambda u: storage.write_bytes(u, u.encode()), uris)
    listed = sorted(o.uri for o in storage.list_objects(base + "/"))
    assert listed == sorted(uris)
    assert storage.list_prefixes(base) == [f"{base}/d0/", f"{base}/d1/", f"{base}/d2/"]
    got = storage.read_many(uris[:50] + [f"{base}/nope"], return_exceptions=True)
    assert got[:50] == [u.encode() for u in uris[:50]]
    assert isinstance(got[50], storage.StorageError) and "no such object" in str(got[50])
    with pytest.raises(storage.StorageError, match="nope"):
        storage.read_many([f"{base}/nope"])
    assert storage.exists(uris[0]) and not storage.exists(f"{base}/nope")


def test_client_per_process_and_thread_safe(s3_bucket):
    storage.write_bytes(f"s3://{s3_bucket}/x", b"1")
    c1 = storage._client()
    out = []
    threads = [threading.Thread(target=lambda: out.append(storage._client())) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(c is c1 for c in out)
    # After a fork the child must build its own client (keyed by pid).
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        ok = storage._client() is not c1 and storage.read_bytes(f"s3://{s3_bucket}/x") == b"1"
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"


def test_anonymous_access_public_vs_private(s3_server, public_bucket, s3_bucket):
    storage.write_bytes(f"s3://{public_bucket}/k", b"pub")
    storage.write_bytes(f"s3://{s3_bucket}/k", b"priv")
    storage.configure(storage.StorageConfig(endpoint_url=s3_server.endpoint_url, anonymous=True))
    assert storage.read_bytes(f"s3://{public_bucket}/k") == b"pub"
    with pytest.raises(storage.StorageError, match="private"):
        storage.read_bytes(f"s3://{s3_bucket}/k")


def test_errors_never_contain_credentials(s3_bucket):
    with pytest.raises(storage.StorageError) as e:
        storage.read_bytes(f"s3://{s3_bucket}/absent")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(e.value)


def test_per_bucket_overrides(s3_server, public_bucket, s3_bucket):
    """The public source read anonymously while outputs are written with credentials, in one process."""
    storage.write_bytes(f"s3://{public_bucket}/k", b"pub")
    storage.configure(storage.StorageConfig(endpoint_url=s3_server.endpoint_url, anonymous=False,
                                            buckets={public_bucket: {"anonymous": True}}))
    assert storage.read_bytes(f"s3://{public_bucket}/k") == b"pub"
    assert storage._client(public_bucket) is not storage._client(s3_bucket)
    storage.write_bytes(f"s3://{s3_bucket}/out", b"signed")  # anonymous writes would be refused
    assert storage.read_bytes(f"s3://{s3_bucket}/out") == b"signed"
    # An explicit empty endpoint means AWS itself, not the AWS_ENDPOINT_URL of the environment.
    cfg = storage.StorageConfig(endpoint_url=s3_server.endpoint_url, buckets={"gallery": {"endpoint_url": ""}})
    assert cfg.for_bucket("gallery").endpoint_url is None
    assert cfg.for_bucket("other").endpoint_url == s3_server.endpoint_url


def test_per_bucket_override_validation():
    from dinocell.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="buckets.b: unknown field"):
        load_config(None, ["storage.buckets={b: {anonymus: true}}"])
    cfg = load_config(None, ["storage.buckets={b: {anonymous: true}}"])
    assert cfg.storage.for_bucket("b").anonymous is True
