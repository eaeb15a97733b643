"""Ray Tune sweeps end to end (sweep/run.py, trial.py, pack.py) on the shared test cluster: packs, ASHA stopping
configurations, the best YAML reproducing its configuration alone, a killed pack, a killed driver and --resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import rayoffline

DATA = "builtin:pendulum-medium"


def _sweep(**over):
    s = {"algo": "iql", "data": DATA, "name": "t",
         "config": {"steps": 200, "log_every": 50, "checkpoint_every": 100, "eval_every": 100, "eval_episodes": 2,
                    "algo": {"hidden": [16, 16]}},
         "space": {"algo.expectile": {"grid": [0.6, 0.7, 0.8, 0.9]}, "batch_size": {"grid": [32, 64]}},
         "seeds": [0, 1], "metric": "eval/return_mean", "mode": "max",
         "scheduler": {"type": "asha", "grace_period": 100, "reduction_factor": 2},
         "resources": {"cpus": 2}, "max_failures": 1}
    s.update(over)
    return s


def _rows(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _packs(out):
    return [json.loads(p.read_text()) for p in sorted((Path(out) / "packs").glob("*.json"))]


def test_sweep_fuses_configurations_asha_stops_some_and_best_yaml_reproduces_the_best(ray_cluster, tmp_path):
    out = tmp_path / "sweep"
    # beta shapes the actor from the first step, so the configurations differ at the step-100 rung (with equal
    # values ASHA has nothing to stop)
    res = rayoffline.tune(_sweep(space={"algo.beta": {"grid": [0.3, 1.0, 3.0, 10.0]},
                                        "batch_size": {"grid": [32, 64]}}), out=out, quiet=True)
    rows = res["rows"]
    assert len(rows) == 8 and all(r["status"] != "error" for r in rows)
    stopped = [r for r in rows if r["status"].startswith("stopped")]
    finished = [r for r in rows if r["status"] == "finished"]
    assert stopped and finished  # ASHA stopped some at the step-100 rung
    packs = _packs(out)
    assert len(packs) >= 2  # two batch sizes: two pack keys at least
    assert max(max(h["members"] for h in p["history"]) for p in packs) >= 4  # >= 2 configurations x 2 seeds fused
    updates = {t: n for p in packs for t, n in p["member_updates"].items()}
    for r in rows:  # a configuration trained exactly the steps it reported: a stopped one cost nothing after
        assert updates[r["trial"]] == r["step"] * 2, r
        assert (r["step"] < 200) == r["status"].startswith("stopped")
    assert res["member_updates"] == sum(r["step"] * 2 for r in rows)
    # the ranked outputs
    lines = (out / "results.csv").read_text().splitlines()
    assert len(lines) == 9 and lines[0].startswith("rank,trial,status,step,algo.beta,batch_size")
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = rows[0]
    assert best["status"] == "finished" and best["mean"] == max(r["mean"] for r in finished)
    # the best configuration trained alone from best.yaml equals its fused run (same seeds, same steps)
    alone = rayoffline.train(None, None, tmp_path / "alone", config=str(out / "best.yaml"))
    fused, solo = _rows(best["run_dir"]), _rows(tmp_path / "alone")
    assert [r["step"] for r in fused] == [r["step"] for r in solo]
    for fr, sr in zip(fused, solo):
        for key in sr:
            if key.startswith(("loss/", "train/", "eval/")):
                assert fr[key] == pytest.approx(sr[key], rel=1e-4, abs=1e-5), key
    assert alone["eval_return_mean"] == pytest.approx(
        json.loads((Path(best["run_dir"]) / "result.json").read_text())["eval_return_mean"], rel=1e-4)
    cfg = yaml.safe_load((out / "best.yaml").read_text())
    assert cfg["algo"]["beta"] == best["config"]["algo.beta"] and cfg["members"] == [{"seed": 0},
                                                                                              {"seed": 1}]


def test_a_killed_pack_restarts_its_trials_from_their_checkpoints(ray_cluster, tmp_path):
    import ray
    out = tmp_path / "sweep"
    sweep = _sweep(space={"algo.expectile": {"grid": [0.6, 0.7, 0.8]}}, scheduler={"type": "fifo"},
                   seeds=[0], resources={"cpus": 8}, config={
                       "steps": 3000, "log_every": 100, "checkpoint_every": 500, "eval_episodes": 0,
                       "algo": {"hidden": [16, 16]}, "batch_size": 32},
                   metric="loss/critic", mode="min")
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("res", rayoffline.tune(sweep, out=out, quiet=True)))
    th.start()
    killed = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and th.is_alive() and killed is None:
        ckpts = list(out.glob("trials/*/checkpoints/step_*.pt"))
        if len(ckpts) >= 3:  # every trial has its step-500 checkpoint
            for name in ray.util.list_named_actors(all_namespaces=True):
                if "-pack000-" in name["name"]:
                    ray.kill(ray.get_actor(name["name"], namespace=name["namespace"]))
                    killed = name["name"]
        time.sleep(0.2)
    th.join(300)
    assert killed, "the pack was not found to kill"
    rows = box["res"]["rows"]
    assert [r["status"] for r in rows] == ["finished"] * 3
    packs = _packs(out)
    assert len(packs) == 2  # the dead pack's trials were retried into a new one
    restarted = packs[1]["member_updates"]
    assert set(restarted) == {r["trial"] for r in rows}
    for t, n in restarted.items():  # each continued from a checkpoint, not from step 0
        assert 0 < n < 3000 and n % 500 == 0
    for r in rows:
        steps = [x["step"] for x in _rows(r["run_dir"])]
        assert steps == sorted(set(steps)) and steps[-1] == 3000  # no duplicated or missing interval


def test_driver_killed_mid_sweep_resumes_without_rerunning_finished_configurations(ray_cluster, tmp_path):
    out = tmp_path / "sweep"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(_sweep(
        space={"algo.expectile": {"grid": [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]}}, scheduler={"type": "fifo"},
        seeds=[0], resources={"cpus": 1}, max_concurrency=2, pack_size=1,
        config={"steps": 600, "log_every": 100, "checkpoint_every": 200, "eval_episodes": 0,
                "algo": {"hidden": [16, 16]}, "batch_size": 32},
        metric="loss/critic", mode="min")))
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rayoffline", "tune", str(sweep), "--out", str(out),
                             "--address", address], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(out.glob("trials/*/result.json"))) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(3)  # Tune records the finished trials in its experiment state (every second here)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done_before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trials/*/result.json")}
    assert 2 <= len(done_before) < 6
    res = rayoffline.tune(None, out=out, resume=True, quiet=True)
    rows = res["rows"]
    assert len(rows) == 6 and all(r["status"] == "finished" for r in rows), rows
    for t, mtime in done_before.items():  # finished before the kill: not trained again
        assert (out / "trials" / t / "result.json").stat().st_mtime_ns == mtime
    resumed = {t for p in _packs(out) for t, n in p["member_updates"].items() if p["history"][0]["time"] >
               max(done_before.values()) / 1e9}
    assert not resumed & set(done_before)
    for r in rows:
        steps = [x["step"] for x in _rows(r["run_dir"])]
        assert steps == list(range(100, 601, 100))


def test_unfused_optuna_sweep_trains_each_configuration_in_its_own_process(ray_cluster, tmp_path):
    out = tmp_path / "sweep"
    res = rayoffline.tune(_sweep(
        space={"algo.expectile": {"uniform": [0.6, 0.9]}}, search={"type": "optuna", "seed": 3}, num_samples=3,
        scheduler={"type": "fifo"}, fuse=False, seeds=[0], resources={"cpus": 1}, max_concurrency=2,
        config={"steps": 100, "log_every": 50, "checkpoint_every": 100, "eval_episodes": 0, "batch_size": 32,
                "algo": {"hidden": [16, 16]}},
        metric="loss/critic", mode="min"), out=out, quiet=True)
    rows = res["rows"]
    assert [r["status"] for r in rows] == ["finished"] * 3
    values = [r["config"]["algo.expectile"] for r in rows]
    assert len(set(values)) == 3 and all(0.6 <= v <= 0.9 for v in values)  # Optuna's suggestions
    assert [r["mean"] for r in rows] == sorted(r["mean"] for r in rows)  # ranked, mode min
    assert not (out / "packs").exists()
    for r in rows:
        result = json.loads((Path(r["run_dir"]) / "result.json").read_text())
        assert result["members_per_pass"] == 1 and result["algo"] == "iql"
        assert _rows(r["run_dir"])[-1]["loss/critic"] == pytest.approx(r["mean"])


def test_pbt_exploits_configurations_inside_their_pack(ray_cluster, tmp_path):
    out = tmp_path / "sweep"
    res = rayoffline.tune(_sweep(
        space={"algo.expectile": {"grid": [0.5, 0.6, 0.8, 0.9]}}, seeds=[0], resources={"cpus": 8},
        scheduler={"type": "pbt", "perturbation_interval": 50, "quantile_fraction": 0.5,
                   "hyperparam_mutations": {"algo.expectile": {"uniform": [0.5, 0.95]}}},
        config={"steps": 400, "log_every": 50, "checkpoint_every": 50, "eval_episodes": 0, "batch_size": 32,
                "algo": {"hidden": [16, 16]}},
        metric="loss/value", mode="min"), out=out, quiet=True)  # the expectile loss: differs by expectile
    rows = res["rows"]
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows)
    grid = [0.5, 0.6, 0.8, 0.9]  # trial i started with grid[i]
    assert any(r["config"]["algo.expectile"] != grid[int(r["trial"].rsplit("_", 1)[1])] for r in rows)  # explored
    for r in rows:  # each run directory records the value its configuration finished with
        assert yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())["algo"]["expectile"] == \
            pytest.approx(r["config"]["algo.expectile"])


def test_distributed_trials_are_ray_train_runs(ray_cluster, tmp_path):
    out = tmp_path / "sweep"
    res = rayoffline.tune(_sweep(
        space={"algo.expectile": {"grid": [0.6, 0.8]}}, scheduler={"type": "fifo"}, fuse=False, seeds=[0],
        resources={"cpus": 1, "workers": 2},
        config={"steps": 100, "log_every": 50, "checkpoint_every": 100, "eval_episodes": 0, "batch_size": 32,
                "algo": {"hidden": [16, 16]}},
        metric="loss/critic", mode="min"), out=out, quiet=True)
    rows = res["rows"]
    assert [r["status"] for r in rows] == ["finished"] * 2
    for r in rows:
        result = json.loads((Path(r["run_dir"]) / "result.json").read_text())
        assert result["num_workers"] == 2
        assert _rows(r["run_dir"])[-1]["loss/critic"] == pytest.approx(r["mean"])
