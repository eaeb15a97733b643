"""OPE against online returns on builtin:cartpole-medium and builtin:pendulum-medium: policies of known online
return (random, the fitted behavior policy, the learner after a few and after many updates, a deliberately bad
one), evaluated side by side by one member-batched FQE: FQE and DR rank them like their online returns
(Spearman >= 0.8), and FQE of the behavior policy lands within 10% of the held-out episodes' own discounted return.

Measured on the 2-core CPU (these settings): cartpole Spearman 0.87 for FQE and DR, behavior FQE 57.1 vs 57.9
held-out. Pendulum: see test_fqe_and_dr_rank_pendulum_policies_like_their_online_returns.

One policy none of the estimators ranks: the trained pendulum policy with its actions negated returns -686, the
worst of all, and FQE scores it -397 (16k updates: -403, 30k: -521), between the trained and the random policy; DR
follows FQE. Its actions are not outside the data's support, per state (pendulum-medium's logged actions are broad:
its per-state action likelihood under the behavior model is that of the IQL policy below), so the miss is FQE's
long-horizon extrapolation over the states that policy lingers in. The test leaves it out (measured in the closing
note of issue 11); its deliberately bad policy is IQL maximizing the negated reward, which returns -745.
"""
from __future__ import annotations

import shutil

import gymnasium as gym
import numpy as np
import pytest
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


def online_discounted(policy, k: int, env_id: str = "CartPole-v1", episodes: int = 10, spec=None) -> float:
    out = []
    for i in range(episodes):
        env = gym.make(env_id)
        obs, _ = env.reset(seed=100 + i)
        g, d = 0.0, 1.0
        while True:
            o = torch.as_tensor(obs, dtype=torch.float32)[None].expand(policy.K, 1, -1)
            a = policy.sample(o, 1)[0][k, 0]
            if spec is None:
                a = int(a)
            else:  # normalized [-1, 1] -> the env's units
                low, high = np.asarray(spec.action_low), np.asarray(spec.action_high)
                a = (low + (a.cpu().numpy() + 1.0) / 2.0 * (high - low)).astype(np.float32)
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


def _train_iql(ds, out, steps: int, *extra: str):
    assert main(["train", "--algo", "iql", "--data", str(ds), "--steps", str(steps), "--out", str(out),
                 "--set", "eval_episodes=0", "--set", "progress=off", "--set", "algo.hidden=[64, 64]",
                 "--set", "diagnostics=off", *extra]) == 0
    return load_run(out)[0]


@pytest.mark.slow
def test_fqe_and_dr_rank_pendulum_policies_like_their_online_returns(tmp_path):
    torch.manual_seed(0)
    ds = tmp_path / "pendulum"
    shutil.copytree(resolve("builtin:pendulum-medium"), ds)
    split(ds, 0.1, seed=0)
    early, mid, trained = (_train_iql(ds, tmp_path / f"run{n}", n) for n in (200, 1000, 2000))
    # deliberately bad yet on the data: IQL maximizing the negated reward, greedy (expectile 0.9, beta 10)
    adverse = _train_iql(ds, tmp_path / "adverse", 4000, "--set", "reward_scale={scale: -1, bias: 0}",
                         "--set", "algo.expectile=0.9", "--set", "algo.beta=10")
    meta = load_metadata(ds)
    spec = EnvSpec.from_metadata(meta)
    behavior = fit_behavior(load(ds), meta, 3000)
    final = LearnedPolicy(trained)
    parts = [UniformPolicy(spec, 1), behavior, LearnedPolicy(early), LearnedPolicy(mid), final,
             LearnedPolicy(adverse)]
    policy = stack_policies(parts)
    settings = OPESettings(estimators=("fqe", "dr"), fqe_steps=12000, behavior_steps=3000, bootstrap=50,
                           fqe=dict(hidden=(64, 64), lr=1e-3, tau=1.0, target_period=50))
    res = estimate_policy(policy, trained.norm_actions, str(ds), meta, GAMMA, settings, torch.device("cpu"))
    online = [online_discounted(policy, k, "Pendulum-v1", 20, spec) for k in range(policy.K)]
    fqe = [e["value"] for e in res["estimates"]["fqe"]]
    dr = [e["value"] for e in res["estimates"]["dr"]]
    print("pendulum online", online, "fqe", fqe, "dr", dr)
    assert min(online) == online[5] and online[4] > online[2], online  # the policies differ as built
    assert spearman(fqe, online) >= 0.8, (fqe, online)
    assert spearman(dr, online) >= 0.8, (dr, online)
    mc = res["holdout"]["mc_return"]
    assert abs(fqe[1] - mc) <= 0.1 * abs(mc), (fqe[1], mc)
