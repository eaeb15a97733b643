"""`rayoffline retrain JOB.yaml` (rayoffline/retrain.py) over growing builtin data: the first candidate is promoted,
a better one replaces it, one trained on corrupted data is refused with its evidence, and jobs killed in training
or right before promoting change nothing and can be re-run."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from rayoffline.data import convert
from rayoffline.data.builtin import resolve
from rayoffline.errors import ConfigError, DataError, RayOfflineError
from rayoffline.registry import Registry
from rayoffline.retrain import load_job, run_job

SMALL = {"algo": {"hidden": [64, 64]}, "eval_episodes": 0, "progress": "off", "diagnostics": "off",
         "log_every": 100}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three partitions of builtin:pendulum-medium's 100 episodes: 0-29, 30-59, and all 100 with their rewards
    negated (a logging bug: a policy trained on it learns to keep the pendulum down)."""
    root = tmp_path_factory.mktemp("sources")
    table = pq.read_table(sorted(glob.glob(f"{resolve('builtin:pendulum-medium')}/part-*/*.parquet")))
    eid = table.column("episode_id")
    first = table.filter(pc.less(eid, 30))
    second = table.filter(pc.and_(pc.greater_equal(eid, 30), pc.less(eid, 60)))
    bad = table.set_column(table.schema.get_field_index("rewards"), "rewards", pc.negate(table.column("rewards")))
    paths = {}
    for name, t in (("first", first), ("second", second), ("corrupted", bad)):
        paths[name] = root / f"{name}.parquet"
        pq.write_table(t, paths[name])
    return paths


def _job(tmp, steps: int, append=(), **extra):
    job = {"name": "pendulum", "registry": str(tmp / "registry"), "work_dir": str(tmp / "work"),
           "data": {"dataset": str(tmp / "data"), "append": [str(a) for a in append], "holdout": 0.2},
           "train": {"algo": "iql", "steps": steps, "config": SMALL},
           "evaluate": {"fqe_steps": 1000, "fqe": {"hidden": [64, 64]}, "online_episodes": 10},
           "gate": {"margin": 0.0}}
    for key, value in extra.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) else value
    return job


@pytest.fixture(scope="module")
def history(sources, tmp_path_factory):
    """Three jobs in sequence on one registry and dataset: (tmp, [decision 1, 2, 3])."""
    tmp = tmp_path_factory.mktemp("retrain")
    convert(str(sources["first"]), tmp / "data", env_id="Pendulum-v1")
    said: list[str] = []
    d1 = run_job(_job(tmp, 200), say=said.append)
    d2 = run_job(_job(tmp, 2000, [sources["second"]]), say=said.append)
    d3 = run_job(_job(tmp, 2000, [sources["corrupted"]]), say=said.append)
    print("\n".join(said))
    return tmp, [d1, d2, d3], said


def test_the_first_candidate_is_promoted_and_a_better_one_replaces_it(history):
    tmp, (d1, d2, _), said = history
    reg = Registry.open(tmp / "registry")
    assert d1["outcome"] == "promote" and d1["incumbent"] is None
    assert d2["outcome"] == "promote" and d2["incumbent"]["version"] == d1["candidate"]["version"]
    c, i = d2["candidate"]["online"], d2["incumbent"]["online"]
    assert c["low"] > i["value"], (c, i)  # the rule, as recorded
    assert d2["warm_start"] == d1["candidate"]["version"]
    v2 = reg.get(d2["candidate"]["version"])
    assert v2.parent == d1["candidate"]["version"] and v2.job["name"] == "pendulum"
    assert v2.dataset["content_hash"] == d2["data"]["content_hash"] and d2["data"]["partitions"] == 2
    assert v2.metrics["ope"]["estimates"]["fqe"] == d2["candidate"]["ope"]["fqe"]
    assert v2.metrics["retrain"]["online"] == d2["candidate"]["online"]
    assert v2.metrics["online"]["return_mean"] == d2["candidate"]["online"]["value"]
    assert any("PROMOTE" in line for line in said)


def test_a_candidate_trained_on_corrupted_data_is_refused_with_its_evidence(history):
    tmp, (d1, d2, d3), _ = history
    reg = Registry.open(tmp / "registry")
    assert d3["outcome"] == "refuse", d3["reason"]
    assert reg.alias("production") == d2["candidate"]["version"]  # unchanged
    recorded = reg.decision(d3["id"])
    assert recorded["outcome"] == "refuse" and recorded["candidate"]["online"]["value"] < \
        recorded["incumbent"]["online"]["value"]
    assert "is not above" in recorded["reason"] and recorded["data"]["partitions"] == 3
    assert recorded["data"]["new_since_incumbent"] == ["part-00002"] and d2["data"]["new_since_incumbent"] == \
        ["part-00001"] and d1["data"]["new_since_incumbent"] == ["part-00000"]
    # the refused candidate is still a version (its evidence points at it), just not production
    assert reg.get(d3["candidate"]["version"]).parent == d2["candidate"]["version"]


def _cli(job_file, env=None):
    return subprocess.Popen([sys.executable, "-m", "rayoffline", "retrain", str(job_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})


def test_jobs_killed_in_training_or_before_promoting_change_nothing_and_can_be_rerun(sources, tmp_path):
    convert(str(sources["first"]), tmp_path / "data", env_id="Pendulum-v1")
    first = run_job(_job(tmp_path, 200), say=lambda s: None)
    reg = Registry.open(tmp_path / "registry")
    before = reg.history("production")
    job_file = tmp_path / "job.yaml"
    job = _job(tmp_path, 3000, [sources["second"]])
    job["train"]["config"] = {**SMALL, "checkpoint_every": 500}
    job_file.write_text(yaml.safe_dump(job))
    # killed mid-training: after its first checkpoint
    proc = _cli(job_file)
    deadline = time.time() + 120
    old = set(glob.glob(str(tmp_path / "work" / "*" / "candidate" / "checkpoints" / "step_*.pt")))  # job 1's
    while not set(glob.glob(str(tmp_path / "work" / "*" / "candidate" / "checkpoints" / "step_*.pt"))) - old:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert reg.history("production") == before
    # killed right before promoting (after registering and recording the decision)
    proc = _cli(job_file, {"RAYOFFLINE_RETRAIN_FAULT": "before_promote"})
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == -9, out
    assert "resuming the candidate" in out, out
    assert reg.history("production") == before and reg.alias("production") == first["candidate"]["version"]
    versions = len(reg.versions())
    # a clean re-run finishes the job: same candidate (reused), same version, now promoted
    proc = _cli(job_file)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert "already trained" in out and "PROMOTE" in out, out
    assert len(reg.versions()) == versions
    assert reg.alias("production") != first["candidate"]["version"]
    # and once more: nothing new to do
    proc = _cli(job_file)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "nothing to do" in out, out
    assert len(reg.versions()) == versions and len(reg.history("production")) == len(before) + 1


def test_bad_jobs_are_refused_before_training(sources, tmp_path, capsys):
    convert(str(sources["first"]), tmp_path / "data", env_id="Pendulum-v1")
    (tmp_path / "file").write_text("x")
    cases = [
        (_job(tmp_path, 10, registry=str(tmp_path / "file" / "registry")), "registry"),
        (_job(tmp_path, 10, train={"warm_start": "staging"}), "warm_start.*alias 'staging'"),
        (_job(tmp_path, 10, gate={"metric": "ope/wis"}), "gate.metric"),
        (_job(tmp_path, 10, gate={"confidence": 2}), "gate.confidence"),
        (_job(tmp_path, 10, data={"dataset": str(tmp_path / "nope")}), "nope"),
        ({"name": "x", "registry": "r", "data": {"dataset": "d"}, "trian": {}}, "job key 'trian'"),
        (_job(tmp_path, 10, data={"dataset": "builtin:pendulum-medium"}), "data.dataset.*convert a copy"),
    ]
    for job, match in cases:
        with pytest.raises(RayOfflineError, match=match):
            run_job(job, say=lambda s: None)
        assert not (tmp_path / "work").exists()
    # spaces changed since the incumbent; another algorithm for a warm start
    run_job(_job(tmp_path, 50), say=lambda s: None)
    cart = tmp_path / "cart"
    import shutil
    shutil.copytree(resolve("builtin:cartpole-medium"), cart)
    with pytest.raises(DataError, match="spaces"):
        run_job(_job(tmp_path, 10, data={"dataset": str(cart)}), say=lambda s: None)
    with pytest.raises(ConfigError, match="warm_start.*'iql' model"):
        run_job(_job(tmp_path, 10, train={"algo": "td3_bc"}), say=lambda s: None)
    with pytest.raises(ConfigError, match="algo.hidden|has shape"):
        run_job(_job(tmp_path, 10, train={"config": {**SMALL, "algo": {"hidden": [32, 32]}}}), say=lambda s: None)
    assert json.loads(json.dumps(load_job(_job(tmp_path, 10)).gate.__dict__))["first"] == "promote"


def test_a_job_can_train_its_candidate_with_a_sweep(ray_cluster, sources, tmp_path):
    """train.sweep: the candidate is the best trial's best member; a warm-started sweep runs unfused."""
    convert(str(sources["first"]), tmp_path / "data", env_id="Pendulum-v1")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "algo": "iql", "data": "builtin:pendulum-medium",  # replaced by the job's dataset
        "config": {"steps": 100, "log_every": 50, "eval_episodes": 2, "checkpoint_every": 0, "progress": "off",
                   "diagnostics": "off", "algo": {"hidden": [32, 32]}},
        "space": {"algo.beta": {"grid": [1.0, 3.0]}}, "seeds": 1, "metric": "eval/return_mean", "mode": "max",
        "fuse": False, "resources": {"cpus": 1}}))
    job = _job(tmp_path, 100)
    job["train"] = {"sweep": str(sweep)}
    first = run_job(job, say=lambda s: None)
    assert first["outcome"] == "promote" and "/sweep/" in first["candidate"]["run_dir"]
    rows = json.loads(json.dumps(first["candidate"]))
    assert rows["step"] == 100
    job["data"]["append"] = [str(sources["second"])]
    second = run_job(job, say=lambda s: None)  # warm-started from the first (an unfused sweep)
    reg = Registry.open(tmp_path / "registry")
    assert reg.get(second["candidate"]["version"]).parent == first["candidate"]["version"]
    trial_cfg = yaml.safe_load((Path(second["candidate"]["run_dir"]) / "config.yaml").read_text())
    assert Path(trial_cfg["init_from"]) == reg.checkout(first["candidate"]["version"]).resolve()
    assert second["outcome"] in ("promote", "refuse") and second["incumbent"]["version"] == \
        first["candidate"]["version"]


def test_a_job_that_loses_the_promotion_race_changes_nothing_and_says_so(sources, tmp_path):
    """Another job promotes while this one evaluates: the compare-and-swap fails, the alias keeps the other job's
    version, and a `conflict` decision is recorded."""
    from rayoffline.registry import AliasConflict
    convert(str(sources["first"]), tmp_path / "data", env_id="Pendulum-v1")
    first = run_job(_job(tmp_path, 50), say=lambda s: None)
    reg = Registry.open(tmp_path / "registry")
    other = reg.register(first["candidate"]["run_dir"], job={"name": "other"})

    def meanwhile(line: str) -> None:  # the other job promotes while this one evaluates
        if line.startswith("retrain: evaluating"):
            reg.promote("production", other.version, reason="the other job")
    with pytest.raises(AliasConflict):
        run_job(_job(tmp_path, 300, [sources["second"]], gate={"margin": -1e6}), say=meanwhile)  # would promote
    assert reg.alias("production") == other.version
    (last,) = [d for d in reg.decisions() if d["outcome"] == "conflict"]
    assert reg.decision(last["decision"])["outcome"] == "promote"  # the decision it could not carry out
    assert last["incumbent"]["version"] == first["candidate"]["version"]
    assert other.version in last["reason"]
