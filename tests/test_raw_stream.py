"""LRU cache, FieldLoader and RawFieldStream against real storage (moto S3 on loopback, or local files)."""

from __future__ import annotations

import collections
import io
import itertools
import threading
import time

import numpy as np
import pytest
import tifffile
import torch
from torch.utils.data import DataLoader

from dinocell import storage
from dinocell.config import LoaderConfig, PreprocessConfig
from dinocell.data.cache import LRUCache, expected_hit_rate
from dinocell.data.fields import Field, FieldLoader, FieldLoadError, collate_fields, field_to_sample
from dinocell.data.preprocess import preprocess_channel
from dinocell.data.raw_stream import RawFieldStream
from dinocell.jump.manifest import FieldRecord, Manifest, make_field_id

SMALL = PreprocessConfig(clahe_tiles=4)  # 4x4 CLAHE tiles on the small test images; the rest as in production


def tiff_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, compression="lzw")
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def raw_image(field_idx: int, ch_idx: int, size: int = 64) -> np.ndarray:
    """A distinct uint16 image per (field, channel): channel order mistakes change the pixels."""
    rng = np.random.default_rng(1000 * field_idx + ch_idx)
    base = rng.integers(0, 4000, (size, size))
    return (base + 5000 * ch_idx).astype(np.uint16)


def make_records(
    buckets, root: str, n: int, channels, size: int = 64, split: str = "train", plate: str = "P1", start: int = 0
):
    """Write n fields (one TIFF per channel) under root and return their FieldRecords."""
    records = []
    for i in range(start, start + n):
        images = {
            ch: (storage.join(root, f"{plate}/f{i:03d}_{ch}.tiff"), tiff_bytes(raw_image(i, j, size)))
            for j, ch in enumerate(channels)
        }
        records.append(buckets.field("B1", plate, f"A{i:02d}", 1, images, split=split))
        assert records[-1].field_id == make_field_id("B1", plate, f"A{i:02d}", 1)
    return records


# --------------------------------------------------------------------------- LRU cache


def arr(nbytes: int, fill: int = 0) -> np.ndarray:
    return np.full(nbytes, fill, np.uint8)


def test_lru_eviction_order_counters_and_oversize():
    c = LRUCache(30)
    for k in "abc":
        assert c.put(k, arr(10))
    assert c.get("a") is not None  # a becomes most recently used: order b, c, a
    assert c.put("d", arr(10))  # evicts b, the least recently used
    assert c.keys() == ["c", "a", "d"]
    assert c.get("b") is None
    s = c.stats()
    assert (s["hits"], s["misses"], s["evictions"], s["bytes"], s["items"]) == (1, 1, 1, 30, 3)
    assert s["hit_rate"] == 0.5
    # A value larger than the whole bound is refused and counted, and evicts nothing.
    assert not c.put("huge", arr(31))
    assert c.stats()["rejected"] == 1 and c.keys() == ["c", "a", "d"]
    # One 25-byte value evicts as many old ones as needed (c and a and d: 25 + 10 > 30).
    assert c.put("e", arr(25))
    assert c.keys() == ["e"] and c.bytes == 25 and c.evictions == 4
    # Replacing a key updates its size rather than double counting.
    c.put("e", arr(5))
    assert c.bytes == 5 and len(c) == 1
    with pytest.raises(TypeError, match="nbytes"):
        c.put("x", b"bytes have no nbytes")


def test_lru_byte_bound_never_exceeded():
    rng = np.random.default_rng(0)
    c = LRUCache(1000)
    for _ in range(3000):
        key = int(rng.integers(0, 200))
        if rng.random() < 0.5:
            size = int(rng.integers(1, 400))
            c.put(key, arr(size))
        else:
            c.get(key)
        assert c.bytes <= 1000
        assert c.bytes == sum(v.nbytes for v in c._data.values())
    s = c.stats()
    assert s["evictions"] > 100 and s["hits"] > 0 and s["items"] == len(c)


def test_lru_hit_rate_under_iid_uniform_sampling_is_cache_over_dataset():
    n_items, capacity = 100, 25
    c = LRUCache(capacity * 8)
    rng = np.random.default_rng(1)
    for key in rng.integers(0, n_items, 2000):  # warm up
        if c.get(int(key)) is None:
            c.put(int(key), arr(8))
    h0, m0 = c.hits, c.misses
    for key in rng.integers(0, n_items, 8000):
        if c.get(int(key)) is None:
            c.put(int(key), arr(8))
    rate = (c.hits - h0) / (c.hits - h0 + c.misses - m0)
    # Expected exactly capacity / n_items = 0.25 once warm; binomial std over 8,000 draws is 0.005.
    assert abs(rate - 0.25) < 0.02, rate
    assert expected_hit_rate(0.25, "iid") == 0.25


# --------------------------------------------------------------------------- FieldLoader


def test_field_loader_order_parallel_fetch_and_cache(s3_bucket, monkeypatch, buckets):
    root = f"s3://{s3_bucket}/images"
    channels = ["DNA", "ER", "Mito"]
    recs = make_records(buckets, root, 3, channels)
    # Parallel fetch: the three channel reads of one field must be in flight together to pass this barrier.
    barrier = threading.Barrier(3, timeout=10)
    real_read = storage.read_bytes
    threads = set()

    def read_in_parallel(uri):
        threads.add(threading.current_thread().name)
        barrier.wait()
        return real_read(uri)

    monkeypatch.setattr(storage, "read_bytes", read_in_parallel)
    cache = LRUCache(10 * 1024**2)
    loader = FieldLoader(SMALL, ["Mito", "DNA", "ER"], fetch_workers=8, cache=cache)
    f = loader.load(recs[1])
    assert len(threads) == 3
    monkeypatch.setattr(storage, "read_bytes", real_read)

    assert isinstance(f, Field) and f.channels == ("Mito", "DNA", "ER")
    assert f.channel_ids == (4, 0, 1)
    assert f.image.dtype == np.uint8 and f.image.shape == (3, 32, 32)
    assert (f.field_id, f.plate, f.batch, f.well, f.site) == (recs[1].field_id, "P1", "B1", "A01", 1)
    # Channel order follows the request, not the manifest: compare with each channel preprocessed on its own.
    for k, ch in enumerate(f.channels):
        expected = preprocess_channel(raw_image(1, channels.index(ch)), SMALL)
        np.testing.assert_array_equal(f.image[k], expected)

    # Second load: every channel from the cache, nothing fetched, identical pixels.
    fetched = loader.counters["objects_fetched"]
    again = loader.load(recs[1])
    np.testing.assert_array_equal(again.image, f.image)
    assert cache.stats()["hits"] == 3 and cache.stats()["misses"] == 3
    assert loader.counters["objects_fetched"] == fetched == 3
    assert loader.counters["channels_from_cache"] == 3
    # A different preprocessing config must not be served from the same cache.
    other = FieldLoader(PreprocessConfig(clahe=False), ["Mito"], cache=cache)
    other.load(recs[1])
    assert other.counters["objects_fetched"] == 1


def test_field_loader_reports_missing_corrupt_and_mismatched(s3_bucket, buckets):
    root = f"s3://{s3_bucket}/images"
    recs = make_records(buckets, root, 4, ["DNA", "ER"])
    storage.delete(recs[1].uris["ER"])  # missing object
    storage.write_bytes(recs[2].uris["DNA"], b"II*\x00garbage that is not a tiff")  # corrupt TIFF
    storage.write_bytes(recs[3].uris["ER"], tiff_bytes(raw_image(3, 1, size=32)))  # 32x32 beside a 64x64 DNA
    loader = FieldLoader(SMALL, ["DNA", "ER"])

    with pytest.raises(FieldLoadError) as e:
        loader.load(recs[1])
    assert e.value.field_id == recs[1].field_id and e.value.uris == [recs[1].uris["ER"]]
    assert recs[1].field_id in str(e.value) and recs[1].uris["ER"] in str(e.value) and "no such object" in str(e.value)

    with pytest.raises(FieldLoadError) as e:
        loader.load(recs[2])
    assert e.value.uris == [recs[2].uris["DNA"]]
    assert recs[2].field_id in str(e.value) and recs[2].uris["DNA"] in str(e.value) and "TIFF" in str(e.value)

    with pytest.raises(FieldLoadError) as e:
        loader.load(recs[3])
    msg = str(e.value)
    assert recs[3].field_id in msg and recs[3].uris["ER"] in msg and recs[3].uris["DNA"] in msg
    assert "(32, 32)" in msg and "(64, 64)" in msg

    fields, errors = loader.load_many(recs, on_error="skip")
    assert [f.field_id for f in fields] == [recs[0].field_id]
    assert [fid for fid, _ in errors] == [r.field_id for r in recs[1:]]
    assert recs[2].uris["DNA"] in errors[1][1]
    assert loader.counters["fields_failed"] == 6 and loader.counters["fields_loaded"] == 1
    with pytest.raises(FieldLoadError, match="no such object"):
        loader.load_many(recs, on_error="raise")
    # A record without a URI for a requested channel.
    bare = FieldRecord("B1/P1/Z99/1", "B1", "P1", "Z99", 1, "train", {"DNA": recs[0].uris["DNA"]})
    with pytest.raises(FieldLoadError, match="B1/P1/Z99/1: ER <none>: the manifest record has no URI for channel ER"):
        loader.load(bare)


def test_field_loader_illum_correction_cached_per_plate(tmp_path, buckets):
    root = str(tmp_path)
    recs = make_records(buckets, root, 2, ["DNA", "ER"])
    illum = {
        "DNA": np.linspace(0.5, 2.0, 64 * 64, dtype=np.float32).reshape(64, 64),
        "ER": np.full((64, 64), 0.25, np.float32),
    }
    illum_uris = {}
    for ch, a in illum.items():
        illum_uris[ch] = storage.join(root, f"illum/P1/P1_Illum{ch}.npy")
        storage.write_bytes(illum_uris[ch], npy_bytes(a))
    recs = [FieldRecord(r.field_id, r.batch, r.plate, r.well, r.site, r.split, r.uris, illum_uris) for r in recs]
    cfg = PreprocessConfig(illum_correction=True, clahe_tiles=4)
    loader = FieldLoader(cfg, ["DNA", "ER"])
    fields, errors = loader.load_many(recs)
    assert errors == []
    for i, f in enumerate(fields):
        for k, ch in enumerate(["DNA", "ER"]):
            np.testing.assert_array_equal(f.image[k], preprocess_channel(raw_image(i, k), cfg, illum[ch]))
    # 2 fields x 2 channels + the plate's 2 illum files read once.
    assert loader.counters["objects_fetched"] == 6
    # Without illum correction the pixels differ (the DNA illum is not flat).
    plain = FieldLoader(PreprocessConfig(clahe_tiles=4), ["DNA"]).load(recs[0])
    assert not np.array_equal(plain.image[0], fields[0].image[0])
    # A wrong-size illumination function fails the field, naming the illum file.
    storage.write_bytes(illum_uris["ER"], npy_bytes(np.ones((8, 8), np.float32)))
    with pytest.raises(FieldLoadError, match=r"P1_IllumER\.npy: illumination function shape \(8, 8\)"):
        FieldLoader(cfg, ["DNA", "ER"]).load(recs[1])


def test_collate_fields_batches_and_refuses_mixed(tmp_path, buckets):
    recs = make_records(buckets, str(tmp_path), 3, ["DNA", "ER"], size=32)
    loader = FieldLoader(SMALL, ["DNA", "ER"])
    fields, _ = loader.load_many(recs)
    batch = collate_fields([field_to_sample(f) for f in fields[:2]] + [fields[2]])
    assert batch["images"].dtype == torch.uint8 and tuple(batch["images"].shape) == (3, 2, 16, 16)
    assert batch["channels"] == ("DNA", "ER") and batch["channel_ids"].tolist() == [0, 1]
    assert batch["field_ids"] == [r.field_id for r in recs] and batch["plates"] == ["P1"] * 3
    np.testing.assert_array_equal(batch["images"][1].numpy(), fields[1].image)

    other = FieldLoader(SMALL, ["ER", "DNA"]).load(recs[0])
    with pytest.raises(ValueError, match=r"has channels \('ER', 'DNA'\).*share one channel list"):
        collate_fields([fields[0], other])
    small = Field(fields[1].image[:, :8, :8].copy(), fields[1].channels, "x/y/z/1", "P1", "B1", "z", 1)
    with pytest.raises(ValueError, match=r"x/y/z/1 has image size \(2, 8, 8\).*share one size"):
        collate_fields([fields[0], small])


# --------------------------------------------------------------------------- RawFieldStream


def _as_is(sample):
    return sample


def _loader_kwargs(num_workers: int) -> dict:
    # collate_fn=_as_is: keep the sample exactly as the stream yields it; timeout: a stuck worker fails the test.
    return {
        "batch_size": None,
        "num_workers": num_workers,
        "persistent_workers": num_workers > 0,
        "collate_fn": _as_is,
        "timeout": 60,
    }


def test_raw_stream_covers_each_train_field_once_per_epoch_across_ranks_and_workers(s3_bucket, buckets):
    root = f"s3://{s3_bucket}/images"
    channels = ["DNA", "Mito"]
    train = make_records(buckets, root, 14, channels, size=32)
    val = make_records(buckets, root, 3, channels, size=32, split="val", plate="P2")
    storage.delete(train[4].uris["Mito"])
    storage.write_bytes(train[9].uris["DNA"], b"not a tiff")
    bad = {train[4].field_id, train[9].field_id}
    good = {r.field_id for r in train} - bad
    manifest = Manifest.from_records(train + val, channels)
    cfg = LoaderConfig(mode="raw", num_workers=2, cache_bytes=1 << 20, fetch_workers=4)

    streams = [RawFieldStream(manifest, cfg, SMALL, channels, rank=r, world_size=2, seed=7) for r in range(2)]
    loaders = [DataLoader(s, **_loader_kwargs(2)) for s in streams]
    orders = []
    for epoch in range(2):
        seen = []
        per_rank = []
        for s, dl in zip(streams, loaders):
            s.set_epoch(epoch)
            ids = []
            for sample in dl:
                assert sample["image"].dtype == torch.uint8 and tuple(sample["image"].shape) == (2, 16, 16)
                assert sample["channels"] == ("DNA", "Mito") and tuple(sample["channel_ids"]) == (0, 4)
                assert sample["plate"] == "P1"
                ids.append(sample["field_id"])
            per_rank.append(ids)
            seen += ids
        counts = collections.Counter(seen)
        assert set(counts) == good and all(v == 1 for v in counts.values())  # complete, exactly once, train only
        assert not set(per_rank[0]) & set(per_rank[1])  # disjoint ranks
        orders.append(per_rank)
    assert orders[0] != orders[1]  # set_epoch reached the persistent workers: a new order
    assert [set(x) for x in orders[0]] == [set(x) for x in orders[1]]  # same fields per rank every epoch

    stats = [s.stats() for s in streams]
    assert sum(st["skipped"] for st in stats) == 4  # 2 bad fields x 2 epochs, never silent
    assert sum(st["fields"] for st in stats) == 2 * len(good)
    reasons = " ".join(r for st in stats for r in st["skip_reasons"])
    assert train[4].field_id in reasons and train[4].uris["Mito"] in reasons and "no such object" in reasons
    assert train[9].field_id in reasons and train[9].uris["DNA"] in reasons
    # Epoch 2 reads the same fields in the same workers: their channels come from the cache (20 MB holds them all).
    assert sum(st["hits"] for st in stats) == 2 * len(good)
    for dl in loaders:
        del dl


def test_raw_stream_hit_rate_matches_lru_permutation_law(tmp_path, buckets):
    torch.set_num_threads(1)
    n_fields, per_field = 60, 16 * 16
    recs = make_records(buckets, str(tmp_path), n_fields, ["DNA"], size=16)
    manifest = Manifest.from_records(recs, ["DNA"])
    pre = PreprocessConfig(downsample=1, clahe_tiles=2)
    epochs = 5

    # num_workers=0: one share of 60 fields, cache of 30 fields (c = 0.5), endless stream.
    cfg = LoaderConfig(mode="raw", num_workers=0, cache_bytes=30 * per_field)
    stream = RawFieldStream(manifest, cfg, pre, ["DNA"], seed=3, iter_epochs=True)
    it = iter(stream)
    first = [s["field_id"] for s in itertools.islice(it, n_fields)]
    assert sorted(first) == sorted(r.field_id for r in recs)
    s0 = stream.stats()
    assert s0["hits"] == 0 and s0["misses"] == n_fields  # cold first epoch
    rest = [s["field_id"] for s in itertools.islice(it, n_fields * (epochs - 1))]
    for e in range(epochs - 1):
        assert sorted(rest[e * n_fields : (e + 1) * n_fields]) == sorted(first)
    s1 = stream.stats()
    hits, misses = s1["hits"] - s0["hits"], s1["misses"] - s0["misses"]
    rate = hits / (hits + misses)
    law = expected_hit_rate(0.5, "permutation")  # 0.153: well below c = 0.5
    # Simulated mean for 60 fields x 4 warm epochs: 0.156, std 0.021; tolerance 0.08 is ~4 std.
    print(f"raw stream LRU hit rate {rate:.3f} (law {law:.3f}, iid would give 0.5)")
    assert abs(rate - law) < 0.08
    assert s1["cache_bytes"] <= cfg.cache_bytes and s1["evictions"] > 0

    # Two persistent workers: each owns a fixed share of 30 fields and a cache of 15 (again c = 0.5 per worker).
    cfg2 = LoaderConfig(mode="raw", num_workers=2, cache_bytes=15 * per_field)
    stream2 = RawFieldStream(manifest, cfg2, pre, ["DNA"], seed=3)
    dl = DataLoader(stream2, **_loader_kwargs(2))
    for e in range(epochs):
        stream2.set_epoch(e)
        got = [s["field_id"] for s in dl]
        # The DataLoader alternates the two workers; each reads its share in the (seed, epoch, worker) order.
        w0, w1 = (stream2.epoch_order(e, w, 2) for w in range(2))
        expected = [recs[int(i)].field_id for pair in zip(w0, w1) for i in pair]
        assert got == expected
        if e == 0:
            warm = stream2.stats()
    st = stream2.stats()
    assert len(st["workers"]) == 2 and st["fields"] == n_fields * epochs and warm["hits"] == 0
    rate2 = (st["hits"] - warm["hits"]) / (st["hits"] - warm["hits"] + st["misses"] - warm["misses"])
    print(f"2 workers: hit rate {rate2:.3f}")
    assert abs(rate2 - law) < 0.1  # two shares of 30: simulated mean 0.160, std 0.020
    del dl


def test_raw_stream_refuses_bad_setup(tmp_path, buckets):
    recs = make_records(buckets, str(tmp_path), 2, ["DNA"], size=16)
    manifest = Manifest.from_records(recs, ["DNA"])
    cfg = LoaderConfig(mode="raw", num_workers=1)
    with pytest.raises(ValueError, match="no fields in split 'val'"):
        RawFieldStream(manifest, cfg, SMALL, ["DNA"], split="val")
    with pytest.raises(ValueError, match="rank"):
        RawFieldStream(manifest, cfg, SMALL, ["DNA"], rank=2, world_size=2)
    with pytest.raises(ValueError, match="not in the manifest"):
        RawFieldStream(manifest, cfg, SMALL, ["ER"])
    stream = RawFieldStream(manifest, cfg, SMALL, ["DNA"])
    with pytest.raises(RuntimeError, match="num_workers=1 but the DataLoader runs 2 workers"):
        list(DataLoader(stream, batch_size=None, num_workers=2, timeout=60))
    # The trainer's way: batches through collate_fields.
    batches = list(DataLoader(stream, batch_size=2, collate_fn=collate_fields))
    assert len(batches) == 1 and tuple(batches[0]["images"].shape) == (2, 1, 8, 8)
    assert sorted(batches[0]["field_ids"]) == sorted(r.field_id for r in recs)


def test_both_streams_keep_the_epoch_in_one_shared_helper(tmp_path, buckets):
    """RawFieldStream and ShardStream share SharedEpoch: same checks, and the epoch reaches forked workers."""
    from dinocell.data.epoch import SharedEpoch
    from dinocell.data.shard_reader import ShardStream

    recs = make_records(buckets, str(tmp_path), 2, ["DNA"], size=16)
    stream = RawFieldStream(Manifest.from_records(recs, ["DNA"]), LoaderConfig(mode="raw"), SMALL, ["DNA"])
    assert isinstance(stream, SharedEpoch) and issubclass(ShardStream, SharedEpoch)
    assert stream.epoch == 0
    stream.set_epoch(3)
    assert stream.epoch == 3 and stream.stats()["epoch"] == 3
    with pytest.raises(ValueError, match="epoch must be >= 0, got -1"):
        stream.set_epoch(-1)
    assert stream.epoch == 3
    # Set after the worker process started: it sees the new epoch (shared memory, not its copy of the object).
    ctx = torch.multiprocessing.get_context("fork")
    started, seen = ctx.Event(), ctx.Queue()

    def worker():
        started.set()
        deadline = time.monotonic() + 30
        while stream.epoch != 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.put(stream.epoch)

    proc = ctx.Process(target=worker)
    proc.start()
    assert started.wait(30)
    stream.set_epoch(5)
    assert seen.get(timeout=60) == 5
    proc.join(30)
