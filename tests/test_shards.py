"""Shard writer + streaming reader: bit-exact round trips (local and S3), rank/worker coverage, shuffling, resume,
resumable writing, and faults in the inputs and in the shards."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from fault_proxy import FaultProxy

from dinocell import storage
from dinocell.channels import FLUORESCENT_CHANNELS
from dinocell.config import LoaderConfig, PreprocessConfig, ShardConfig
from dinocell.data.fields import FieldLoader
from dinocell.data.shard_format import ShardBuildError, ShardIndex
from dinocell.data.shard_reader import ShardStream
from dinocell.data.shard_tar import CorruptShardError, read_shard
from dinocell.data.shards import write_shards
from dinocell.jump.manifest import Manifest, make_field_id

torch.set_num_threads(1)

SIZE = 64  # raw field side; preprocessed (downsample 2) fields are 5 x 32 x 32 = 5,120 bytes
FIELD_BYTES = 5 * (SIZE // 2) ** 2
CH = list(FLUORESCENT_CHANNELS)
PRE = PreprocessConfig()


def _tiff(rng) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, rng.gamma(2.0, 300.0, (SIZE, SIZE)).astype(np.uint16))
    return buf.getvalue()


def make_inputs(
    buckets, root: str, n_fields: int = 12, faults: bool = True, seed: int = 0
) -> tuple[Manifest, set[str]]:
    """TIFFs for `n_fields` fields over 2 plates under `root` (local dir or s3:// prefix) and their manifest.

    With faults: field 1 lacks its ER object (the URI points nowhere), field 2 has a corrupt RNA TIFF.
    Returns the manifest and the set of field ids that are expected to be skipped.
    """
    rng = np.random.default_rng(seed)
    records, bad = [], set()
    for i in range(n_fields):
        plate, well, site = f"P{i % 2}", f"A{i // 4 + 1:02d}", i % 4 + 1
        images = {}
        for ch in CH:
            data = _tiff(rng)
            if faults and i == 1 and ch == "ER":
                data = None  # never written: a missing channel
            elif faults and i == 2 and ch == "RNA":
                data = b"II*\x00" + b"\x07" * 40  # a TIFF signature and garbage
            images[ch] = (storage.join(root, "B1", plate, f"{well}_s{site}_{ch}.tiff"), data)
        record = buckets.field("B1", plate, well, site, images)
        assert record.field_id == make_field_id("B1", plate, well, site)
        if faults and i in (1, 2):
            bad.add(record.field_id)
        records.append(record)
    return Manifest.from_records(records, CH), bad


def shard_cfg(out: str, per_shard: int = 3, workers: int = 1) -> ShardConfig:
    return ShardConfig(output=out, target_bytes=per_shard * FIELD_BYTES, workers=workers, split="train")


def loader_cfg(buffer: int = 4, workers: int = 0, seed: int = 0) -> LoaderConfig:
    return LoaderConfig(mode="shards", shuffle_buffer=buffer, num_workers=workers, seed=seed)


def expected_images(manifest: Manifest, skip: set[str]) -> dict[str, np.ndarray]:
    loader = FieldLoader(PRE, CH)
    return {r.field_id: loader.load(r).image for r in manifest.records() if r.field_id not in skip}


def one_epoch(stream: ShardStream, worker: int = 0, num_workers: int = 1) -> list[dict]:
    stream.infinite = False
    return list(stream.iter_worker(worker, num_workers))


@pytest.fixture(scope="module")
def local_set(tmp_path_factory, buckets):
    """One local input set + shard set shared by the read-only tests (12 fields, 2 faulty, 3 per shard: 4 shards)."""
    root = tmp_path_factory.mktemp("shards")
    manifest, bad = make_inputs(buckets, str(root / "raw"))
    index = write_shards(manifest, str(root / "out"), shard_cfg(str(root / "out")), PRE)
    return manifest, bad, index, expected_images(manifest, bad)


def test_public_names_stay_where_callers_import_them():
    """The shard step's names are importable from dinocell.data.shards / shard_reader as before the split."""
    from dinocell.data import shard_format, shard_reader, shard_tar, shards

    assert shards.INDEX_NAME == "index.json" == shard_format.INDEX_NAME
    assert (shards.ShardIndex, shards.ShardInfo, shards.ShardBuildError) == (
        shard_format.ShardIndex,
        shard_format.ShardInfo,
        ShardBuildError,
    )
    assert (shards.write_tar_member, shards.finish_tar) == (shard_tar.write_tar_member, shard_tar.finish_tar)
    for name in shard_reader.__all__:
        assert getattr(shard_reader, name) is not None, name
    assert (shard_reader.read_shard, shard_reader.CorruptShardError) == (read_shard, CorruptShardError)
    for name in shards.__all__:
        assert getattr(shards, name) is not None, name


# --------------------------------------------------------------------------- round trips


def _check_round_trip(index: ShardIndex, manifest: Manifest, bad: set[str], want: dict[str, np.ndarray]) -> None:
    assert index.n_fields == len(manifest) - len(bad) == len(want)
    assert len(index.shards) == 4 and [s.n_fields for s in index.shards] != []
    assert {s["field_id"] for s in index.skipped} == bad
    got = one_epoch(ShardStream(index.uri, loader_cfg()))
    assert sorted(s["field_id"] for s in got) == sorted(want)
    for s in got:
        assert s["image"].dtype == torch.uint8 and s["channels"] == tuple(CH)
        assert np.array_equal(s["image"].numpy(), want[s["field_id"]]), s["field_id"]
        assert s["plate"] == s["field_id"].split("/")[1]


def test_round_trip_local_bit_exact_and_faults_listed(local_set):
    manifest, bad, index, want = local_set
    _check_round_trip(index, manifest, bad, want)
    # The index on storage says the same as the returned one, and lists why each field was skipped.
    on_disk = json.loads(Path(index.uri).read_text())
    assert on_disk["totals"] == {"shards": 4, "fields": 10, "bytes": index.total_bytes, "skipped": 2, "planned": 12}
    assert on_disk["field_shape"] == [5, SIZE // 2, SIZE // 2] and on_disk["channels"] == CH
    reasons = {s["field_id"]: s["reason"] for s in on_disk["skipped"]}
    missing_fid, corrupt_fid = make_field_id("B1", "P1", "A01", 2), make_field_id("B1", "P0", "A01", 3)
    assert "ER" in reasons[missing_fid] and "_ER.tiff" in reasons[missing_fid]
    assert "RNA" in reasons[corrupt_fid] and "TIFF" in reasons[corrupt_fid]
    # Each skip is also listed in the sidecar of the shard that planned the field.
    for s in on_disk["skipped"]:
        side = json.loads((Path(index.uri).parent / f"{s['shard']}.json").read_text())
        assert s["field_id"] in {x["field_id"] for x in side["skipped"]}


def test_samples_match_raw_streaming_mode(local_set):
    """Both data modes hand the trainer the same sample for the same field (shards add only `stream_pos`)."""
    from dinocell.data.raw_stream import RawFieldStream

    manifest, _, index, _ = local_set
    raw = {s["field_id"]: s for s in RawFieldStream(manifest, loader_cfg(), PRE, CH)}
    shard = {s["field_id"]: s for s in one_epoch(ShardStream(index.uri, loader_cfg()))}
    assert raw.keys() == shard.keys()
    for fid, r in raw.items():
        s = shard[fid]
        assert set(s) - {"stream_pos"} == set(r)
        assert torch.equal(s["image"], r["image"]), fid
        assert (s["channels"], s["channel_ids"], s["plate"]) == (r["channels"], r["channel_ids"], r["plate"])


def test_shards_are_standard_webdataset_tars(local_set):
    _, _, index, want = local_set
    path = Path(index.shard_uri(index.shards[0]))
    with tarfile.open(path) as tf:
        names = tf.getnames()
        assert len(names) == 2 * index.shards[0].n_fields
        for json_name, u8_name in zip(names[::2], names[1::2]):
            key = json_name[: -len(".json")]
            assert u8_name == f"{key}.u8" and key.isdigit()
            meta = json.loads(tf.extractfile(json_name).read())
            img = np.frombuffer(tf.extractfile(u8_name).read(), np.uint8).reshape(meta["shape"])
            assert np.array_equal(img, want[meta["field_id"]]) and meta["channels"] == CH
    # read_shard (the reader's own tar parser) agrees with tarfile, in tar order.
    samples = read_shard(str(path), index.shards[0].bytes, index.shards[0].sha256)
    with tarfile.open(path) as tf:
        assert [m["field_id"] for m, _ in samples] == [
            json.loads(tf.extractfile(n).read())["field_id"] for n in names[::2]
        ]


def test_round_trip_s3_with_process_pool(s3_bucket, buckets):
    manifest, bad = make_inputs(buckets, f"s3://{s3_bucket}/raw")
    out = f"s3://{s3_bucket}/shards/train"
    index = write_shards(manifest, out, shard_cfg(out, workers=2), PRE)
    assert index.uri == f"{out}/index.json" and storage.exists(index.uri)
    assert sorted(index.written) == [f"shard-{i:06d}" for i in range(4)]
    _check_round_trip(ShardIndex.read(index.uri), manifest, bad, expected_images(manifest, bad))
    # A rerun on S3 finds every shard complete (sidecar + tar size) and rebuilds nothing.
    storage.write_bytes(f"s3://{s3_bucket}/shards/train2/shard-000000.tar", b"a sibling prefix, not ours")
    again = write_shards(manifest, out, shard_cfg(out, workers=2), PRE)
    assert again.written == [] and len(again.reused) == 4
    with pytest.raises(CorruptShardError, match="missing"):
        read_shard(f"{out}/shard-999999.tar")
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in index.shards]


# --------------------------------------------------------------------------- assignment and shuffling


@pytest.mark.parametrize("ranks,workers", [(2, 2), (3, 2)])  # 4 shards: 4 consumers read whole shards, 6 share them
def test_every_field_exactly_once_per_epoch_across_ranks_and_workers(local_set, ranks, workers):
    _, _, index, want = local_set
    for epoch in (0, 1):
        seen, per_consumer = [], []
        for rank in range(ranks):
            stream = ShardStream(index.uri, loader_cfg(workers=workers), rank=rank, world_size=ranks, seed=7)
            stream.set_epoch(epoch)
            rank_fields = []
            for w in range(workers):
                got = [s["field_id"] for s in one_epoch(stream, w, workers)]
                assert got, f"rank {rank} worker {w} got no fields"
                per_consumer.append(got)
                rank_fields += got
            assert len(rank_fields) == stream.fields_per_epoch(epoch, workers)
            seen += rank_fields
        assert Counter(seen) == Counter(want.keys()), f"epoch {epoch}: not every field exactly once"
    # The deal changes between epochs (the shard order is re-drawn).
    s = ShardStream(index.uri, loader_cfg(workers=2), rank=0, world_size=2, seed=7)
    assert s.consumer_plan(0, 0, 4) != s.consumer_plan(1, 0, 4) or s.consumer_plan(0, 1, 4) != s.consumer_plan(1, 1, 4)


def test_too_many_consumers_for_the_data_is_a_clear_error(local_set):
    _, _, index, _ = local_set  # 4 shards of 3 fields: 16 consumers would leave some with nothing
    with pytest.raises(ValueError, match="cannot feed 16 consumers"):
        ShardStream(index.uri, loader_cfg(workers=8), rank=0, world_size=2)


def test_shuffle_buffer_shuffles_deterministically(local_set):
    _, _, index, _ = local_set
    tar_order = [m["field_id"] for s in index.shards for m, _ in read_shard(index.shard_uri(s))]
    a = [s["field_id"] for s in one_epoch(ShardStream(index.uri, loader_cfg(buffer=100), seed=1))]
    b = [s["field_id"] for s in one_epoch(ShardStream(index.uri, loader_cfg(buffer=100), seed=1))]
    c = [s["field_id"] for s in one_epoch(ShardStream(index.uri, loader_cfg(buffer=100), seed=2))]
    assert a == b and sorted(a) == sorted(tar_order)
    assert a != tar_order and a != c
    # A buffer of 100 pools every shard: fields of different shards interleave (not shard after shard).
    shard_of = {fid: i // 3 for i, fid in enumerate(tar_order)}
    runs = sum(1 for x, y in itertools.pairwise(a) if shard_of[x] != shard_of[y])
    assert runs > 3


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("k", [1, 5, 9])
def test_resume_continues_with_exactly_the_remaining_fields(local_set, k):
    _, _, index, _ = local_set
    full = [s["field_id"] for s in one_epoch(ShardStream(index.uri, loader_cfg(buffer=4), seed=3))]
    first = ShardStream(index.uri, loader_cfg(buffer=4), seed=3, infinite=False)
    it = iter(first)
    consumed = [next(it)["field_id"] for _ in range(k)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint would store
    second = ShardStream(index.uri, loader_cfg(buffer=4), seed=3, infinite=False)
    second.load_state_dict(state)
    rest = [s["field_id"] for s in second]
    assert consumed + rest == full


def test_resume_in_infinite_mode_crosses_epochs(local_set):
    _, _, index, _ = local_set
    ref = ShardStream(index.uri, loader_cfg(buffer=4), seed=5)
    it = iter(ref)
    seq = [next(it)["field_id"] for _ in range(25)]  # 2.5 epochs of 10 fields
    assert Counter(seq[:10]) == Counter(seq[10:20]) and seq[:10] != seq[10:20]
    first = ShardStream(index.uri, loader_cfg(buffer=4), seed=5)
    it = iter(first)
    for _ in range(13):
        next(it)
    state = first.state_dict()
    assert state["positions"]["0"][0] == 1  # in the second epoch
    second = ShardStream(index.uri, loader_cfg(buffer=4), seed=5)
    second.load_state_dict(state)
    it = iter(second)
    assert [next(it)["field_id"] for _ in range(12)] == seq[13:25]


def test_resume_with_a_multiprocess_dataloader(local_set):
    _, _, index, want = local_set
    cfg = loader_cfg(buffer=4, workers=2)

    def loader(stream):
        return torch.utils.data.DataLoader(
            stream, batch_size=2, num_workers=2, collate_fn=ShardStream.collate, multiprocessing_context="fork"
        )

    first = ShardStream(index.uri, cfg, seed=9, infinite=False)
    consumed = []
    for i, batch in enumerate(loader(first)):  # workers prefetch ahead; only observed batches count
        assert batch["images"].shape == (2, 5, SIZE // 2, SIZE // 2)
        first.observe(batch)
        consumed += batch["field_ids"]
        if i == 2:
            break
    state = first.state_dict()
    assert state["num_workers"] == 2 and set(state["positions"]) == {"0", "1"}
    second = ShardStream(index.uri, cfg, seed=9, infinite=False)
    second.load_state_dict(state)
    rest = [f for batch in loader(second) for f in batch["field_ids"]]
    assert len(consumed) == 6 and Counter(consumed + rest) == Counter(want.keys())
    # Positions are per worker: another worker count cannot continue them.
    third = ShardStream(index.uri, cfg, seed=9, infinite=False)
    third.load_state_dict(state)
    with pytest.raises(ValueError, match="saved with 2 DataLoader workers"):
        next(iter(third))
    with pytest.raises(ValueError, match="another configuration.*seed"):
        ShardStream(index.uri, cfg, seed=10).load_state_dict(state)


# --------------------------------------------------------------------------- the writer resumes


def test_writer_rebuilds_only_missing_or_stale_shards(tmp_path, buckets):
    manifest, _ = make_inputs(buckets, str(tmp_path / "raw"), n_fields=10, faults=False)
    out = tmp_path / "out"
    first = write_shards(manifest, str(out), shard_cfg(str(out), per_shard=3), PRE)
    assert len(first.shards) == 4 and first.reused == []
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "shard-000002.tar").unlink()
    second = write_shards(manifest, str(out), shard_cfg(str(out), per_shard=3), PRE)
    assert second.written == ["shard-000002"]
    assert second.reused == ["shard-000000", "shard-000001", "shard-000003"]
    for name in ("shard-000000.tar", "shard-000001.json", "shard-000003.tar"):
        assert (out / name).stat().st_mtime_ns == mtimes[name], f"{name} was rewritten"
    # The rebuilt shard is byte-identical (same plan -> same bytes), so the index is unchanged.
    assert [s.sha256 for s in second.shards] == [s.sha256 for s in first.shards]
    # A truncated tar (size no longer matches its sidecar) is rebuilt too; the others stay.
    with open(out / "shard-000001.tar", "r+b") as f:
        f.truncate(1000)
    third = write_shards(manifest, str(out), shard_cfg(str(out), per_shard=3), PRE)
    assert third.written == ["shard-000001"] and third.shards[1].sha256 == first.shards[1].sha256
    # Another shard size is another plan: every shard is stale.
    fourth = write_shards(manifest, str(out), shard_cfg(str(out), per_shard=5), PRE)
    assert len(fourth.shards) == 2 and fourth.written == ["shard-000000", "shard-000001"]
    assert Counter(s["field_id"] for s in one_epoch(ShardStream(fourth.uri, loader_cfg()))) == Counter(
        manifest.column("field_id")
    )


def test_writer_refuses_bad_requests(tmp_path, buckets):
    manifest, _ = make_inputs(buckets, str(tmp_path / "raw"), n_fields=2, faults=False)
    with pytest.raises(ValueError, match=r"channels \['HighZBF', 'LowZBF', 'Brightfield'\] are not in the manifest"):
        write_shards(manifest, str(tmp_path / "o"), ShardConfig(include_brightfield=True), PRE)
    with pytest.raises(ValueError, match="no fields in split 'val'"):
        write_shards(manifest, str(tmp_path / "o"), ShardConfig(split="val"), PRE)
    twice = Manifest.from_records([manifest.record(0), manifest.record(1), manifest.record(0)], CH)
    with pytest.raises(ValueError, match=r"1 field_ids more than once, e.g. \['B1/P0/A01/1'\]"):
        write_shards(twice, str(tmp_path / "o"), ShardConfig(), PRE)
    broken, _ = make_inputs(buckets, str(tmp_path / "raw2"), n_fields=2, faults=False)
    for r in broken.records():
        storage.delete(r.uris["DNA"])
    with pytest.raises(ShardBuildError, match="none of the first 2 fields"):
        write_shards(broken, str(tmp_path / "o2"), ShardConfig(), PRE)


# --------------------------------------------------------------------------- corrupt shards


def _copy_set(index: ShardIndex, dst: Path) -> ShardIndex:
    dst.mkdir()
    src = Path(index.uri).parent
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return ShardIndex.read(str(dst / "index.json"))


def test_truncated_and_tampered_shards_are_skipped_and_counted(local_set, tmp_path, caplog):
    _, _, index, want = local_set
    idx = _copy_set(index, tmp_path / "set")
    truncated, tampered = idx.shards[0], idx.shards[2]
    p = Path(idx.shard_uri(truncated))
    p.write_bytes(p.read_bytes()[: truncated.bytes // 2])
    p = Path(idx.shard_uri(tampered))
    data = bytearray(p.read_bytes())
    data[3 * 512 + 100] ^= 0xFF  # json header+payload, u8 header, then the first image: same size, other bytes
    p.write_bytes(bytes(data))
    lost = {m["field_id"] for s in (truncated, tampered) for m, _ in read_shard(index.shard_uri(s))}

    with pytest.raises(CorruptShardError, match="missing"):
        read_shard(idx.shard_uri(truncated) + ".gone")
    with pytest.raises(CorruptShardError, match="truncated"):
        read_shard(idx.shard_uri(truncated), truncated.bytes, truncated.sha256)
    with pytest.raises(CorruptShardError, match="sha256"):
        read_shard(idx.shard_uri(tampered), tampered.bytes, tampered.sha256)

    stream = ShardStream(idx.uri, loader_cfg(), seed=1)  # infinite: keeps going past the bad shards
    it = iter(stream)
    got = [next(it)["field_id"] for _ in range(3 * (len(want) - len(lost)))]
    assert set(got) == set(want) - lost and Counter(got) == Counter({f: 3 for f in set(want) - lost})
    st = stream.stats()
    assert st["shards_failed"] >= 4 and {f["shard"] for f in st["failed"]} == {truncated.name, tampered.name}
    assert "skipping shard" in caplog.text
    # Counted across DataLoader worker processes too (shared counters), for one finite epoch.
    par = ShardStream(idx.uri, loader_cfg(workers=2), seed=1, infinite=False)
    dl = torch.utils.data.DataLoader(par, batch_size=None, num_workers=2, multiprocessing_context="fork")
    assert {s["field_id"] for s in dl} == set(want) - lost
    assert par.stats()["shards_failed"] == 2 and par.stats()["fields_yielded"] == len(want) - len(lost)
    # verify="size" checks size and structure only: the tampered payload passes, the truncated tar does not.
    loose = ShardStream(idx.uri, loader_cfg(), seed=1, verify="size")
    assert {s["field_id"] for s in one_epoch(loose)} == set(want) - {
        m["field_id"] for m, _ in read_shard(index.shard_uri(truncated))
    }


def test_a_consumer_whose_every_shard_is_corrupt_fails_loudly(local_set, tmp_path):
    _, _, index, _ = local_set
    idx = _copy_set(index, tmp_path / "set")
    for s in idx.shards:
        Path(idx.shard_uri(s)).write_bytes(b"\0" * 10)
    with pytest.raises(RuntimeError, match="read no field in a whole epoch"):
        next(iter(ShardStream(idx.uri, loader_cfg())))


# --------------------------------------------------------------------------- with the project's synthetic bucket


def test_synth_bucket_discover_shard_read(tmp_path, buckets):
    """End to end on the project's synthetic JUMP bucket: planted faults in the packed channels are exactly the skips."""
    from dinocell.synth import SynthFaults

    root = str(tmp_path / "source")
    report = buckets.synth(
        root,
        plates_per_batch=2,
        sites_per_well=2,
        size=SIZE,
        seed=0,
        faults=SynthFaults(missing_channel=2, corrupt_tiff=2, truncated_tiff=1),
    )
    assert (report.n_plates, report.n_fields) == (2, 8)
    manifest = buckets.manifest(report)
    planted = {make_field_id(f.batch, f.plate, f.well, f.site) for f in report.faults if f.channel in CH}
    assert planted, "the seed should plant faults in fluorescent channels"
    out = str(tmp_path / "shards")
    index = write_shards(manifest, out, shard_cfg(out, per_shard=2), PRE)
    assert {s["field_id"] for s in index.skipped} == planted
    assert index.n_fields == len(manifest) - len(planted)
    got = one_epoch(ShardStream(index.uri, loader_cfg()))
    assert sorted(s["field_id"] for s in got) == sorted(set(manifest.column("field_id")) - planted)


# --------------------------------------------------------------------------- transient losses are not permanent


def test_a_rerun_rebuilds_shards_whose_skips_were_transient(s3_server, s3_bucket, buckets):
    """A field whose object answered 503 past the retries is skipped as "transient"; a fault-free rerun rebuilds
    exactly its shard and recovers it, while missing and corrupt inputs stay skipped (and reported) with their kind."""
    manifest, bad = make_inputs(buckets, f"s3://{s3_bucket}/raw")  # field 1: missing ER, field 2: corrupt RNA
    flaky = manifest.record(5)
    out = f"s3://{s3_bucket}/shards"
    cfg = shard_cfg(out)
    with FaultProxy(s3_server.endpoint_url, ["503"] * 1000, match=flaky.uris["DNA"].split("/", 3)[3]) as proxy:
        storage.configure(storage.StorageConfig(endpoint_url=proxy.url, anonymous=False, max_attempts=2))
        first = write_shards(manifest, out, cfg, PRE)
    storage.configure(storage.StorageConfig(endpoint_url=s3_server.endpoint_url, anonymous=False))
    assert proxy.injected["503"] >= 2
    kinds = {s["field_id"]: s["kind"] for s in first.skipped}
    assert kinds == {flaky.field_id: "transient", make_field_id("B1", "P1", "A01", 2): "missing",
                     make_field_id("B1", "P0", "A01", 3): "corrupt"}
    assert first.skipped_by_kind() == {"transient": 1, "missing": 1, "corrupt": 1}
    assert "rerun the shard step" in first.format_summary() and "[transient]" in first.format_summary()
    flaky_shard = next(s["shard"] for s in first.skipped if s["kind"] == "transient")

    again = write_shards(manifest, out, cfg, PRE)
    assert again.written == [flaky_shard] and len(again.reused) == len(again.shards) - 1
    assert {s["field_id"] for s in again.skipped} == bad  # only the permanent losses are left, each still counted
    assert again.skipped_by_kind() == {"transient": 0, "missing": 1, "corrupt": 1}
    on_storage = json.loads(storage.read_text(again.uri))
    assert on_storage["skipped_by_kind"] == again.skipped_by_kind() and on_storage["totals"]["skipped"] == 2
    got = {s["field_id"] for s in one_epoch(ShardStream(again.uri, loader_cfg()))}
    assert got == set(manifest.column("field_id")) - bad  # the transient loss is recovered
    third = write_shards(manifest, out, cfg, PRE)  # missing / corrupt skips do not trigger rebuilds
    assert third.written == []


# --------------------------------------------------------------------------- any channel set


OTHER = ["Actin", "Mito", "Phase"]


@pytest.fixture
def other_channels(tmp_path, buckets):
    """6 fields of a dataset whose channels are Actin, Mito, Phase (no DNA), and its manifest on disk."""
    rng = np.random.default_rng(3)
    records = [
        buckets.field("B1", f"P{i % 2}", f"A{i + 1:02d}", 1,
                      {ch: (str(tmp_path / "raw" / f"f{i}_{ch}.tiff"), _tiff(rng)) for ch in OTHER})
        for i in range(6)
    ]
    manifest = Manifest.from_records(records, OTHER)
    uri = str(tmp_path / "manifest.parquet")
    manifest.write(uri)
    return manifest, uri


def _shard_step(manifest_uri, out, *overrides):
    from dinocell.data.step import shard

    return shard("", [f"shard.target_bytes={2 * 3 * (SIZE // 2) ** 2}", "shard.workers=1", *overrides],
                 manifest_uri=manifest_uri, shards_prefix=out)


@pytest.mark.parametrize("channels", [OTHER, ["Phase", "Actin"]])
def test_shards_hold_exactly_the_configured_channels_of_any_dataset(other_channels, tmp_path, channels):
    manifest, uri = other_channels
    out = str(tmp_path / "shards")
    result = _shard_step(uri, out, f"data.channels=[{','.join(channels)}]")
    assert result.channels == channels and result.totals["fields"] == 6 and result.totals["skipped"] == 0
    index = ShardIndex.read(result.index_uri)
    assert index.channels == channels and index.field_shape == [len(channels), SIZE // 2, SIZE // 2]
    want = {r.field_id: FieldLoader(PRE, channels).load(r).image for r in manifest.records()}
    samples = one_epoch(ShardStream(index.uri, loader_cfg()))
    assert sorted(s["field_id"] for s in samples) == sorted(want)
    for s in samples:
        assert s["channels"] == tuple(channels) and len(s["channel_ids"]) == len(channels)
        assert np.array_equal(s["image"].numpy(), want[s["field_id"]])
    for info in index.shards:  # the per-field metadata members say the same
        assert all(m["channels"] == channels for m, _ in read_shard(index.shard_uri(info)))


def test_empty_data_channels_means_the_manifests_and_a_channel_it_lacks_is_named(other_channels, tmp_path):
    from dinocell.config.step_args import StepError

    _, uri = other_channels
    assert _shard_step(uri, str(tmp_path / "a"), "data.channels=[]").channels == OTHER
    with pytest.raises(StepError, match=rf"channels \['DNA'\] are not in the manifest: manifest {uri} has "
                                        r"\['Actin', 'Mito', 'Phase'\]"):
        _shard_step(uri, str(tmp_path / "b"), "data.channels=[Actin,DNA]")
    with pytest.raises(StepError, match=r"channels \['DNA', 'ER', 'RNA', 'AGP'\] are not in the manifest"):
        _shard_step(uri, str(tmp_path / "c"))  # the default data.channels (the 5 JUMP fluorescent ones)


# --------------------------------------------------------------------------- a killed shard step


_KILLED_SCRIPT = """
import sys
from dinocell import storage
from dinocell.config import PreprocessConfig, ShardConfig
from dinocell.data.shards import write_shards
from dinocell.jump.manifest import Manifest

if __name__ == "__main__":
    endpoint, manifest_uri, out, target = sys.argv[1:5]
    storage.configure(storage.StorageConfig(endpoint_url=endpoint, anonymous=False))
    write_shards(Manifest.read(manifest_uri), out, ShardConfig(output=out, target_bytes=int(target), workers=2),
                 PreprocessConfig(), fetch_workers=1)
"""


def _children(pid: int) -> list[int]:
    """Pool workers of `pid` (spawned multiprocessing children, not its resource tracker), from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_bytes().rsplit(b")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"multiprocessing" in cmd and b"resource_tracker" not in cmd:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process state from /proc (Linux)")
def test_pool_workers_die_with_a_killed_parent_and_their_temp_files_are_cleaned(
    s3_server, s3_bucket, buckets, tmp_path, monkeypatch
):
    import os
    import signal
    import subprocess
    import sys
    import time

    manifest, _ = make_inputs(buckets, f"s3://{s3_bucket}/raw", faults=False)
    manifest_uri = str(tmp_path / "manifest.parquet")
    manifest.write(manifest_uri)
    script = tmp_path / "shard_job.py"
    script.write_text(_KILLED_SCRIPT)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = f"s3://{s3_bucket}/shards"
    with FaultProxy(s3_server.endpoint_url, ["delay"] * 100_000, delay_s=0.25) as proxy:  # every GET is slow
        job = subprocess.Popen([sys.executable, str(script), proxy.url, manifest_uri, out, str(3 * FIELD_BYTES)],
                               env={**os.environ, "TMPDIR": str(tmp)})
        try:
            workers, deadline = [], time.time() + 60
            while time.time() < deadline and (len(workers) < 2 or proxy.object_gets < 8):
                assert job.poll() is None, "the shard job ended before it could be killed"
                workers = _children(job.pid)
                time.sleep(0.1)
            assert len(workers) == 2, f"pool workers not found: {workers}"
        finally:
            job.send_signal(signal.SIGKILL)
            job.wait()
        deadline = time.time() + 5
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.1)
        assert not [p for p in workers if _alive(p)], "pool workers outlived their killed parent"
        time.sleep(0.5)  # requests in flight when they died have arrived
        before = dict(proxy.requests)
        time.sleep(1.5)
        assert dict(proxy.requests) == before, "the workers of a killed shard step kept reading / writing"
    assert not storage.exists(f"{out}/index.json")
    left = sorted(p.name for p in tmp.iterdir() if p.name.startswith("dinocell-shard-"))
    assert left, "the killed builds should have left their temp tars"
    # The next run removes them (their owners are dead) and finishes the set.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    index = write_shards(manifest, out, shard_cfg(out), PRE)
    assert index.cleaned_temps == len(left) and not [p for p in tmp.iterdir() if p.name.startswith("dinocell-")]
    assert f"{len(left)} stale temp file(s) of killed writers removed" in index.format_summary()
    assert index.n_fields == len(manifest)
