"""Issue 7, data at cluster scale: conversion streams blocks of whole episodes through tasks; the result equals
converting the source in one piece (rows, episode ids, counts, returns, content hash, notes), errors still
name file, column and row, and the driver never reads the source's rows."""
from __future__ import annotations

import hashlib
import importlib
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayoffline.data import append, convert, load
from rayoffline.data.metadata import content_hash
from rayoffline.data.sources import plan_source
from rayoffline.errors import DataError, DataWarning

from ._convert_helpers import episodes, flat_rows, fsl, make_minari, read_converted, write_hdf5, write_parquet

conv = importlib.import_module("rayoffline.data.convert")  # the module (rayoffline.data.convert is the function)
EXACT = ["schema_version", "content_hash", "env_id", "env_spec", "observation_space", "action_space",
         "num_transitions", "num_episodes", "num_terminations", "num_truncations", "return_stats",
         "episode_length_stats", "ref_min_score", "ref_max_score", "partitions"]


@pytest.fixture
def minari_root(tmp_path, monkeypatch):
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def layout(k: int, seed: int = 0) -> list[tuple[int, str]]:
    """k episodes of 1..40 steps ending by termination, truncation or neither."""
    rng = np.random.default_rng(seed)
    return [(int(n), end) for n, end in zip(rng.integers(1, 40, k), rng.choice(["term", "trunc", "none"], k))]


def whole_then_blocks(monkeypatch, tmp_path, source: str, block_bytes: int = 3000, min_blocks: int = 3, **kw):
    """Convert `source` as one block, then in blocks of ~block_bytes; both metadata dicts, both outputs."""
    with _maybe_warns() as w1:
        a = convert(source, tmp_path / "whole", **kw)
    assert len(plan_source(source, kw.get("mapping"), conv.BLOCK_BYTES).blocks) == 1
    monkeypatch.setattr(conv, "BLOCK_BYTES", block_bytes)
    assert len(plan_source(source, kw.get("mapping"), block_bytes).blocks) >= min_blocks
    with _maybe_warns() as w2:
        b = convert(source, tmp_path / "blocks", **kw)
    assert [str(x.message) for x in w1] == [str(x.message) for x in w2]  # the same notes, said once
    return a, b


class _maybe_warns:
    """Record DataWarnings (a conversion that drops rows says so once; others say nothing)."""

    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings(record=True)
        self.list = self._cm.__enter__()
        warnings.simplefilter("always", DataWarning)
        return self.list

    def __exit__(self, *exc):
        self.list[:] = [w for w in self.list if issubclass(w.category, DataWarning)]
        return self._cm.__exit__(*exc)

    def __iter__(self):
        return iter(self.list)


def parquet_source(tmp_path, eps, next_observations: bool = True, episode_ids: bool = True):
    """src.parquet with the episodes' rows back to back (D4RL-style flat rows)."""
    r = flat_rows(eps)
    cols = {"observations": r["observations"], "actions": r["actions"], "rewards": r["rewards"]}
    if next_observations:
        cols["next_observations"] = r["next_observations"]
    cols.update(terminations=r["terminations"], truncations=r["truncations"])
    if episode_ids:
        cols["episode_id"] = r["episode"]
    return write_parquet(tmp_path / "src.parquet", cols)


def assert_same_dataset(tmp_path, a: dict, b: dict) -> None:
    for k in EXACT:
        assert a[k] == b[k], k
    for k in ("obs_mean", "obs_std"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-15)
    assert a["reward_mean"] == pytest.approx(b["reward_mean"], rel=1e-12)
    assert a["reward_std"] == pytest.approx(b["reward_std"], rel=1e-12)
    ra, rb = read_converted(tmp_path / "whole"), read_converted(tmp_path / "blocks")
    for k in ra:
        np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)


# ---------------------------------------------------------------------------------------------------------
# blocks of whole episodes give what one block gives, for every reader

def test_minari_in_episode_ranges(minari_root, tmp_path, monkeypatch):
    lay = [(n, "trunc" if e == "none" else e) for n, e in layout(40)]
    make_minari("test/stream-v0", episodes(layout=lay, act_scale=2.0))
    a, b = whole_then_blocks(monkeypatch, tmp_path, "minari:test/stream-v0", shards=3)
    assert_same_dataset(tmp_path, a, b)
    assert a["num_episodes"] == 40


def test_d4rl_hdf5_without_next_observations_in_row_ranges(tmp_path, monkeypatch):
    eps = episodes(obs_dim=4, act_dim=2, layout=layout(60, seed=1))
    r = flat_rows(eps)
    src = write_hdf5(tmp_path / "d4rl.hdf5", {"observations": r["observations"], "actions": r["actions"],
                                              "rewards": r["rewards"], "terminals": r["terminations"],
                                              "timeouts": r["truncations"]})
    a, b = whole_then_blocks(monkeypatch, tmp_path, str(src))
    assert_same_dataset(tmp_path, a, b)
    assert a["partitions"][0]["notes"] and a["num_transitions"] < len(r["rewards"])  # rows were dropped


def test_parquet_without_ids_split_at_episode_ends(tmp_path, monkeypatch):
    eps = episodes(obs_dim=3, layout=layout(80, seed=2))
    r = flat_rows(eps)
    cols = {"obs": r["observations"], "act": r["actions"], "rew": r["rewards"], "done": r["terminations"],
            "tl": r["truncations"]}
    half = len(r["rewards"]) // 2
    write_parquet(tmp_path / "src" / "a.parquet", {k: v[:half] for k, v in cols.items()})  # cut mid-episode
    write_parquet(tmp_path / "src" / "b.parquet", {k: v[half:] for k, v in cols.items()})
    mapping = {"observations": "obs", "actions": "act", "rewards": "rew", "terminations": "done",
               "truncations": "tl"}
    a, b = whole_then_blocks(monkeypatch, tmp_path, str(tmp_path / "src"), mapping=mapping)
    assert_same_dataset(tmp_path, a, b)
    plan = plan_source(str(tmp_path / "src"), mapping, conv.BLOCK_BYTES)
    assert any(start not in (None, 0) for blk in plan.blocks for _, start, _ in blk.args["units"])  # split files


def test_episodes_spanning_files_and_interleaved_rows_stay_in_one_block(tmp_path, monkeypatch):
    """RLlib-style: string episode ids, a step column, rows of several episodes interleaved, and episodes whose
    rows continue in the next file: those files (and all between) are one block."""
    rng = np.random.default_rng(3)
    eps = episodes(obs_dim=3, layout=[(n, "trunc" if i % 3 else "term") for i, (n, _) in enumerate(layout(90, 3))])
    r = flat_rows(eps)
    n = len(r["rewards"])
    ids = np.array([f"ep-{e:04d}" for e in r["episode"]])
    step = np.concatenate([np.arange(len(e["rewards"])) for e in eps])
    order = np.argsort(r["episode"] // 2 * 10_000 + rng.permutation(n) % 7, kind="stable")  # pairs interleaved
    cuts = [0, n // 5, 2 * n // 5, 3 * n // 5, 4 * n // 5, n]
    for i in range(5):
        rows = order[cuts[i]:cuts[i + 1]]
        write_parquet(tmp_path / "src" / f"f{i}.parquet", {
            "obs": r["observations"][rows], "new_obs": r["next_observations"][rows], "actions": r["actions"][rows],
            "rewards": r["rewards"][rows], "terminateds": r["terminations"][rows],
            "truncateds": r["truncations"][rows], "eps_id": ids[rows], "t": step[rows].astype(np.int64)})
    a, b = whole_then_blocks(monkeypatch, tmp_path, str(tmp_path / "src"), block_bytes=800)
    assert_same_dataset(tmp_path, a, b)
    assert a["source"].startswith("rllib:") and a["num_episodes"] == 90
    # every block boundary falls where no episode continues
    plan = plan_source(str(tmp_path / "src"), None, 800)
    seen: dict[str, int] = {}
    for bi, blk in enumerate(plan.blocks):
        for f, start, stop in blk.args["units"]:
            e = pq.read_table(f, columns=["eps_id"]).column(0).to_numpy(zero_copy_only=False)
            for k in set(e[start:stop] if start is not None else e):
                assert seen.setdefault(k, bi) == bi, k


def test_csv_files_as_blocks(tmp_path, monkeypatch):
    from .test_integrity import CSV_MAP, csv_source

    (tmp_path / "src").mkdir()
    for i in range(4):
        csv_source(tmp_path / "src" / f"log{i}.csv", n=30)
    mapping = dict(kv.split("=") for kv in CSV_MAP.split(","))
    mapping.pop("episode_id")  # episodes by flags: files never share one
    a, b = whole_then_blocks(monkeypatch, tmp_path, str(tmp_path / "src"), block_bytes=500, mapping=mapping)
    assert_same_dataset(tmp_path, a, b)


def test_through_ray_equals_in_process_and_the_driver_reads_no_rows(ray_cluster, tmp_path, monkeypatch):
    eps = episodes(obs_dim=3, layout=layout(50, seed=4))
    src = parquet_source(tmp_path, eps)
    monkeypatch.setattr(conv, "BLOCK_BYTES", 4000)
    monkeypatch.setattr(conv, "_TASKS", 3)
    local = convert(str(src), tmp_path / "whole", shards=4)

    def never(*a, **k):
        raise AssertionError("the driver read source rows")

    monkeypatch.setattr(conv, "read_block", never)  # Ray's tasks import the module afresh: theirs is the real one
    monkeypatch.setattr(conv, "LOCAL_WRITE_MAX_BYTES", 0)
    ray = convert(str(src), tmp_path / "blocks", shards=4)
    assert_same_dataset(tmp_path, local, ray)
    assert len(plan_source(str(src), None, 4000).blocks) >= 4


# ---------------------------------------------------------------------------------------------------------
# the content hash: pieces of R rows, the same whatever the blocks, shards and processes

def test_content_hash_is_made_of_pieces_and_ignores_blocks_and_shards(ray_cluster, tmp_path, monkeypatch):
    md = importlib.import_module("rayoffline.data.metadata")
    eps = episodes(obs_dim=3, layout=layout(30, seed=5))
    src = parquet_source(tmp_path, eps)
    whole = convert(str(src), tmp_path / "one")
    rows = read_converted(tmp_path / "one")
    n = len(rows["rewards"])
    assert whole["partitions"][0]["content_hash"] == content_hash(rows)  # one piece: schema version 1's hash
    row_bytes = sum(v[:1].nbytes for v in rows.values())
    monkeypatch.setattr(md, "HASH_PIECE_BYTES", 17 * row_bytes)  # pieces of 17 rows
    pieces = [bytes.fromhex(content_hash({k: v[i:i + 17] for k, v in rows.items()})) for i in range(0, n, 17)]
    want = hashlib.sha256(f"pieces:17:{n};".encode() + b"".join(pieces)).hexdigest()
    got = set()
    for i, (blocks, shards, through_ray) in enumerate([(1 << 30, 1, False), (1 << 30, 5, False), (3000, None, False),
                                                        (2000, 7, True)]):
        monkeypatch.setattr(conv, "BLOCK_BYTES", blocks)
        monkeypatch.setattr(conv, "LOCAL_WRITE_MAX_BYTES", 0 if through_ray else 64 << 20)
        meta = convert(str(src), tmp_path / f"o{i}", shards=shards)
        assert meta["partitions"][0]["hash_piece_rows"] == 17
        got.add(meta["partitions"][0]["content_hash"])
        np.testing.assert_array_equal(read_converted(tmp_path / f"o{i}")["observations"], rows["observations"])
    assert got == {want}


def test_many_files_from_many_blocks(tmp_path, monkeypatch):
    """File boundaries follow the estimated total while blocks arrive; every file is written once, in order,
    and the files hold every row once."""
    eps = episodes(obs_dim=3, layout=layout(120, seed=6))
    src = parquet_source(tmp_path, eps, next_observations=False, episode_ids=False)
    monkeypatch.setattr(conv, "BLOCK_BYTES", 2500)
    with pytest.warns(DataWarning):
        meta = convert(str(src), tmp_path / "o", shards=6)
    files = meta["partitions"][0]["files"]
    assert files == [f"shard-{i:05d}.parquet" for i in range(6)]
    sizes = [pq.read_metadata(tmp_path / "o" / "part-00000" / f).num_rows for f in files]
    assert sum(sizes) == meta["num_transitions"] and min(sizes) > 0
    assert max(sizes) <= 2 * math.ceil(meta["num_transitions"] / 6)
    b = load(tmp_path / "o")
    ep = read_converted(tmp_path / "o")["episode_id"]
    assert (np.diff(ep) >= 0).all() and ep[-1] == meta["num_episodes"] - 1 and len(b) == len(ep)


def test_append_streams_and_counts_existing_episodes(tmp_path, monkeypatch):
    a = episodes(obs_dim=3, layout=layout(20, seed=7))
    b = episodes(obs_dim=3, layout=layout(25, seed=8))

    def src(eps, name):
        r = flat_rows(eps)
        return write_parquet(tmp_path / name, {"observations": r["observations"], "actions": r["actions"],
                                               "rewards": r["rewards"], "next_observations": r["next_observations"],
                                               "terminations": r["terminations"],
                                               "truncations": r["truncations"]})
    sa, sb = src(a, "a.parquet"), src(b, "b.parquet")
    convert(str(sa), tmp_path / "one")
    one = append(str(sb), tmp_path / "one")
    monkeypatch.setattr(conv, "BLOCK_BYTES", 1500)
    convert(str(sa), tmp_path / "many", shards=3)
    many = append(str(sb), tmp_path / "many", shards=2)
    for k in EXACT[:-1]:
        assert one[k] == many[k], k
    assert [p["content_hash"] for p in one["partitions"]] == [p["content_hash"] for p in many["partitions"]]
    ep = read_converted(tmp_path / "many")["episode_id"]
    np.testing.assert_array_equal(np.unique(ep), np.arange(one["num_episodes"]))
    with pytest.raises(DataError, match="already in"):
        append(str(sb), tmp_path / "many")
    assert json.loads((tmp_path / "many" / "_rayoffline.json").read_text()) == many


# ---------------------------------------------------------------------------------------------------------
# errors from a block: file, column and the file's own row; nothing written

def test_error_in_a_later_block_names_the_file_row(ray_cluster, tmp_path, monkeypatch):
    eps = episodes(obs_dim=3, layout=layout(60, seed=9))
    r = flat_rows(eps)
    obs = r["observations"].copy()
    bad = len(obs) - 7
    obs[bad, 1] = np.nan
    src = write_parquet(tmp_path / "src.parquet", {"obs": obs, "act": r["actions"], "rew": r["rewards"],
                                                   "done": r["terminations"], "tl": r["truncations"]})
    mapping = {"observations": "obs", "actions": "act", "rewards": "rew", "terminations": "done",
               "truncations": "tl"}
    monkeypatch.setattr(conv, "BLOCK_BYTES", 2000)
    plan = plan_source(str(src), mapping, 2000)
    units = [u for blk in plan.blocks for u in blk.args["units"]]
    last = next(u for u in units if u[1] is not None and u[1] <= bad < u[2])
    assert last[1] > 0  # not the first block
    for through_ray in (False, True):
        monkeypatch.setattr(conv, "LOCAL_WRITE_MAX_BYTES", 0 if through_ray else 64 << 20)
        with pytest.raises(DataError) as e:
            convert(str(src), tmp_path / "o", mapping=mapping)
        msg = str(e.value)
        assert type(e.value) is DataError and "\n" not in msg
        assert msg.startswith(f"{src}: column 'obs' holds NaN (not a number) at row {bad} (0-based)")
        assert f"1 row(s) with NaN or inf in rows {last[1]}-{last[2] - 1} of this file" in msg
        assert sorted(p.name for p in tmp_path.iterdir()) == ["src.parquet"]  # nothing left behind


def test_action_space_of_blocks_is_inferred_from_all_blocks(tmp_path, monkeypatch):
    """Actions inside [-1, 1] in one block and beyond it in another: Box(min, max) over all blocks."""
    eps = episodes(obs_dim=3, act_dim=2, layout=[(30, "term")] * 12, seed=10)
    eps[-1]["actions"][3] = [2.5, -3.0]
    src = parquet_source(tmp_path, eps, episode_ids=False)
    a, b = whole_then_blocks(monkeypatch, tmp_path, str(src))
    assert_same_dataset(tmp_path, a, b)
    assert b["action_space"]["high"][0] == pytest.approx(2.5) and b["action_space"]["low"][1] == pytest.approx(-3.0)


def test_observation_width_changing_between_blocks_is_an_error(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    (tmp_path / "src").mkdir()
    for i, d in enumerate((3, 3, 4)):
        n = 200
        pq.write_table(pa.table({"observations": fsl(rng.standard_normal((n, d)).astype(np.float32)),
                                 "actions": fsl(rng.uniform(-1, 1, (n, 1)).astype(np.float32)),
                                 "rewards": np.zeros(n, np.float32), "terminations": np.arange(n) % 50 == 49,
                                 "next_observations": fsl(rng.standard_normal((n, d)).astype(np.float32))}),
                       tmp_path / "src" / f"f{i}.parquet")
    monkeypatch.setattr(conv, "BLOCK_BYTES", 2000)
    assert len(plan_source(str(tmp_path / "src"), None, 2000).blocks) >= 3
    with pytest.raises(DataError, match=r"observation dimension changes between files: .*f0.parquet has 3 values per "
                                        r"row in column 'observations', .*f2.parquet has 4"):
        convert(str(tmp_path / "src"), tmp_path / "o")
    assert not (tmp_path / "o").exists()
