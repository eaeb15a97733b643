"""The importance-sampling family against problems whose true value is exact: a contextual bandit and a small
tabular MDP with random episode ends (rayoffline/evaluation/ope.py)."""
from __future__ import annotations

import numpy as np
import pytest

from rayoffline.evaluation.ope import Episodes, estimate

GAMMA = 0.9


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class MDP:
    """S states, A actions, start distribution d0; each step ends the episode with probability `stop` (after the
    reward), and at the latest after H steps. Rewards are R[s, a] plus N(0, noise)."""

    def __init__(self, seed=0, S=3, A=2, H=5, stop=0.15, noise=0.5):
        g = np.random.default_rng(seed)
        self.S, self.A, self.H, self.stop, self.noise = S, A, H, stop, noise
        self.P = g.dirichlet(np.ones(S), size=(S, A))               # (S, A, S)
        self.R = g.normal(size=(S, A))
        self.d0 = g.dirichlet(np.ones(S))
        self.behavior = _softmax(g.normal(size=(S, A)))             # (S, A)
        self.target = _softmax(2.0 * g.normal(size=(S, A)))

    def truth(self):
        """(V(pi_e) from d0, q (H, S, A), v (H, S)) by backward induction over the horizon."""
        q = np.zeros((self.H, self.S, self.A))
        v = np.zeros((self.H + 1, self.S))
        for t in range(self.H - 1, -1, -1):
            cont = 0.0 if t == self.H - 1 else (1 - self.stop)
            q[t] = self.R + GAMMA * cont * self.P @ v[t + 1]
            v[t] = (self.target * q[t]).sum(-1)
        return float(self.d0 @ v[0]), q, v[:-1]

    def episodes(self, n, seed, model_bias=0.0):
        g = np.random.default_rng(seed)
        _, qt, vt = self.truth()
        rows = {k: [] for k in ("r", "pe", "pb", "q", "v")}
        for _ in range(n):
            s = g.choice(self.S, p=self.d0)
            ep = {k: [] for k in rows}
            for t in range(self.H):
                a = g.choice(self.A, p=self.behavior[s])
                ep["r"].append(self.R[s, a] + self.noise * g.normal())
                ep["pe"].append(self.target[s, a])
                ep["pb"].append(self.behavior[s, a])
                ep["q"].append(qt[t, s, a] + model_bias)
                ep["v"].append(vt[t, s] + model_bias)
                if g.random() < self.stop:
                    break
                s = g.choice(self.S, p=self.P[s, a])
            for k in rows:
                rows[k].append(ep[k])
        return Episodes.from_lists(rows["r"], rows["pe"], rows["pb"], q=rows["q"], v=rows["v"])


@pytest.fixture(scope="module")
def mdp():
    return MDP()


@pytest.fixture(scope="module")
def batches(mdp):
    return [mdp.episodes(200, seed) for seed in range(120)]


def _values(name, batches):
    return np.array([estimate(name, ep, GAMMA, bootstrap=0).value for ep in batches])


@pytest.mark.parametrize("name", ["is", "pdis", "dr"])
def test_unbiased_estimators_average_to_the_truth(name, mdp, batches):
    truth, _, _ = mdp.truth()
    vals = _values(name, batches)
    se = vals.std(ddof=1) / np.sqrt(len(vals))
    assert abs(vals.mean() - truth) < 4 * se + 1e-9, (vals.mean(), truth, se)


@pytest.mark.parametrize("name", ["wis", "pdwis"])
def test_weighted_estimators_are_close_and_steadier(name, mdp, batches):
    truth, _, _ = mdp.truth()
    vals = _values(name, batches)
    assert abs(vals.mean() - truth) < 0.05 * abs(truth) + 3 * vals.std(ddof=1) / np.sqrt(len(vals))
    assert vals.std() < _values("is", batches).std()  # what self-normalizing buys


def test_dr_with_the_true_model_is_nearly_exact_and_a_biased_model_stays_unbiased(mdp):
    truth, _, _ = mdp.truth()
    exact = np.array([estimate("dr", mdp.episodes(200, s), GAMMA, bootstrap=0).value for s in range(20)])
    is_ = np.array([estimate("is", mdp.episodes(200, s), GAMMA, bootstrap=0).value for s in range(20)])
    assert exact.std() < 0.5 * is_.std()  # only the reward noise is left
    biased = np.array([estimate("dr", mdp.episodes(200, s, model_bias=1.0), GAMMA, bootstrap=0).value
                       for s in range(120)])
    assert abs(biased.mean() - truth) < 4 * biased.std(ddof=1) / np.sqrt(len(biased))


def test_a_contextual_bandit_is_a_one_step_episode():
    g = np.random.default_rng(1)
    mu = g.normal(size=(4, 3))
    pb, pe = _softmax(g.normal(size=(4, 3))), _softmax(g.normal(size=(4, 3)))
    truth = float((pe * mu).sum(1).mean())
    vals = []
    for seed in range(200):
        r = np.random.default_rng(seed)
        x = r.integers(0, 4, 300)
        a = np.array([r.choice(3, p=pb[c]) for c in x])
        rew = mu[x, a] + 0.3 * r.normal(size=300)
        ep = Episodes.from_lists(rew[:, None], pe[x, a][:, None], pb[x, a][:, None])
        vals.append(estimate("is", ep, 1.0, bootstrap=0).value)
    vals = np.array(vals)
    assert abs(vals.mean() - truth) < 4 * vals.std(ddof=1) / np.sqrt(len(vals))


def test_bootstrap_intervals_cover_the_truth_at_about_their_level(mdp):
    truth, _, _ = mdp.truth()
    hits = [(e.low <= truth <= e.high) for e in
            (estimate("pdwis", mdp.episodes(150, 1000 + s), GAMMA, bootstrap=200, seed=s) for s in range(60))]
    assert 0.8 <= np.mean(hits) <= 1.0


def test_effective_sample_size_and_its_warning(mdp):
    ep = mdp.episodes(100, 5)
    same = Episodes(ep.rewards, ep.behavior_prob, ep.behavior_prob, ep.mask)
    assert estimate("wis", same, GAMMA, bootstrap=0).ess == pytest.approx(100)
    # a deterministic target that rarely agrees with the behavior policy: most episode weights are 0
    greedy = np.where(ep.target_prob >= ep.behavior_prob, 1.0, 0.0) * (ep.behavior_prob < 0.2)
    far = Episodes(ep.rewards, greedy, ep.behavior_prob, ep.mask)
    est = estimate("wis", far, GAMMA, bootstrap=0)
    assert est.ess < 10 and "effective sample size" in est.warning and "do not trust" in est.warning


def test_bad_input_is_named(mdp):
    ep = mdp.episodes(10, 0)
    with pytest.raises(ValueError, match=r"unknown estimator 'fqe2'; estimators: is, wis, pdis, pdwis, dr"):
        estimate("fqe2", ep, GAMMA)
    bad = Episodes(ep.rewards, ep.target_prob, np.where(ep.mask, 0.0, 1.0), ep.mask)
    with pytest.raises(ValueError, match="behavior probabilities must be positive"):
        estimate("is", bad, GAMMA)
    plain = Episodes(ep.rewards, ep.target_prob, ep.behavior_prob, ep.mask)
    with pytest.raises(ValueError, match="doubly robust needs a model"):
        estimate("dr", plain, GAMMA)


def test_self_normalized_estimators_survive_long_products_of_densities():
    """400 steps of density ratios 10 and 9 overflow float64 as plain products; WIS, PDWIS and the ESS are
    invariant to a per-step scale and must come out finite and right."""
    t = 400
    rewards = [[1.0] * t, [0.0] * t]
    ep = Episodes.from_lists(rewards, [[10.0] * t, [9.0] * t], [[1.0] * t, [1.0] * t])
    g0 = sum(GAMMA ** i for i in range(t))
    assert estimate("wis", ep, GAMMA, bootstrap=20).value == pytest.approx(g0)
    pdwis = estimate("pdwis", ep, GAMMA, bootstrap=20)
    share = [1.0 / (1.0 + 0.9 ** (i + 1)) for i in range(t)]  # episode 0's share of step i's weight
    assert np.isfinite(pdwis.value) and pdwis.value == pytest.approx(sum(GAMMA ** i * share[i] for i in range(t)))
    assert pdwis.ess == pytest.approx(1.0)
