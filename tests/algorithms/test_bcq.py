"""BCQ losses against a direct computation from the equations of Fujimoto, Meger, Precup (2018)."""
from __future__ import annotations

import copy

import torch

from rayoffline.algorithms.bcq import BCQ, BCQConfig
from rayoffline.batch import Batch
from rayoffline.spec import EnvSpec

from ._reference import OBS_MEAN, OBS_STD, RecordingRNG, assert_close, drive, member_batch, mlp, norm, weights

SPEC = EnvSpec(obs_dim=4, action_dim=2, discrete=False, action_low=(-1.0,) * 2, action_high=(1.0,) * 2)
K, B, N, LATENT, TAU = 2, 8, 3, 4, 0.1
COMMON = dict(hidden=(16, 16), vae_hidden=(12, 12), n_action_samples=N, tau=TAU)


def make() -> BCQ:
    configs = [BCQConfig(phi=0.05, lmbda=0.75, kl_weight=0.5, discount=0.99, **COMMON),
               BCQConfig(phi=0.4, lmbda=0.3, kl_weight=2.0, discount=0.9, **COMMON)]
    alg = BCQ(SPEC, configs, [0, 1], obs_mean=OBS_MEAN, obs_std=OBS_STD)
    alg.rng = RecordingRNG(alg.rng)
    return alg


def batch(seed: int) -> Batch:
    return member_batch(seed, K, B)


def decode(alg, k, s, z):
    return torch.tanh(mlp(weights(alg.vae.decoder, k), torch.cat([s, z.double()], 1)))


def perturb(actor, k, phi, s, a):
    return (a + phi * torch.tanh(mlp(weights(actor.net, k), torch.cat([s, a], 1)))).clamp(-1.0, 1.0)


def q(critic, m, s, a):
    return mlp(weights(critic.net, m), torch.cat([s, a], 1))[:, 0]


def vae_ref(alg, bt, eps):
    recon, kl = [], []
    for k in range(K):
        s, a = norm(bt.observations[k]), bt.actions[k].double()
        out = mlp(weights(alg.vae.encoder, k), torch.cat([s, a], 1))
        mu, log_sigma = out[:, :LATENT], out[:, LATENT:].clamp(-4.0, 15.0)
        sigma = log_sigma.exp()
        z = mu + sigma * eps[k].double()
        recon.append(((decode(alg, k, s, z) - a) ** 2).mean())
        kl.append((-0.5 * (1 + torch.log(sigma ** 2) - mu ** 2 - sigma ** 2)).mean())
    return torch.stack(recon), torch.stack(kl)


def critic_ref(alg, bt, z_next):
    losses, targets = [], []
    for k, cfg in enumerate(alg.configs):
        s, a, s2 = norm(bt.observations[k]), bt.actions[k].double(), norm(bt.next_observations[k])
        s2n = s2.repeat_interleave(N, 0)                                   # row i*N + j: state i, sample j
        a2 = perturb(alg.actor_target, k, cfg.phi, s2n, decode(alg, k, s2n, z_next[k].clamp(-0.5, 0.5)))
        q1, q2 = q(alg.critic_target, 2 * k, s2n, a2), q(alg.critic_target, 2 * k + 1, s2n, a2)
        soft = cfg.lmbda * torch.minimum(q1, q2) + (1 - cfg.lmbda) * torch.maximum(q1, q2)
        y = bt.rewards[k].double() + cfg.discount * (1 - bt.terminations[k].double()) * soft.view(B, N).max(1).values
        losses.append(sum(((q(alg.critic, 2 * k + e, s, a) - y) ** 2).mean() for e in range(2)))
        targets.append(y.mean())
    return torch.stack(losses), torch.stack(targets)


def actor_ref(alg, bt, z):
    out = []
    for k, cfg in enumerate(alg.configs):
        s = norm(bt.observations[k])
        pert = perturb(alg.actor, k, cfg.phi, s, decode(alg, k, s, z[k].clamp(-0.5, 0.5)))
        out.append(-q(alg.critic, 2 * k, s, pert).mean())
    return torch.stack(out)


def test_losses_match_the_equations_in_the_paper_order():
    alg = make()
    rng: RecordingRNG = alg.rng
    for step in range(1, 3):
        bt = batch(step)
        rng.draws.clear()
        seen = []

        def check(group, loss, metrics):
            seen.append(group)
            shapes = [tuple(d.shape) for _, d in rng.draws]
            if group == "vae":
                assert shapes == [(K, B, LATENT)]
                recon, kl = vae_ref(alg, bt, rng.draws[0][1])
                kl_w = torch.tensor([c.kl_weight for c in alg.configs], dtype=torch.float64)
                assert_close(loss, (recon + kl_w * kl), "vae loss")
                assert_close(metrics["recon"], recon, "recon")
                assert_close(metrics["kl"], kl, "kl")
            elif group == "critic":  # the target already uses the VAE after its step
                assert shapes == [(K, B, LATENT), (K, B * N, LATENT)]
                losses, targets = critic_ref(alg, bt, rng.draws[1][1])
                assert_close(loss, losses, "critic loss")
                assert_close(metrics["target_mean"], targets, "target mean")
            else:
                assert shapes == [(K, B, LATENT), (K, B * N, LATENT), (K, B, LATENT)]
                assert_close(loss, actor_ref(alg, bt, rng.draws[2][1]), "actor loss")
                before_targets.extend(copy.deepcopy(m) for m in (alg.critic_target, alg.actor_target))

        before_targets: list = []
        drive(alg, bt, step, check)
        assert seen == ["vae", "critic", "actor"]
        # Polyak averaging after the actor step, for both targets
        for old, new, online in zip(before_targets, (alg.critic_target, alg.actor_target), (alg.critic, alg.actor)):
            for po, pn, p in zip(old.parameters(), new.parameters(), online.parameters()):
                assert_close(pn, (1 - TAU) * po.double() + TAU * p.double(), "soft update")


def test_act_picks_the_highest_q1_among_perturbed_vae_candidates():
    alg = make()
    drive(alg, batch(1), 1)
    obs = OBS_MEAN + OBS_STD * torch.randn(K, 6, 4)
    got = alg.act(obs)
    for k, cfg in enumerate(alg.configs):
        s = norm(obs[k])
        z = alg.act_latent[k]                                              # (N, latent), fixed per member
        assert z.shape == (N, LATENT) and z.abs().max() <= 0.5
        for i in range(6):
            si = s[i:i + 1].expand(N, -1)
            cand = perturb(alg.actor, k, cfg.phi, si, decode(alg, k, si, z))
            assert_close(got[k, i], cand[q(alg.critic, 2 * k, si, cand).argmax()], "chosen action")
    assert torch.equal(alg.act(obs), got), "acting is deterministic"
