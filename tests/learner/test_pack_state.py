"""Members join and leave a pack by slicing and concatenating learner states (learner/pack_state.py): a pack
made of members that trained apart, at different steps, continues exactly as each member alone."""
from __future__ import annotations

import copy

import pytest
import torch

from rayoffline import algorithms
from rayoffline.learner import pack_state
from rayoffline.learner.loop import Learner
from tests.helpers import random_data, spec_for


def _learner(name, configs, seeds, data):
    cls = algorithms.get(name)
    return Learner(cls(spec_for(cls), configs, seeds), data, batch_size=16)


def _steps(learner, n):
    out = []
    for _ in range(n):
        learner.step()
        out.append(learner.pop_metrics())
    return out


def _member(learner, i):
    """Member i's parameters as a flat list of tensors."""
    k = learner.algorithm.K
    return [p[i * (p.shape[0] // k):(i + 1) * (p.shape[0] // k)] for p in learner.algorithm.parameters()]


@pytest.mark.parametrize("name,extra", [
    ("iql", {}), ("td3_bc", {}), ("cql", {"bc_steps": 5}), ("bcq", {}),
    # CORL's options: per-member log-std scalars (K,) in the state and the actor's optimizer chunks
    ("cql", {"bc_steps": 5, "log_std_offset": -1.0, "orthogonal_init": True, "last_layer_gain": 1e-2,
             "max_target_backup": True})])
def test_members_joined_at_different_steps_continue_as_alone(name, extra):
    cls = algorithms.get(name)
    data = random_data(spec_for(cls), n=512)
    cfg_a = cls.Config(hidden=(16, 16), **extra)
    coef = {"iql": {"beta": 5.0}, "td3_bc": {"alpha": 1.0}, "cql": {"cql_alpha": 2.0}, "bcq": {"threshold": 0.1}}
    cfg_b = cls.Config(hidden=(16, 16), **extra, **{k: v for k, v in coef[name].items()
                                                     if hasattr(cls.Config, k)})
    a = _learner(name, [cfg_a], [3], data)
    b = _learner(name, [cfg_b], [11], data)
    _steps(a, 4)
    _steps(b, 8)  # b is 4 steps ahead (same parity: TD3+BC's delayed actor agrees)
    pack = _learner(name, [cfg_a, cfg_b], [3, 11], data)
    # copies: a loaded optimizer state aliases the tensors it was given, and a and b keep training below
    pack.load_state_dict(pack_state.concat([copy.deepcopy(a.state_dict()), copy.deepcopy(b.state_dict())]))
    assert pack.member_steps == [4, 8]
    hist_pack = _steps(pack, 4)  # CQL: a is in its BC warm-up for one more step, b is past it
    hist_a, hist_b = _steps(a, 4), _steps(b, 4)
    for i, (solo, hist) in enumerate([(a, hist_a), (b, hist_b)]):
        for s, (hp, hs) in enumerate(zip(hist_pack, hist)):
            for key in hs:
                assert hp[key][i] == pytest.approx(hs[key][0], rel=1e-4, abs=1e-5), f"step {s} {key} member {i}"
        for p, q in zip(_member(pack, i), _member(solo, 0)):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_a_selected_member_is_a_run_of_its_own():
    cls = algorithms.get("iql")
    data = random_data(spec_for(cls), n=512)
    cfgs = [cls.Config(hidden=(16, 16), expectile=e) for e in (0.6, 0.7, 0.9)]
    pack = _learner("iql", cfgs, [1, 2, 3], data)
    _steps(pack, 5)
    state = pack_state.to_cpu(pack_state.select(pack.state_dict(), [2]))
    assert state["members"] == 1 and state["member_steps"] == [5]
    alone = _learner("iql", [cfgs[2]], [3], data)
    alone.load_state_dict(state)
    # the pack loses members 0 and 1 (they left) and keeps training member 2: same as the member alone
    rest = _learner("iql", [cfgs[2]], [3], data)
    rest.load_state_dict(copy.deepcopy(pack_state.select(pack.state_dict(), [2])))
    h1, h2 = _steps(alone, 3), _steps(rest, 3)
    assert h1 == h2
    with pytest.raises(ValueError, match="outside"):
        pack_state.select(pack.state_dict(), [3])


def test_checkpoint_of_one_flat_optimizer_tensor_still_loads():
    """Checkpoints written before the optimizer kept one chunk per member and parameter held one Adam state
    over the whole flat buffer; they load into the chunks unchanged."""
    cls = algorithms.get("td3_bc")
    data = random_data(spec_for(cls), n=512)
    cfg = cls.Config(hidden=(16, 16))
    a = _learner("td3_bc", [cfg], [5], data)
    _steps(a, 4)
    state = a.state_dict()
    old = dict(state)
    old.pop("member_steps")
    old["optimizers"] = {}
    for g, o in state["optimizers"].items():
        chunks = [o["state"][i] for i in range(len(o["param_groups"][0]["params"]))]
        whole = {"step": chunks[0]["step"], **{k: torch.cat([c[k] for c in chunks]) for k in ("exp_avg", "exp_avg_sq")}}
        old["optimizers"][g] = {"state": {0: whole}, "param_groups": [{**o["param_groups"][0], "params": [0]}]}
    b = _learner("td3_bc", [cfg], [5], data)
    b.load_state_dict(old, step=4)
    assert _steps(a, 2) == _steps(b, 2)


def test_coefficients_come_from_the_config_not_the_checkpoint():
    """PBT continues a donor's weights with mutated coefficients: the loading learner's configs win."""
    cls = algorithms.get("iql")
    data = random_data(spec_for(cls), n=512)
    donor = _learner("iql", [cls.Config(hidden=(16, 16), beta=3.0)], [1], data)
    _steps(donor, 3)
    mutated = _learner("iql", [cls.Config(hidden=(16, 16), beta=7.0)], [1], data)
    mutated.load_state_dict(copy.deepcopy(donor.state_dict()))
    assert mutated.algorithm.coef("beta").tolist() == [7.0]
    same = _learner("iql", [cls.Config(hidden=(16, 16), beta=3.0)], [1], data)
    same.load_state_dict(copy.deepcopy(donor.state_dict()))
    assert _steps(same, 2) == _steps(donor, 2)
    assert _steps(mutated, 1)[0]["loss/actor"] != _steps(same, 1)[0]["loss/actor"]
