"""Learning-rate schedules and the reward transform (learner/shaping.py): owned by the learner, a function of
each member's step (exact on resume and in packs whose members are at different steps), recorded with the run."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml

import rayoffline
from rayoffline import algorithms
from rayoffline.errors import ConfigError
from rayoffline.learner import checkpoint as ckpt
from rayoffline.learner import pack_state
from rayoffline.learner.config import build_config
from rayoffline.learner.loop import Learner
from rayoffline.learner.shaping import reward_transform, schedules
from tests.helpers import random_data, spec_for
from tests.learner.test_pack_state import _steps

SCHED = {"actor": "cosine", "critic": "linear_warmup"}


def _learner(configs, seeds, data, total=20, warmup=6, lr_schedule=SCHED, reward=(1.0, 0.0)):
    cls = algorithms.get("iql")
    alg = cls(spec_for(cls), configs, seeds)
    run = build_config("iql", {"steps": total, "lr_warmup_steps": warmup, "lr_schedule": lr_schedule})["run"]
    return Learner(alg, data, batch_size=16, schedules=schedules(run, "iql", list(alg.optim_groups())),
                   reward=reward)


def _lrs(learner, group):
    """{member: lr} of `group` as its optimizer will step them next."""
    g = learner.groups[group]
    per = len(g.chunks) // g.members
    out = {}
    for pg in g.optimizer.param_groups:
        ids = {id(p) for p in pg["params"]}
        for k in range(g.members):
            if id(g.chunks[k * per]) in ids:
                out[k] = pg["lr"]
    return out


def test_schedule_factors():
    run = build_config("iql", {"steps": 100, "lr_warmup_steps": 10,
                               "lr_schedule": {"actor": "cosine", "critic": "linear_warmup"}})["run"]
    s = schedules(run, "iql", ["value", "critic", "actor"])
    assert set(s) == {"actor", "critic"}  # value stays constant: no schedule at all
    assert s["actor"](0) == 1.0 and s["actor"](50) == pytest.approx(0.5) and s["actor"](100) == pytest.approx(0.0)
    assert s["actor"](25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert [s["critic"](t) for t in (0, 4, 9, 10, 500)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0])
    every = schedules(build_config("iql", {"steps": 100, "lr_schedule": "cosine"})["run"], "iql", ["value", "actor"])
    assert set(every) == {"value", "actor"}


def test_learning_rates_follow_each_members_step():
    cls = algorithms.get("iql")
    data = random_data(spec_for(cls), n=512)
    cfg = cls.Config(hidden=(16, 16))
    learner = _learner([cfg], [0], data)
    base_actor, base_critic = cfg.actor_lr, cfg.critic_lr
    for t in range(3):
        learner.step()
        # the update just made used the factor of t; the optimizer holds it until the next step
        assert _lrs(learner, "actor")[0] == pytest.approx(base_actor * 0.5 * (1 + math.cos(math.pi * t / 20)))
        assert _lrs(learner, "critic")[0] == pytest.approx(base_critic * min(1.0, (t + 1) / 6))
        assert _lrs(learner, "value")[0] == pytest.approx(cfg.value_lr)


def test_a_pack_of_members_at_different_steps_continues_each_schedule_exactly():
    cls = algorithms.get("iql")
    data = random_data(spec_for(cls), n=512)
    cfg_a, cfg_b = cls.Config(hidden=(16, 16)), cls.Config(hidden=(16, 16), beta=5.0)
    a, b = _learner([cfg_a], [3], data), _learner([cfg_b], [11], data)
    _steps(a, 3)
    _steps(b, 9)
    pack = _learner([cfg_a, cfg_b], [3, 11], data)
    pack.load_state_dict(pack_state.concat([copy.deepcopy(a.state_dict()), copy.deepcopy(b.state_dict())]))
    hist_pack = _steps(pack, 4)
    lrs = _lrs(pack, "actor")
    assert lrs[0] != lrs[1] and len(pack.groups["actor"].optimizer.param_groups) == 2  # one group per rate
    hist_a, hist_b = _steps(a, 4), _steps(b, 4)
    for i, (solo, hist) in enumerate([(a, hist_a), (b, hist_b)]):
        for hp, hs in zip(hist_pack, hist):
            for key in hs:
                assert hp[key][i] == pytest.approx(hs[key][0], rel=1e-4, abs=1e-5), key
        k = pack.algorithm.K
        for p, q in zip(pack.algorithm.parameters(), solo.algorithm.parameters()):
            rows = p.shape[0] // k
            torch.testing.assert_close(p[i * rows:(i + 1) * rows], q, rtol=1e-4, atol=1e-5)
    # a state saved while the members step at different rates has the one-group layout of any checkpoint
    state = pack.state_dict()
    assert all(len(o["param_groups"]) == 1 for o in state["optimizers"].values())
    alone = pack_state.select(state, [1])
    c = _learner([cfg_b], [11], data)
    c.load_state_dict(copy.deepcopy(alone))
    _steps(c, 1)
    _steps(b, 1)
    assert _lrs(c, "actor")[0] == pytest.approx(_lrs(b, "actor")[0])
    assert _lrs(c, "actor")[0] == pytest.approx(cfg_b.actor_lr * 0.5 * (1 + math.cos(math.pi * 13 / 20)))


def test_resume_mid_schedule_reproduces_the_uninterrupted_run(tmp_path):
    cls = algorithms.get("iql")
    data = random_data(spec_for(cls), n=512)
    cfgs = [cls.Config(hidden=(16, 16))] * 2
    straight = _learner(cfgs, [0, 1], data)
    ref = _steps(straight, 10)
    first = _learner(cfgs, [0, 1], data)
    _steps(first, 5)
    path = ckpt.save(tmp_path, 5, {"algo": "iql", "learner": first.state_dict(), "member_configs": [], "seeds": [],
                                   "run_config": {}})
    resumed = _learner(cfgs, [7, 8], data)
    resumed.load_state_dict(ckpt.load(path)["learner"])
    for want in ref[5:]:
        got = _steps(resumed, 1)[0]
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_a_loaded_checkpoint_does_not_bring_its_learning_rate():
    """PBT continues a donor's weights with a mutated learning rate: the configured rate wins."""
    cls = algorithms.get("iql")
    data = random_data(spec_for(cls), n=256)
    donor = _learner([cls.Config(hidden=(16, 16), critic_lr=1e-3)], [0], data, lr_schedule="constant")
    _steps(donor, 2)
    child = _learner([cls.Config(hidden=(16, 16), critic_lr=2e-4)], [0], data, lr_schedule="constant")
    child.load_state_dict(copy.deepcopy(donor.state_dict()))
    assert _lrs(child, "critic")[0] == pytest.approx(2e-4)


def test_reward_transform_applies_to_sampled_rewards_only():
    cls = algorithms.get("iql")
    data = random_data(spec_for(cls), n=256)
    cfg = cls.Config(hidden=(16, 16))
    plain = _learner([cfg], [0], data, lr_schedule="constant")
    scaled = _learner([cfg], [0], data, lr_schedule="constant", reward=(2.0, -1.0))
    x, y = plain.sample(), scaled.sample()
    torch.testing.assert_close(y.rewards, x.rewards * 2.0 - 1.0)
    torch.testing.assert_close(y.observations, x.observations)
    assert torch.equal(data.rewards, random_data(spec_for(cls), n=256).rewards)  # the dataset is untouched
    assert scaled.state_dict()["reward_transform"] == [2.0, -1.0]
    again = _learner([cfg], [0], data, lr_schedule="constant")  # a resume keeps the transform it trained with
    again.load_state_dict(copy.deepcopy(scaled.state_dict()))
    assert again.reward == (2.0, -1.0)


def test_return_range_needs_different_returns():
    meta = {"return_stats": {"min": -100.0, "max": 400.0}, "num_episodes": 7}
    assert reward_transform("return_range", meta, "DS") == (2.0, 0.0)
    assert reward_transform({"scale": 10, "bias": -5}, meta, "DS") == (10.0, -5.0)
    assert reward_transform("none", meta, "DS") == (1.0, 0.0)
    with pytest.raises(ConfigError, match=r"every episode of /data/flat \(3 episodes\) returns 200.*scale"):
        reward_transform("return_range", {"return_stats": {"min": 200.0, "max": 200.0}, "num_episodes": 3},
                         "/data/flat")


@pytest.mark.parametrize("override,match", [
    ({"lr_schedule": {"policy": "cosine"}}, r"lr_schedule.policy.*no optimizer group 'policy'.*value, critic, actor"),
    ({"lr_schedule": "exponential"}, r"'lr_schedule': unknown schedule 'exponential'"),
    ({"lr_schedule": {"actor": "step"}}, r"'lr_schedule.actor': unknown schedule 'step'"),
    ({"reward_scale": "range"}, r"'reward_scale': expected none, return_range"),
    ({"reward_scale": {"scale": 2, "offset": 1}}, r"'reward_scale.offset': unknown key"),
    ({"lr_warmup_steps": 0}, r"'lr_warmup_steps': must be >= 1"),
])
def test_bad_settings_name_the_key_and_write_nothing(override, match, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        rayoffline.train("iql", "builtin:pendulum-medium", out=out, steps=5, overrides=override)
    assert not out.exists()


def test_run_records_its_transform_and_schedule(tmp_path):
    out = tmp_path / "run"
    result = rayoffline.train("iql", "builtin:pendulum-medium", out=out, steps=20, overrides={
        "reward_scale": "return_range", "lr_schedule.actor": "cosine", "eval_episodes": 0, "log_every": 10,
        "progress": "off", "algo.hidden": [16, 16]})
    meta = rayoffline.data.read_metadata(rayoffline.data.resolve("builtin:pendulum-medium"))
    scale = 1000.0 / (meta["return_stats"]["max"] - meta["return_stats"]["min"])
    assert result["reward_transform"] == {"scale": pytest.approx(scale), "bias": 0.0}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["reward_scale"] == "return_range" and saved["lr_schedule"] == {"actor": "cosine"}
    state = ckpt.load(ckpt.latest(out))
    assert state["learner"]["reward_transform"] == [pytest.approx(scale), 0.0]
    assert state["run_config"]["reward_scale"] == "return_range"


def test_result_files_are_strict_json(tmp_path):
    """CQL's unbounded clip_diff_max default is inf: result.json must still parse outside Python."""
    import json

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    rayoffline.train("cql", "builtin:pendulum-medium", out=tmp_path / "run", steps=2, overrides={
        "eval_episodes": 0, "progress": "off", "algo.hidden": [8, 8], "algo.cql_n_actions": 2})
    result = json.loads((tmp_path / "run" / "result.json").read_text(), parse_constant=refuse)
    assert result["members"][0]["algo"]["clip_diff_max"] == "inf"
