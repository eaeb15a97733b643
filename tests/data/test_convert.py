"""Conversion of every source format into schema.py's layout, with exact episode boundaries, and append."""
from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayoffline.data import append, convert, read_metadata
from rayoffline.data.schema import COLUMNS, SCHEMA_VERSION
from rayoffline.errors import DataError, DataWarning

from ._convert_helpers import (episodes, flat_rows, make_minari, read_converted, write_hdf5,
                               write_parquet)

META_KEYS = ["schema_version", "source", "content_hash", "env_id", "env_spec", "observation_space", "action_space",
             "num_transitions", "num_episodes", "num_terminations", "num_truncations", "return_stats",
             "episode_length_stats", "obs_mean", "obs_std", "reward_mean", "reward_std", "ref_min_score",
             "ref_max_score", "partitions"]


@pytest.fixture
def minari_root(tmp_path, monkeypatch):
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def check_layout(out: Path, meta: dict, shards: int) -> None:
    """Files, column types and metadata keys exactly as schema.py describes them."""
    assert list(meta) == META_KEYS
    assert meta["schema_version"] == SCHEMA_VERSION
    assert json.loads((out / "_rayoffline.json").read_text()) == json.loads(json.dumps(meta))
    files = [f"shard-{i:05d}.parquet" for i in range(shards)]
    assert meta["partitions"][0]["name"] == "part-00000"
    assert meta["partitions"][0]["files"] == files
    assert sorted(os.listdir(out)) == ["_rayoffline.json", "part-00000"]
    assert sorted(os.listdir(out / "part-00000")) == files
    schema = pq.read_schema(out / "part-00000" / files[0])
    assert tuple(schema.names) == COLUMNS
    d = meta["observation_space"]["shape"][0]
    assert schema.field("observations").type == pa.list_(pa.float32(), d)
    assert schema.field("next_observations").type == pa.list_(pa.float32(), d)
    if meta["action_space"]["type"] == "Discrete":
        assert schema.field("actions").type == pa.int64()
    else:
        assert schema.field("actions").type == pa.list_(pa.float32(), meta["action_space"]["shape"][0])
    for name, typ in [("rewards", pa.float32()), ("terminations", pa.bool_()), ("truncations", pa.bool_()),
                      ("episode_id", pa.int64()), ("step", pa.int32())]:
        assert schema.field(name).type == typ
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def check_stats(meta: dict, rows: dict) -> None:
    """Counts and statistics against a direct computation on the converted rows."""
    ep = rows["episode_id"]
    returns = np.bincount(ep, weights=rows["rewards"].astype(np.float64))
    lengths = np.bincount(ep)
    assert meta["num_transitions"] == len(ep)
    assert meta["num_episodes"] == len(returns)
    assert meta["num_terminations"] == int(rows["terminations"].sum())
    assert meta["num_truncations"] == int(rows["truncations"].sum())
    rs = meta["return_stats"]
    assert rs["mean"] == pytest.approx(returns.mean())
    assert rs["std"] == pytest.approx(returns.std())
    assert (rs["min"], rs["max"]) == pytest.approx((returns.min(), returns.max()))
    for q in (5, 25, 50, 75, 95):
        assert rs[f"p{q}"] == pytest.approx(np.percentile(returns, q))
    assert meta["episode_length_stats"] == {"mean": pytest.approx(lengths.mean()), "min": int(lengths.min()),
                                            "max": int(lengths.max())}
    np.testing.assert_allclose(meta["obs_mean"], rows["observations"].astype(np.float64).mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(meta["obs_std"], rows["observations"].astype(np.float64).std(0), rtol=1e-6)
    assert meta["reward_mean"] == pytest.approx(rows["rewards"].astype(np.float64).mean())
    assert meta["reward_std"] == pytest.approx(rows["rewards"].astype(np.float64).std())
    # episode ids 0..E-1 in order, steps 0..len-1, and every episode ends with exactly one flag
    assert (np.diff(ep) >= 0).all() and ep[0] == 0
    starts = np.flatnonzero(np.r_[True, ep[1:] != ep[:-1]])
    np.testing.assert_array_equal(rows["step"], np.arange(len(ep)) - np.repeat(starts, lengths))
    last = np.r_[ep[1:] != ep[:-1], True]
    ends = rows["terminations"] | rows["truncations"]
    np.testing.assert_array_equal(ends, last)


def expected_from_episodes(eps):
    """Transitions a source with real final observations must produce (Minari, RLlib, next_observations given)."""
    return flat_rows(eps)


def check_rows_equal(rows: dict, exp: dict, discrete=False) -> None:
    np.testing.assert_array_equal(rows["observations"], exp["observations"])
    np.testing.assert_array_equal(rows["next_observations"], exp["next_observations"])
    if discrete:
        np.testing.assert_array_equal(rows["actions"], exp["actions"])
    else:
        np.testing.assert_array_equal(rows["actions"].reshape(exp["actions"].shape), exp["actions"])
    np.testing.assert_array_equal(rows["rewards"], exp["rewards"])
    np.testing.assert_array_equal(rows["terminations"], exp["terminations"])
    np.testing.assert_array_equal(rows["truncations"], exp["truncations"])
    np.testing.assert_array_equal(rows["episode_id"], exp["episode"])


# ---------------------------------------------------------------------------------------------------------
# Minari

def test_minari_by_id_layout_stats_and_truncation(ray_cluster, minari_root, tmp_path):
    eps = episodes(obs_dim=3, act_dim=1, act_scale=2.0)
    make_minari("test/pendulum-v0", eps)
    out = tmp_path / "out"
    meta = convert("minari:test/pendulum-v0", out, shards=4)
    check_layout(out, meta, shards=4)
    rows = read_converted(out)
    check_stats(meta, rows)
    check_rows_equal(rows, expected_from_episodes(eps))
    # the truncated episode (id 1, 4 steps) keeps its real final observation, terminations=0, truncations=1
    last = np.flatnonzero(rows["episode_id"] == 1)[-1]
    np.testing.assert_array_equal(rows["next_observations"][last], eps[1]["observations"][-1])
    assert not rows["terminations"][last] and rows["truncations"][last]
    assert rows["terminations"][np.flatnonzero(rows["episode_id"] == 0)[-1]]
    assert meta["source"] == "minari:test/pendulum-v0"
    assert meta["env_id"] == "Pendulum-v1"
    assert json.loads(meta["env_spec"])["id"] == "Pendulum-v1"
    assert meta["observation_space"] == {"type": "Box", "shape": [3], "low": [-1.0, -1.0, -8.0],
                                         "high": [1.0, 1.0, 8.0], "dtype": "float32"}
    assert meta["action_space"] == {"type": "Box", "shape": [1], "low": [-2.0], "high": [2.0]}
    assert (meta["ref_min_score"], meta["ref_max_score"]) == (-1000.0, -100.0)
    assert (meta["num_terminations"], meta["num_truncations"]) == (1, 2)
    assert len(meta["content_hash"]) == 64

    # deterministic content hash, independent of the number of shards
    meta2 = convert("minari:test/pendulum-v0", tmp_path / "out2", shards=2)
    assert meta2["content_hash"] == meta["content_hash"]
    assert meta2["partitions"][0]["content_hash"] == meta["partitions"][0]["content_hash"]


def test_minari_discrete_by_path_env_override_and_default_shards(ray_cluster, minari_root, tmp_path):
    eps = episodes(obs_dim=4, discrete_n=2, layout=[(6, "term"), (3, "trunc"), (7, "term"), (9, "trunc")])
    ds = make_minari("test/cartpole-v0", eps, env="CartPole-v1", ref=None)
    path = Path(ds.storage.data_path).parent
    out = tmp_path / "nested" / "out"  # missing parents are created
    meta = convert(str(path), out, env_id="CartPole-v0")
    check_layout(out, meta, shards=1)  # default: one file per 16 MiB (convert.default_shards)
    rows = read_converted(out)
    check_stats(meta, rows)
    check_rows_equal(rows, expected_from_episodes(eps), discrete=True)
    assert meta["action_space"] == {"type": "Discrete", "n": 2}
    assert meta["env_id"] == "CartPole-v0" and json.loads(meta["env_spec"])["id"] == "CartPole-v0"
    assert meta["source"].startswith("minari-dir:")
    assert meta["ref_min_score"] is None and meta["ref_max_score"] is None
    assert rows["actions"].dtype == np.int64


def test_more_shards_than_transitions(ray_cluster, minari_root, tmp_path):
    eps = episodes(layout=[(2, "trunc"), (1, "term")])
    make_minari("test/tiny-v0", eps, ref=None)
    meta = convert("minari:test/tiny-v0", tmp_path / "out", shards=16)
    assert len(meta["partitions"][0]["files"]) == 3 == meta["num_transitions"]
    check_layout(tmp_path / "out", meta, shards=3)


def test_minari_arrow_format_goes_through_minari_storage(ray_cluster, minari_root, tmp_path):
    eps = episodes(obs_dim=3, act_dim=1, layout=[(3, "trunc"), (2, "term")], act_scale=2.0)
    make_minari("test/arrow-v0", eps, data_format="arrow")
    meta = convert("minari:test/arrow-v0", tmp_path / "out", shards=2)
    rows = read_converted(tmp_path / "out")
    check_stats(meta, rows)
    check_rows_equal(rows, expected_from_episodes(eps))


def test_builtin_source_goes_through_minari_dataset_path(ray_cluster, minari_root, tmp_path, monkeypatch):
    import rayoffline.data.builtin as builtin

    eps = episodes()
    ds = make_minari("test/builtin-v0", eps)
    calls = []

    def fake(name):
        calls.append(name)
        return Path(ds.storage.data_path).parent

    monkeypatch.setattr(builtin, "minari_dataset_path", fake)
    meta = convert("builtin:pendulum-medium", tmp_path / "out", shards=2)
    assert calls == ["pendulum-medium"]
    assert meta["source"] == "builtin:pendulum-medium" and meta["env_id"] == "Pendulum-v1"
    check_rows_equal(read_converted(tmp_path / "out"), expected_from_episodes(eps))


def test_minari_id_not_local_never_downloads_silently(minari_root, tmp_path, monkeypatch):
    import minari

    def no_network(dataset_id):
        raise ConnectionError("no network")

    monkeypatch.setattr(minari, "download_dataset", no_network)
    with pytest.raises(DataError, match=r"minari:nope/x-v0.*MINARI_DATASETS_PATH.*no network"):
        convert("minari:nope/x-v0", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# D4RL-style HDF5

def d4rl_columns(eps, cut_last=True):
    """D4RL rows; the last episode ends with no flag at all (the file is cut) when `cut_last`."""
    r = flat_rows(eps)
    term = r["terminations"].copy()
    timeouts = r["truncations"].copy()
    if cut_last:
        timeouts[-1] = False
    return r, {"observations": r["observations"], "actions": r["actions"], "rewards": r["rewards"],
               "terminals": term, "timeouts": timeouts}


def test_hdf5_without_next_observations_derives_them(ray_cluster, tmp_path):
    eps = episodes(obs_dim=5, act_dim=2, layout=[(4, "term"), (3, "trunc"), (2, "term"), (3, "none")])
    r, cols = d4rl_columns(eps)
    path = write_hdf5(tmp_path / "d4rl.hdf5", cols)
    out = tmp_path / "out"
    with pytest.warns(DataWarning, match="dropped"):  # rows without a next observation
        meta = convert(str(path), out, shards=2)
    check_layout(out, meta, shards=2)
    rows = read_converted(out)
    check_stats(meta, rows)
    # episode 0 (terminal): all 4 rows kept; its last next_observations is a placeholder (its own observation)
    # episode 1 (timeout): the timeout row is dropped; row 1 of it becomes the truncated end, real next obs
    # episode 2 (terminal, 2 rows) kept; episode 3 (cut by the end of the file): last row dropped, truncated
    keep = np.array([1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0], bool)
    np.testing.assert_array_equal(rows["observations"], r["observations"][keep])
    np.testing.assert_array_equal(rows["episode_id"], [0, 0, 0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(rows["terminations"], [0, 0, 0, 1, 0, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(rows["truncations"], [0, 0, 0, 0, 0, 1, 0, 0, 0, 1])
    obs = r["observations"]
    np.testing.assert_array_equal(rows["next_observations"][:3], obs[1:4])
    np.testing.assert_array_equal(rows["next_observations"][3], obs[3])
    # truncated end of episode 1: its next observation is the (dropped) timeout row's observation, which is real
    np.testing.assert_array_equal(rows["next_observations"][4:6], obs[5:7])
    np.testing.assert_array_equal(rows["next_observations"][6], obs[8])
    np.testing.assert_array_equal(rows["next_observations"][8:10], obs[10:12])
    assert meta["source"] == f"hdf5:{path}"
    assert meta["env_id"] is None and meta["ref_min_score"] is None
    assert meta["observation_space"]["low"] == [-np.inf] * 5
    assert meta["action_space"] == {"type": "Box", "shape": [2], "low": [-1.0, -1.0], "high": [1.0, 1.0]}


def test_hdf5_with_next_observations_keeps_every_row(ray_cluster, tmp_path):
    eps = episodes(obs_dim=3, act_dim=1, layout=[(3, "trunc"), (4, "term"), (2, "none")])
    r, cols = d4rl_columns(eps)
    cols["next_observations"] = r["next_observations"]
    cols["rewards"] = cols["rewards"][:, None]  # D4RL sometimes stores (N, 1)
    path = write_hdf5(tmp_path / "d4rl.h5", cols)
    meta = convert(str(path), tmp_path / "out", shards=3, env_id="Pendulum-v1")
    rows = read_converted(tmp_path / "out")
    check_stats(meta, rows)
    exp = expected_from_episodes(eps)
    exp["truncations"] = exp["truncations"].copy()
    exp["truncations"][-1] = True  # the file ends the last episode without a flag: truncated
    check_rows_equal(rows, exp)
    # the truncated first episode keeps its real final observation
    np.testing.assert_array_equal(rows["next_observations"][2], eps[0]["observations"][-1])
    assert rows["truncations"][2] and not rows["terminations"][2]
    # env_id given: spaces from the env
    assert meta["env_id"] == "Pendulum-v1"
    assert meta["action_space"] == {"type": "Box", "shape": [1], "low": [-2.0], "high": [2.0]}
    assert json.loads(meta["env_spec"])["id"] == "Pendulum-v1"


def test_hdf5_env_id_attribute_gives_spaces(ray_cluster, tmp_path):
    import h5py

    eps = episodes(obs_dim=3, act_dim=1, layout=[(3, "trunc"), (2, "term")], act_scale=2.0)
    _, cols = d4rl_columns(eps)
    path = write_hdf5(tmp_path / "d.hdf5", cols)
    with h5py.File(path, "a") as f:
        f.attrs["env_id"] = "Pendulum-v1"
    with pytest.warns(DataWarning, match="dropped"):  # rows without a next observation
        meta = convert(str(path), tmp_path / "out", shards=1)
    assert meta["env_id"] == "Pendulum-v1" and json.loads(meta["env_spec"])["id"] == "Pendulum-v1"
    assert meta["action_space"] == {"type": "Box", "shape": [1], "low": [-2.0], "high": [2.0]}
    assert meta["observation_space"]["high"] == [1.0, 1.0, 8.0]


# ---------------------------------------------------------------------------------------------------------
# RLlib-recorded Parquet

def pack(a: np.ndarray) -> str:
    """What RLlib's `pack` (output_compress_columns) writes: base64(lz4(pickle(array)))."""
    import lz4.frame

    return base64.b64encode(lz4.frame.compress(pickle.dumps(a))).decode("ascii")


def rllib_rows(eps, names=("a", "b", "c")):
    """RLlib's columnar rows: one per step, only the last step of an episode carries its flag."""
    r = flat_rows(eps)
    n = len(r["rewards"])
    t = np.concatenate([np.arange(len(e["rewards"])) for e in eps])
    return r, {"eps_id": [f"{names[i]}-{'0' * 20}" for i in r["episode"]], "agent_id": [None] * n,
               "obs": r["observations"], "actions": r["actions"], "rewards": r["rewards"].astype(np.float64),
               "new_obs": r["next_observations"], "terminateds": r["terminations"],
               "truncateds": r["truncations"], "t": t}


def take(cols: dict, idx) -> dict:
    return {k: ([v[i] for i in idx] if isinstance(v, list) else v[idx]) for k, v in cols.items()}


def test_rllib_parquet_split_episodes_and_truncation(ray_cluster, tmp_path):
    eps = episodes(obs_dim=4, act_dim=2, layout=[(5, "trunc"), (3, "term"), (4, "trunc")])
    r, cols = rllib_rows(eps)
    # RLlib writes several files; an episode may be spread over two of them, rows not in step order
    idx_a = np.array([0, 1, 2, 5, 6, 7])          # episode a steps 0-2, episode b
    idx_b = np.array([4, 3, 11, 8, 9, 10])        # episode a steps 4, 3, then episode c shuffled
    d = tmp_path / "rllib"
    write_parquet(d / "output-0.parquet", take(cols, idx_a), list_type="list")
    write_parquet(d / "output-1.parquet", take(cols, idx_b), list_type="list")
    meta = convert(str(d), tmp_path / "out", shards=2)
    rows = read_converted(tmp_path / "out")
    check_stats(meta, rows)
    check_rows_equal(rows, expected_from_episodes(eps))
    assert meta["source"] == f"rllib:{d}"
    last = np.flatnonzero(rows["episode_id"] == 0)[-1]
    np.testing.assert_array_equal(rows["next_observations"][last], eps[0]["observations"][-1])
    assert rows["truncations"][last] and not rows["terminations"][last]


def test_rllib_compressed_and_ray_tensor_columns_discrete(ray_cluster, tmp_path):
    eps = episodes(obs_dim=3, discrete_n=3, layout=[(3, "term"), (4, "trunc")])
    r, cols = rllib_rows(eps)
    # default RLlib output: obs/new_obs compressed; written through Ray Data like RLlib does
    items = [{"eps_id": cols["eps_id"][i], "obs": pack(cols["obs"][i]), "new_obs": pack(cols["new_obs"][i]),
              "actions": int(cols["actions"][i]), "rewards": float(cols["rewards"][i]),
              "terminateds": bool(cols["terminateds"][i]), "truncateds": bool(cols["truncateds"][i]),
              "t": int(cols["t"][i])} for i in range(len(cols["t"]))]
    d = tmp_path / "rllib"
    ray_cluster.data.from_items(items).repartition(2).write_parquet(str(d))
    meta = convert(str(d), tmp_path / "out", shards=2)
    check_rows_equal(read_converted(tmp_path / "out"), expected_from_episodes(eps), discrete=True)
    assert meta["action_space"] == {"type": "Discrete", "n": 3}

    # uncompressed numpy columns become Ray tensor extension columns
    items = [{**it, "obs": cols["obs"][i], "new_obs": cols["new_obs"][i]} for i, it in enumerate(items)]
    d2 = tmp_path / "rllib2"
    ray_cluster.data.from_items(items).write_parquet(str(d2))
    convert(str(d2), tmp_path / "out2", shards=1)
    check_rows_equal(read_converted(tmp_path / "out2"), expected_from_episodes(eps), discrete=True)


# ---------------------------------------------------------------------------------------------------------
# any Parquet / CSV with a column mapping

def test_mapped_parquet_numbered_columns_and_episode_ids(ray_cluster, tmp_path):
    eps = episodes(obs_dim=3, act_dim=2, layout=[(4, "trunc"), (3, "term"), (2, "trunc")])
    r = flat_rows(eps)
    cols = {f"o_{i}": r["observations"][:, i] for i in range(3)}
    cols.update({f"no_{i}": r["next_observations"][:, i] for i in range(3)})
    cols.update(act=r["actions"], rew=r["rewards"], done=r["terminations"].astype(np.int64),
                cut=r["truncations"], ep=r["episode"] * 10 + 7)
    path = write_parquet(tmp_path / "log.parquet", cols)
    mapping = {"observations": "o_*", "next_observations": "no_*", "actions": "act", "rewards": "rew",
               "terminations": "done", "truncations": "cut", "episode_id": "ep"}
    meta = convert(str(path), tmp_path / "out", shards=2, mapping=mapping)
    rows = read_converted(tmp_path / "out")
    check_stats(meta, rows)
    check_rows_equal(rows, expected_from_episodes(eps))
    assert meta["source"] == f"parquet:{path}"


def test_mapped_csv_without_next_observations(ray_cluster, tmp_path):
    eps = episodes(obs_dim=2, discrete_n=4, layout=[(3, "term"), (4, "trunc"), (3, "none")])
    r = flat_rows(eps)
    lines = ["x0,x1,a,r,terminal,timeout"]
    for i in range(len(r["rewards"])):
        o = r["observations"][i]
        lines.append(f"{float(o[0])!r},{float(o[1])!r},{r['actions'][i]},{float(r['rewards'][i])!r},"
                     f"{int(r['terminations'][i])},"
                     f"{int(r['truncations'][i])}")
    path = tmp_path / "log.csv"
    path.write_text("\n".join(lines) + "\n")
    mapping = {"observations": "x*", "actions": "a", "rewards": "r", "terminations": "terminal",
               "truncations": "timeout"}
    from rayoffline.cli import main

    assert main(["data", "convert", str(path), "--out", str(tmp_path / "out"), "--shards", "2",
                 "--map", "observations=x*,actions=a", "--map", "rewards=r,terminations=terminal,truncations=timeout"]) == 0
    meta = read_metadata(tmp_path / "out")
    rows = read_converted(tmp_path / "out")
    check_stats(meta, rows)
    assert meta["source"] == f"csv:{path}"
    assert meta["action_space"] == {"type": "Discrete", "n": int(r["actions"].max()) + 1}
    # terminal episode keeps all 3 rows; the truncated and the cut episode lose their last row
    np.testing.assert_array_equal(rows["episode_id"], [0, 0, 0, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(rows["truncations"], [0, 0, 0, 0, 0, 1, 0, 1])
    np.testing.assert_array_equal(rows["terminations"], [0, 0, 1, 0, 0, 0, 0, 0])
    keep = np.array([1, 1, 1, 1, 1, 1, 0, 1, 1, 0], bool)
    np.testing.assert_allclose(rows["observations"], r["observations"][keep].astype(np.float32))
    np.testing.assert_allclose(rows["next_observations"][3:6], r["observations"][4:7])
    assert mapping  # the same mapping as the CLI flags above


def test_converted_directory_reconverts_with_its_spaces(ray_cluster, minari_root, tmp_path):
    eps = episodes(act_scale=2.0)
    make_minari("test/reshard-v0", eps)
    a = convert("minari:test/reshard-v0", tmp_path / "a", shards=4)
    b = convert(str(tmp_path / "a"), tmp_path / "b", shards=1)
    assert b["partitions"][0]["content_hash"] == a["partitions"][0]["content_hash"]
    assert (b["observation_space"], b["action_space"], b["env_id"]) == (a["observation_space"], a["action_space"],
                                                                       a["env_id"])


# ---------------------------------------------------------------------------------------------------------
# append

def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_append_adds_a_partition_and_updates_metadata(ray_cluster, minari_root, tmp_path):
    eps = episodes(obs_dim=3, act_dim=1, act_scale=2.0)
    make_minari("test/base-v0", eps)
    out = tmp_path / "ds"
    meta0 = convert("minari:test/base-v0", out, shards=2)
    before = tree_digest(out)

    new_eps = episodes(obs_dim=3, act_dim=1, layout=[(3, "trunc"), (2, "term")], seed=5, act_scale=2.0)
    r = flat_rows(new_eps)
    src = write_parquet(tmp_path / "new.parquet", {
        "observations": r["observations"], "actions": r["actions"], "rewards": r["rewards"],
        "next_observations": r["next_observations"], "terminations": r["terminations"],
        "truncations": r["truncations"]})
    meta = append(str(src), out, shards=2)

    after = tree_digest(out)
    assert {k: v for k, v in after.items() if k in before and k != "_rayoffline.json"} == \
           {k: v for k, v in before.items() if k != "_rayoffline.json"}  # existing shards untouched
    assert meta["partitions"][:1] == meta0["partitions"]
    assert meta["partitions"][1]["name"] == "part-00001"
    assert meta["partitions"][1]["files"] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert meta["partitions"][1]["source"] == f"parquet:{src}"
    assert sorted(p.name for p in out.iterdir()) == ["_rayoffline.json", "part-00000", "part-00001"]
    assert read_metadata(out) == json.loads(json.dumps(meta))
    rows = read_converted(out)
    check_stats(meta, rows)  # statistics over both partitions, pooled observation moments included
    np.testing.assert_array_equal(np.unique(rows["episode_id"]), np.arange(5))
    assert meta["num_episodes"] == 5 and meta["num_transitions"] == 12 + 5
    assert meta["content_hash"] != meta0["content_hash"]
    assert (meta["env_id"], meta["source"], meta["ref_max_score"]) == ("Pendulum-v1", meta0["source"], -100.0)

    # a second append of the same source needs allow_duplicate; it gets part-00002 and ids after the last ones
    meta2 = append(str(src), out, allow_duplicate=True)
    assert meta2["partitions"][2]["name"] == "part-00002" and meta2["partitions"][2]["duplicate_of"] == "part-00001"
    assert meta2["partitions"][2]["files"] == ["shard-00000.parquet"]  # default: by size
    assert meta2["num_episodes"] == 7
    np.testing.assert_array_equal(np.unique(read_converted(out)["episode_id"]), np.arange(7))


def test_failed_append_leaves_dataset_as_it_was(ray_cluster, minari_root, tmp_path, monkeypatch):
    conv = importlib.import_module("rayoffline.data.convert")  # the module (rayoffline.data.convert is the function)

    make_minari("test/base2-v0", episodes(act_scale=2.0))
    out = tmp_path / "ds"
    convert("minari:test/base2-v0", out, shards=2)
    before = tree_digest(out)
    r = flat_rows(episodes(seed=3, act_scale=2.0))
    src = write_parquet(tmp_path / "new.parquet", {
        "observations": r["observations"], "actions": r["actions"], "rewards": r["rewards"],
        "terminations": r["terminations"], "truncations": r["truncations"]})

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(conv, "write_metadata", broken)  # fails after the partition was written and renamed
    with pytest.raises(OSError, match="disk full"):
        append(str(src), out)
    assert tree_digest(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["_rayoffline.json", "part-00000"]


def test_failed_convert_leaves_nothing(ray_cluster, minari_root, tmp_path, monkeypatch):
    conv = importlib.import_module("rayoffline.data.convert")  # the module (rayoffline.data.convert is the function)

    make_minari("test/fail-v0", episodes())

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(conv, "write_metadata", broken)
    with pytest.raises(OSError, match="disk full"):
        convert("minari:test/fail-v0", tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["minari"]


def test_read_metadata_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="no such dataset directory"):
        read_metadata(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match=r"_rayoffline.json: missing"):
        read_metadata(tmp_path / "d")
    (tmp_path / "d" / "_rayoffline.json").write_text('{"schema_version": 1, "source": ')
    with pytest.raises(DataError, match=r"d/_rayoffline.json: corrupt JSON"):
        read_metadata(tmp_path / "d")
    (tmp_path / "d" / "_rayoffline.json").write_text('{"schema_version": 1}')
    with pytest.raises(DataError, match=r"d/_rayoffline.json: corrupt or not a rayoffline dataset: missing keys"):
        read_metadata(tmp_path / "d")
