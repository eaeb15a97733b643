"""BCQ: Batch-Constrained deep Q-learning for continuous actions.

Fujimoto, Meger, Precup (2018), "Off-Policy Deep Reinforcement Learning without Exploration", ICML.
Actions are in the normalized space [-1, 1]; per member k the losses below are batch means, the yielded loss is
the (K,) vector of them. Update order per step (as in the authors' code): `vae`, `critic`, `actor`, then Polyak
averaging of the target critic and target actor.

Generative model: conditional VAE, encoder E(s, a) = N(mu, sigma), z = mu + sigma * eps, decoder D(s, z) in
[-1, 1], latent size 2 * act_dim, log sigma clamped to [-4, 15]:
    L_vae = mean_j (D(s, z)_j - a_j)^2 + kl_weight * mean_l -1/2 (1 + log sigma_l^2 - mu_l^2 - sigma_l^2)
Sampling from the model draws z ~ N(0, I) clipped to [-0.5, 0.5].
Perturbation model: xi(s, a) = phi * tanh(mlp(s, a)), perturbed action a~ = clip(a + xi(s, a), -1, 1).
Critic (twin Q1, Q2, targets Q1', Q2', target perturbation xi'): for n_action_samples actions a_i = D(s', z_i),
a~_i = clip(a_i + xi'(s', a_i), -1, 1),
    y = r + gamma (1 - term) max_i [ lmbda min_j Q'_j(s', a~_i) + (1 - lmbda) max_j Q'_j(s', a~_i) ]
    L_critic = sum_{j=1,2} (Q_j(s, a) - y)^2
Actor (perturbation model), with a = D(s, z), z clipped noise, no gradient into the VAE:
    L_actor = -Q1(s, clip(a + xi(s, a), -1, 1))
Target networks: theta' <- tau theta + (1 - tau) theta' for critic and perturbation model, every step.
Acting: decode n_action_samples candidates at s, perturb them, take the one with the largest Q1.

Defaults: the paper and the authors' code (github.com/sfujim/BCQ): VAE 750-750, perturbation model and critics
400-300, Adam with learning rate 1e-3 for all three, tau 0.005, lmbda 0.75, phi 0.05, kl_weight 0.5, 10 sampled
actions, gamma 0.99.

**Deviations**
- Acting decodes `n_action_samples` (10, as the paper states) candidates; the authors' code uses 100 at acting
  time and 10 in the target. The acting latents are n clipped prior draws made once per member at
  construction (buffer `act_latent`) rather than fresh draws at every call, so `policy` is deterministic
  (same state, same action) and never consumes the training noise stream.
- phi is in the normalized action units: phi * (high - low) / 2 in env units, which equals the authors'
  phi * max_action for the symmetric action spaces they use.
- The batch size is the learner's (the authors use 100).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..config import member, require
from ..nn.functional import frozen_copy, member_mean, soft_update
from ..nn.generative import ConditionalVAE
from ..nn.members import MemberMLP
from ..nn.policies import TwinQ
from .base import AlgoConfig, Algorithm, Update


@dataclass(frozen=True)
class BCQConfig(AlgoConfig):
    hidden: tuple[int, ...] = (400, 300)
    """Hidden layer widths of the perturbation model and the twin critics (paper: 400-300)."""
    vae_hidden: tuple[int, ...] = (750, 750)
    """Hidden layer widths of the VAE's encoder and of its decoder (paper: 750-750)."""
    actor_lr: float = 1e-3
    """Adam learning rate of the perturbation model xi (paper: 1e-3)."""
    critic_lr: float = 1e-3
    """Adam learning rate of the twin critics (paper: 1e-3)."""
    vae_lr: float = 1e-3
    """Adam learning rate of the conditional VAE (paper: 1e-3, Adam's default)."""
    tau: float = 0.005
    """Polyak factor of the target critic and target perturbation model, applied every step."""
    phi: float = member(0.05)
    """Maximum perturbation Phi of a sampled action, in normalized action units [-1, 1]."""
    lmbda: float = member(0.75)
    """Soft clipped double-Q weight lambda: target = lambda * min + (1 - lambda) * max."""
    kl_weight: float = member(0.5)
    """Weight of the KL term of the VAE loss (the authors' code uses 0.5)."""
    n_action_samples: int = 10
    """Actions sampled from the VAE per state, for the critic target and for acting."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(len(self.vae_hidden) >= 1 and all(h > 0 for h in self.vae_hidden), "vae_hidden",
                f"need at least one positive width, got {list(self.vae_hidden)}")
        for key in ("actor_lr", "critic_lr", "vae_lr"):
            require(getattr(self, key) > 0.0, key, f"must be positive, got {getattr(self, key)}")
        require(0.0 < self.tau <= 1.0, "tau", f"must be in (0, 1], got {self.tau}")
        require(self.phi >= 0.0, "phi", f"must be >= 0, got {self.phi}")
        require(0.0 <= self.lmbda <= 1.0, "lmbda", f"must be in [0, 1], got {self.lmbda}")
        require(self.kl_weight >= 0.0, "kl_weight", f"must be >= 0, got {self.kl_weight}")
        require(self.n_action_samples >= 1, "n_action_samples", f"must be >= 1, got {self.n_action_samples}")


class Perturbation(nn.Module):
    """BCQ's perturbation model: (s, a) -> clip(a + phi * tanh(mlp(s, a)), -1, 1). Shapes (K, B, .)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], gens: Sequence[torch.Generator]) -> None:
        super().__init__()
        self.net = MemberMLP(obs_dim + act_dim, hidden, act_dim, gens)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        xi = phi[:, None, None] * torch.tanh(self.net(torch.cat([obs, actions], dim=-1)))
        return (actions + xi).clamp(-1.0, 1.0)


class BCQ(Algorithm):
    name = "bcq"
    networks = "perturbation actor and twin critics (the VAE has vae_hidden)"
    Config = BCQConfig
    action_types = ("continuous",)

    def build(self, gens: list[torch.Generator]) -> None:
        s, a, cfg = self.spec.obs_dim, self.spec.action_dim, self.cfg
        self.latent_dim = 2 * a
        self.vae = ConditionalVAE(s, a, self.latent_dim, cfg.vae_hidden, gens)
        self.actor = Perturbation(s, a, cfg.hidden, gens)
        self.critic = TwinQ(s, a, cfg.hidden, gens)
        self.actor_target = frozen_copy(self.actor)
        self.critic_target = frozen_copy(self.critic)
        # acting decodes the same n clipped prior draws at every state (drawn once, per member), so that
        # `policy` is a deterministic function of the weights and the state
        self.register_buffer("act_latent", torch.stack([
            torch.randn(cfg.n_action_samples, self.latent_dim, generator=g).clamp(-0.5, 0.5) for g in gens]))

    def optim_groups(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        cfg = self.cfg
        return {"vae": (list(self.vae.parameters()), cfg.vae_lr),
                "critic": (list(self.critic.parameters()), cfg.critic_lr),
                "actor": (list(self.actor.parameters()), cfg.actor_lr)}

    def _latent(self, rows: int) -> torch.Tensor:
        """Clipped prior draws for sampling from the VAE: (K, rows, latent)."""
        return self.rng.randn((rows, self.latent_dim)).clamp(-0.5, 0.5)

    def update(self, batch, step: int) -> Update:
        b = self.prepare(batch)
        obs, act = b.observations, b.actions  # (K, B, obs), (K, B, act) in [-1, 1]
        k, bs = b.rewards.shape
        n = self.cfg.n_action_samples
        phi, lmbda = self.coef("phi"), self.coef("lmbda")

        # --- generative model
        recon, mean, log_std = self.vae(obs, act, self.rng.randn((bs, self.latent_dim)))
        recon_loss = member_mean((recon - act).square())                                             # (K,)
        kl = member_mean(-0.5 * (1.0 + 2.0 * log_std - mean.square() - torch.exp(2.0 * log_std)))    # (K,)
        vae_loss = recon_loss + self.coef("kl_weight") * kl
        yield "vae", vae_loss, {"recon": recon_loss.detach(), "kl": kl.detach()}

        # --- critics
        with torch.no_grad():
            next_obs = b.next_observations.repeat_interleave(n, dim=1)                  # (K, B*n, obs), row i*n+j
            next_act = self.actor_target(next_obs, self.vae.decode(next_obs, self._latent(bs * n)), phi)
            q_next = self.critic_target(next_obs, next_act)                             # (K, 2, B*n)
            lo, hi = torch.aminmax(q_next, dim=1)                                       # (K, B*n) each
            soft = lmbda[:, None] * lo + (1.0 - lmbda[:, None]) * hi
            v_next = soft.view(k, bs, n).amax(-1)                                       # (K, B)
            target = b.rewards + self.coef("discount")[:, None] * (1.0 - b.terminations) * v_next
        q = self.critic(obs, act)                                                       # (K, 2, B)
        critic_loss = (q - target[:, None]).square().mean(-1).sum(-1)                   # (K,)
        yield "critic", critic_loss, {"q_mean": q.detach()[:, 0].mean(-1), "target_mean": target.mean(-1),
                                            "critic_loss": critic_loss.detach()}

        # --- perturbation model
        with torch.no_grad():
            sampled = self.vae.decode(obs, self._latent(bs))                            # (K, B, act)
        actor_loss = -self.critic.q1(obs, self.actor(obs, sampled, phi)).mean(-1)       # (K,)
        yield "actor", actor_loss, {"actor_q": -actor_loss.detach()}

        soft_update(self.critic_target, self.critic, self.cfg.tau)
        soft_update(self.actor_target, self.actor, self.cfg.tau)

    def policy(self, obs: torch.Tensor) -> torch.Tensor:
        k, bs, _ = obs.shape
        n, act_dim = self.cfg.n_action_samples, self.spec.action_dim
        obs_rep = obs.repeat_interleave(n, dim=1)                                       # (K, B*n, obs)
        z = self.act_latent.repeat(1, bs, 1)                                            # (K, B*n, latent)
        cand = self.actor(obs_rep, self.vae.decode(obs_rep, z), self.coef("phi"))
        best = self.critic.q1(obs_rep, cand).view(k, bs, n).argmax(-1)                 # (K, B)
        cand = cand.view(k, bs, n, act_dim)
        return cand.gather(2, best[:, :, None, None].expand(k, bs, 1, act_dim)).squeeze(2)

    @torch.no_grad()
    def critic_values(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.critic(obs, actions)                                       # (K, 2, B)


ALGORITHM = BCQ
