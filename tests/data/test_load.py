"""Loading converted datasets for learners: shares, dtypes, streaming within a memory budget, bad files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rayoffline.batch import FIELDS
from rayoffline.data.load import _reader_reserve, dataset_files, iter_chunks, load, load_metadata, shard_plan
from rayoffline.data.schema import SCHEMA_VERSION
from rayoffline.errors import ConfigError, DataError


def write_dataset(root: Path, lengths=(50, 30, 70, 20, 40, 90), obs_dim=3, act_dim=2, discrete_n=None,
                  files=4, partitions=1, row_group_size=64, seed=0, truncate_last=True,
                  file_rows: list[int] | None = None) -> dict:
    """A converted dataset written with pyarrow exactly as schema.py describes it.

    Row i of the whole dataset has reward i (so shares are easy to check); episodes alternate between
    ending by termination and by truncation (when `truncate_last`). `file_rows`: rows of each file of a
    single partition (instead of `files` near-equal files per partition). Returns the numpy columns."""
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    obs = rng.standard_normal((n, obs_dim)).astype(np.float32)
    nxt = rng.standard_normal((n, obs_dim)).astype(np.float32)
    if discrete_n:
        act = rng.integers(discrete_n, size=n).astype(np.int64)
    else:
        act = rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32)
    rew = np.arange(n, dtype=np.float32)
    term = np.zeros(n, bool)
    trunc = np.zeros(n, bool)
    ep = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    step = np.concatenate([np.arange(k, dtype=np.int32) for k in lengths])
    ends = np.cumsum(lengths) - 1
    for i, e in enumerate(ends):
        (trunc if (truncate_last and i % 2) else term)[e] = True

    def fsl(a):
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])

    cols = dict(observations=obs, actions=act, rewards=rew, next_observations=nxt, terminations=term,
                truncations=trunc, episode_id=ep, step=step)
    part_rows = np.array_split(np.arange(n), partitions)
    meta_parts = []
    for p, prow in enumerate(part_rows):
        pdir = root / f"part-{p:05d}"
        pdir.mkdir(parents=True)
        names = []
        splits = (np.split(prow, np.cumsum(file_rows)[:-1]) if file_rows is not None else np.array_split(prow, files))
        for s, rows in enumerate(splits):
            table = pa.table({k: (fsl(v[rows]) if v.ndim == 2 else pa.array(v[rows])) for k, v in cols.items()})
            name = f"shard-{s:05d}.parquet"
            pq.write_table(table, pdir / name, row_group_size=row_group_size)
            names.append(name)
        meta_parts.append({"name": pdir.name, "source": "test", "files": names, "num_transitions": len(prow),
                           "num_episodes": int(len(np.unique(ep[prow]))), "content_hash": "x"})
    rets = np.bincount(ep, weights=rew)
    act_space = ({"type": "Discrete", "n": discrete_n} if discrete_n else
                 {"type": "Box", "shape": [act_dim], "low": [-1.0] * act_dim, "high": [1.0] * act_dim})
    meta = {
        "schema_version": SCHEMA_VERSION, "source": "test", "content_hash": "x", "env_id": None, "env_spec": None,
        "observation_space": {"type": "Box", "shape": [obs_dim], "low": [-np.inf] * obs_dim,
                              "high": [np.inf] * obs_dim, "dtype": "float32"},
        "action_space": act_space, "num_transitions": n, "num_episodes": len(lengths),
        "num_terminations": int(term.sum()), "num_truncations": int(trunc.sum()),
        "return_stats": {"mean": float(rets.mean()), "std": float(rets.std()), "min": float(rets.min()),
                         "max": float(rets.max()), **{f"p{q}": float(np.percentile(rets, q))
                                                      for q in (5, 25, 50, 75, 95)}},
        "episode_length_stats": {"mean": float(np.mean(lengths)), "min": min(lengths), "max": max(lengths)},
        "obs_mean": obs.mean(0).tolist(), "obs_std": obs.std(0).tolist(), "reward_mean": float(rew.mean()),
        "reward_std": float(rew.std()), "ref_min_score": None, "ref_max_score": None, "partitions": meta_parts,
    }
    (root / "_rayoffline.json").write_text(json.dumps(meta))
    return cols


@pytest.fixture
def ds(tmp_path):
    root = tmp_path / "ds"
    cols = write_dataset(root, files=4, partitions=2)
    return root, cols


def test_load_whole_dataset_matches_columns(ds):
    root, cols = ds
    b = load(root)
    assert len(b) == len(cols["rewards"])
    for k in FIELDS:
        t = getattr(b, k)
        assert t.dtype == torch.float32 and t.is_contiguous()
        np.testing.assert_array_equal(t.numpy(), cols[k].astype(np.float32))
    assert b.observations.shape == (len(b), 3) and b.actions.shape == (len(b), 2)
    assert b.rewards.shape == (len(b),) and b.terminations.shape == (len(b),)


def test_discrete_actions_are_int64_vector(tmp_path):
    cols = write_dataset(tmp_path / "d", discrete_n=4, files=2)
    b = load(tmp_path / "d")
    assert b.actions.dtype == torch.int64 and b.actions.shape == (len(b),)
    np.testing.assert_array_equal(b.actions.numpy(), cols["actions"])


@pytest.mark.parametrize("world_size", [1, 2, 3, 8, 13, 500])
def test_shares_are_disjoint_and_cover_dataset(ds, world_size):
    root, cols = ds  # 8 files (2 partitions x 4 shards), 300 rows
    n = len(cols["rewards"])
    seen = []
    for rank in range(world_size):
        if world_size > n:
            break
        b = load(root, rank, world_size)
        r = b.rewards.numpy().astype(np.int64)
        # rows stay aligned across columns
        np.testing.assert_array_equal(b.observations.numpy(), cols["observations"][r])
        np.testing.assert_array_equal(b.next_observations.numpy(), cols["next_observations"][r])
        seen.append(r)
    if world_size > n:
        with pytest.raises(DataError, match="gets no transitions"):
            [load(root, r, world_size) for r in range(world_size)]
        return
    allr = np.concatenate(seen)
    assert len(allr) == n and len(np.unique(allr)) == n


def test_whole_files_balanced_by_transitions_then_row_ranges(ds):
    root, _ = ds
    files = dataset_files(root)
    assert len(files) == 8 and files[0].parent.name == "part-00000" and files[-1].parent.name == "part-00001"
    plan = shard_plan(root, 1, 3)
    assert all(s.start == 0 for s in plan)
    sizes = [sum(len(s) for s in shard_plan(root, r, 3)) for r in range(3)]
    assert sum(sizes) == 300 and max(sizes) - min(sizes) <= 38  # at most one file apart
    # more workers than files: contiguous, near-equal row ranges
    sizes = [sum(len(s) for s in shard_plan(root, r, 11)) for r in range(11)]
    assert sum(sizes) == 300 and max(sizes) - min(sizes) <= 1


def test_unequal_files_are_dealt_by_transitions_not_file_count(tmp_path):
    # round-robin would give rank 0 files 0 and 2 (180 rows) and rank 1 files 1 and 3 (120)
    write_dataset(tmp_path / "d", file_rows=[120, 80, 60, 40])
    files = dataset_files(tmp_path / "d")
    plans = [shard_plan(tmp_path / "d", r, 2) for r in range(2)]
    assert [[s.path for s in p] for p in plans] == [[files[0], files[3]], [files[1], files[2]]]  # dataset order
    assert [sum(len(s) for s in p) for p in plans] == [160, 140]
    assert plans == [shard_plan(tmp_path / "d", r, 2) for r in range(2)]  # deterministic
    got = np.concatenate([load(tmp_path / "d", r, 2).rewards.numpy() for r in range(2)])
    np.testing.assert_array_equal(np.sort(got), np.arange(300, dtype=np.float32))  # every transition once

    # whole files cannot come within SHARE_SLACK of an even share (200 vs 100): contiguous row ranges instead
    write_dataset(tmp_path / "e", file_rows=[200, 20, 20, 20, 20, 20])
    plans = [shard_plan(tmp_path / "e", r, 2) for r in range(2)]
    assert [sum(len(s) for s in p) for p in plans] == [150, 150]
    got = np.concatenate([load(tmp_path / "e", r, 2).rewards.numpy() for r in range(2)])
    np.testing.assert_array_equal(got, np.arange(300, dtype=np.float32))


def test_row_range_split_reads_inside_row_groups(tmp_path):
    cols = write_dataset(tmp_path / "one", files=1, row_group_size=37)
    n = len(cols["rewards"])
    got = np.concatenate([load(tmp_path / "one", r, 7).rewards.numpy() for r in range(7)])
    np.testing.assert_array_equal(got, np.arange(n, dtype=np.float32))


@pytest.mark.parametrize("world_size,rank", [(1, 0), (3, 2), (16, 5)])
def test_iter_chunks_equals_load(ds, world_size, rank):
    root, _ = ds
    full = load(root, rank, world_size)
    row_bytes = 4 * (3 + 3 + 2 + 3)
    reserves = [_reader_reserve(pq.ParquetFile(f)) for f in dataset_files(root)]
    budget = max(reserves) + 6 * row_bytes * 10  # 10+ rows a chunk
    chunks = list(iter_chunks(root, rank, world_size, memory_budget_bytes=budget))
    assert len(chunks) > 1
    for c in chunks:
        assert sum(getattr(c, k).nbytes for k in FIELDS) <= (budget - min(reserves)) / 6
    for k in FIELDS:
        torch.testing.assert_close(torch.cat([getattr(c, k) for c in chunks]), getattr(full, k), rtol=0, atol=0)


@pytest.mark.parametrize("episodes,row_group_size,budget", [(60, 4_000, 3 << 20), (200, 100_000, 16 << 20)])
def test_iter_chunks_stays_within_budget(tmp_path, episodes, row_group_size, budget):
    """Arrow allocations + the chunk held by the caller stay within the budget, with row groups smaller
    and larger than a chunk, for shares larger than the budget (Hopper-shaped rows: 112 bytes each)."""
    write_dataset(tmp_path / "big", lengths=[1000] * episodes, obs_dim=11, act_dim=3, files=1,
                  row_group_size=row_group_size)
    assert episodes * 1000 * 112 > budget
    base = pa.total_allocated_bytes()
    peak, n = 0, 0
    for c in iter_chunks(tmp_path / "big", memory_budget_bytes=budget):
        held = sum(getattr(c, k).nbytes for k in FIELDS)
        peak = max(peak, pa.total_allocated_bytes() - base + 2 * held)  # + the caller's previous chunk
        n += len(c)
    assert n == episodes * 1000
    assert peak <= budget


def test_iter_chunks_budget_too_small(ds):
    with pytest.raises(ConfigError, match="too small"):
        next(iter_chunks(ds[0], memory_budget_bytes=10))


def test_bad_rank_and_missing_dirs(ds, tmp_path):
    with pytest.raises(ConfigError, match="rank 2 / world_size 2"):
        load(ds[0], 2, 2)
    with pytest.raises(DataError, match="nope"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_rayoffline.json").write_text((ds[0] / "_rayoffline.json").read_text())
    with pytest.raises(DataError, match="no Parquet files"):
        load(tmp_path / "empty")


def test_missing_column_and_unreadable_file_are_named(ds):
    root, _ = ds
    f = dataset_files(root)[2]
    pq.write_table(pq.read_table(f).drop(["rewards"]), f)
    with pytest.raises(DataError, match=r"shard-00002\.parquet: missing column.*rewards"):
        load(root)
    with pytest.raises(DataError, match=r"shard-00002\.parquet: missing column.*rewards"):
        list(iter_chunks(root))
    f.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"shard-00002\.parquet: unreadable"):
        load(root)


def test_wrong_dimension_is_named(ds):
    root, _ = ds
    meta = json.loads((root / "_rayoffline.json").read_text())
    meta["observation_space"]["shape"] = [4]
    (root / "_rayoffline.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="column 'observations'"):
        load(root)


def test_load_metadata(ds):
    assert load_metadata(ds[0])["num_transitions"] == 300
