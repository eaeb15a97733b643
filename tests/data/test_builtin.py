"""Builtin datasets: scripted behavior policies, Minari storage, cache, resolve."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from rayoffline.data import builtin
from rayoffline.errors import DataError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYOFFLINE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def collected():
    return {name: builtin.collect(name) for name in builtin.names()}


def _mean_return(episodes):
    return float(np.mean([e.ret for e in episodes]))


def test_names_and_unknown_name():
    assert set(builtin.names()) == {f"{e}-{q}" for e in ("pendulum", "cartpole")
                                    for q in ("random", "medium", "expert")}
    with pytest.raises(DataError, match=r"unknown builtin dataset 'pendulum-great'.*builtin:pendulum-medium"):
        builtin.minari_dataset_path("pendulum-great")
    with pytest.raises(DataError, match="known: builtin:pendulum-random"):
        builtin.resolve("builtin:nope")


def test_quality_ordering_and_target_ranges(collected):
    r = {n: _mean_return(eps) for n, eps in collected.items()}
    for env in ("pendulum", "cartpole"):
        assert r[f"{env}-random"] < r[f"{env}-medium"] < r[f"{env}-expert"], r
    assert -900 < r["pendulum-medium"] < -500
    assert -250 < r["pendulum-expert"] < -130
    assert r["pendulum-random"] < -1000
    assert 60 < r["cartpole-medium"] < 200
    assert r["cartpole-expert"] > 475
    assert r["cartpole-random"] < 40


def test_sizes_and_episode_boundaries(collected):
    for name, eps in collected.items():
        n = sum(len(e.rewards) for e in eps)
        assert builtin.MIN_TRANSITIONS <= n < builtin.MIN_TRANSITIONS + 500, name
        for e in eps:
            t = len(e.rewards)
            assert e.observations.shape[0] == t + 1 and len(e.actions) == t
            ends = e.terminations | e.truncations
            assert ends[-1] and not ends[:-1].any(), name  # exactly one end, on the last step
    for e in collected["pendulum-medium"]:
        # Pendulum-v1 never terminates: every episode is truncated at 200 steps
        assert len(e.rewards) == 200 and e.truncations[-1] and not e.terminations.any()
        # the last next observation is the real one: a unit vector (cos, sin) continuing the trajectory
        c, s, w = e.observations[-1]
        assert abs(c * c + s * s - 1) < 1e-5 and abs(w) <= 8.0
        assert not np.allclose(e.observations[-1], e.observations[0])
    cart = collected["cartpole-medium"]
    assert any(e.terminations[-1] for e in cart) and any(e.truncations[-1] and len(e.rewards) == 500
                                                       for e in cart)
    assert all(not e.truncations[-1] or len(e.rewards) == 500 for e in cart)


def test_action_coverage(collected):
    for name in ("pendulum-medium", "pendulum-random"):
        a = np.concatenate([e.actions for e in collected[name]])[:, 0]
        hist = np.histogram(a, bins=10, range=(-2, 2))[0]
        assert (hist > 0.02 * len(a)).all(), (name, hist)  # every tenth of [-2, 2] is visited
    a = np.concatenate([e.actions for e in collected["cartpole-medium"]])
    assert a.dtype == np.int64 and 0.3 < a.mean() < 0.7


def test_deterministic_by_seed():
    a = builtin.rollout("pendulum-medium", episodes=3, seed=7)
    b = builtin.rollout("pendulum-medium", episodes=3, seed=7)
    c = builtin.rollout("pendulum-medium", episodes=3, seed=8)
    for x, y in zip(a, b):
        for k in ("observations", "actions", "rewards", "terminations", "truncations"):
            np.testing.assert_array_equal(getattr(x, k), getattr(y, k))
    assert not np.array_equal(a[0].actions, c[0].actions)


def test_behavior_policy_formats():
    p = builtin.behavior_policy("pendulum-expert", seed=1)
    a = p(np.array([1.0, 0.0, 0.0], np.float32))
    assert a.shape == (1,) and a.dtype == np.float32 and -2 <= a[0] <= 2
    q = builtin.behavior_policy("cartpole-expert")
    assert q(np.zeros(4, np.float32)) in (0, 1)


def test_behavior_return_online():
    assert -900 < builtin.behavior_return("pendulum-medium", episodes=10) < -450
    assert builtin.behavior_return("cartpole-expert", episodes=3) > 475


def test_reference_scores():
    lo, hi = builtin.reference_scores("pendulum")
    assert lo < -1000 and -250 < hi < -130
    assert builtin.reference_scores("cartpole")[1] > 475


def test_minari_dataset_roundtrip_and_cache(collected):
    import minari

    path = builtin.minari_dataset_path("pendulum-medium")
    assert path == builtin.minari_root() / builtin.dataset_id("pendulum-medium")
    assert str(path).startswith(os.environ["RAYOFFLINE_CACHE"])
    ds = minari.MinariDataset(path / "data")
    eps = collected["pendulum-medium"]
    assert ds.total_episodes == len(eps) and ds.total_steps == 20_000
    assert ds.env_spec.id == "Pendulum-v1"
    md = ds.storage.metadata
    assert (md["ref_min_score"], md["ref_max_score"]) == builtin.reference_scores("pendulum")
    for i in (0, len(eps) - 1):
        ep = ds[i]
        np.testing.assert_array_equal(ep.observations, eps[i].observations)
        np.testing.assert_array_equal(ep.actions, eps[i].actions)
        np.testing.assert_array_equal(ep.truncations, eps[i].truncations)
        assert ep.truncations[-1] and not ep.terminations.any()
    # by id, as Minari's own tools would open it
    os.environ["MINARI_DATASETS_PATH"] = str(builtin.minari_root())
    try:
        assert minari.load_dataset(builtin.dataset_id("pendulum-medium")).total_steps == 20_000
    finally:
        del os.environ["MINARI_DATASETS_PATH"]
    # cached: a second call does not rebuild
    mtime = (path / "data" / "metadata.json").stat().st_mtime_ns
    assert builtin.minari_dataset_path("pendulum-medium") == path
    assert (path / "data" / "metadata.json").stat().st_mtime_ns == mtime


def test_discrete_minari_dataset():
    import minari

    ds = minari.MinariDataset(builtin.minari_dataset_path("cartpole-medium") / "data")
    assert ds.action_space.n == 2 and ds.total_steps >= builtin.MIN_TRANSITIONS
    ep = ds[0]
    assert ep.actions.ndim == 1 and ep.observations.shape[1] == 4


def test_failed_build_leaves_no_cache_entry(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(builtin, "collect", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        builtin.minari_dataset_path("cartpole-random")
    assert not (builtin.minari_root() / builtin.dataset_id("cartpole-random")).exists()
    assert list((builtin.cache_root() / "tmp").iterdir()) == []


def test_concurrent_builders_agree(tmp_path):
    """Two processes building the same builtin at once: both succeed, one dataset results."""
    code = ("import sys; from rayoffline.data import builtin; "
            "print(builtin.minari_dataset_path('cartpole-expert'))")
    env = {**os.environ, "RAYOFFLINE_CACHE": str(tmp_path / "shared")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]
    root = tmp_path / "shared" / "minari"
    assert [p.name for p in root.iterdir()] == [f"cartpole-expert-v{builtin.BUILD_VERSION}"]
    meta = json.loads((root / f"cartpole-expert-v{builtin.BUILD_VERSION}" / "data" / "metadata.json").read_text())
    assert meta["total_steps"] >= builtin.MIN_TRANSITIONS


def test_resolve_directories(tmp_path):
    with pytest.raises(DataError, match="not found"):
        builtin.resolve(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="no _rayoffline.json"):
        builtin.resolve(tmp_path / "plain")
    with pytest.raises(DataError, match="converted first"):
        builtin.resolve("minari:mujoco/hopper/medium-v0")
    (tmp_path / "plain" / "metadata.json").write_text("{}")
    assert builtin.resolve(str(tmp_path / "plain")) == tmp_path / "plain"


def test_resolve_builtin_converts_once(ray_cluster):
    from rayoffline.data import load, load_metadata

    path = builtin.resolve("builtin:pendulum-medium")
    assert path == builtin.converted_path("pendulum-medium")
    assert str(path).startswith(os.environ["RAYOFFLINE_CACHE"])
    meta = load_metadata(path)
    assert meta["num_transitions"] == 20_000 and meta["num_episodes"] == 100
    assert meta["env_id"] == "Pendulum-v1" and meta["source"] == "builtin:pendulum-medium"
    assert (meta["ref_min_score"], meta["ref_max_score"]) == pytest.approx(builtin.reference_scores("pendulum"))
    assert meta["num_truncations"] == 100 and meta["num_terminations"] == 0
    b = load(path)
    assert b.truncations.sum() == 100 and b.terminations.sum() == 0
    # truncated ends keep the real next observation: a unit (cos, sin) vector, not a copy of the observation
    ends = b.truncations.bool()
    nxt = b.next_observations[ends]
    assert torch.allclose(nxt[:, 0] ** 2 + nxt[:, 1] ** 2, torch.ones(100), atol=1e-5)
    assert not torch.equal(nxt, b.observations[ends])
    # within an episode, next_observations[t] == observations[t + 1]
    inner = ~ends[:-1]
    assert torch.equal(b.next_observations[:-1][inner], b.observations[1:][inner])
    # cached: no rebuild, and the returned directory is complete
    mtime = (path / "_rayoffline.json").stat().st_mtime_ns
    assert builtin.resolve("builtin:pendulum-medium") == path
    assert (path / "_rayoffline.json").stat().st_mtime_ns == mtime
    assert list((builtin.cache_root() / "tmp").iterdir()) == []
