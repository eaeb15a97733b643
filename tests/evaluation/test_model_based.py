"""Model-based OPE (rayoffline/evaluation/model_based.py) against problems whose true value is computable: a
noisy linear system with a quadratic cost (the truth by simulating the true model), and a discrete chain with
terminations (the truth in closed form)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rayoffline.batch import Batch
from rayoffline.errors import ConfigError, DataError
from rayoffline.evaluation.model_based import (DynamicsConfig, DynamicsEnsemble, fit_dynamics, held_out_metrics,
                                               model_based_estimate)
from rayoffline.spec import EnvSpec

A = torch.tensor([[0.95, 0.1], [-0.1, 0.9]])
B = torch.tensor([[0.0], [0.3]])
SIGMA = 0.05
H, GAMMA = 50, 0.95


def _step(s, a, gen):
    return s @ A.T + a @ B.T + SIGMA * torch.randn(s.shape, generator=gen)


def _linear_data(n, seed):
    """i.i.d. transitions: s ~ U([-2, 2]^2), a ~ U(-1, 1), s' = A s + B a + 0.05 eps, r = -|s|^2, no ends."""
    g = torch.Generator().manual_seed(seed)
    s = 4.0 * torch.rand(n, 2, generator=g) - 2.0
    a = 2.0 * torch.rand(n, 1, generator=g) - 1.0
    z = torch.zeros(n)
    return Batch(observations=s, actions=a, rewards=-(s ** 2).sum(-1), next_observations=_step(s, a, g),
                 terminations=z, truncations=z)


class LinearPolicies:
    """Two deterministic target policies (K = 2): member 0 a = clip(-0.6 s_0 - 0.8 s_1), member 1 a = 0.5
    (whose fixed point (1, 0.5) lies inside the data)."""

    K, discrete, action_dim, device = 2, False, 1, torch.device("cpu")

    def act(self, obs):
        obs = obs.expand(2, *obs.shape) if obs.dim() == 2 else obs
        first = (-0.6 * obs[0, :, :1] - 0.8 * obs[0, :, 1:]).clamp(-1.0, 1.0)
        return torch.stack([first, torch.full_like(first, 0.5)])            # (K, B, 1)

    def sample(self, obs, n):
        a = self.act(obs)
        return a.unsqueeze(0).expand(n, *a.shape)


def _true_values(policy, s0, reps=200):
    gen = torch.Generator().manual_seed(123)
    out = []
    for k in range(policy.K):
        s, ret = s0.repeat(reps, 1), torch.zeros(reps * s0.shape[0])
        for t in range(H):
            ret += GAMMA ** t * -(s ** 2).sum(-1)
            s = _step(s, policy.act(s)[k], gen)
        out.append(float(ret.mean()))
    return np.array(out)


@pytest.fixture(scope="module")
def linear_ensemble():
    spec = EnvSpec(2, 1, False, (-1.0,), (1.0,))
    return fit_dynamics(_linear_data(20000, seed=0), spec, 2000, members=5, config=DynamicsConfig(hidden=(64, 64)))


def test_linear_system_value_within_ten_percent(linear_ensemble):
    ens, pol = linear_ensemble, LinearPolicies()
    metrics = held_out_metrics(ens, _linear_data(2000, seed=1))
    assert metrics["delta_mse"].shape == (5,)
    # the noise is 0.05 on deltas of std ~0.17: a perfect model leaves ~9% of the delta variance
    assert (metrics["delta_mse"] < 0.12).all() and (metrics["reward_mse"] < 0.01).all()
    s0 = 3.0 * torch.rand(100, 2, generator=torch.Generator().manual_seed(2)) - 1.5
    est = model_based_estimate(ens, pol, s0, H, GAMMA, rollouts_per_start=2, seed=0)
    truth = _true_values(pol, s0)
    assert est["value"].shape == (2,) and est["per_model"].shape == (2, 5)
    np.testing.assert_allclose(est["value"], truth, rtol=0.10)
    np.testing.assert_allclose(est["value"], est["per_model"].mean(1))
    assert (est["continuation"] == 1.0).all()  # no terminations in the data: the model predicts none
    # the model's noise matters: without it (the mean path) the cost of the noise is missing
    mean_path = model_based_estimate(ens, pol, s0, H, GAMMA, seed=0, noise=False)
    assert (mean_path["value"] > est["value"]).all()
    # same seed, same numbers
    again = model_based_estimate(ens, pol, s0, H, GAMMA, rollouts_per_start=2, seed=0)
    np.testing.assert_array_equal(again["per_model"], est["per_model"])


def test_disagreement_grows_outside_the_data(linear_ensemble):
    ens, pol = linear_ensemble, LinearPolicies()
    inside = 3.0 * torch.rand(50, 2, generator=torch.Generator().manual_seed(3)) - 1.5
    far = torch.tensor([[6.0, -6.0], [-6.0, 6.0], [6.0, 6.0], [-6.0, -6.0]]).repeat(10, 1)
    e_in = model_based_estimate(ens, pol, inside, 10, GAMMA, seed=0)
    e_far = model_based_estimate(ens, pol, far, 10, GAMMA, seed=0)
    assert (e_far["disagreement_per_step"][:, 0] > 5 * e_in["disagreement_per_step"][:, 0]).all()
    assert (e_far["state_disagreement"] > 2 * e_in["state_disagreement"]).all()
    # the models' spread of the value grows less (after the first step the far rollouts are clipped back to the
    # data's range; measured 1.8x for the linear policy, 1.2x for the constant one)
    assert e_far["value_std"][0] > e_in["value_std"][0]
    # predicted states are clipped to the data's range: the far rollouts stay at its edge, not at +-6
    floor = float(ens.reward_low) * sum(GAMMA ** t for t in range(10))  # the true far values are far below
    assert (e_far["value"] >= floor - 1e-6).all()


class ChainPolicies:
    """Discrete target policies on the chain (K = 2): member 0 always right, member 1 towards the centre."""

    K, discrete, action_dim, device = 2, True, 2, torch.device("cpu")

    def act(self, obs):
        obs = obs.expand(2, *obs.shape) if obs.dim() == 2 else obs
        right = torch.ones(obs.shape[1], dtype=torch.int64)
        centre = (obs[1, :, 0] < 0).long()
        return torch.stack([right, centre])

    def sample(self, obs, n):
        a = self.act(obs)
        return a.unsqueeze(0).expand(n, *a.shape)


def test_discrete_chain_with_terminations():
    """s in [-1, 1], a in {left, right}: s' = s -+ 0.1, reward 1, the episode terminates when |s'| > 1. From
    s_0 = 0.05 always-right earns 10 rewards (s' = 1.05 at t = 9); moving to the centre never terminates."""
    g = torch.Generator().manual_seed(4)
    n = 8000
    s = 2.0 * torch.rand(n, 1, generator=g) - 1.0
    a = torch.randint(2, (n,), generator=g)
    s2 = s + 0.1 * (2.0 * a[:, None] - 1.0)
    term = (s2.abs() > 1.0).float().squeeze(-1)
    data = Batch(observations=s, actions=a, rewards=torch.ones(n), next_observations=s2, terminations=term,
                 truncations=torch.zeros(n))
    spec = EnvSpec(1, 2, True)
    ens = fit_dynamics(data, spec, 1500, members=3, config=DynamicsConfig(hidden=(64, 64)))
    gamma, horizon = 0.9, 30
    est = model_based_estimate(ens, ChainPolicies(), torch.full((8, 1), 0.05), horizon, gamma, seed=0)
    truth = np.array([(1 - gamma ** 10) / (1 - gamma), (1 - gamma ** horizon) / (1 - gamma)])
    np.testing.assert_allclose(est["value"], truth, rtol=0.1)
    assert est["continuation"][0] < 0.1 and est["continuation"][1] > 0.9
    assert est["per_model"].shape == (2, 3) and np.isfinite(est["value_std"]).all()


def test_errors():
    with pytest.raises(ConfigError, match="log_std_min"):
        DynamicsConfig(log_std_min=1.0, log_std_max=0.5)
    spec = EnvSpec(2, 1, False, (-1.0,), (1.0,))
    ens = DynamicsEnsemble(spec, DynamicsConfig(hidden=(8,)), [0, 1])
    with pytest.raises(DataError, match="start_obs"):
        model_based_estimate(ens, LinearPolicies(), torch.zeros(4, 3), 5, 0.9)
    with pytest.raises(ConfigError, match="discrete"):
        model_based_estimate(ens, ChainPolicies(), torch.zeros(4, 2), 5, 0.9)
    with pytest.raises(ConfigError, match="horizon"):
        model_based_estimate(ens, LinearPolicies(), torch.zeros(4, 2), 0, 0.9)
    with pytest.raises(ConfigError, match="policy"):
        ens.policy(torch.zeros(2, 1, 2))


def test_state_dict_round_trip(linear_ensemble):
    """A fitted ensemble's weights and statistics (delta/reward standardization, clip ranges) load into a fresh
    one built without statistics, which then predicts the same."""
    ens = linear_ensemble
    fresh = DynamicsEnsemble(ens.spec, ens.cfg, ens.seeds)
    assert torch.isinf(fresh.obs_low).all()
    fresh.load_state_dict(ens.state_dict())
    obs, act = torch.randn(5, 7, 2), torch.rand(5, 7, 1) * 2 - 1
    for key, value in ens.predict(obs, act).items():
        torch.testing.assert_close(fresh.predict(obs, act)[key], value)
    assert set(DynamicsEnsemble.SHARED_STATE) >= {"obs_low", "delta_std", "termination_rate"}
