"""The pack (tune/pack.py) without Ray: trials' members trained in one pass equal their solo runs, a trial that
leaves stops costing updates, and a trial joins a running pack, fresh or from a checkpoint."""
from __future__ import annotations

import json
import shutil
import threading

import pytest

import rayoffline
from rayoffline.data.builtin import resolve
from rayoffline.data.holdout import split
from rayoffline.errors import DataError
from rayoffline.evaluation import offpolicy
from rayoffline.learner.config import build_config
from rayoffline.sweep.pack import Pack

DATA = "builtin:pendulum-medium"
BASE = {"steps": 40, "batch_size": 32, "log_every": 10, "checkpoint_every": 20, "eval_every": 20,
        "eval_episodes": 2, "progress": "off", "algo": {"hidden": [16, 16]}}


def _cfg(expectile, seeds):
    return build_config("iql", {**BASE, "algo": {**BASE["algo"], "expectile": expectile},
                                "members": [{"seed": s} for s in seeds]})


def _drive(pack, trial, start=0, stop_after=None):
    out, step = [], start
    while True:
        r = pack.next(trial, step, timeout=120)
        assert r["error"] is None, r["error"]
        out.append(r)
        step = r["step"]
        if r["done"]:
            return out
        if stop_after is not None and step >= stop_after:
            pack.drop([trial])
            return out


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture()
def pack(tmp_path):
    p = Pack("p0", "iql", DATA, device="cpu", stats_dir=str(tmp_path / "packs"))
    yield p
    p.close()


def _close(a, b):
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_fused_trials_equal_their_solo_runs_and_load_like_runs(pack, tmp_path):
    trials = {"a": _cfg(0.7, [0, 1]), "b": _cfg(0.9, [2])}
    results = {}
    for t, cfg in trials.items():
        assert pack.join(t, cfg, str(tmp_path / t)) == 0
    threads = [threading.Thread(target=lambda t=t: results.__setitem__(t, _drive(pack, t))) for t in trials]
    [th.start() for th in threads]
    [th.join(300) for th in threads]
    assert pack.stats()["history"][0]["members"] == 3  # one pass of a's two members and b's one
    for t, expectile, seeds in (("a", 0.7, [0, 1]), ("b", 0.9, [2])):
        assert [r["step"] for r in results[t]] == [10, 20, 30, 40]
        solo = rayoffline.train("iql", DATA, tmp_path / f"solo_{t}", config={
            **BASE, "algo": {**BASE["algo"], "expectile": expectile}, "members": [{"seed": s} for s in seeds]})
        fused_rows, solo_rows = _rows(tmp_path / t), _rows(tmp_path / f"solo_{t}")
        assert [r["step"] for r in fused_rows] == [r["step"] for r in solo_rows]
        for fr, sr in zip(fused_rows, solo_rows):
            for key in sr:
                if key.startswith(("loss/", "train/", "eval/", "diag/")):
                    _close(fr[key], sr[key])
        fused = json.loads((tmp_path / t / "result.json").read_text())
        _close([m["eval_return_mean"] for m in fused["members"]], [m["eval_return_mean"] for m in solo["members"]])
        ev = rayoffline.evaluate_run(tmp_path / t, episodes=2)  # the trial's run directory is a run like any
        _close(ev["eval_return_mean"], [m["eval_return_mean"] for m in solo["members"]])
    assert results["a"][1]["checkpoint"] is not None and results["a"][0]["checkpoint"] is None


def test_a_stopped_trial_costs_nothing_more_and_a_new_one_joins_the_running_pack(pack, tmp_path):
    pack.join("a", _cfg(0.7, [0]), str(tmp_path / "a"))
    pack.join("b", _cfg(0.8, [1]), str(tmp_path / "b"))
    done = {}
    ta = threading.Thread(target=lambda: done.__setitem__("a", _drive(pack, "a")))
    tb = threading.Thread(target=lambda: done.__setitem__("b", _drive(pack, "b", stop_after=10)))
    ta.start(), tb.start()
    tb.join(300)
    # c joins while a trains (a is past step 10): c starts at 0 in the same pass as a
    pack.join("c", _cfg(0.9, [2]), str(tmp_path / "c"))
    done["c"] = _drive(pack, "c")
    ta.join(300)
    stats = json.loads((tmp_path / "packs" / "p0.json").read_text())
    assert stats["member_updates"] == {"a": 40, "b": 10, "c": 40}
    assert any(set(h["trials"]) == {"a", "c"} for h in stats["history"])
    solo = rayoffline.train("iql", DATA, tmp_path / "solo_c", config={
        **BASE, "algo": {**BASE["algo"], "expectile": 0.9}, "members": [{"seed": 2}]})
    for fr, sr in zip(_rows(tmp_path / "c"), _rows(tmp_path / "solo_c")):
        for key in sr:
            if key.startswith(("loss/", "eval/")):
                _close(fr[key], sr[key])
    assert solo["eval_return_mean"] == pytest.approx(
        json.loads((tmp_path / "c" / "result.json").read_text())["eval_return_mean"], rel=1e-4)


def test_a_trial_restarted_from_its_checkpoint_continues_as_uninterrupted(pack, tmp_path):
    pack.join("a", _cfg(0.7, [0]), str(tmp_path / "a"))
    first = _drive(pack, "a", stop_after=20)
    assert first[-1]["checkpoint"] is not None
    # the same trial comes back (a retry, a PBT restart) from its step-20 checkpoint into the same pack
    assert pack.join("a", _cfg(0.7, [0]), str(tmp_path / "a"), state=first[-1]["checkpoint"]) == 20
    rest = _drive(pack, "a", start=20)
    assert [r["step"] for r in rest] == [30, 40]
    solo = rayoffline.train("iql", DATA, tmp_path / "solo", config={**BASE, "members": [{"seed": 0}]})
    assert json.loads((tmp_path / "a" / "result.json").read_text())["eval_return_mean"] == pytest.approx(
        solo["eval_return_mean"], rel=1e-4)
    assert [r["step"] for r in _rows(tmp_path / "a")] == [r["step"] for r in _rows(tmp_path / "solo")]


def test_fused_trials_log_the_off_policy_estimates_of_their_solo_runs(tmp_path, monkeypatch):
    ds = tmp_path / "pendulum"  # off-policy estimates need held-out episodes
    shutil.copytree(resolve(DATA), ds)
    split(ds, 0.1, seed=0)
    base = {**BASE, "steps": 20, "eval_every": 10, "eval_episodes": 0, "diagnostics": "off", "ope": ["fqe"],
            "ope_steps": 200}
    trials = {"a": (0.7, [0, 1]), "b": (0.9, [2])}
    fits = []  # (members evaluated) per run_metrics call of the pack
    real = offpolicy.run_metrics
    monkeypatch.setattr(offpolicy, "run_metrics", lambda alg, *a, **kw: fits.append(alg.K) or real(alg, *a, **kw))
    pack = Pack("p1", "iql", str(ds), device="cpu")
    results = {}
    try:
        for t, (expectile, seeds) in trials.items():
            pack.join(t, build_config("iql", {**base, "algo": {**base["algo"], "expectile": expectile},
                                              "members": [{"seed": s} for s in seeds]}), str(tmp_path / t))
        threads = [threading.Thread(target=lambda t=t: results.__setitem__(t, _drive(pack, t))) for t in trials]
        [th.start() for th in threads]
        [th.join(300) for th in threads]
    finally:
        pack.close()
    assert fits == [3, 3]  # one FQE fit of both trials' members per eval point
    monkeypatch.setattr(offpolicy, "run_metrics", real)
    for t, (expectile, seeds) in trials.items():
        assert [r["step"] for r in results[t] if "ope/fqe" in r["metrics"]] == [10, 20]  # relayed to Tune
        rayoffline.train("iql", str(ds), tmp_path / f"solo_{t}", config={
            **base, "algo": {**base["algo"], "expectile": expectile}, "members": [{"seed": s} for s in seeds]})
        fused = {r["step"]: r["ope/fqe"] for r in _rows(tmp_path / t) if "ope/fqe" in r}
        solo = {r["step"]: r["ope/fqe"] for r in _rows(tmp_path / f"solo_{t}") if "ope/fqe" in r}
        assert sorted(fused) == sorted(solo) == [10, 20]
        for step in solo:  # b's FQE member is seeded as in its solo run (0), not by its place in the pack (2)
            _close(fused[step], solo[step])


def test_a_trial_asking_for_ope_on_data_without_held_out_episodes_fails_at_join(pack, tmp_path):
    with pytest.raises(DataError, match="run key 'ope'.*no held-out split"):
        pack.join("a", _cfg(0.7, [0]) | {"run": build_config("iql", {**BASE, "ope": ["fqe"]})["run"]},
                  str(tmp_path / "a"))
    assert pack.size() == 0 and not (tmp_path / "a").exists()
