"""Logged action probabilities (the optional `action_logp` column, rayoffline/data/schema.py): picked up from RLlib
recordings and D4RL HDF5, mapped from Parquet/CSV/HDF5 columns of log-probabilities or probabilities, checked row by
row, carried with their rows through episode assembly, hashed only when present, recorded in the metadata, kept
consistent by `append`, and read back by `load_episodes`."""
from __future__ import annotations

import hashlib
import importlib
import json
import re
import uuid
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayoffline.cli import main
from rayoffline.data import append, convert
from rayoffline.data.holdout import load_episodes
from rayoffline.data.metadata import content_hash, has_action_logp
from rayoffline.data.schema import COLUMNS
from rayoffline.errors import DataError, DataWarning

from ._convert_helpers import episodes, flat_rows, read_converted, write_hdf5, write_parquet

conv = importlib.import_module("rayoffline.data.convert")
LAYOUT = [(5, "term"), (4, "trunc"), (6, "trunc"), (3, "term")]


def _code(rewards):
    """A log-probability tied to each row's reward (rewards are distinct and travel with their rows): which row
    a logged value belongs to after conversion reorders, renumbers and drops rows."""
    return -(0.1 + np.abs(np.asarray(rewards, np.float64)))


def _rows(discrete_n=None, act_dim=2, layout=LAYOUT, seed=0):
    eps = episodes(obs_dim=3, act_dim=act_dim, discrete_n=discrete_n, layout=layout, seed=seed)
    r = flat_rows(eps)
    r["step"] = np.concatenate([np.arange(len(e["rewards"])) for e in eps]).astype(np.int64)
    return r


def _shuffled(r, seed=1):
    perm = np.random.default_rng(seed).permutation(len(r["rewards"]))
    return {k: v[perm] for k, v in r.items()}


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return fn(*a, **kw)


MAP = {"episode_id": "episode", "step": "step"}


def test_mapped_probabilities_discrete_are_logged_and_follow_their_rows(tmp_path):
    r = _shuffled(_rows(discrete_n=3))                      # rows out of order: assembly reorders them by step
    r["p"] = np.exp(_code(r["rewards"]))         # probabilities in (0, 1)
    src = write_parquet(tmp_path / "src.parquet", r)
    meta = convert(str(src), tmp_path / "out", mapping={**MAP, "action_prob": "p"})
    schema = pq.read_schema(tmp_path / "out" / "part-00000" / meta["partitions"][0]["files"][0])
    assert tuple(schema.names) == COLUMNS + ("action_logp",) and schema.field("action_logp").type == pa.float32()
    assert meta["action_logp"] is True and meta["partitions"][0]["action_logp"] is True
    assert list(meta)[-2:] == ["action_logp", "partitions"] and has_action_logp(meta)
    c = read_converted(tmp_path / "out")
    np.testing.assert_allclose(c["action_logp"], _code(c["rewards"]), rtol=1e-6)
    assert c["action_logp"].dtype == np.float32
    # the hash covers the column: the v1 definition over the schema's columns, then action_logp
    assert meta["partitions"][0]["content_hash"] == content_hash(c)
    assert meta["partitions"][0]["content_hash"] != content_hash({k: c[k] for k in COLUMNS})


def test_mapped_log_densities_continuous_with_derived_next_observations(tmp_path):
    r = _rows(act_dim=2)
    del r["next_observations"]                               # the last row of a truncated episode is dropped
    r["lp"] = _code(r["rewards"]) + 3.0           # log-densities may be positive
    src = write_parquet(tmp_path / "src.parquet", r)
    meta = _quiet(convert, str(src), tmp_path / "out", mapping={**MAP, "action_logp": "lp"})
    c = read_converted(tmp_path / "out")
    assert meta["num_transitions"] == len(r["rewards"]) - 2  # two truncated episodes lose their last row
    np.testing.assert_allclose(c["action_logp"], _code(c["rewards"]) + 3.0, rtol=1e-6)
    ep = load_episodes(tmp_path / "out", part="all")
    np.testing.assert_allclose(ep.action_logp, _code(ep.batch.rewards.numpy()) + 3.0, rtol=1e-6)


def test_csv_and_hdf5_map_probabilities_and_d4rl_log_probs_are_picked_up(tmp_path, capsys):
    r = _rows(act_dim=1)
    cols = {"o_0": r["observations"][:, 0], "o_1": r["observations"][:, 1], "o_2": r["observations"][:, 2],
            "a": r["actions"][:, 0], "r": r["rewards"], "done": r["terminations"].astype(int),
            "trunc": r["truncations"].astype(int), "dens": np.exp(_code(r["rewards"]) + 2.0)}
    csv = tmp_path / "log.csv"
    import pandas as pd
    pd.DataFrame(cols).to_csv(csv, index=False)
    assert main(["data", "convert", str(csv), "--out", str(tmp_path / "csv"), "--map",
                 "observations=o_*,actions=a,rewards=r,terminations=done,truncations=trunc,action_prob=dens"]) == 0
    capsys.readouterr()
    c = read_converted(tmp_path / "csv")
    assert (c["action_logp"] > 0).any()                      # densities above 1 are fine for continuous actions
    np.testing.assert_allclose(c["action_logp"], _code(c["rewards"]) + 2.0, rtol=1e-6)

    h5 = {"observations": r["observations"], "actions": r["actions"], "rewards": r["rewards"],
          "terminals": r["terminations"], "timeouts": r["truncations"],
          "next_observations": r["next_observations"], "infos/action_log_probs": _code(r["rewards"])}
    write_hdf5(tmp_path / "d4rl.hdf5", h5)
    meta = convert(str(tmp_path / "d4rl.hdf5"), tmp_path / "h5")
    assert meta["action_logp"] is True
    c = read_converted(tmp_path / "h5")
    np.testing.assert_allclose(c["action_logp"], _code(c["rewards"]), rtol=1e-6)
    h5["pb"] = np.exp(h5.pop("infos/action_log_probs"))
    write_hdf5(tmp_path / "mapped.hdf5", h5)
    convert(str(tmp_path / "mapped.hdf5"), tmp_path / "h5b", mapping={"action_prob": "pb"})
    np.testing.assert_allclose(read_converted(tmp_path / "h5b")["action_logp"], c["action_logp"], rtol=1e-6)
    meta = convert(str(tmp_path / "mapped.hdf5"), tmp_path / "h5c")        # no known key: no column
    assert "action_logp" not in meta and "action_logp" not in read_converted(tmp_path / "h5c")


def _rllib_table(r, logp_column="action_logp", discrete=True):
    """Rows as RLlib's offline recording writes them (new API stack: extra model outputs as columns)."""
    ids = [str(uuid.UUID(int=int(e) + 1)) for e in r["episode"]]
    cols = {"eps_id": pa.array(ids), "agent_id": pa.array([None] * len(ids), pa.string()),
            "obs": pa.array(list(r["observations"].astype(np.float64))),
            "actions": pa.array(r["actions"]), "rewards": pa.array(r["rewards"].astype(np.float64)),
            "new_obs": pa.array(list(r["next_observations"].astype(np.float64))),
            "terminateds": pa.array(r["terminations"]), "truncateds": pa.array(r["truncations"]),
            "t": pa.array(r["step"]), "action_dist_inputs": pa.array([[0.1, 0.2, 0.3]] * len(ids))}
    lp = _code(r["rewards"])
    cols[logp_column] = pa.array(lp if logp_column == "action_logp" else np.exp(lp))
    return pa.table(cols)


def test_rllib_recordings_carry_action_logp_or_action_prob(tmp_path):
    r = _shuffled(_rows(discrete_n=3))
    for name in ("action_logp", "action_prob"):
        d = tmp_path / name
        d.mkdir()
        t = _rllib_table(r, name)
        pq.write_table(t.slice(0, 9), d / "a.parquet")      # an episode continues in the next file
        pq.write_table(t.slice(9), d / "b.parquet")
        meta = convert(str(d), tmp_path / f"out-{name}")
        assert meta["source"].startswith("rllib:") and meta["action_logp"] is True
        c = read_converted(tmp_path / f"out-{name}")
        np.testing.assert_allclose(c["action_logp"], _code(c["rewards"]), rtol=1e-6)


def _write(tmp_path, name, **extra):
    r = _rows(discrete_n=3)
    r.update(extra)
    return write_parquet(tmp_path / f"{name}.parquet", r)


@pytest.mark.parametrize("column,values,field,message", [
    ("p", lambda n: np.r_[np.full(n - 3, 0.5), 0.0, 0.5, 0.5], "action_prob",
     r"column 'p' \(action_prob\) holds 0\.0 at row 15 \(0-based\), which is <= 0"),
    ("p", lambda n: np.r_[np.full(4, 0.5), 1.5, np.full(n - 5, 0.5)], "action_prob",
     r"column 'p' \(action_prob\) holds 1\.5 at row 4 \(0-based\), which is above 1"),
    ("lp", lambda n: np.r_[np.full(7, -1.0), np.nan, np.full(n - 8, -1.0)], "action_logp",
     r"column 'lp' holds NaN \(not a number\) at row 7 \(0-based\)"),
    ("lp", lambda n: np.r_[np.full(2, -1.0), np.inf, np.full(n - 3, -1.0)], "action_logp",
     r"column 'lp' holds \+inf at row 2 \(0-based\)"),
    ("lp", lambda n: np.r_[np.full(n - 1, -1.0), 0.5], "action_logp",
     r"column 'lp' \(action_logp\) holds 0\.5 at row 17 \(0-based\): a log-probability above 0.*--map action_prob=lp"),
    ("lp", lambda n: np.full(n, "x"), "action_logp", r"column 'lp' holds text/bytes that are not RLlib-compressed"),
])
def test_bad_values_are_errors_naming_file_column_and_row(tmp_path, column, values, field, message):
    n = sum(length for length, _ in LAYOUT)
    src = _write(tmp_path, "bad", **{column: values(n)})
    with pytest.raises(DataError, match=re.escape(str(src)) + ": " + message):
        convert(str(src), tmp_path / "out", mapping={**MAP, field: column})
    assert not (tmp_path / "out").exists()


def test_mapping_mistakes_and_mixed_files_are_errors(tmp_path):
    n = sum(length for length, _ in LAYOUT)
    src = _write(tmp_path, "src", p=np.full(n, 0.5), lp=np.full(n, -1.0))
    with pytest.raises(DataError, match="map one of them"):
        convert(str(src), tmp_path / "o1", mapping={**MAP, "action_prob": "p", "action_logp": "lp"})
    with pytest.raises(DataError, match=r"column 'nope' \(mapped to action_logp\) not found"):
        convert(str(src), tmp_path / "o2", mapping={**MAP, "action_logp": "nope"})
    d = tmp_path / "mixed"
    _write(d, "a", action_logp=np.full(n, -1.0))
    _write(d, "b")
    with pytest.raises(DataError, match=r"b\.parquet: has no logged action probabilities but .*a\.parquet has them"):
        convert(str(d), tmp_path / "o3", mapping=MAP)


def test_hash_of_data_without_the_column_is_unchanged_and_blocks_agree(tmp_path, monkeypatch):
    r = _rows(act_dim=2, layout=[(n, "trunc") for n in range(3, 40)])
    plain = write_parquet(tmp_path / "plain.parquet", r)
    a = convert(str(plain), tmp_path / "plain", mapping=MAP)
    c = read_converted(tmp_path / "plain")
    assert "action_logp" not in a and "action_logp" not in a["partitions"][0] and "action_logp" not in c
    assert a["partitions"][0]["content_hash"] == content_hash(c)   # schema version 1's definition, as before

    r["lp"] = _code(r["rewards"])
    src = write_parquet(tmp_path / "logp.parquet", r)
    whole = convert(str(src), tmp_path / "whole", mapping={**MAP, "action_logp": "lp"})
    rows = read_converted(tmp_path / "whole")
    assert {k: rows[k].tobytes() for k in COLUMNS} == {k: c[k].tobytes() for k in COLUMNS}
    assert whole["partitions"][0]["content_hash"] == content_hash(rows) != a["partitions"][0]["content_hash"]
    # in blocks and hash pieces (in this process): the same rows and the piece hash over all nine columns
    md = importlib.import_module("rayoffline.data.metadata")
    row_bytes = sum(v[:1].nbytes for v in rows.values())
    monkeypatch.setattr(md, "HASH_PIECE_BYTES", 50 * row_bytes)
    monkeypatch.setattr(conv, "BLOCK_BYTES", 4000)
    b = convert(str(src), tmp_path / "blocks", mapping={**MAP, "action_logp": "lp"}, shards=3)
    n = len(rows["rewards"])
    pieces = [bytes.fromhex(content_hash({k: v[i:i + 50] for k, v in rows.items()})) for i in range(0, n, 50)]
    assert b["partitions"][0]["content_hash"] == hashlib.sha256(
        f"pieces:50:{n};".encode() + b"".join(pieces)).hexdigest()
    got = read_converted(tmp_path / "blocks")
    for k in rows:
        np.testing.assert_array_equal(got[k], rows[k], err_msg=k)


def test_append_keeps_the_dataset_flag_consistent(tmp_path):
    n = sum(length for length, _ in LAYOUT)
    logp = _write(tmp_path, "logp", lp=np.full(n, -0.5))
    plain = _write(tmp_path, "plain", rewards=np.ones(n, np.float32))
    more = _write(tmp_path, "more", lp=np.full(n, -2.0), rewards=np.full(n, 2.0, np.float32))
    ds = tmp_path / "ds"
    convert(str(logp), ds, mapping={**MAP, "action_logp": "lp"}, holdout=0.5)
    meta = append(str(more), ds, mapping={**MAP, "action_logp": "lp"})
    assert meta["action_logp"] is True and [p.get("action_logp") for p in meta["partitions"]] == [True, True]
    ep = load_episodes(ds, part="all")
    by_reward = {float(r): set(ep.action_logp[ep.batch.rewards.numpy() == r].tolist())
                 for r in np.unique(ep.batch.rewards.numpy())}
    assert by_reward[2.0] == {-2.0} and -0.5 in set(ep.action_logp.tolist())      # each partition's own values
    held = load_episodes(ds)                                                       # the held-out part has them too
    assert held.action_logp is not None and len(held.action_logp) == len(held.step)

    with pytest.warns(DataWarning, match=r"appended as part-00002 without logged action probabilities, but "
                                         r"partition\(s\) part-00000, part-00001 have them"):
        meta = append(str(plain), ds, mapping=MAP)
    saved = json.loads((ds / "_rayoffline.json").read_text())
    assert "action_logp" not in meta and "action_logp" not in saved and not has_action_logp(saved)
    assert [p.get("action_logp") for p in saved["partitions"]] == [True, True, None]
    assert "nothing is filled in" in saved["partitions"][2]["notes"][0]
    assert load_episodes(ds, part="all").action_logp is None and load_episodes(ds).action_logp is None

    with pytest.warns(DataWarning, match=r"appended as part-00003 with logged action probabilities .*, but "
                                         r"partition\(s\) part-00002 have none"):
        meta = append(str(logp), ds, mapping={**MAP, "action_logp": "lp"}, allow_duplicate=True)
    assert "action_logp" not in meta and meta["partitions"][3]["action_logp"] is True

    other = tmp_path / "other"                                  # the reverse: without, then with
    convert(str(plain), other, mapping=MAP)
    with pytest.warns(DataWarning, match=r"but partition\(s\) part-00000 have none"):
        meta = append(str(logp), other, mapping={**MAP, "action_logp": "lp"})
    assert "action_logp" not in meta and load_episodes(other, part="all").action_logp is None
