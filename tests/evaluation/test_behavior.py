"""Fitted behavior models (rayoffline/evaluation/behavior.py) against data whose behavior density is known: the
fitted held-out log-likelihood must come close to the true density's, the mixture must beat one Gaussian on
bimodal actions, and on builtin:cartpole-medium the softmax must recover the logged mixture (55% uniform)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rayoffline.batch import Batch
from rayoffline.errors import ConfigError
from rayoffline.evaluation.behavior import BehaviorConfig, BehaviorModel, fit_behavior, held_out_nll
from rayoffline.spec import EnvSpec

W = torch.tensor([[0.3, -0.2], [0.1, 0.25]])
SMALL = dict(hidden=(64, 64))


def _batch(obs, act):
    z = torch.zeros(obs.shape[0])
    return Batch(observations=obs, actions=act, rewards=z, next_observations=obs, terminations=z, truncations=z)


def _linear(n, seed):
    """s ~ N(0, I_2), normalized action a = clip(W s + 0.2 eps) in 2-D, stored in the action bounds
    [-2, 2] x [-1, 1] (dataset action a * (2, 1)); true density of the unclipped normalized actions N(W s, 0.2^2)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, 2, generator=g)
    a = (s @ W.T + 0.2 * torch.randn(n, 2, generator=g)).clamp(-1.0, 1.0)
    scale = torch.tensor([2.0, 1.0])
    return _batch(s, a * scale), s @ W.T, 0.2 * torch.ones(2)


def _bimodal(n, seed):
    """a = +-0.5 + 0.2 s_0 + 0.1 eps (1-D; the sign a fair coin)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, 2, generator=g)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    a = (0.5 * sign + 0.2 * s[:, 0] + 0.1 * torch.randn(n, generator=g)).clamp(-1.0, 1.0)
    return _batch(s, a[:, None])


def _bimodal_true_nll(b):
    a, m = b.actions[:, 0], 0.2 * b.observations[:, 0]
    comp = torch.stack([-0.5 * ((a - m - 0.5) / 0.1) ** 2, -0.5 * ((a - m + 0.5) / 0.1) ** 2])
    logp = torch.logsumexp(comp, 0) + math.log(0.5) - math.log(0.1) - 0.5 * math.log(2 * math.pi)
    return float(-logp.mean())


def _interior(b):
    """The rows whose actions were not clipped (the true density there is the Gaussian's)."""
    keep = (b.actions.abs() < 0.999 * torch.tensor([2.0, 1.0])[: b.actions.shape[1]]).all(-1)
    return b.index(torch.nonzero(keep).squeeze(-1))


def test_linear_gaussian_matches_true_density():
    train, _, _ = _linear(8000, seed=0)
    test, mean, std = _linear(4000, seed=1)
    spec = EnvSpec(2, 2, False, (-2.0, -1.0), (2.0, 1.0))
    fb = fit_behavior(train, spec, 1500, seeds=(0, 1), config=BehaviorConfig(components=1, **SMALL))
    keep = (test.actions.abs() < 0.999 * torch.tensor([2.0, 1.0])).all(-1)
    scale = torch.tensor([2.0, 1.0])
    z = (test.actions / scale - mean) / std
    true_nll = float(-(-0.5 * z ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)[keep].mean())
    fitted = held_out_nll(fb, _interior(test))
    assert fitted.shape == (2,)
    np.testing.assert_allclose(fitted.numpy(), true_nll, atol=0.05)
    # act() is the mean: close to W s in the normalized space
    act = fb.act(test.observations[:200])                                  # (K, B, act)
    assert act.shape == (2, 200, 2)
    err = (act - mean[:200].clamp(-1, 1)).abs().mean()
    assert err < 0.03
    # sample() draws from the fitted density: its spread matches the noise, and stays in [-1, 1]
    draws = fb.sample(test.observations[:200], 64)                         # (n, K, B, act)
    assert draws.shape == (64, 2, 200, 2) and draws.abs().max() <= 1.0
    np.testing.assert_allclose(draws.std(0).mean((0, 1)).numpy(), std.numpy(), rtol=0.15)
    # log_prob of a broadcast (B, act) action batch equals the model's, per member
    lp = fb.log_prob(test.observations[:5], test.actions[:5] / scale)
    assert lp.shape == (2, 5) and torch.isfinite(lp).all()


def test_mixture_beats_single_gaussian_on_bimodal_actions():
    train, test = _bimodal(10000, seed=2), _interior(_bimodal(4000, seed=3))
    spec = EnvSpec(2, 1, False, (-1.0,), (1.0,))
    true_nll = _bimodal_true_nll(test)
    mix = fit_behavior(train, spec, 2000, seeds=(0,), config=BehaviorConfig(components=5, **SMALL))
    one = fit_behavior(train, spec, 2000, seeds=(0,), config=BehaviorConfig(components=1, **SMALL))
    nll_mix, nll_one = float(held_out_nll(mix, test)[0]), float(held_out_nll(one, test)[0])
    assert abs(nll_mix - true_nll) < 0.1, (nll_mix, true_nll)
    assert nll_one > nll_mix + 0.5, (nll_one, nll_mix)
    # the mode sits on one of the two modes, not between them
    s = test.observations[:500]
    a = mix.act(s)[0, :, 0]
    dist = torch.minimum((a - 0.2 * s[:, 0] - 0.5).abs(), (a - 0.2 * s[:, 0] + 0.5).abs())
    assert float(dist.median()) < 0.05
    # samples are bimodal: both signs of the offset, about half each
    draws = mix.sample(s, 20)[:, 0, :, 0] - 0.2 * s[:, 0]
    frac = float((draws > 0).float().mean())
    assert 0.4 < frac < 0.6


def test_softmax_matches_true_discrete_policy():
    g = torch.Generator().manual_seed(4)
    m = torch.tensor([[1.5, -1.0, 0.0], [0.0, 1.0, -1.5]])

    def data(n):
        s = torch.randn(n, 2, generator=g)
        p = torch.softmax(s @ m, -1)
        return _batch(s, torch.multinomial(p, 1, generator=g).squeeze(-1)), p

    (train, _), (test, p_true) = data(10000), data(4000)
    spec = EnvSpec(2, 3, True)
    fb = fit_behavior(train, spec, 1500, seeds=(0,), config=BehaviorConfig(**SMALL))
    true_nll = float(-torch.log(p_true.gather(-1, test.actions[:, None])).mean())
    assert abs(float(held_out_nll(fb, test)[0]) - true_nll) < 0.03
    probs = fb.probs(test.observations)
    assert probs.shape == (1, 4000, 3)
    assert float((probs[0] - p_true).abs().sum(-1).mean()) < 0.1
    lp = fb.log_prob(test.observations, test.actions)
    torch.testing.assert_close(lp.exp(), probs.gather(-1, test.actions[None, :, None]).squeeze(-1))
    draws = fb.sample(test.observations[:100], 400)                         # (n, K, B)
    assert draws.shape == (400, 1, 100) and draws.dtype == torch.int64
    emp = torch.nn.functional.one_hot(draws[:, 0], 3).float().mean(0)      # (B, 3)
    assert float((emp - probs[0, :100]).abs().max()) < 0.12


def test_cartpole_medium_recovers_the_logged_mixture():
    """cartpole-medium logs the expert rule with 55% of the actions replaced by uniform ones: the expert's action
    has probability 0.45 + 0.275 = 0.725 and the other 0.275 everywhere."""
    from rayoffline.data import load, load_metadata
    from rayoffline.data.builtin import _cartpole_controller, resolve

    path = resolve("builtin:cartpole-medium")
    data, meta = load(path), load_metadata(path)
    n = data.rewards.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    train, test = data.index(perm[: n - 4000]), data.index(perm[n - 4000:])
    fb = fit_behavior(train, meta, 2000, seeds=(0,), config=BehaviorConfig(**SMALL))
    expert = torch.tensor([_cartpole_controller(o) for o in test.observations.numpy()])
    probs = fb.probs(test.observations)[0]                                  # (B, 2)
    p_expert = probs.gather(-1, expert[:, None]).squeeze(-1)
    p_logged = probs.gather(-1, test.actions[:, None]).squeeze(-1)
    assert float((probs.argmax(-1) == expert).float().mean()) > 0.95
    assert abs(float(p_expert.mean()) - 0.725) < 0.05
    assert float(p_logged.quantile(0.01)) > 0.2                           # >= 0.275 up to fit noise
    true_nll = float(-torch.log(torch.where(test.actions == expert, 0.725, 0.275)).mean())
    assert abs(float(held_out_nll(fb, test)[0]) - true_nll) < 0.03


def test_config_and_input_errors():
    with pytest.raises(ConfigError, match="components"):
        BehaviorConfig(components=0)
    with pytest.raises(ConfigError, match="log_std_min"):
        BehaviorConfig(log_std_min=2.0, log_std_max=1.0)
    spec = EnvSpec(2, 1, False, (-1.0,), (1.0,))
    model = BehaviorModel(spec, BehaviorConfig(**SMALL), [0, 1])
    from rayoffline.evaluation.behavior import FittedBehavior
    fb = FittedBehavior(model)
    with pytest.raises(ValueError, match="expected"):
        fb.act(torch.zeros(3, 4, 2))                                        # 3 members given, model has 2
    with pytest.raises(NotImplementedError, match="discrete"):
        fb.probs(torch.zeros(4, 2))
