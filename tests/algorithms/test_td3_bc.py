"""TD3+BC losses against a direct computation from the paper's equations (Fujimoto & Gu 2021)."""
from __future__ import annotations

import torch

from rayoffline.algorithms.td3_bc import TD3BC, TD3BCConfig
from rayoffline.batch import Batch
from rayoffline.spec import EnvSpec

from ._reference import OBS_MEAN, OBS_STD, RecordingRNG, assert_close, drive, member_batch, mlp, norm, weights

SPEC = EnvSpec(obs_dim=4, action_dim=2, discrete=False, action_low=(-1.0,) * 2, action_high=(1.0,) * 2)
K, B = 2, 8


def make(**kw) -> TD3BC:
    configs = [TD3BCConfig(hidden=(16, 16), alpha=2.5, policy_noise=0.2, noise_clip=0.5, discount=0.99, **kw),
               TD3BCConfig(hidden=(16, 16), alpha=0.7, policy_noise=0.6, noise_clip=0.3, discount=0.9, **kw)]
    alg = TD3BC(SPEC, configs, [0, 1], obs_mean=OBS_MEAN, obs_std=OBS_STD)
    alg.rng = RecordingRNG(alg.rng)
    return alg


def batch(seed: int) -> Batch:
    return member_batch(seed, K, B)


def critic_ref(alg: TD3BC, bt: Batch, noise: torch.Tensor) -> torch.Tensor:
    """Per-member critic losses (K,)."""
    losses = []
    for k, cfg in enumerate(alg.configs):
        s, s2, a = norm(bt.observations[k]), norm(bt.next_observations[k]), bt.actions[k].double()
        eps = (noise[k].double() * cfg.policy_noise).clamp(-cfg.noise_clip, cfg.noise_clip)
        a2 = (torch.tanh(mlp(weights(alg.actor_target.net, k), s2)) + eps).clamp(-1.0, 1.0)
        q2 = torch.minimum(*(mlp(weights(alg.critic_target.net, 2 * k + e), torch.cat([s2, a2], 1))[:, 0]
                             for e in range(2)))
        y = bt.rewards[k].double() + cfg.discount * (1.0 - bt.terminations[k].double()) * q2
        losses.append(sum(((mlp(weights(alg.critic.net, 2 * k + e), torch.cat([s, a], 1))[:, 0] - y) ** 2).mean()
                          for e in range(2)))
    return torch.stack(losses)


def actor_ref(alg: TD3BC, bt: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member actor losses and lambdas, (K,) each."""
    losses, lams = [], []
    for k, cfg in enumerate(alg.configs):
        s, a = norm(bt.observations[k]), bt.actions[k].double()
        pi = torch.tanh(mlp(weights(alg.actor.net, k), s))
        q = mlp(weights(alg.critic.net, 2 * k), torch.cat([s, pi], 1))[:, 0]  # the first critic only
        lam = cfg.alpha / q.abs().mean()
        losses.append(-lam * q.mean() + ((pi - a) ** 2).mean())
        lams.append(lam)
    return torch.stack(losses), torch.stack(lams)


def test_losses_match_the_equations_and_targets_follow_the_actor():
    alg = make()
    opts: dict = {}
    for step in (1, 2):
        bt = batch(step)
        t_actor = [p.detach().clone() for p in alg.actor_target.parameters()]
        t_critic = [p.detach().clone() for p in alg.critic_target.parameters()]
        checked = []

        def check(group, loss, metrics):
            if group == "critic":
                (kind, noise), = alg.rng.draws[-1:]
                assert kind == "randn" and noise.shape == (K, B, 2)
                assert_close(loss, critic_ref(alg, bt, noise), f"critic loss, step {step}")
            else:
                ref, lams = actor_ref(alg, bt)
                assert_close(loss, ref, f"actor loss, step {step}")
                assert_close(metrics["lambda"], lams, "lambda")
            checked.append(group)

        groups = drive(alg, bt, step, check, opts)
        assert groups == checked == (["critic"] if step == 1 else ["critic", "actor"])
        tau = alg.cfg.tau
        for old, new, online in [*zip(t_actor, alg.actor_target.parameters(), alg.actor.parameters()),
                                 *zip(t_critic, alg.critic_target.parameters(), alg.critic.parameters())]:
            expected = old if step == 1 else (1 - tau) * old + tau * online.detach()
            torch.testing.assert_close(new.detach(), expected, msg=f"target after step {step}")
        assert all(not p.requires_grad for p in [*alg.actor_target.parameters(), *alg.critic_target.parameters()])


def test_actor_and_targets_move_only_every_policy_freq_steps():
    alg = make(policy_freq=3)
    opts: dict = {}
    seen = []
    for step in range(1, 7):
        actor = [p.detach().clone() for p in alg.actor.parameters()]
        target = [p.detach().clone() for p in alg.critic_target.parameters()]
        seen.append(drive(alg, batch(step), step, None, opts))
        moved = any(not torch.equal(a, p) for a, p in zip(actor, alg.actor.parameters()))
        target_moved = any(not torch.equal(a, p) for a, p in zip(target, alg.critic_target.parameters()))
        assert moved == target_moved == (step % 3 == 0), f"step {step}"
    assert seen == [["critic"], ["critic"], ["critic", "actor"]] * 2


def test_noise_is_clipped_per_member():
    """A huge policy_noise makes every noise entry hit its member's clip; the loss must still match."""
    configs = [TD3BCConfig(hidden=(16, 16), policy_noise=100.0, noise_clip=0.1),
               TD3BCConfig(hidden=(16, 16), policy_noise=100.0, noise_clip=0.4)]
    alg = TD3BC(SPEC, configs, [3, 4], obs_mean=OBS_MEAN, obs_std=OBS_STD)
    alg.rng = RecordingRNG(alg.rng)
    bt = batch(7)

    def check(group, loss, metrics):
        if group == "critic":
            assert_close(loss, critic_ref(alg, bt, alg.rng.draws[-1][1]), "critic loss with clipped noise")

    drive(alg, bt, 1, check)
