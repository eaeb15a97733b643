"""K members in one pass = K separate runs (DESIGN: members)."""
from __future__ import annotations

import pytest
import torch

from rayoffline import algorithms
from rayoffline.learner.loop import Learner
from tests.helpers import random_data, spec_for

STEPS = 6


def _run(name, configs, seeds, data, steps=STEPS):
    cls = algorithms.get(name)
    alg = cls(spec_for(cls), configs, seeds)
    learner = Learner(alg, data, batch_size=32)
    history = []
    for s in range(1, steps + 1):
        learner.step(s)
        history.append(learner.pop_metrics())
    return alg, history


def _check_member(pack, pack_hist, i, k, single, single_hist):
    for s, (hp, hs) in enumerate(zip(pack_hist, single_hist), 1):
        assert set(hp) == set(hs)
        for key in hs:
            assert hp[key][i] == pytest.approx(hs[key][0], rel=1e-4, abs=1e-5), f"step {s} {key} member {i}"
    for (n, p), (_, q) in zip(pack.named_parameters(), single.named_parameters()):
        e = p.shape[0] // k
        torch.testing.assert_close(p[i * e:(i + 1) * e], q, rtol=1e-4, atol=1e-5, msg=n)


def test_cql_four_alphas_in_one_pass_match_four_single_runs():
    name = "cql"
    cls = algorithms.get(name)
    data = random_data(spec_for(cls), n=2048)
    alphas = [0.5, 2.0, 5.0, 10.0]
    configs = [cls.Config(hidden=(32, 32), cql_alpha=a) for a in alphas]
    pack, pack_hist = _run(name, configs, [7] * 4, data)
    for i, cfg in enumerate(configs):
        single, single_hist = _run(name, [cfg], [7], data)
        _check_member(pack, pack_hist, i, 4, single, single_hist)
    # the alphas really differ in effect: the members' critics diverged
    q = dict(pack.named_parameters())
    w = next(v for n, v in q.items() if "critic" in n and v.requires_grad)
    assert not torch.allclose(w[:2], w[-2:])


@pytest.mark.parametrize("name", ["iql", "td3_bc", "discrete_cql"])
def test_members_with_different_seeds_match_single_runs(name):
    cls = algorithms.get(name)
    data = random_data(spec_for(cls), n=2048)
    cfg = cls.Config(hidden=(32, 32))
    pack, pack_hist = _run(name, [cfg, cfg], [3, 11], data)
    single, single_hist = _run(name, [cfg], [11], data)
    _check_member(pack, pack_hist, 1, 2, single, single_hist)
