"""IQL losses against a direct computation from the paper's equations (Kostrikov et al. 2022)."""
from __future__ import annotations

import torch

from rayoffline.algorithms.iql import IQL, IQLConfig
from rayoffline.batch import Batch
from rayoffline.spec import EnvSpec

from ._reference import OBS_MEAN, OBS_STD, assert_close, drive, member_batch, mlp, norm, weights

SPEC = EnvSpec(obs_dim=4, action_dim=2, discrete=False, action_low=(-1.0,) * 2, action_high=(1.0,) * 2)
K, B = 2, 16


def make(**kw) -> IQL:
    configs = [IQLConfig(hidden=(16, 16), expectile=0.7, beta=3.0, discount=0.99, **kw),
               IQLConfig(hidden=(16, 16), expectile=0.9, beta=8.0, discount=0.9, **kw)]
    return IQL(SPEC, configs, [0, 1], obs_mean=OBS_MEAN, obs_std=OBS_STD)


def batch(seed: int) -> Batch:
    return member_batch(seed, K, B, term_every=5)


def reference(alg: IQL, bt: Batch) -> dict[str, torch.Tensor]:
    """All three per-member losses (K,) from the weights at the start of the step (what the paper's update
    order implies: V(s') and the advantage come from the value net before its step)."""
    out: dict[str, list] = {"value": [], "critic": [], "actor": []}
    raw_weights = []
    for k, cfg in enumerate(alg.configs):
        s, s2, a = norm(bt.observations[k]), norm(bt.next_observations[k]), bt.actions[k].double()
        sa = torch.cat([s, a], 1)
        target_q = torch.minimum(*(mlp(weights(alg.critic_target.net, 2 * k + e), sa)[:, 0] for e in range(2)))
        v = mlp(weights(alg.value.net, k), s)[:, 0]
        u = target_q - v
        out["value"].append((torch.where(u < 0, 1.0 - cfg.expectile, cfg.expectile) * u ** 2).mean())
        next_v = mlp(weights(alg.value.net, k), s2)[:, 0]
        y = bt.rewards[k].double() + cfg.discount * (1 - bt.terminations[k].double()) * next_v
        out["critic"].append(0.5 * sum(((mlp(weights(alg.critic.net, 2 * k + e), sa)[:, 0] - y) ** 2).mean()
                                       for e in range(2)))
        raw = torch.exp(cfg.beta * u)
        raw_weights.append(raw)
        w = raw.clamp(max=cfg.exp_adv_max)
        mean = torch.tanh(mlp(weights(alg.actor.net, k), s))
        if cfg.deterministic_actor:
            nll = ((mean - a) ** 2).sum(-1)
        else:
            std = alg.actor.log_std[k, 0].detach().double().clamp(-20.0, 2.0).exp()
            nll = -torch.distributions.Normal(mean, std).log_prob(a).sum(-1)
        out["actor"].append((w * nll).mean())
    return {**{g: torch.stack(v) for g, v in out.items()}, "raw_weights": torch.stack(raw_weights)}


def run_and_check(alg: IQL, steps: int = 3) -> list[torch.Tensor]:
    opts: dict = {}
    raws = []
    for step in range(1, steps + 1):
        bt = batch(step)
        ref = reference(alg, bt)
        raws.append(ref["raw_weights"])
        target_before = [p.detach().clone() for p in alg.critic_target.parameters()]
        checked = []

        def check(group, loss, metrics):
            assert_close(loss, ref[group], f"{group} loss, step {step}")
            if group == "actor":  # the critic's soft target update happened right after the critic step
                for old, new, online in zip(target_before, alg.critic_target.parameters(), alg.critic.parameters()):
                    torch.testing.assert_close(new.detach(), (1 - alg.cfg.tau) * old + alg.cfg.tau * online.detach())
            checked.append(group)

        assert drive(alg, bt, step, check, opts) == checked == ["value", "critic", "actor"]
        # the learner stepped the log-std too; give it a value away from 0 so the likelihood term is exercised
        with torch.no_grad():
            if hasattr(alg.actor, "log_std"):
                alg.actor.log_std.add_(0.3 * torch.randn_like(alg.actor.log_std))
    return raws


def test_gaussian_actor_losses_match_the_equations():
    alg = make(exp_adv_max=1.2)
    raws = run_and_check(alg)
    # the advantage-weight clip was exercised (some weights clipped, some not)
    raw = torch.cat([r.flatten() for r in raws])
    assert (raw > 1.2).any() and (raw < 1.2).any()


def test_deterministic_actor_losses_match_the_equations():
    run_and_check(make(deterministic_actor=True, exp_adv_max=100.0), steps=2)


def test_gaussian_log_prob_is_the_normal_density():
    alg = make()
    with torch.no_grad():
        alg.actor.log_std.copy_(torch.tensor([[[-0.5, 0.3]], [[0.1, -1.0]]]))
    obs, act = torch.randn(K, 5, 4), torch.rand(K, 5, 2) * 2 - 1
    mean = alg.actor(obs)
    expected = torch.distributions.Normal(mean, alg.actor.log_std.exp()).log_prob(act).sum(-1)
    assert_close(alg.actor.log_prob(obs, act), expected, "log_prob")
