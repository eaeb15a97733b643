"""Issue 7: datasets on filesystems pyarrow understands (file://, object stores, a filesystem registered for a
test), the metadata file that Parquet readers skip, and datasets written before it was renamed."""
from __future__ import annotations

import importlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rayoffline import data
from rayoffline.data import append, convert, is_uri, iter_chunks, load, read_metadata, register_filesystem, resolve
from rayoffline.data.load import dataset_files, shard_plan
from rayoffline.data.schema import LEGACY_METADATA_FILE, METADATA_FILE
from rayoffline.errors import DataError

from ._convert_helpers import episodes, flat_rows, write_parquet

conv = importlib.import_module("rayoffline.data.convert")  # the module (rayoffline.data.convert is the function)


def source(path, seed=0, k=12):
    eps = episodes(obs_dim=3, act_dim=2, layout=[(10 + i, "trunc" if i % 2 else "term") for i in range(k)], seed=seed)
    r = flat_rows(eps)
    return write_parquet(path, {"observations": r["observations"], "actions": r["actions"], "rewards": r["rewards"],
                                "next_observations": r["next_observations"], "terminations": r["terminations"],
                                "truncations": r["truncations"], "episode_id": r["episode"]})


def same_batches(a, b) -> None:
    for f in ("observations", "actions", "rewards", "next_observations", "terminations", "truncations"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


@pytest.fixture
def memfs():
    """A pyarrow filesystem over fsspec's in-memory one, registered as memtest:// for the test."""
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    mem = fsspec.filesystem("memory")
    fs = PyFileSystem(FSSpecHandler(mem))
    register_filesystem("memtest", fs)
    yield mem
    register_filesystem("memtest", None)
    if mem.exists("/bucket"):
        mem.rm("/bucket", recursive=True)


def test_is_uri():
    assert is_uri("s3://bucket/ds") and is_uri("gs://b/x") and is_uri("file:///tmp/x") and is_uri("memtest://a/b")
    assert not is_uri("data/hopper") and not is_uri("/abs/path") and not is_uri("builtin:pendulum-medium")
    assert not is_uri("minari:mujoco/hopper/medium-v0")
    assert data.is_uri is is_uri


# ---------------------------------------------------------------------------------------------------------
# file:// is the local filesystem

def test_file_uri_convert_append_load(tmp_path):
    src, more = source(tmp_path / "a.parquet"), source(tmp_path / "b.parquet", seed=1)
    uri = f"file://{tmp_path}/ds"
    meta = convert(str(src), uri, shards=3)
    assert (tmp_path / "ds" / METADATA_FILE).is_file()
    assert not list(tmp_path.glob(".ds.tmp-*"))
    meta = append(str(more), uri, shards=2)
    assert read_metadata(uri) == json.loads(json.dumps(meta))
    assert resolve(uri) == tmp_path / "ds"  # a local Path, as for a plain path
    same_batches(load(uri), load(tmp_path / "ds"))
    same_batches(load(uri, 1, 2), load(tmp_path / "ds", 1, 2))
    chunks = list(iter_chunks(uri, memory_budget_bytes=8 << 20))
    assert sum(len(c) for c in chunks) == meta["num_transitions"]
    assert [s.path for s in shard_plan(uri, 0, 2)] == [s.path for s in shard_plan(tmp_path / "ds", 0, 2)]


# ---------------------------------------------------------------------------------------------------------
# a registered (non-local) filesystem: written in place, metadata last; nothing left on failure

def test_registered_filesystem_round_trip(tmp_path, memfs):
    src, more = source(tmp_path / "a.parquet"), source(tmp_path / "b.parquet", seed=1)
    local = convert(str(src), tmp_path / "local", shards=3)
    meta = convert(str(src), "memtest://bucket/ds", shards=3)
    assert meta["content_hash"] == local["content_hash"]
    assert sorted(memfs.ls("/bucket/ds", detail=False)) == ["/bucket/ds/_rayoffline.json", "/bucket/ds/part-00000"]
    assert read_metadata("memtest://bucket/ds") == json.loads(json.dumps(meta))
    assert resolve("memtest://bucket/ds") == "memtest://bucket/ds"
    files = dataset_files("memtest://bucket/ds")
    assert files == [f"memtest://bucket/ds/part-00000/shard-0000{i}.parquet" for i in range(3)]
    same_batches(load("memtest://bucket/ds"), load(tmp_path / "local"))
    same_batches(load("memtest://bucket/ds", 2, 3), load(tmp_path / "local", 2, 3))
    got = torch.cat([c.rewards for c in iter_chunks("memtest://bucket/ds", memory_budget_bytes=8 << 20)])
    assert torch.equal(got, load(tmp_path / "local").rewards)

    report = data.inspect("memtest://bucket/ds", out=tmp_path)
    assert report["png"] == str(tmp_path / "ds-inspect.png") and "memtest://bucket/ds" in report["text"]
    from rayoffline.data.window import WindowedData
    w = WindowedData("memtest://bucket/ds", 0, 1, budget_bytes=4 << 20, batch_size=16)  # out-of-core windows
    k = min(w.n, meta["num_transitions"])
    assert w.n == w.window_rows and torch.equal(w.data.rewards[:k], load(tmp_path / "local").rewards[:k])
    w.close()

    meta2 = append(str(more), "memtest://bucket/ds")
    local2 = append(str(more), tmp_path / "local")
    assert meta2["content_hash"] == local2["content_hash"] and meta2["num_episodes"] == 24
    same_batches(load("memtest://bucket/ds"), load(tmp_path / "local"))
    with pytest.raises(DataError, match="already exists"):
        convert(str(src), "memtest://bucket/ds")
    with pytest.raises(DataError, match="already in memtest://bucket/ds as partition part-00001"):
        append(str(more), "memtest://bucket/ds")
    assert sorted(memfs.ls("/bucket/ds", detail=False)) == ["/bucket/ds/_rayoffline.json", "/bucket/ds/part-00000",
                                                            "/bucket/ds/part-00001"]  # the refused one is gone
    memfs.rm("/bucket/ds/part-00001/shard-00000.parquet")
    with pytest.raises(DataError, match=r"memtest://bucket/ds: 1 of 4 Parquet file\(s\) listed in _rayoffline.json "
                                        r"are missing: part-00001/shard-00000.parquet"):
        load("memtest://bucket/ds")


def test_failure_on_a_registered_filesystem_leaves_nothing(tmp_path, memfs, monkeypatch):
    src = source(tmp_path / "a.parquet")

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(conv, "write_metadata", broken)
    with pytest.raises(OSError, match="disk full"):
        convert(str(src), "memtest://bucket/new")
    assert not memfs.exists("/bucket/new")
    monkeypatch.undo()
    convert(str(src), "memtest://bucket/ds")
    before = {p: memfs.cat(p) for p in memfs.find("/bucket/ds")}
    monkeypatch.setattr(conv, "write_metadata", broken)
    with pytest.raises(OSError, match="disk full"):
        append(str(source(tmp_path / "b.parquet", seed=1)), "memtest://bucket/ds")
    assert {p: memfs.cat(p) for p in memfs.find("/bucket/ds")} == before


def test_fsspec_scheme_without_registration(tmp_path):
    import fsspec

    src = source(tmp_path / "a.parquet")
    try:
        convert(str(src), "memory://rayoffline-test/ds")
        meta = convert(str(src), tmp_path / "local")
        assert read_metadata("memory://rayoffline-test/ds")["content_hash"] == meta["content_hash"]
        same_batches(load("memory://rayoffline-test/ds"), load(tmp_path / "local"))
    finally:
        mem = fsspec.filesystem("memory")
        if mem.exists("/rayoffline-test"):
            mem.rm("/rayoffline-test", recursive=True)
    with pytest.raises(DataError, match="unknown filesystem scheme 'nosuchfs'"):
        read_metadata("nosuchfs://x/y")


def test_ray_tasks_write_to_a_registered_filesystem(ray_cluster, tmp_path, monkeypatch):
    """Through Ray the filesystem travels to the tasks (pickled): a SubTreeFileSystem over a local directory."""
    from pyarrow.fs import LocalFileSystem, SubTreeFileSystem

    (tmp_path / "store").mkdir()
    register_filesystem("subtree", SubTreeFileSystem(str(tmp_path / "store"), LocalFileSystem()))
    try:
        src = source(tmp_path / "a.parquet")
        monkeypatch.setattr(conv, "LOCAL_WRITE_MAX_BYTES", 0)
        monkeypatch.setattr(conv, "BLOCK_BYTES", 3000)
        meta = convert(str(src), "subtree://bucket/ds", shards=2)
        assert sorted(p.name for p in (tmp_path / "store" / "bucket" / "ds" / "part-00000").iterdir()) == [
            "shard-00000.parquet", "shard-00001.parquet"]
        monkeypatch.setattr(conv, "LOCAL_WRITE_MAX_BYTES", 64 << 20)
        local = convert(str(src), tmp_path / "local", shards=2)
        assert meta["content_hash"] == local["content_hash"]
        same_batches(load("subtree://bucket/ds"), load(tmp_path / "local"))
    finally:
        register_filesystem("subtree", None)


# ---------------------------------------------------------------------------------------------------------
# the ecosystem's own readers open a converted dataset without filters

def test_pandas_and_pyarrow_read_a_converted_dataset(tmp_path):
    import pandas as pd

    src, more = source(tmp_path / "a.parquet"), source(tmp_path / "b.parquet", seed=1)
    convert(str(src), tmp_path / "ds", shards=3)
    meta = append(str(more), tmp_path / "ds", shards=2)  # two partitions
    n = meta["num_transitions"]
    df = pd.read_parquet(tmp_path / "ds")
    assert len(df) == n and list(df.columns) == list(data.schema.COLUMNS)
    t = pq.read_table(tmp_path / "ds")
    assert t.num_rows == n
    np.testing.assert_array_equal(np.sort(t.column("episode_id").to_numpy()), np.sort(df["episode_id"].to_numpy()))
    assert sorted(np.unique(df["episode_id"])) == list(range(meta["num_episodes"]))


# ---------------------------------------------------------------------------------------------------------
# datasets written before the metadata file was renamed

def test_legacy_metadata_json_is_read_and_replaced_on_append(tmp_path):
    src, more = source(tmp_path / "a.parquet"), source(tmp_path / "b.parquet", seed=1)
    convert(str(src), tmp_path / "ds", shards=2)
    old = json.loads((tmp_path / "ds" / METADATA_FILE).read_text())
    old["schema_version"] = 1
    for p in old["partitions"]:
        p.pop("hash_piece_rows")
    (tmp_path / "ds" / LEGACY_METADATA_FILE).write_text(json.dumps(old))
    (tmp_path / "ds" / METADATA_FILE).unlink()
    assert read_metadata(tmp_path / "ds") == old
    assert resolve(str(tmp_path / "ds")) == tmp_path / "ds"
    assert len(load(tmp_path / "ds")) == old["num_transitions"]
    with pytest.raises(DataError, match="already in"):  # its hash (one piece) is schema version 1's
        append(str(src), tmp_path / "ds")
    meta = append(str(more), tmp_path / "ds")
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [METADATA_FILE, "part-00000", "part-00001"]
    assert read_metadata(tmp_path / "ds") == json.loads(json.dumps(meta))
    assert meta["schema_version"] == data.schema.SCHEMA_VERSION and meta["partitions"][0] == old["partitions"][0]
    (tmp_path / "ds" / METADATA_FILE).write_text("{not json")
    with pytest.raises(DataError, match=f"ds/{METADATA_FILE}: corrupt JSON"):
        read_metadata(tmp_path / "ds")
