"""TD3+BC: TD3 with a behavior-cloning term in the actor loss.

Fujimoto & Gu, "A Minimalist Approach to Offline Reinforcement Learning", NeurIPS 2021
(https://arxiv.org/abs/2106.06860). Actions live in the normalized space [-1, 1] (max_action = 1).

Critic (every step), twin critics Q_1, Q_2 with targets Q'_1, Q'_2 and a target actor pi':
    a'  = clip(pi'(s') + clip(sigma * eps, -c, c), -1, 1)          eps ~ N(0, I)
    y   = r + gamma * (1 - term) * min_i Q'_i(s', a')
    L_Q = sum_i E[(Q_i(s, a) - y)^2]
Actor (every `policy_freq` steps, after that step's critic update; targets follow the actor step):
    lambda = alpha / E[|Q_1(s, pi(s))|]                            (no gradient through lambda)
    L_pi   = -lambda * E[Q_1(s, pi(s))] + E[mean_j (pi(s)_j - a_j)^2]
    theta' <- (1 - tau) theta' + tau theta  for Q'_1, Q'_2 and pi'
Every expectation is a mean over the member's batch; each group yields the (K,) vector of per-member losses.

Groups, in the paper's order: `critic` each step, then `actor` on steps where step % policy_freq == 0
(the learner counts steps from 1, so the actor first moves on step 2, as in the reference code's
`total_it`).

Defaults: CORL's `td3_bc.py` (the reference implementation publishing D4RL scores) and the paper:
alpha 2.5, policy_noise 0.2, noise_clip 0.5, policy_freq 2, tau 0.005, Adam 3e-4 for actor and critic,
2 x 256 hidden layers, observations standardized with the dataset statistics.

**Deviations**
- The BC term and the target-policy noise act on actions normalized to [-1, 1]. For environments whose
  bounds are +-max_action (all of D4RL's locomotion tasks: max_action = 1) this is the reference algorithm;
  for others it rescales the BC term per action dimension, as the range normalization does.
- Training metrics of the actor group (`lambda`, `bc_mse`, `actor_q`) are produced only on actor steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..batch import Batch
from ..config import member, require
from ..nn.functional import frozen_copy, params, soft_update, twin_min
from ..nn.policies import DeterministicActor, TwinQ
from .base import AlgoConfig, Algorithm, Update


@dataclass(frozen=True)
class TD3BCConfig(AlgoConfig):
    alpha: float = member(2.5)
    """Weight of the Q term against the BC term (lambda = alpha / mean |Q|); larger is less conservative."""
    policy_noise: float = member(0.2)
    """Std of the Gaussian noise added to the target policy's action (target policy smoothing)."""
    noise_clip: float = member(0.5)
    """Clip of the target policy smoothing noise, in normalized action units."""
    policy_freq: int = 2
    """Update the actor and the target networks once every this many critic updates (delayed updates)."""
    tau: float = 0.005
    """Polyak rate of the soft target updates."""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor."""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin critics."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.alpha >= 0.0, "alpha", f"must be >= 0, got {self.alpha}")
        require(self.policy_noise >= 0.0, "policy_noise", f"must be >= 0, got {self.policy_noise}")
        require(self.noise_clip >= 0.0, "noise_clip", f"must be >= 0, got {self.noise_clip}")
        require(self.policy_freq >= 1, "policy_freq", f"must be a positive integer, got {self.policy_freq}")
        require(0.0 < self.tau <= 1.0, "tau", f"must be in (0, 1], got {self.tau}")
        require(self.actor_lr > 0.0, "actor_lr", f"must be positive, got {self.actor_lr}")
        require(self.critic_lr > 0.0, "critic_lr", f"must be positive, got {self.critic_lr}")


class TD3BC(Algorithm):
    name = "td3_bc"
    networks = "actor and twin critics"
    Config = TD3BCConfig

    def build(self, gens: list[torch.Generator]) -> None:
        spec, cfg = self.spec, self.cfg
        self.actor = DeterministicActor(spec.obs_dim, spec.action_dim, cfg.hidden, gens)
        self.critic = TwinQ(spec.obs_dim, spec.action_dim, cfg.hidden, gens)
        self.actor_target = frozen_copy(self.actor)
        self.critic_target = frozen_copy(self.critic)

    def optim_groups(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        return {"critic": (params(self.critic), self.cfg.critic_lr),
                "actor": (params(self.actor), self.cfg.actor_lr)}

    def update(self, batch: Batch, step: int) -> Update:
        b = self.prepare(batch)
        obs, act, next_obs = b.observations, b.actions, b.next_observations  # (K,B,obs) (K,B,act) (K,B,obs)
        k, bs, na = act.shape
        gamma = self.coef("discount")[:, None]                                 # (K, 1)

        with torch.no_grad():
            clip = self.coef("noise_clip")[:, None, None]                      # (K, 1, 1)
            noise = (self.rng.randn((bs, na)) * self.coef("policy_noise")[:, None, None]).clamp(-clip, clip)
            next_act = (self.actor_target(next_obs) + noise).clamp(-1.0, 1.0)  # (K, B, act)
            next_q = twin_min(self.critic_target(next_obs, next_act))         # (K, B)
            target = b.rewards + gamma * (1.0 - b.terminations) * next_q       # (K, B)

        q = self.critic(obs, act)                                              # (K, 2, B)
        critic_loss = (q - target[:, None]).square().mean(2).sum(1)            # (K,) sum of the twins' MSEs
        yield "critic", critic_loss, {"q_mean": q.detach().mean((1, 2)), "target_q": target.mean(1)}

        if step % self.cfg.policy_freq == 0:
            pi = self.actor(obs)                                               # (K, B, act)
            q_pi = self.critic.q1(obs, pi)                                     # (K, B)
            lam = self.coef("alpha") / self.batch_mean(q_pi.detach().abs(), 1)  # (K,) over the global batch
            bc = (pi - act).square().mean((1, 2))                              # (K,)
            actor_q = q_pi.mean(1)                                             # (K,)
            actor_loss = bc - lam * actor_q
            yield "actor", actor_loss, {"lambda": lam, "bc_mse": bc.detach(), "actor_q": actor_q.detach()}
            soft_update(self.critic_target, self.critic, self.cfg.tau)
            soft_update(self.actor_target, self.actor, self.cfg.tau)

    @property
    def step_period(self) -> int:
        return self.cfg.policy_freq

    def policy(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(obs)

    @torch.no_grad()
    def critic_values(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.critic(obs, actions)                                       # (K, 2, B)


ALGORITHM = TD3BC
