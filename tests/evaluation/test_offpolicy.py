"""`rayoffline ope RUN_DIR` (rayoffline/evaluation/offpolicy.py): estimates with intervals in ope.json, and clear
errors for what is missing."""
from __future__ import annotations

import json
import shutil

import pytest

from rayoffline.cli import main
from rayoffline.data.builtin import resolve
from rayoffline.data.holdout import split

SMALL = {"fqe_steps": 300, "behavior_steps": 300, "dynamics_steps": 200, "ensemble": 2, "bootstrap": 50}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ope")
    ds = root / "pendulum"
    shutil.copytree(resolve("builtin:pendulum-medium"), ds)
    split(ds, 0.1, seed=0)
    run = root / "run"
    assert main(["train", "--algo", "bc", "--data", str(ds), "--steps", "200", "--out", str(run),
                 "--set", "eval_episodes=0", "--set", "progress=off", "--set", "algo.hidden=[32, 32]"]) == 0
    return ds, run


def test_ope_writes_estimates_with_intervals(trained):
    from rayoffline.evaluation.offpolicy import format_table, run_ope
    ds, run = trained
    out = run_ope(run, estimators="fqe,wis,pdwis,dr,mb", **SMALL)
    saved = json.loads((run / "ope.json").read_text())
    assert saved["estimates"].keys() == {"fqe", "wis", "pdwis", "dr", "mb"} == out["estimates"].keys()
    assert saved["holdout"]["episodes"] == 10 and saved["holdout"]["transitions"] == 2000
    assert saved["members"] == [0] and saved["step"] == 200 and saved["gamma"] == 0.99
    for name, rows in saved["estimates"].items():
        (e,) = rows
        assert e["member"] == 0 and e["low"] <= e["value"] <= e["high"], (name, e)
    assert saved["estimates"]["wis"][0]["ess"] is not None and "disagreement" in saved["estimates"]["mb"][0]
    # pendulum's rewards are in [-16.3, 0]: every discounted estimate must lie in [-16.3 / (1 - 0.99), 0]
    assert all(-1630 <= rows[0]["value"] <= 0 for rows in saved["estimates"].values())
    table = format_table(out)
    assert "held-out episodes' own discounted return" in table and "fqe" in table


def test_ope_errors_name_what_is_missing(trained, tmp_path, capsys):
    ds, run = trained
    cases = [
        (["ope", str(run), "--estimators", "fqe,magic"], "unknown estimator 'magic'"),
        (["ope", str(run), "--estimators", "is"], "needs the behavior policy's logged action probabilities.*wis, pdwis "
                                                  "and dr apply with a behavior model fitted"),
        (["ope", str(run), "--members", "3"], "member 3 does not exist; the run has 1 member"),
        (["ope", str(tmp_path / "nowhere")], "does not exist"),
    ]
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.yaml").write_text("algo_name: bc\n")
    cases.append((["ope", str(empty)], "has no checkpoint yet"))
    nosplit = tmp_path / "nosplit"
    shutil.copytree(resolve("builtin:pendulum-medium"), nosplit)
    cases.append((["ope", str(run), "--data", str(nosplit)], "no held-out split; make one with `rayoffline data "
                                                             "split"))
    import re
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err), (argv, err)
    assert not (tmp_path / "nowhere").exists()


def test_a_run_can_request_ope_metrics_at_its_eval_points(trained, tmp_path, capsys):
    ds, _ = trained
    run = tmp_path / "run"
    assert main(["train", "--algo", "bc", "--data", str(ds), "--steps", "100", "--out", str(run),
                 "--set", "eval_episodes=0", "--set", "progress=off", "--set", "algo.hidden=[32, 32]",
                 "--set", "eval_every=50", "--set", "ope=[fqe, wis]", "--set", "ope_steps=100"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    got = {r["step"]: r for r in rows if "ope/fqe" in r}
    assert sorted(got) == [50, 100]
    assert all(isinstance(got[s][k], float) for s in got for k in ("ope/fqe", "ope/wis"))  # K=1: scalars
    assert got[50]["ope/fqe"] != got[100]["ope/fqe"]
    nosplit = tmp_path / "nosplit"
    shutil.copytree(resolve("builtin:pendulum-medium"), nosplit)
    assert main(["train", "--algo", "bc", "--data", str(nosplit), "--steps", "10", "--out", str(tmp_path / "r2"),
                 "--set", "eval_episodes=0", "--set", "progress=off", "--set", "ope=[fqe]"]) == 2
    assert "run key 'ope'" in capsys.readouterr().err and not (tmp_path / "r2").exists()
    assert main(["train", "--algo", "bc", "--data", str(ds), "--steps", "10", "--out", str(tmp_path / "r3"),
                 "--set", "ope=[is]"]) == 2
    assert "run key 'ope': 'is'" in capsys.readouterr().err


def test_estimates_of_a_policy_outside_the_datas_support_carry_a_warning(tmp_path):
    """On narrow data (builtin:pendulum-expert, logged actions of nearby states within ~0.1 of each other) a BC
    policy stays on the data and the uniform policy does not: `support` says so per member, and the model-based
    estimates (fqe here) of the off-support member carry the warning."""
    import torch

    from rayoffline.data import load_metadata
    from rayoffline.evaluation.offpolicy import OPESettings, estimate_policy
    from rayoffline.evaluation.policies import LearnedPolicy, UniformPolicy, stack_policies
    from rayoffline.learner.api import load_run
    from rayoffline.spec import EnvSpec
    ds = tmp_path / "expert"
    shutil.copytree(resolve("builtin:pendulum-expert"), ds)
    split(ds, 0.1, seed=0)
    assert main(["train", "--algo", "bc", "--data", str(ds), "--steps", "500", "--out", str(tmp_path / "bc"),
                 "--set", "eval_episodes=0", "--set", "progress=off", "--set", "algo.hidden=[32, 32]"]) == 0
    bc = load_run(tmp_path / "bc")[0]
    meta = load_metadata(ds)
    policy = stack_policies([LearnedPolicy(bc), UniformPolicy(EnvSpec.from_metadata(meta), 1)])
    res = estimate_policy(policy, bc.norm_actions, str(ds), meta, 0.99,
                          OPESettings(estimators=("fqe",), fqe_steps=100, bootstrap=0), torch.device("cpu"))
    on, off = res["support"]
    assert on["reference"] == off["reference"] < 0.2, res["support"]
    assert not on["off_support"] and off["off_support"], res["support"]
    assert off["action_distance"] > 3 * on["action_distance"], res["support"]
    assert res["estimates"]["fqe"][0]["warning"] is None
    assert "outside the data's support" in res["estimates"]["fqe"][1]["warning"]
