"""Shared fixtures: a real S3 server on loopback and a fresh bucket per test, wired into the storage layer; `buckets`,
the helpers that fill a test bucket (objects, manifest fields, small synthetic JUMP buckets and their manifest)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Mapping

import pytest

from dinocell import storage
from dinocell.storage.local_server import LOCAL_CREDENTIALS, create_bucket, local_s3_server

# A developer's own WANDB_MODE would reach the tests' runs (it wins over train.wandb_mode): tests run without W&B
# unless a test sets it.
os.environ.setdefault("WANDB_MODE", "disabled")

# Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of the cores for torch's
# intra-op threads, so that the workers do not oversubscribe the machine.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

_bucket_ids = itertools.count()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): the tiny models'
    operations are too small to gain from a second one (0.10 vs 0.12 s per iteration on two idle cores), and two
    threads on shared cores stall by an order of magnitude. The previous count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


class Buckets:
    """Builders of small test buckets, local (a directory) or S3 (an s3:// prefix); the `buckets` fixture.

    put: write objects; field: write one field's channel images and return its manifest record; synth: a small
    synthetic JUMP-layout bucket (dinocell.synth); manifest: discover the fields of a synth bucket.
    """

    # What `synth` writes unless told otherwise: 1 batch, 1 plate, 2 wells, 1 site, 64 x 64 (2 fields, 16 images).
    SMALL_SYNTH = {"batches": 1, "plates_per_batch": 1, "wells_per_plate": 2, "sites_per_well": 1, "size": 64}

    @staticmethod
    def put(objects: Mapping[str, bytes] | Iterable[tuple[str, bytes]], workers: int = 16) -> list[str]:
        """Write (uri, bytes) objects in parallel; returns their URIs in order."""
        items = list(objects.items() if isinstance(objects, Mapping) else objects)
        storage.map_parallel(lambda item: storage.write_bytes(*item), items, max_workers=workers)
        return [uri for uri, _ in items]

    @staticmethod
    def field(batch: str, plate: str, well: str, site: int, images: Mapping[str, tuple[str, bytes | None]],
              split: str = "train"):
        """Write one field's images, {channel: (uri, bytes)}, in channel order, and return its FieldRecord.

        bytes None: the record names the URI but nothing is written there (a missing channel).
        """
        from dinocell.jump.manifest import FieldRecord, make_field_id

        for uri, data in images.values():
            if data is not None:
                storage.write_bytes(uri, data)
        uris = {ch: uri for ch, (uri, _) in images.items()}
        return FieldRecord(make_field_id(batch, plate, well, site), batch, plate, well, site, split, uris)

    def synth(self, root, **overrides):
        """dinocell.synth.synth_bucket(root, **SMALL_SYNTH | overrides): returns its SynthReport."""
        from dinocell.synth import synth_bucket

        return synth_bucket(str(root), **{**self.SMALL_SYNTH, **overrides})

    @staticmethod
    def manifest(report, mode: str = "auto", val_fraction: float = 0.0, **data_kw):
        """The field manifest that `dinocell discover` finds in a synth bucket (images prefix <source_root>/images)."""
        from dinocell.config import DataConfig
        from dinocell.jump.discover import discover_fields

        cfg = DataConfig(images_prefix=storage.join(report.source_root, "images"), val_fraction=val_fraction, **data_kw)
        return discover_fields(cfg, mode=mode).manifest


@pytest.fixture(scope="session")
def buckets() -> Buckets:
    return Buckets()
