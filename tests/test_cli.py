"""End to end through the CLI: train, eval, algos, and the bad inputs of issue 3."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rayoffline.cli import main

FAST = ["--set", "batch_size=64", "--set", "log_every=50", "--set", "eval_episodes=2", "--set", "algo.hidden=[32,32]"]


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def iql_run(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "iql"
    assert main(["train", "--algo", "iql", "--data", "builtin:pendulum-medium", "--steps", "200", "--out", str(out),
                 "--seed", "3", "--set", "checkpoint_every=100", *FAST]) == 0
    return out


def test_train_writes_the_run_directory(iql_run):
    result = json.loads((iql_run / "result.json").read_text())
    for key in ("algo", "steps", "eval_return_mean", "eval_return_std", "normalized_score", "updates_per_s", "wall_s"):
        assert key in result, key
    assert result["algo"] == "iql" and result["steps"] == 200
    assert -2000 < result["eval_return_mean"] <= 0  # Pendulum returns are negative, 200 steps of at most -16.3
    assert result["normalized_score"] is not None and result["updates_per_s"] > 0
    cfg = yaml.safe_load((iql_run / "config.yaml").read_text())
    assert cfg["seed"] == 3 and cfg["algo"]["hidden"] == [32, 32] and cfg["algo"]["expectile"] == 0.7
    rows = [json.loads(x) for x in (iql_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/value" in r] == [50, 100, 150, 200]
    assert {"loss/value", "loss/critic", "loss/actor", "perf/updates_per_s"} <= set(rows[0])
    assert any("eval/return_mean" in r for r in rows)
    assert [p.name for p in sorted((iql_run / "checkpoints").iterdir())] == ["step_00000100.pt", "step_00000200.pt"]
    events = list((iql_run / "tb").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(iql_run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/critic", "perf/updates_per_s", "eval/return_mean"} <= tags


def test_eval_reevaluates_latest_checkpoint(iql_run, capsys):
    assert main(["eval", str(iql_run), "--episodes", "3"]) == 0
    out = json.loads((iql_run / "eval.json").read_text())
    assert out["step"] == 200 and out["episodes"] == 3 and len(out["eval_return_mean"]) == 1
    assert "step 200: return " in capsys.readouterr().out


def test_resume_continues_from_saved_step_and_matches_straight_run(ray_cluster, tmp_path):
    common = ["--algo", "td3_bc", "--data", "builtin:pendulum-medium", "--seed", "1", *FAST,
              "--set", "eval_episodes=0", "--set", "threads=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *common, "--steps", "200", "--out", str(straight)]) == 0
    assert main(["train", *common, "--steps", "100", "--out", str(split)]) == 0
    assert main(["train", "--algo", "td3_bc", "--data", "builtin:pendulum-medium", "--resume", "--steps", "200",
                 "--out", str(split)]) == 0
    a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [50, 100, 150, 200]
    for ra, rb in zip(a, b):
        for key in ("loss/critic", "loss/actor"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra["step"], key)


def test_algos_lists_every_algorithm_with_defaults(capsys):
    assert main(["algos"]) == 0
    out = capsys.readouterr().out
    for name in ("bc", "td3_bc", "iql", "cql", "bcq", "discrete_cql", "discrete_bcq"):
        assert f"\n{name}  [" in "\n" + out
    assert "algo.expectile = 0.7" in out and "algo.alpha = 2.5" in out


@pytest.mark.parametrize("argv, message", [
    (["--algo", "nope"], "unknown algorithm 'nope'"),
    (["--algo", "iql", "--set", "algo.nope=1"], "unknown config key 'algo.nope'"),
    (["--algo", "iql", "--set", "algo.expectile=high"], "config key 'algo.expectile'"),
    (["--algo", "iql", "--set", "algo.expectile=1.5"], "config key 'algo.expectile'"),
    (["--algo", "iql", "--set", "batch_size=0"], "config key 'batch_size'"),
    (["--algo", "iql", "--set", "bogus=0"], "unknown config key 'bogus'"),
])
def test_bad_config_is_a_clear_error(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *argv, "--data", "builtin:pendulum-medium", "--steps", "10", "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_algorithm_that_does_not_fit_the_action_space(ray_cluster, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--algo", "td3_bc", "--data", "builtin:cartpole-medium", "--steps", "10",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "td3_bc" in err and "Discrete(2)" in err
    assert not out.exists()


def test_existing_run_directory_is_not_touched(iql_run, capsys):
    before = _snapshot(iql_run)
    assert main(["train", "--algo", "iql", "--data", "builtin:pendulum-medium", "--steps", "10",
                 "--out", str(iql_run)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert _snapshot(iql_run) == before


def test_corrupted_checkpoint_on_eval(iql_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(iql_run, run)
    ck = run / "checkpoints" / "step_00000200.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    before = _snapshot(run)
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "step_00000200.pt" in err and "corrupted" in err
    assert _snapshot(run) == before


def test_process_exit_status_is_nonzero():
    res = subprocess.run([sys.executable, "-m", "rayoffline", "train", "--algo", "nope", "--data", "x", "--out",
                          "/tmp/never"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown algorithm" in res.stderr and "Traceback" not in res.stderr


def test_overrides_parse_numbers_and_nested_keys():
    from rayoffline.learner.config import build_config
    cfg = build_config("iql", {"algo": {"beta": "1e-1"}}, ["algo.actor_lr=1e-3", "steps=5", "algo.hidden=[8, 8]"])
    assert cfg["members"][0].actor_lr == 1e-3 and cfg["members"][0].beta == 0.1
    assert cfg["run"].steps == 5 and cfg["members"][0].hidden == (8, 8)


def test_dataset_without_env_fails_before_training(ray_cluster, tmp_path, capsys):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayoffline import data
    n = 64
    rng = np.random.default_rng(0)
    table = pa.table({"obs_0": rng.standard_normal(n), "obs_1": rng.standard_normal(n),
                      "act_0": rng.uniform(-1, 1, n), "r": rng.standard_normal(n),
                      "term": np.zeros(n, bool), "trunc": (np.arange(n) % 16 == 15), "ep": np.arange(n) // 16})
    pq.write_table(table, tmp_path / "logs.parquet")
    ds = tmp_path / "ds"
    from rayoffline.errors import DataWarning
    with pytest.warns(DataWarning, match="dropped 4 of 64 rows"):  # no next_observations column: said, not silent
        data.convert(str(tmp_path / "logs.parquet"), ds, mapping={
            "observations": "obs_*", "actions": "act_*", "rewards": "r", "terminations": "term",
            "truncations": "trunc", "episode_id": "ep"})
    out = tmp_path / "run"
    assert main(["train", "--algo", "bc", "--data", str(ds), "--steps", "5", "--out", str(out)]) == 2
    assert "env_id" in capsys.readouterr().err
    assert not out.exists()
    # without online evaluation the same dataset trains
    assert main(["train", "--algo", "bc", "--data", str(ds), "--steps", "5", "--out", str(out),
                 "--set", "eval_episodes=0"]) == 0
    assert json.loads((out / "result.json").read_text())["eval_return_mean"] is None


def _train(out, steps, **extra):
    import rayoffline
    cfg = {"batch_size": 32, "log_every": 5, "eval_episodes": 0, "checkpoint_every": 10, "threads": 1,
           "algo": {"hidden": [16, 16]}}
    return rayoffline.train("iql", "builtin:pendulum-medium", out, steps=steps, config=cfg, **extra)


def test_resume_refuses_to_change_what_the_checkpoint_was_trained_with(ray_cluster, tmp_path):
    import rayoffline
    from rayoffline.errors import ConfigError
    out = tmp_path / "run"
    _train(out, 20)
    before = _snapshot(out)
    for kwargs, message in [
        ({"overrides": ["algo.expectile=0.9"]}, "'algo' cannot change"),
        ({"overrides": ["seed=4"]}, "'seed' cannot change"),
        ({"steps": 10}, "below the 20 steps"),
    ]:
        with pytest.raises(ConfigError, match=message):
            rayoffline.train(None, None, out, resume=True, **{"steps": 30, **kwargs})
    with pytest.raises(ConfigError, match="trained with algorithm 'iql', not 'td3_bc'"):
        rayoffline.train("td3_bc", None, out, steps=30, resume=True)
    assert _snapshot(out) == before
    # run-level settings may change
    result = rayoffline.train(None, None, out, steps=30, resume=True, overrides=["log_every=10"])
    assert result["steps"] == 30
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 30]


def test_run_that_crashed_before_its_first_checkpoint_can_be_resumed(ray_cluster, tmp_path, monkeypatch):
    import rayoffline
    from rayoffline.learner.loop import Learner
    out = tmp_path / "run"
    real = Learner.step

    def crash(self, step):
        if step == 7:
            raise RuntimeError("node lost")
        real(self, step)
    monkeypatch.setattr(Learner, "step", crash)
    with pytest.raises(RuntimeError, match="node lost"):
        _train(out, 20)
    assert not (out / "checkpoints").exists() and (out / "config.yaml").exists()
    monkeypatch.setattr(Learner, "step", real)
    result = rayoffline.train(None, None, out, resume=True)
    assert result["steps"] == 20
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]


def test_final_checkpoint_is_written_before_the_final_evaluation(ray_cluster, tmp_path, monkeypatch):
    from rayoffline.learner import api, worker
    out = tmp_path / "run"

    def broken(*a, **k):
        raise RuntimeError("env crashed")
    monkeypatch.setattr(worker, "evaluate_members", broken)
    with pytest.raises(RuntimeError, match="env crashed"):
        api.train("iql", "builtin:pendulum-medium", out, steps=12, config={
            "batch_size": 32, "eval_episodes": 2, "checkpoint_every": 0, "algo": {"hidden": [16, 16]}})
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000012.pt"]


def test_run_files_are_readable_by_the_team(iql_run):
    import os
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.yaml", "result.json", "checkpoints/step_00000200.pt"):
        assert (iql_run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
