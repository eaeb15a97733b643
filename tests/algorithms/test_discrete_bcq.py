"""Discrete BCQ (Fujimoto et al. 2019) loss and action filter against a direct computation."""
from __future__ import annotations

import copy

import torch

from rayoffline.algorithms.discrete_bcq import DiscreteBCQ, DiscreteBCQConfig
from rayoffline.batch import Batch
from rayoffline.nn.functional import hard_update
from rayoffline.spec import EnvSpec

from ._reference import OBS_MEAN, OBS_STD, assert_close, drive, huber, member_batch, mlp, norm, weights

SPEC = EnvSpec(obs_dim=4, action_dim=2, discrete=True)
K, B, TAU = 2, 32, 0.1
Q, IMITATION = 0, 1  # ensemble copies of the one member-batched MLP


def make(thresholds=(0.3, 0.6)) -> DiscreteBCQ:
    configs = [DiscreteBCQConfig(hidden=(16, 16), tau=TAU, threshold=thresholds[0], logit_reg=0.01, discount=0.99),
               DiscreteBCQConfig(hidden=(16, 16), tau=TAU, threshold=thresholds[1], logit_reg=0.5, discount=0.9)]
    return DiscreteBCQ(SPEC, configs, [0, 1], obs_mean=OBS_MEAN, obs_std=OBS_STD)


def batch(seed: int) -> Batch:  # rewards * 2: TD errors on both sides of Huber's threshold
    return member_batch(seed, K, B, discrete=True, reward_scale=2.0)


def nets(net, k, s):
    """(Q(s, .), imitation logits) of member k from the module's weights."""
    return mlp(weights(net, 2 * k + Q), s), mlp(weights(net, 2 * k + IMITATION), s)


def allowed_ref(logits, threshold):
    probs = torch.softmax(logits, 1)
    return probs / probs.max(1, keepdim=True).values > threshold


def test_loss_is_filtered_double_q_huber_plus_imitation():
    alg = make()
    with torch.no_grad():  # spread the imitation probabilities so the filter excludes some actions but not all;
        # and move the target away from the online net
        for layer in alg.net.layers[-1:]:
            layer.weight.view(K, 2, *layer.weight.shape[1:])[:, IMITATION] *= 20.0
        for p in alg.net_target.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    excluded = []
    for step in range(1, 4):
        bt = batch(step)
        old_target = copy.deepcopy(alg.net_target)

        def check(group, loss, metrics):
            assert group == "q"
            totals, ces = [], []
            for k, cfg in enumerate(alg.configs):
                s, s2, a = norm(bt.observations[k]), norm(bt.next_observations[k]), bt.actions[k]
                q2, logits2 = nets(alg.net, k, s2)
                ok = allowed_ref(logits2, cfg.threshold)
                excluded.append((~ok).sum())
                a_star = torch.where(ok, q2, -torch.inf).argmax(1)
                q_next = mlp(weights(alg.net_target, 2 * k + Q), s2)[torch.arange(B), a_star]
                y = bt.rewards[k].double() + cfg.discount * (1 - bt.terminations[k].double()) * q_next
                q_all, logits = nets(alg.net, k, s)
                ce = (torch.logsumexp(logits, 1) - logits[torch.arange(B), a]).mean()
                totals.append(huber(q_all[torch.arange(B), a] - y).mean() + ce
                              + cfg.logit_reg * (logits ** 2).mean())
                ces.append(ce)
                assert_close(metrics["allowed_frac"][k], ok.double().mean(), "allowed fraction")
            assert_close(loss, torch.stack(totals), "discrete BCQ loss (per member)")
            assert_close(metrics["ce"], torch.stack(ces), "ce")

        drive(alg, bt, step, check)
        for po, pn, p in zip(old_target.parameters(), alg.net_target.parameters(), alg.net.parameters()):
            assert_close(pn, (1 - TAU) * po.double() + TAU * p.double(), "soft update")
    assert sum(excluded) > 0, "degenerate test: the filter should exclude some actions"


def _q_prefers_what_the_clone_rules_out(alg):
    """Q says action 1 everywhere, the imitation network says action 0 almost surely (ratio e^-8)."""
    with torch.no_grad():
        last = alg.net.layers[-1]
        last.bias.view(K, 2, 1, 2)[:, Q] += torch.tensor([0.0, 50.0])
        last.bias.view(K, 2, 1, 2)[:, IMITATION] += torch.tensor([8.0, 0.0])
        hard_update(alg.net_target, alg.net)


def test_filter_excludes_low_ratio_actions_in_the_policy():
    alg = make(thresholds=(0.3, 0.0))  # member 1 does not filter
    _q_prefers_what_the_clone_rules_out(alg)
    a = alg.act(OBS_MEAN + OBS_STD * torch.randn(K, 64, 4))
    assert (a[0] == 0).all(), "member 0 took an action whose behavior ratio is below the threshold"
    assert (a[1] == 1).all(), "member 1 (threshold 0) should take the Q-greedy action"


def test_filter_excludes_low_ratio_actions_in_the_target():
    alg = make(thresholds=(0.3, 0.0))
    _q_prefers_what_the_clone_rules_out(alg)
    bt = batch(7)
    target_net = copy.deepcopy(alg.net_target)  # before this step's soft update
    targets = {}
    drive(alg, bt, 1, lambda g, loss, m: targets.update(m))
    for k, (cfg, action) in enumerate(zip(alg.configs, (0, 1))):
        s2 = norm(bt.next_observations[k])
        q_next = mlp(weights(target_net, 2 * k + Q), s2)[:, action]
        y = bt.rewards[k].double() + cfg.discount * (1 - bt.terminations[k].double()) * q_next
        assert_close(targets["target_mean"][k], y.mean(), f"member {k}: target bootstraps from action {action}")
