"""Warm starts (run key `init_from`, rayoffline/learner/warm.py): the networks come from the source run, the
coefficients from the new config; sources that do not fit are refused before anything is written."""
from __future__ import annotations

import pytest
import torch

import rayoffline
from rayoffline.errors import ConfigError
from rayoffline.learner.api import load_run

SMALL = {"algo": {"hidden": [32, 32]}, "eval_episodes": 0, "progress": "off", "diagnostics": "off",
         "log_every": 50}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("warm") / "src"
    rayoffline.train("iql", "builtin:pendulum-medium", out, steps=200, config=SMALL)
    return out


def _weights(run_dir):
    return load_run(run_dir)[0].state_dict()


def test_a_warm_started_run_begins_from_the_source_weights(source, tmp_path):
    src = _weights(source)
    warm, cold = tmp_path / "warm", tmp_path / "cold"
    rayoffline.train("iql", "builtin:pendulum-medium", warm, steps=1, config={**SMALL, "init_from": str(source),
                                                                              "algo": {"hidden": [32, 32],
                                                                                       "expectile": 0.9}})
    rayoffline.train("iql", "builtin:pendulum-medium", cold, steps=1, config=SMALL)
    w, c = _weights(warm), _weights(cold)
    name = next(n for n in src if n.startswith("actor") and n.endswith("weight"))
    assert (w[name] - src[name]).abs().max() < 0.01 < (c[name] - src[name]).abs().max()
    assert float(w["coef_expectile"][0]) == pytest.approx(0.9)  # the new config's coefficient, not the source's
    assert torch.equal(w["obs_mean"], src["obs_mean"])


def test_one_member_is_copied_into_every_member(source, tmp_path):
    from rayoffline.learner.warm import initial_weights
    two = tmp_path / "two"
    rayoffline.train("iql", "builtin:pendulum-medium", two, steps=1,
                     config={**SMALL, "members": [{"seed": 1}, {"seed": 2}]})
    algorithm = load_run(two)[0]
    got = initial_weights(algorithm, "iql", source)
    src = _weights(source)
    name = next(n for n in src if n.startswith("actor") and n.endswith("weight"))
    assert got[name].shape[0] == 2 * src[name].shape[0] and torch.equal(got[name], torch.cat([src[name]] * 2))
    critic = next(n for n in src if n.startswith("critic") and n.endswith("weight"))  # K x C rows, member-major
    assert torch.equal(got[critic], torch.cat([src[critic]] * 2))


@pytest.mark.parametrize("algo,data,extra,match", [
    ("td3_bc", "builtin:pendulum-medium", {}, "holds a 'iql' model"),
    ("iql", "builtin:pendulum-medium", {"algo": {"hidden": [64, 64]}}, "has shape"),
    ("iql", "builtin:pendulum-expert", {}, None),
])
def test_a_source_that_does_not_fit_is_refused_before_anything_is_written(source, tmp_path, algo, data, extra,
                                                                          match):
    out = tmp_path / "bad"
    cfg = {**SMALL, **extra, "init_from": str(source)}
    if match is None:  # same spaces, other data: allowed (that is what retraining on new data does)
        rayoffline.train(algo, data, out, steps=1, config=cfg)
        return
    with pytest.raises(ConfigError, match=match) as e:
        rayoffline.train(algo, data, out, steps=1, config=cfg)
    assert "init_from" in str(e.value) and not (out / "config.yaml").exists()


def test_a_missing_source_is_named(tmp_path):
    with pytest.raises(ConfigError, match="init_from.*does not exist"):
        rayoffline.train("iql", "builtin:pendulum-medium", tmp_path / "x", steps=1,
                         config={**SMALL, "init_from": str(tmp_path / "nope")})
