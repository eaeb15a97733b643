"""Bad input: every error names the file, the column and (where it applies) the row; the CLI exits 2 and no
output is left behind."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayoffline.cli import main
from rayoffline.data import append, convert
from rayoffline.errors import DataWarning

from ._convert_helpers import episodes, make_minari, write_hdf5, write_parquet


@pytest.fixture
def minari_root(tmp_path, monkeypatch):
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def cli_error(capsys, *args: str) -> str:
    """Run `rayoffline data ...` in-process; it must exit 2 with one error line; returns that line."""
    capsys.readouterr()
    rc = main(["data", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("rayoffline: error: ") and err.count("\n") == 1, err
    return err


def convert_error(capsys, tmp_path, source, *extra: str) -> str:
    out = tmp_path / "out"
    err = cli_error(capsys, "convert", str(source), "--out", str(out), *extra)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
    return err


def good_columns(n=12, obs_dim=3, act_dim=2, seed=0):
    rng = np.random.default_rng(seed)
    term = np.zeros(n, bool)
    term[n // 2 - 1] = True
    trunc = np.zeros(n, bool)
    trunc[-1] = True
    return {"observations": rng.standard_normal((n, obs_dim)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
            "rewards": rng.standard_normal(n).astype(np.float32),
            "terminations": term, "truncations": trunc}


def d4rl(n=10, obs_dim=3):
    c = good_columns(n, obs_dim)
    return {"observations": c["observations"], "actions": c["actions"], "rewards": c["rewards"],
            "terminals": c["terminations"], "timeouts": c["truncations"]}


# ---------------------------------------------------------------------------------------------------------
# missing column

def test_missing_column_parquet(capsys, tmp_path):
    cols = good_columns()
    del cols["rewards"]
    path = write_parquet(tmp_path / "log.parquet", cols)
    err = convert_error(capsys, tmp_path, path)
    assert str(path) in err and "missing column for 'rewards'" in err and "--map rewards=COLUMN" in err


def test_mapped_column_not_found(capsys, tmp_path):
    path = write_parquet(tmp_path / "log.parquet", good_columns())
    err = convert_error(capsys, tmp_path, path, "--map", "rewards=reward")
    assert str(path) in err and "column 'reward' (mapped to rewards) not found" in err
    err = convert_error(capsys, tmp_path, path, "--map", "obs=observations")
    assert "unknown field 'obs'" in err


def test_missing_key_hdf5(capsys, tmp_path):
    cols = d4rl()
    del cols["timeouts"]
    path = write_hdf5(tmp_path / "d.hdf5", cols)
    err = convert_error(capsys, tmp_path, path)
    assert str(path) in err and "missing dataset (column) 'timeouts'" in err


# ---------------------------------------------------------------------------------------------------------
# wrong dtype or shape

def test_wrong_dtype(capsys, tmp_path):
    cols = good_columns()
    cols["rewards"] = np.array([f"r{i}" for i in range(12)])
    path = write_parquet(tmp_path / "log.parquet", cols)
    err = convert_error(capsys, tmp_path, path)
    assert str(path) in err and "column 'rewards' has dtype string" in err

    cols = d4rl()
    cols["observations"] = np.array([[b"a", b"b", b"c"]] * 10)
    path = write_hdf5(tmp_path / "d.hdf5", cols)
    err = convert_error(capsys, tmp_path, path)
    assert str(path) in err and "column 'observations' has dtype |S1" in err


def test_flags_must_be_bool_or_01(capsys, tmp_path):
    cols = good_columns()
    cols["terminations"] = np.zeros(12, np.int64)
    cols["terminations"][4] = 2
    path = write_parquet(tmp_path / "log.parquet", cols)
    err = convert_error(capsys, tmp_path, path)
    assert str(path) in err and "column 'terminations'" in err and "row 4" in err


def test_wrong_shape_variable_length_rows(capsys, tmp_path):
    cols = good_columns()
    obs = [list(map(float, o)) for o in cols.pop("observations")]
    obs[3] = obs[3][:2]
    table = pa.table({"observations": pa.array(obs), **{k: pa.array(v if v.ndim == 1 else list(v))
                                                        for k, v in cols.items()}})
    path = tmp_path / "log.parquet"
    pq.write_table(table, path)
    err = convert_error(capsys, tmp_path, path)
    assert str(path) in err and "column 'observations'" in err and "2 values at row 3" in err


def test_wrong_shape_hdf5(capsys, tmp_path):
    cols = d4rl()
    cols["rewards"] = np.zeros((10, 2), np.float32)
    path = write_hdf5(tmp_path / "d.hdf5", cols)
    err = convert_error(capsys, tmp_path, path)
    assert str(path) in err and "column 'rewards' has shape (2,)" in err

    cols = d4rl()
    cols["actions"] = cols["actions"][:7]
    path = write_hdf5(tmp_path / "e.hdf5", cols)
    err = convert_error(capsys, tmp_path, path)
    assert str(path) in err and "different numbers of rows" in err and "'actions': 7" in err


def test_null_value_names_row(capsys, tmp_path):
    cols = good_columns()
    rewards = [float(x) for x in cols.pop("rewards")]
    rewards[5] = None
    table = pa.table({"rewards": pa.array(rewards), **{k: (pa.array(v) if v.ndim == 1 else
                                                           pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1]))
                                                       for k, v in cols.items()}})
    path = tmp_path / "log.parquet"
    pq.write_table(table, path)
    err = convert_error(capsys, tmp_path, path)
    assert str(path) in err and "column 'rewards' is empty (null) at row 5" in err


def test_image_or_dict_observations_refused(capsys, tmp_path, minari_root):
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer
    import minari
    import warnings

    eps = [EpisodeBuffer(id=0, observations={"pos": np.zeros((4, 2), np.float32)}, actions=np.zeros((3, 1), np.float32),
                         rewards=[0.0] * 3, terminations=[False, False, True], truncations=[False] * 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(
            "test/dict-v0", eps, observation_space=gym.spaces.Dict({"pos": gym.spaces.Box(-1, 1, (2,))}),
            action_space=gym.spaces.Box(-1, 1, (1,)), author="t", author_email="t", code_permalink="t",
            algorithm_name="t", description="t")
    err = convert_error(capsys, tmp_path, "minari:test/dict-v0")
    assert "minari:test/dict-v0" in err and "observation space Dict is not supported" in err

    # RLlib/Ray tensor columns of images (what Ray Data writes for numpy array cells)
    from ray.data.extensions import ArrowTensorArray

    d = tmp_path / "img"
    d.mkdir()
    n = 3
    pq.write_table(pa.table({"obs": ArrowTensorArray.from_numpy(np.zeros((n, 2, 2), np.float32)),
                             "new_obs": ArrowTensorArray.from_numpy(np.zeros((n, 2, 2), np.float32)),
                             "actions": pa.array([0] * n), "rewards": pa.array([0.0] * n),
                             "terminateds": pa.array([False] * n), "eps_id": pa.array(["a"] * n)}),
                   d / "part-0.parquet")
    err = convert_error(capsys, tmp_path, d)
    assert str(d) in err and "column 'obs' holds tensors of shape (2, 2)" in err


# ---------------------------------------------------------------------------------------------------------
# NaN / inf

def test_nan_observation_names_first_bad_row(capsys, tmp_path):
    cols = good_columns()
    cols["observations"][7, 1] = np.nan
    cols["observations"][9, 0] = np.inf
    path = write_parquet(tmp_path / "log.parquet", cols)
    err = convert_error(capsys, tmp_path, path)
    assert str(path) in err and "column 'observations'" in err and "row 7" in err and "2 row(s)" in err


def test_inf_reward_hdf5_names_row(capsys, tmp_path):
    cols = d4rl()
    cols["rewards"][3] = -np.inf
    path = write_hdf5(tmp_path / "d.hdf5", cols)
    err = convert_error(capsys, tmp_path, path)
    assert str(path) in err and "column 'rewards'" in err and "row 3" in err


def test_nan_in_minari_names_episode_and_step(capsys, tmp_path, minari_root):
    eps = episodes()
    eps[1]["observations"][2, 0] = np.nan
    make_minari("test/nan-v0", eps)
    err = convert_error(capsys, tmp_path, "minari:test/nan-v0")
    assert "minari:test/nan-v0" in err and "column 'observations'" in err and "episode 1, step 2" in err

    eps = episodes()
    eps[2]["actions"][1, 0] = np.nan
    make_minari("test/nan-v1", eps)
    err = convert_error(capsys, tmp_path, "minari:test/nan-v1")
    assert "column 'actions'" in err and "episode 2, step 1" in err


# ---------------------------------------------------------------------------------------------------------
# inconsistent files, actions outside the space

def test_observation_dimension_changes_between_files(capsys, tmp_path):
    a = write_parquet(tmp_path / "logs" / "a.parquet", good_columns(obs_dim=3))
    b = write_parquet(tmp_path / "logs" / "b.parquet", good_columns(obs_dim=4))
    err = convert_error(capsys, tmp_path, tmp_path / "logs")
    assert "observation dimension changes between files" in err
    assert f"{a} has 3" in err and f"{b} has 4" in err and "column 'observations'" in err


def test_actions_outside_action_space(capsys, tmp_path, minari_root):
    eps = episodes(act_scale=2.0)
    eps[2]["actions"][1, 0] = 3.5  # Pendulum-v1 torques lie in [-2, 2]
    make_minari("test/act-v0", eps)
    err = convert_error(capsys, tmp_path, "minari:test/act-v0")
    assert "column 'actions'" in err and "episode 2, step 1" in err and "outside the action space" in err

    # an env id gives the space for a source without one
    cols = good_columns(obs_dim=3, act_dim=1)
    cols["actions"][6, 0] = -2.5
    path = write_parquet(tmp_path / "log.parquet", cols)
    err = convert_error(capsys, tmp_path, path, "--env-id", "Pendulum-v1")
    assert str(path) in err and "column 'actions'" in err and "row 6" in err and "[-2.5]" in err


def test_negative_discrete_action(capsys, tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("o_0,o_1,act,rew,done\n" + "".join(
        f"0.{i},1.{i},{-1 if i == 4 else i % 2},1.0,{int(i == 5)}\n" for i in range(6)))
    err = convert_error(capsys, tmp_path, path, "--map", "observations=o_*,actions=act,rewards=rew,terminations=done")
    # CSV: the file line (header = line 1), so data row 4 is line 6
    assert str(path) in err and "column 'act'" in err and "at line 6" in err and "negative discrete action -1" in err


def test_flag_in_the_middle_of_an_episode(capsys, tmp_path):
    cols = good_columns()
    cols["episode_id"] = np.repeat([0, 1], 6)
    cols["terminations"][:] = False
    cols["terminations"][2] = True
    path = write_parquet(tmp_path / "log.parquet", cols)
    err = convert_error(capsys, tmp_path, path)
    assert str(path) in err and "row 2 (0-based) ends its episode (column 'terminations' is set)" in err
    assert "row 3 (0-based)" in err


# ---------------------------------------------------------------------------------------------------------
# empty, unreadable, existing output

def test_empty_dataset(capsys, tmp_path):
    cols = {k: v[:0] for k, v in good_columns().items()}
    path = write_parquet(tmp_path / "log.parquet", cols)
    err = convert_error(capsys, tmp_path, path)
    assert str(path) in err and "empty dataset" in err

    path = write_hdf5(tmp_path / "d.hdf5", {k: v[:0] for k, v in d4rl().items()})
    err = convert_error(capsys, tmp_path, path)
    assert str(path) in err and "empty dataset" in err


def test_unreadable_or_corrupt_files(capsys, tmp_path):
    bad = tmp_path / "log.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    err = convert_error(capsys, tmp_path, bad)
    assert str(bad) in err and "cannot read this Parquet file" in err

    good = write_parquet(tmp_path / "t.parquet", good_columns())
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[:-40])
    err = convert_error(capsys, tmp_path, cut)
    assert str(cut) in err and "cannot read this Parquet file" in err

    h5 = tmp_path / "d.hdf5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    err = convert_error(capsys, tmp_path, h5)
    assert str(h5) in err and "cannot open as HDF5" in err

    err = convert_error(capsys, tmp_path, tmp_path / "nope.parquet")
    assert "nope.parquet" in err and "not found" in err
    other = tmp_path / "data.bin"
    other.write_bytes(b"x")
    err = convert_error(capsys, tmp_path, other)
    assert str(other) in err and "unknown file type '.bin'" in err


def test_output_directory_exists(capsys, tmp_path):
    path = write_parquet(tmp_path / "log.parquet", good_columns())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = cli_error(capsys, "convert", str(path), "--out", str(out))
    assert str(out) in err and "already exists" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_bad_shards(capsys, tmp_path):
    path = write_parquet(tmp_path / "log.parquet", good_columns())
    err = convert_error(capsys, tmp_path, path, "--shards", "0")
    assert "--shards 0" in err


# ---------------------------------------------------------------------------------------------------------
# append

def digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_appends_leave_dataset_unchanged(capsys, tmp_path, ray_cluster):
    src = write_parquet(tmp_path / "a.parquet", good_columns(obs_dim=3, act_dim=2))
    ds = tmp_path / "ds"
    with pytest.warns(DataWarning, match="dropped"):  # rows without a next observation
        convert(str(src), ds, shards=2)
    before = digest(ds)

    wrong_dim = write_parquet(tmp_path / "b.parquet", good_columns(obs_dim=5, act_dim=2))
    err = cli_error(capsys, "append", str(wrong_dim), "--to", str(ds))
    assert str(wrong_dim) in err and "5 values per row" in err and "'observations'" in err

    cols = good_columns(obs_dim=3, act_dim=2, seed=1)
    cols["actions"][8] = [0.5, 1.5]
    outside = write_parquet(tmp_path / "c.parquet", cols)
    err = cli_error(capsys, "append", str(outside), "--to", str(ds))
    assert str(outside) in err and "column 'actions'" in err and "row 8" in err and "outside the action space" in err

    cols = good_columns(obs_dim=3, act_dim=2, seed=2)
    cols["actions"] = np.arange(12, dtype=np.int64) % 2
    discrete = write_parquet(tmp_path / "d.parquet", cols)
    err = cli_error(capsys, "append", str(discrete), "--to", str(ds))
    assert str(discrete) in err and "integer (discrete) actions" in err

    assert digest(ds) == before
    assert sorted(p.name for p in ds.iterdir()) == ["_rayoffline.json", "part-00000"]

    (ds / "_rayoffline.json").write_text("{not json")
    err = cli_error(capsys, "append", str(src), "--to", str(ds))
    assert str(ds / "_rayoffline.json") in err and "corrupt JSON" in err
    err = cli_error(capsys, "append", str(src), "--to", str(tmp_path / "missing"))
    assert "missing" in err and "no such dataset directory" in err
    with pytest.raises(Exception):
        append(str(src), tmp_path / "missing")


def test_cli_subprocess_exits_2(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "rayoffline", "data", "convert", str(tmp_path / "nope.h5"), "--out",
                        str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "rayoffline: error: source" in r.stderr and "nope.h5" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
