"""Held-out episodes (rayoffline/data/holdout.py): chosen deterministically, recorded in the metadata only, never
read by training (load, iter_chunks, windows, every rank of a split), read back whole by load_episodes."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from rayoffline import data as data_mod
from rayoffline.cli import main
from rayoffline.data.builtin import resolve
from rayoffline.data.holdout import choose, discounted_to_go, load_episodes, split
from rayoffline.errors import ConfigError, DataError

from ._convert_helpers import episodes, flat_rows, write_parquet


def _key(batch) -> np.ndarray:
    """One sortable row per transition (observation, action, reward)."""
    b = batch
    return np.concatenate([b.observations.numpy(), b.actions.reshape(len(b.rewards), -1).float().numpy(),
                           b.rewards[:, None].numpy()], 1)


def _rows(batch) -> set:
    return set(map(tuple, _key(batch).round(6).tolist()))


@pytest.fixture()
def ds(tmp_path):
    dst = tmp_path / "pendulum"
    shutil.copytree(resolve("builtin:pendulum-medium"), dst)
    return dst


def test_choose_is_deterministic_exact_and_seeded():
    ids = np.arange(1000, 1100)
    a, b = choose(ids, 0.1, 0), choose(ids[::-1], 0.1, 0)
    assert np.array_equal(a, b) and len(a) == 10 and set(a) <= set(ids)
    assert not np.array_equal(a, choose(ids, 0.1, 1))
    assert len(choose(ids[:3], 0.01, 0)) == 1          # at least one episode of a partition with >= 2
    assert len(choose(ids[:2], 0.9, 0)) == 1           # never all of them
    assert len(choose(ids[:1], 0.5, 0)) == 0


def test_split_is_metadata_only_and_training_never_sees_it(ds):
    shards = {p: p.read_bytes() for p in ds.rglob("*.parquet")}
    meta = split(ds, 0.1, seed=3)
    assert {p: p.read_bytes() for p in ds.rglob("*.parquet")} == shards  # no shard rewritten
    h = json.loads((ds / "_rayoffline.json").read_text())["holdout"]
    assert h == meta["holdout"] and h["num_episodes"] == 10 and h["num_transitions"] == 2000
    assert h["fraction"] == 0.1 and h["seed"] == 3

    train, held, full = (data_mod.load(ds, part=p) for p in ("train", "holdout", "all"))
    assert len(train.rewards) == 18000 and len(held.rewards) == 2000 and len(full.rewards) == 20000
    rt, rh = _rows(train), _rows(held)
    assert not rt & rh and len(rt | rh) == len(_rows(full))
    assert torch.equal(data_mod.load(ds).rewards, train.rewards)        # the default is the training part

    chunks = list(data_mod.iter_chunks(ds, memory_budget_bytes=3 << 20))
    assert len(chunks) > 1 and torch.equal(torch.cat([c.rewards for c in chunks]), train.rewards)
    ranks = [data_mod.load(ds, rank=r, world_size=3) for r in range(3)]  # split-mode shares
    assert sum(len(b.rewards) for b in ranks) == 18000
    assert set().union(*(_rows(b) for b in ranks)) == rt

    from rayoffline.data.window import WindowedData
    w = WindowedData(ds, 0, 1, budget_bytes=2_000_000, batch_size=64)
    seen = set()
    for _ in range(40):
        seen |= _rows(w.data)
        for _ in range(w.steps_per_window):
            w.after_step()
    w.close()
    assert seen and not seen & rh


def test_load_episodes_orders_rows_and_returns_to_go(ds):
    split(ds, 0.2, seed=0)
    ep = load_episodes(ds)
    h = json.loads((ds / "_rayoffline.json").read_text())["holdout"]
    assert ep.num_episodes == 20 and sorted(set(ep.episode_id.tolist())) == h["episode_ids"]
    assert (ep.lengths == 200).all() and (ep.step[ep.starts] == 0).all()
    assert np.all(np.diff(ep.step.reshape(20, 200), axis=1) == 1)
    # consecutive rows of an episode chain: next observation = the following observation
    nxt, obs = ep.batch.next_observations[:-1], ep.batch.observations[1:]
    inner = np.ones(len(ep.step) - 1, bool)
    inner[ep.starts[1:] - 1] = False
    assert torch.allclose(nxt[inner], obs[inner])
    r = ep.batch.rewards.double().numpy()
    g = ep.returns_to_go(0.9)
    s, n = ep.starts[3], ep.lengths[3]
    assert g[s] == pytest.approx(sum(0.9 ** t * r[s + t] for t in range(n)))
    assert discounted_to_go(np.ones(3), np.array([0]), np.array([3]), 0.5).tolist() == [1.75, 1.5, 1.0]
    assert ep.padded(r).shape == (20, 200) and ep.mask().all()
    few = load_episodes(ds, part="train", max_episodes=5, seed=1)
    assert few.num_episodes == 5 and not set(few.episode_id.tolist()) & set(h["episode_ids"])


def test_existing_split_is_kept_or_replaced_only_when_asked(ds, capsys):
    split(ds, 0.1, seed=0)
    before = (ds / "_rayoffline.json").read_text()
    assert split(ds, 0.1, seed=0)["holdout"] == json.loads(before)["holdout"]   # same settings: nothing to do
    with pytest.raises(ConfigError, match="already holds out 10 episodes.*--replace"):
        split(ds, 0.2, seed=0)
    assert (ds / "_rayoffline.json").read_text() == before
    assert main(["data", "split", str(ds), "--holdout", "0.2", "--replace"]) == 0
    assert "held out 20 of 100 episodes" in capsys.readouterr().out
    assert main(["data", "split", str(ds), "--holdout", "1.0"]) == 2
    assert "--holdout: expected a fraction of the episodes in (0, 1)" in capsys.readouterr().err


def test_holdout_part_without_a_split_says_how_to_make_one(ds):
    with pytest.raises(DataError, match=r"no held-out split; make one with `rayoffline data split .* --holdout 0.1`"):
        load_episodes(ds)
    with pytest.raises(DataError, match="no held-out split"):
        data_mod.load(ds, part="holdout")
    assert len(data_mod.load(ds).rewards) == 20000  # without a split, training reads everything


def test_append_splits_the_new_partition_the_same_way(ds, tmp_path):
    split(ds, 0.1, seed=0)
    eps = episodes(obs_dim=3, act_dim=1, layout=[(6, "trunc")] * 20, seed=4, act_scale=2.0)
    r = flat_rows(eps)
    src = write_parquet(tmp_path / "new.parquet", {
        "observations": r["observations"], "actions": r["actions"], "rewards": r["rewards"],
        "next_observations": r["next_observations"], "terminations": r["terminations"],
        "truncations": r["truncations"], "episode": r["episode"]})
    meta = data_mod.append(str(src), ds, mapping={"episode_id": "episode"})
    h = meta["holdout"]
    assert h["num_episodes"] == 12 and h["num_transitions"] == 2000 + 2 * 6
    new_ids = [i for i in h["episode_ids"] if i >= 100]
    assert len(new_ids) == 2
    assert len(data_mod.load(ds).rewards) == 18000 + 18 * 6


def test_convert_with_holdout_matches_a_later_split(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["data", "convert", "builtin:cartpole-medium", "--out", str(out), "--holdout", "0.1",
                 "--holdout-seed", "7"]) == 0
    assert "held out" in capsys.readouterr().out
    later = tmp_path / "later"
    shutil.copytree(resolve("builtin:cartpole-medium"), later)
    assert split(later, 0.1, seed=7)["holdout"] == json.loads((out / "_rayoffline.json").read_text())["holdout"]
    assert main(["data", "convert", "builtin:cartpole-medium", "--out", str(tmp_path / "bad"), "--holdout", "0"]) == 2
    assert not (tmp_path / "bad").exists()


def test_resume_refuses_a_split_made_after_the_run_began(ds, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["--set", "eval_episodes=0", "--set", "progress=off", "--set", "algo.hidden=[16]",
            "--set", "diagnostics=off", "--set", "checkpoint_every=10"]
    assert main(["train", "--algo", "bc", "--data", str(ds), "--steps", "10", "--out", str(run)] + base) == 0
    split(ds, 0.1)
    assert main(["train", "--resume", "--out", str(run), "--steps", "20"]) == 2
    assert "held-out split has changed" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(run), "--steps", "20", "--allow-data-change"]) == 0
    assert "held_out_episodes" in (run / "config.yaml").read_text()
