"""Reference presets (`rayoffline train --preset NAME`): the shipped files are valid configs that say where their
numbers come from; a preset sits beneath --config and --set; wrong names, algorithms and action spaces are
clear errors that write nothing."""
from __future__ import annotations

import pytest
import yaml

import rayoffline
from rayoffline.cli import main
from rayoffline.config import load_yaml
from rayoffline.errors import ConfigError
from rayoffline.learner import presets
from rayoffline.learner.config import build_config

SHIPPED = presets.names()


def test_the_reference_presets_ship():
    for algo in ("iql", "cql", "td3_bc"):
        for env in ("hopper", "halfcheetah", "walker2d"):
            for quality in ("medium", "medium-replay", "medium-expert"):
                assert f"{algo}-{env}-{quality}" in SHIPPED
        for maze in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse"):
            assert f"{algo}-antmaze-{maze}" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_preset_is_a_valid_config_with_its_source(name):
    raw = presets.load(name)
    assert name.startswith(f"{raw['algo_name']}-")
    assert raw["action_space"] in ("continuous", "discrete")
    assert len(str(raw.get("source", ""))) > 20, "a preset says where its numbers come from"
    config = {k: v for k, v in raw.items() if k not in presets.META_KEYS}
    cfg = build_config(raw["algo_name"], config)
    assert cfg["run"].steps >= 100_000
    if name.startswith("iql-"):  # the reference anneals IQL's actor rate everywhere
        assert cfg["run"].lr_schedule == {"actor": "cosine"}
    if name in ("iql-hopper-medium", "iql-hopper-medium-replay"):  # CORL's files that rescale rewards
        assert cfg["run"].reward_scale == "return_range"
    if "antmaze" in name:  # sparse 0/1 rewards shifted (IQL, TD3+BC: r - 1) or scaled (CQL: 10 r - 5)
        assert isinstance(cfg["run"].reward_scale, dict) and cfg["run"].reward_scale["bias"] < 0


@pytest.fixture
def preset_dir(tmp_path, monkeypatch):
    d = tmp_path / "presets"
    d.mkdir()
    (d / "iql-pendulum-test.yaml").write_text(yaml.safe_dump({
        "source": "a test preset: numbers chosen to be visible in config.yaml", "algo_name": "iql",
        "action_space": "continuous", "data": "builtin:pendulum-medium", "steps": 12, "log_every": 6,
        "eval_episodes": 0, "progress": "off", "reward_scale": {"scale": 2.0, "bias": -1.0},
        "lr_schedule": {"actor": "cosine"}, "algo": {"beta": 7.0, "hidden": [8, 8]}}))
    (d / "td3_bc-hopper-test.yaml").write_text(yaml.safe_dump({
        "source": "a test preset on a Minari dataset to convert first", "algo_name": "td3_bc",
        "action_space": "continuous", "data": "minari:mujoco/hopper/medium-v0", "steps": 10}))
    (d / "td3_bc-nodata-test.yaml").write_text(yaml.safe_dump({
        "source": "a test preset without a hosted dataset", "algo_name": "td3_bc", "action_space": "continuous"}))
    monkeypatch.setenv("RAYOFFLINE_PRESETS", str(d))
    return d


def test_a_preset_is_beneath_config_and_set(preset_dir, tmp_path):
    r = rayoffline.train(None, None, tmp_path / "a", preset="iql-pendulum-test")
    saved = load_yaml((tmp_path / "a" / "config.yaml").read_text())
    assert saved["algo_name"] == "iql" and saved["data"] == "builtin:pendulum-medium" and saved["steps"] == 12
    assert saved["algo"]["beta"] == 7.0 and saved["lr_schedule"] == {"actor": "cosine"}
    assert r["reward_transform"] == {"scale": 2.0, "bias": -1.0}
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("algo:\n  beta: 4.0\nsteps: 6\n")
    rayoffline.train("iql", "builtin:pendulum-medium", tmp_path / "b", preset="iql-pendulum-test", config=cfg_file,
                     overrides=["algo.beta=2.5"])
    saved = load_yaml((tmp_path / "b" / "config.yaml").read_text())
    assert saved["algo"]["beta"] == 2.5 and saved["steps"] == 6 and saved["algo"]["hidden"] == [8, 8]


def test_preset_errors_name_what_is_wrong(preset_dir, tmp_path, capsys):
    out = tmp_path / "x"
    with pytest.raises(ConfigError, match=r"no such preset \(did you mean 'iql-pendulum-test'\?\); presets: "
                                          r"iql-pendulum-test"):
        rayoffline.train(None, None, out, preset="iql-pendulum-tset")
    with pytest.raises(ConfigError, match=r"'iql-pendulum-test' is for algorithm 'iql', not 'cql'; there are no "
                                          r"presets for cql"):
        rayoffline.train("cql", None, out, preset="iql-pendulum-test")
    with pytest.raises(ConfigError, match=r"is for continuous actions, but builtin:cartpole-medium has discrete "
                                          r"actions \(Discrete\(2\)\)"):
        rayoffline.train(None, "builtin:cartpole-medium", out, preset="iql-pendulum-test")
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"trains on minari:mujoco/hopper/medium-v0: convert it once with "
                                          r"`rayoffline data convert minari:mujoco/hopper/medium-v0 --out DIR` and "
                                          r"pass --data DIR"):
        rayoffline.train(None, None, out, preset="td3_bc-hopper-test")
    with pytest.raises(ConfigError, match=r"'td3_bc-nodata-test' names no dataset.*pass --data DIR"):
        rayoffline.train(None, None, out, preset="td3_bc-nodata-test")
    assert not out.exists()
    rc = main(["train", "--preset", "nope", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "presets: iql-pendulum-test; td3_bc-{hopper-test, nodata-test}" in err, err
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert "iql-pendulum-test" in listing and "a test preset" in listing


def test_resume_refuses_a_preset(preset_dir, tmp_path):
    rayoffline.train(None, None, tmp_path / "a", preset="iql-pendulum-test")
    with pytest.raises(ConfigError, match="--preset cannot change it"):
        rayoffline.train(None, None, tmp_path / "a", resume=True, preset="iql-pendulum-test")


def test_a_sweep_builds_on_a_preset(preset_dir):
    from rayoffline.sweep.space import load_sweep
    sweep = load_sweep({"preset": "iql-pendulum-test", "config": {"steps": 8},
                        "space": {"algo.expectile": {"grid": [0.6, 0.8]}}})
    assert sweep.algo == "iql" and sweep.data == "builtin:pendulum-medium" and sweep.preset == "iql-pendulum-test"
    assert sweep.config["steps"] == 8 and sweep.config["algo"]["beta"] == 7.0
    assert sweep.config["lr_schedule"] == {"actor": "cosine"}
    with pytest.raises(ConfigError, match=r"sweep key 'preset': --preset 'iql-pendulum-test' is for algorithm "
                                          r"'iql', not 'cql'"):
        load_sweep({"preset": "iql-pendulum-test", "algo": "cql"})
    with pytest.raises(ConfigError, match=r"sweep key 'preset':.*no such preset"):
        load_sweep({"preset": "iql-nothing", "algo": "iql", "data": "builtin:pendulum-medium"})


def test_a_sweep_searches_keys_its_preset_sets(preset_dir):
    from rayoffline.sweep.space import load_sweep
    sweep = load_sweep({"preset": "iql-pendulum-test", "space": {"algo.beta": {"grid": [1.0, 2.0]}}})
    assert "beta" not in sweep.config["algo"] and sweep.config["algo"]["hidden"] == [8, 8]
