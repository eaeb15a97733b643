"""Discrete CQL loss (double DQN + CQL(H) penalty, Kumar et al. 2020) against a direct computation."""
from __future__ import annotations

import copy

import torch

from rayoffline.algorithms.discrete_cql import DiscreteCQL, DiscreteCQLConfig
from rayoffline.batch import Batch
from rayoffline.spec import EnvSpec

from ._reference import OBS_MEAN, OBS_STD, assert_close, drive, huber, member_batch, mlp, norm, weights

SPEC = EnvSpec(obs_dim=4, action_dim=2, discrete=True)
K, B, TAU = 2, 16, 0.1


def make() -> DiscreteCQL:
    configs = [DiscreteCQLConfig(hidden=(16, 16), tau=TAU, cql_alpha=0.5, discount=0.99),
               DiscreteCQLConfig(hidden=(16, 16), tau=TAU, cql_alpha=4.0, discount=0.9)]
    alg = DiscreteCQL(SPEC, configs, [0, 1], obs_mean=OBS_MEAN, obs_std=OBS_STD)
    with torch.no_grad():  # a target that differs from the online net, so selection != evaluation
        for p in alg.q_target.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return alg


def batch(seed: int) -> Batch:  # rewards * 2: TD errors on both sides of Huber's threshold
    return member_batch(seed, K, B, discrete=True, reward_scale=2.0)


def test_loss_is_double_dqn_huber_plus_alpha_times_logsumexp_penalty():
    alg = make()
    big_errors = []
    for step in range(1, 4):
        bt = batch(step)
        old_target = copy.deepcopy(alg.q_target)

        def check(group, loss, metrics):
            assert group == "q"
            totals, pens, tds = [], [], []
            for k, cfg in enumerate(alg.configs):
                s, s2, a = norm(bt.observations[k]), norm(bt.next_observations[k]), bt.actions[k]
                a_star = mlp(weights(alg.q.net, k), s2).argmax(1)                    # online selects
                q_next = mlp(weights(alg.q_target.net, k), s2)[torch.arange(B), a_star]  # target evaluates
                y = bt.rewards[k].double() + cfg.discount * (1 - bt.terminations[k].double()) * q_next
                q_all = mlp(weights(alg.q.net, k), s)
                q_data = q_all[torch.arange(B), a]
                td = huber(q_data - y).mean()
                pen = (torch.logsumexp(q_all, 1) - q_data).mean()
                totals.append(td + cfg.cql_alpha * pen)
                tds.append(td)
                pens.append(pen)
                big_errors.append(((q_data - y).abs() > 1).any() & ((q_data - y).abs() < 1).any())
            assert_close(loss, torch.stack(totals), "discrete CQL loss (per member)")
            assert_close(metrics["td_loss"], torch.stack(tds), "td loss")
            assert_close(metrics["cql_penalty"], torch.stack(pens), "cql penalty")

        drive(alg, bt, step, check)
        for po, pn, p in zip(old_target.parameters(), alg.q_target.parameters(), alg.q.parameters()):
            assert_close(pn, (1 - TAU) * po.double() + TAU * p.double(), "soft update")
    assert all(big_errors), "degenerate test: both branches of the Huber loss should be exercised"


def test_act_is_greedy_in_the_online_q():
    alg = make()
    obs = OBS_MEAN + OBS_STD * torch.randn(K, 32, 4)
    expect = torch.stack([mlp(weights(alg.q.net, k), norm(obs[k])).argmax(1) for k in range(K)])
    assert torch.equal(alg.act(obs), expect)
