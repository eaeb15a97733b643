"""Issue 7: learners as Ray Train workers (2 CPU workers on the shared test cluster).

Slow by nature (a Ray Train worker group takes ~10-20 s to start on 2 cores), so few runs, each checking much.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import rayoffline
from rayoffline.errors import ConfigError

CFG = {"batch_size": 64, "log_every": 20, "eval_episodes": 0, "checkpoint_every": 40, "threads": 1,
       "progress": "off", "algo": {"hidden": [32, 32]}}


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(rows: list[dict]) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss/")} for r in rows}


def test_two_workers_match_one_process_and_resume_with_another_worker_count(ray_cluster, tmp_path, monkeypatch):
    solo, dist = tmp_path / "solo", tmp_path / "dist"
    rayoffline.train("iql", "builtin:pendulum-medium", solo, steps=80, config=CFG)
    monkeypatch.chdir(tmp_path)  # a relative run directory: the workers' working directory is not the driver's
    result = rayoffline.train("iql", "builtin:pendulum-medium", "dist", steps=40,
                              config={**CFG, "num_workers": 2, "data_mode": "replicate"})
    assert result["num_workers"] == 2 and result["steps"] == 40
    assert sorted(p.name for p in (dist / "checkpoints").iterdir()) == ["step_00000040.pt"]
    assert any((dist / "ray_train").glob("checkpoint_*/step_00000040.pt"))  # reported to Ray Train too
    assert list((dist / "tb").glob("events.out.tfevents.*"))
    # continue the 2-worker run on one Ray Train worker (replicate mode: any worker count continues exactly)
    result = rayoffline.train(None, None, dist, steps=80, resume=True, overrides={"num_workers": 1})
    assert result["num_workers"] == 1
    a, b = _losses(_rows(solo)), _losses(_rows(dist))
    assert sorted(b) == [20, 40, 60, 80]
    for step in a:
        for key in a[step]:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (step, key)


def _train_worker_pids() -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"RayTrainWorker" in cmd:
                pids.append(int(p.name))
    return pids


def test_killed_worker_restarts_from_the_last_checkpoint(ray_cluster, tmp_path):
    run = tmp_path / "run"
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            try:
                steps = [r["step"] for r in _rows(run)]
            except (OSError, ValueError):
                steps = []
            if steps and max(steps) >= 60 and any((run / "checkpoints").glob("step_*.pt")):
                pids = _train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = rayoffline.train("bc", "builtin:pendulum-medium", run, steps=600,
                              config={**CFG, "num_workers": 2, "max_failures": 1, "data_mode": "replicate"})
    thread.join()
    assert killed, "no Ray Train worker was found to kill"
    assert result["steps"] == 600
    steps = [r["step"] for r in _rows(run)]
    assert steps == list(range(20, 601, 20))  # nothing duplicated, nothing missing
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tb_steps = [e.step for e in acc.Scalars("loss/actor")]
    assert sorted(set(tb_steps)) == list(range(20, 601, 20))


def test_a_worker_group_the_cluster_cannot_place_is_refused_at_once(ray_cluster, tmp_path):
    t = time.monotonic()
    with pytest.raises(ConfigError, match="needs 48 CPU, but the Ray cluster has"):
        rayoffline.train("bc", "builtin:pendulum-medium", tmp_path / "r", steps=10,
                         config={**CFG, "num_workers": 16, "cpus_per_worker": 3})
    assert time.monotonic() - t < 60
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="divisible by num_workers"):
        rayoffline.train("bc", "builtin:pendulum-medium", tmp_path / "r", steps=10,
                         config={**CFG, "num_workers": 3})


def test_split_mode_needs_a_file_per_worker(ray_cluster, tmp_path):
    from rayoffline import data
    ds = tmp_path / "ds"
    data.convert("builtin:pendulum-medium", ds, shards=1)
    with pytest.raises(ConfigError, match="--shards 8"):
        rayoffline.train("bc", str(ds), tmp_path / "r", steps=10,
                         config={**CFG, "num_workers": 2, "data_mode": "split"})
    assert not (tmp_path / "r").exists()


def test_data_mode_auto_follows_the_memory_budget():
    from rayoffline.learner.config import RunConfig
    from rayoffline.learner.distributed import choose_data_mode, dataset_bytes
    meta = {"num_transitions": 1_000_000, "observation_space": {"type": "Box", "shape": [11]},
            "action_space": {"type": "Box", "shape": [3]}}
    assert dataset_bytes(meta) == 1_000_000 * 4 * (22 + 3 + 3)
    mode, why = choose_data_mode(RunConfig(num_workers=2, memory_budget_gb=1.0), meta)
    assert mode == "replicate" and "fits memory_budget_gb 1" in why
    mode, why = choose_data_mode(RunConfig(num_workers=2, memory_budget_gb=0.05), meta)
    assert mode == "split" and "exceeds" in why
    assert choose_data_mode(RunConfig(num_workers=2, data_mode="split"), meta)[0] == "split"


def test_killed_driver_then_resume_continues(ray_cluster, tmp_path):
    import subprocess
    import sys
    run = tmp_path / "run"
    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-m", "rayoffline", "train", "--algo", "bc", "--data", "builtin:pendulum-medium",
         "--steps", "100000", "--out", str(run), "--num-workers", "2", "--address", address,
         "--set", "batch_size=64", "--set", "log_every=20", "--set", "checkpoint_every=40",
         "--set", "eval_episodes=0", "--set", "algo.hidden=[32,32]", "--set", "progress=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((run / "checkpoints").glob("step_*.pt"))) >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.kill()  # the driver dies mid-run; Ray ends the job's workers with it
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 60
    while _train_worker_pids() and time.monotonic() < deadline:  # Ray ends the dead driver's workers
        time.sleep(0.5)
    assert not _train_worker_pids()
    saved = sorted(int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("step_*.pt"))
    # continue in this process (any worker count continues a replicate-mode run)
    result = rayoffline.train(None, None, run, steps=saved[-1] + 40, resume=True, overrides={"num_workers": 0})
    assert result["steps"] == saved[-1] + 40
    steps = [r["step"] for r in _rows(run)]
    assert steps == list(range(20, saved[-1] + 41, 20))


def test_two_node_cluster_spreads_the_workers(ray_cluster, tmp_path):
    """A 2-node cluster on loopback in its own process (the test session's Ray stays as it is)."""
    import subprocess
    import sys
    from rayoffline import data
    ds = tmp_path / "ds"
    data.convert("builtin:pendulum-medium", ds, shards=4)  # split mode: each node's worker reads 2 files
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("_two_node_run.py")), str(ds),
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_ADDRESS": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["steps"] == 40 and out["num_workers"] == 2
    assert len(out["cluster_nodes"]) == 2 and out["worker_nodes"] == out["cluster_nodes"]
    assert [r["step"] for r in _rows(tmp_path / "run")] == [20, 40]


def test_worker_errors_name_the_rank_and_node():
    from rayoffline.errors import DataError
    from rayoffline.learner.distributed import _user_error, on_worker
    e = on_worker(DataError("/data/hopper: no such dataset directory"), 1, "10.0.0.7", "f" * 56)
    assert isinstance(e, DataError)
    assert str(e) == "/data/hopper: no such dataset directory (on Ray Train worker rank 1, node 10.0.0.7, id ffffffffffff)"

    class Wrapped(Exception):  # Ray Train's failure wrappers keep the worker's exception as a cause
        pass
    try:
        try:
            raise e
        except DataError as inner:
            raise Wrapped("worker group failed") from inner
    except Wrapped as outer:
        assert _user_error(outer) is e
