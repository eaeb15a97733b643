"""FQE (rayoffline/evaluation/fqe.py) against values known exactly, and the target policies it evaluates
(rayoffline/evaluation/policies.py).

- A stationary tabular MDP (one-hot observations, 5 states, 2 actions, random transitions and a termination
  probability per (s, a)), logged by a stochastic behavior policy: V(pi) = d0 (I - gamma P_pi)^-1 r_pi for three
  stochastic target policies, evaluated as one K=3 FQE.
- A 1-D linear problem (s' = a s + b u + noise, r = 1 + s + u / 2, constant termination probability): a linear
  policy u = -k s (+ Gaussian noise) has V(s) = 1 / (1 - g) + alpha s in closed form.
- Member batching: member k of a K=3 FQE equals FQE of K=1 with member k's seed and policy.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rayoffline.algorithms.discrete_cql import DiscreteCQL, DiscreteCQLConfig
from rayoffline.algorithms.td3_bc import TD3BC, TD3BCConfig
from rayoffline.batch import Batch
from rayoffline.errors import ConfigError
from rayoffline.evaluation.fqe import FQE, FQEConfig, fit_fqe
from rayoffline.evaluation.policies import (LearnedPolicy, NegatedPolicy, TargetPolicy, UniformPolicy,
                                            stack_policies)
from rayoffline.spec import EnvSpec

GAMMA = 0.9


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class TabularPolicy(TargetPolicy):
    """K stochastic policies over one-hot observations: table (K, S, A) of pi_k(a | s)."""

    def __init__(self, table):
        self.table = torch.as_tensor(np.asarray(table), dtype=torch.float32)
        self.K, self.discrete, self.action_dim = self.table.shape[0], True, self.table.shape[2]
        self.device, self.deterministic = torch.device("cpu"), False

    def probs(self, obs):
        s = self.members_obs(obs).argmax(-1)                                      # (K, B)
        return self.table[torch.arange(self.K)[:, None], s]                       # (K, B, A)

    def act(self, obs):
        return self.probs(obs).argmax(-1)

    def log_prob(self, obs, actions):
        return self.probs(obs).gather(-1, self.members_actions(actions).unsqueeze(-1)).squeeze(-1).log()


class TabularMDP:
    def __init__(self, seed=0, S=5, A=2, n=30_000):
        g = np.random.default_rng(seed)
        self.S, self.A = S, A
        self.P = g.dirichlet(np.ones(S), size=(S, A))                             # (S, A, S)
        self.R = g.normal(size=(S, A))
        self.stop = g.uniform(0.05, 0.2, size=(S, A))                             # termination probability
        self.d0 = g.dirichlet(np.ones(S))
        self.behavior = _softmax(g.normal(size=(S, A)))
        self.targets = np.stack([_softmax(2.0 * g.normal(size=(S, A))) for _ in range(3)])  # (3, S, A)
        # logged transitions: states from a fixed distribution, actions from the behavior policy
        s = g.integers(0, S, n)
        a = (g.random(n)[:, None] > self.behavior[s].cumsum(-1)).sum(-1).clip(max=A - 1)
        u = g.random(n)[:, None]
        s2 = (u > self.P[s, a].cumsum(-1)).sum(-1).clip(max=S - 1)
        term = (g.random(n) < self.stop[s, a]).astype(np.float32)
        r = self.R[s, a] + 0.5 * g.normal(size=n)
        eye = np.eye(S, dtype=np.float32)
        self.eye = torch.tensor(eye)
        self.data = Batch(observations=torch.tensor(eye[s]), actions=torch.tensor(a, dtype=torch.int64),
                          rewards=torch.tensor(r, dtype=torch.float32), next_observations=torch.tensor(eye[s2]),
                          terminations=torch.tensor(term), truncations=torch.zeros(n))
        self.meta = {"observation_space": {"type": "Box", "shape": [S]},
                     "action_space": {"type": "Discrete", "n": A},
                     "obs_mean": eye[s].mean(0).tolist(), "obs_std": eye[s].std(0).tolist()}

    def truth(self, pi):
        """V(pi) from d0: (I - gamma P_pi) V = r_pi with P_pi[s, s'] = sum_a pi(a|s) (1 - stop) P(s'|s, a)."""
        p_pi = np.einsum("sa,sa,sat->st", pi, 1.0 - self.stop, self.P)
        v = np.linalg.solve(np.eye(self.S) - GAMMA * p_pi, (pi * self.R).sum(-1))
        return float(self.d0 @ v)


@pytest.fixture(scope="module")
def mdp():
    torch.set_num_threads(1)
    return TabularMDP()


FAST = FQEConfig(hidden=(64, 64), discount=GAMMA, lr=3e-4, tau=0.01)


def test_tabular_values_within_5_percent(mdp):
    pi = TabularPolicy(mdp.targets)
    logged = []
    fqe = fit_fqe(pi, mdp.data, mdp.meta, steps=3000, config=FAST, log_every=1000,
                  on_log=lambda step, m: logged.append((step, m)))
    assert [s for s, _ in logged] == [1000, 2000, 3000] and len(logged[-1][1]["loss/q"]) == 3
    est = fqe.value(mdp.eye).numpy() @ mdp.d0                                     # (K,)
    truth = np.array([mdp.truth(p) for p in mdp.targets])
    assert len(set(np.round(truth, 2))) == 3  # three different values, so a member mix-up would show
    np.testing.assert_allclose(est, truth, rtol=0.05)
    # q and value agree: V(s) = sum_a pi(a|s) Q(s, a)
    q = torch.stack([fqe.q(mdp.eye, torch.full((mdp.S,), a)) for a in range(mdp.A)], -1)  # (K, S, A)
    np.testing.assert_allclose((q * pi.table).sum(-1).numpy(), fqe.value(mdp.eye).numpy(), rtol=1e-5, atol=1e-6)
    assert fqe.cfg.reward_scale == pytest.approx(1 / float(mdp.data.rewards.square().mean().sqrt()))  # auto


def test_members_equal_separate_runs(mdp):
    pi = TabularPolicy(mdp.targets)
    cfg = FQEConfig(hidden=(32, 32), discount=GAMMA, lr=1e-3, tau=0.05, reward_scale=0.1)
    together = fit_fqe(pi, mdp.data, mdp.meta, steps=200, seeds=[3, 4, 5], config=cfg).value(mdp.eye)
    for k in range(3):
        alone = fit_fqe(pi.select([k]), mdp.data, mdp.meta, steps=200, seeds=[3 + k], config=cfg).value(mdp.eye)
        torch.testing.assert_close(together[k], alone[0], rtol=1e-5, atol=1e-5)


class LinearGaussianPolicy(TargetPolicy):
    """u = -gain * s + std * N(0, 1) on a 1-D state (std 0: deterministic)."""

    def __init__(self, gain, std=0.0, seed=0):
        self.gain, self.std = gain, std
        self.K, self.discrete, self.action_dim, self.device = 1, False, 1, torch.device("cpu")
        self.deterministic = std == 0.0
        self.gen = torch.Generator().manual_seed(seed)

    def act(self, obs):
        return -self.gain * self.members_obs(obs)

    def sample(self, obs, n):
        mean = self.act(obs)
        return mean + self.std * torch.randn((n, *mean.shape), generator=self.gen)

    def log_prob(self, obs, actions):
        z = (self.members_actions(actions) - self.act(obs)) / self.std
        return (-0.5 * z.square() - np.log(self.std) - 0.5 * np.log(2 * np.pi)).sum(-1)


def test_linear_continuous_values():
    """s' = a s + b u + sigma eps, r = 1 + s + u / 2, each step terminates with probability p (after the reward).
    With g = gamma (1 - p), u = -k s (+ zero-mean noise): V(s) = 1 / (1 - g) + alpha s with
    alpha = (1 - k / 2) / (1 - g (a - b k)). Three members: k = 0.5 (deterministic: FQE uses pi.act), its
    NegatedPolicy (u = +k s) and k = 0.5 with N(0, 0.2^2) noise (FQE's sampled targets).

    A linear value is exact for the network, so what is left is FQE's own error; a quadratic cost (an LQR value)
    left ~0.05 absolute error on values of ~0.5 at these step counts, too much for a 5% check of small values."""
    a, b, sigma, p, n = 0.6, 0.4, 0.1, 0.1, 30_000
    g = np.random.default_rng(1)
    s = g.uniform(-1.5, 1.5, n)
    u = g.uniform(-1.0, 1.0, n)
    s2 = a * s + b * u + sigma * g.normal(size=n)
    term = (g.random(n) < p).astype(np.float32)
    f = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    data = Batch(observations=f(s[:, None]), actions=f(u[:, None]), rewards=f(1.0 + s + 0.5 * u),
                 next_observations=f(s2[:, None]), terminations=f(term), truncations=torch.zeros(n))
    meta = {"observation_space": {"type": "Box", "shape": [1]},
            "action_space": {"type": "Box", "low": [-1.0], "high": [1.0]},
            "obs_mean": [float(s.mean())], "obs_std": [float(s.std())]}
    k = 0.5
    pi = stack_policies([LinearGaussianPolicy(k), NegatedPolicy(LinearGaussianPolicy(k)),
                         LinearGaussianPolicy(k, 0.2, seed=1)])
    cfg = FQEConfig(hidden=(64, 64), discount=GAMMA, lr=3e-4, tau=0.01, n_action_samples=8)
    fqe = fit_fqe(pi, data, meta, steps=2500, config=cfg)
    ge = GAMMA * (1 - p)
    s0 = torch.linspace(0.0, 1.0, 101)[:, None]                                  # start states, mean 0.5
    truth = [1 / (1 - ge) + (1 - kk / 2) / (1 - ge * (a - b * kk)) * 0.5 for kk in (k, -k, k)]
    est = fqe.value(s0).mean(1).numpy()
    np.testing.assert_allclose(est, truth, rtol=0.05)


# ----- errors and the policy wrappers ----------------------------------------------------------------------------
DISCRETE = EnvSpec(obs_dim=3, action_dim=4, discrete=True)
BOX = EnvSpec(obs_dim=3, action_dim=2, discrete=False, action_low=(-2.0, -2.0), action_high=(2.0, 2.0))


def test_set_target_errors():
    fqe = FQE(DISCRETE, FQEConfig(hidden=(8,)), seeds=[0, 1])
    with pytest.raises(ConfigError, match="2 members but the target policy has 3"):
        fqe.set_target(UniformPolicy(DISCRETE, K=3))
    with pytest.raises(ConfigError, match="continuous actions but the dataset's action space is discrete"):
        fqe.set_target(UniformPolicy(BOX, K=2))
    with pytest.raises(ConfigError, match="set_target"):
        fqe.value(torch.zeros(5, 3))
    cont = FQE(BOX, FQEConfig(hidden=(8,)), seeds=[0])
    with pytest.raises(ConfigError, match="discrete actions but the dataset's action space is continuous"):
        cont.set_target(UniformPolicy(DISCRETE, K=1))
    with pytest.raises(ConfigError, match="loss"):
        FQEConfig(loss="l1")


def test_learned_policy_keeps_noise_stream_and_wrappers():
    alg = TD3BC(BOX, TD3BCConfig(hidden=(8,)), seeds=[0, 1, 2])
    pi = LearnedPolicy(alg, noise=0.1)
    obs = torch.randn(5, 3)
    before = alg.rng.get_state()
    a = pi.act(obs)                                                               # (3, 5, 2)
    assert a.shape == (3, 5, 2) and not a.requires_grad
    assert all(torch.equal(x, y) for x, y in zip(before, alg.rng.get_state()))
    torch.testing.assert_close(a, alg.policy(alg.norm_obs(obs.expand(3, 5, 3))).detach())
    assert pi.sample(obs, 4).shape == (4, 3, 5, 2)
    torch.testing.assert_close(pi.log_prob(obs, a), torch.full((3, 5), 2 * (-np.log(0.1) - 0.5 * np.log(2 * np.pi))))
    neg = NegatedPolicy(pi)
    torch.testing.assert_close(neg.act(obs), -a)
    torch.testing.assert_close(neg.log_prob(obs, -a), pi.log_prob(obs, a))
    sub = pi.select([2, 0])
    torch.testing.assert_close(sub.act(obs), a[[2, 0]])
    both = stack_policies([pi, UniformPolicy(BOX, K=2)])
    assert both.K == 5 and both.sample(obs, 3).shape == (3, 5, 5, 2)
    torch.testing.assert_close(both.act(obs)[:3], a)
    torch.testing.assert_close(both.log_prob(obs, a[:1].expand(5, 5, 2))[3:], torch.full((2, 5), -2 * np.log(2.0)))

    dq = DiscreteCQL(DISCRETE, DiscreteCQLConfig(hidden=(8,)), seeds=[0, 1])
    eg = LearnedPolicy(dq, epsilon=0.2)
    greedy = eg.act(obs)
    p = eg.probs(obs)                                                             # (2, 5, 4)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 5))
    torch.testing.assert_close(p.gather(-1, greedy[..., None]).squeeze(-1), torch.full((2, 5), 0.85))
    draws = eg.sample(obs, 2000)                                                  # (2000, 2, 5)
    assert abs((draws == greedy).float().mean().item() - 0.85) < 0.03
    bad = NegatedPolicy(eg)
    torch.testing.assert_close(bad.act(obs), (greedy + 1) % 4)
    torch.testing.assert_close(bad.probs(obs).gather(-1, ((greedy + 1) % 4)[..., None]).squeeze(-1),
                               torch.full((2, 5), 0.85))
    torch.testing.assert_close(bad.log_prob(obs, (greedy + 1) % 4), eg.log_prob(obs, greedy))
