"""OPE against online returns on builtin:cartpole-medium: five policies of known online return (a constant action,
the fitted behavior policy, Discrete CQL after 200 and 2000 updates, and the trained policy with its actions
flipped), evaluated side by side by one member-batched FQE: FQE and DR rank them like their online returns
(Spearman >= 0.8), and FQE of the behavior policy lands within 10% of the held-out episodes' own discounted return.

Measured on the 2-core CPU (this setting): Spearman 0.87 for FQE and DR; behavior FQE 57.1 vs 57.9 held-out.
On builtin:pendulum-medium the same recipe (IQL, 16k FQE updates) ranks at 0.6 (FQE) / 0.7 (DR): FQE scores the
flipped policy, far off the data, at -403 where it returns -658; see the closing note of issue 11.
"""
from __future__ import annotations

import shutil

import gymnasium as gym
import numpy as np
import torch

from rayoffline.cli import main
from rayoffline.data import load, load_metadata
from rayoffline.data.builtin import resolve
from rayoffline.data.holdout import split
from rayoffline.evaluation.behavior import fit_behavior
from rayoffline.evaluation.offpolicy import OPESettings, estimate_policy
from rayoffline.evaluation.policies import LearnedPolicy, NegatedPolicy, UniformPolicy, stack_policies
from rayoffline.learner.api import load_run
from rayoffline.spec import EnvSpec

GAMMA = 0.99


def spearman(a, b) -> float:
    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def online_discounted(policy, k: int, episodes: int = 10) -> float:
    out = []
    for i in range(episodes):
        env = gym.make("CartPole-v1")
        obs, _ = env.reset(seed=100 + i)
        g, d = 0.0, 1.0
        while True:
            o = torch.as_tensor(obs, dtype=torch.float32)[None].expand(policy.K, 1, -1)
            a = int(policy.sample(o, 1)[0][k, 0])
            obs, r, term, trunc, _ = env.step(a)
            g += d * r
            d *= GAMMA
            if term or trunc:
                break
        out.append(g)
    return float(np.mean(out))


def test_fqe_and_dr_rank_cartpole_policies_like_their_online_returns(tmp_path):
    torch.manual_seed(0)
    ds = tmp_path / "cartpole"
    shutil.copytree(resolve("builtin:cartpole-medium"), ds)
    split(ds, 0.1, seed=0)
    trained = {}
    for steps in (200, 2000):
        out = tmp_path / f"run{steps}"
        assert main(["train", "--algo", "discrete_cql", "--data", str(ds), "--steps", str(steps), "--out", str(out),
                     "--set", "eval_episodes=0", "--set", "progress=off", "--set", "algo.hidden=[64, 64]",
                     "--set", "diagnostics=off"]) == 0
        trained[steps] = load_run(out)[0]
    meta = load_metadata(ds)
    behavior = fit_behavior(load(ds), meta, 3000)
    final = LearnedPolicy(trained[2000])
    policy = stack_policies([UniformPolicy(EnvSpec.from_metadata(meta), 1), behavior, LearnedPolicy(trained[200]),
                             final, NegatedPolicy(final)])
    settings = OPESettings(estimators=("fqe", "dr"), fqe_steps=8000, behavior_steps=3000, bootstrap=50,
                           fqe=dict(hidden=(64, 64), lr=1e-3, tau=1.0, target_period=50))
    res = estimate_policy(policy, trained[2000].norm_actions, str(ds), meta, GAMMA, settings, torch.device("cpu"))
    online = [online_discounted(policy, k) for k in range(policy.K)]
    fqe = [e["value"] for e in res["estimates"]["fqe"]]
    dr = [e["value"] for e in res["estimates"]["dr"]]
    assert online[3] > online[1] > online[0] > online[4], online  # the policies differ as built
    assert spearman(fqe, online) >= 0.8, (fqe, online)
    assert spearman(dr, online) >= 0.8, (dr, online)
    mc = res["holdout"]["mc_return"]
    assert abs(fqe[1] - mc) <= 0.1 * abs(mc), (fqe[1], mc)
