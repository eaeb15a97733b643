"""IQL: Implicit Q-Learning (in-sample value learning + advantage-weighted regression).

Kostrikov, Nair & Levine, "Offline Reinforcement Learning with Implicit Q-Learning", ICLR 2022
(https://arxiv.org/abs/2110.06169). Actions live in the normalized space [-1, 1].

With twin critics Q_1, Q_2, their soft target Q' (Q'(s, a) = min_i Q'_i(s, a)), a value net V and a policy pi,
per member (expectations are means over the member's batch):
    value:  u = Q'(s, a) - V(s),   L_V = E[ |tau - 1(u < 0)| * u^2 ]          tau = `expectile`
    critic: y = r + gamma * (1 - term) * V(s')     (V before this step's value update)
            L_Q = 1/2 * sum_i E[(Q_i(s, a) - y)^2];   then Q' <- (1 - rate) Q' + rate * Q
    actor:  w = min(exp(beta * u), exp_adv_max)    (u from the value step, no gradient)
            L_pi = -E[ w * log pi(a | s) ]        pi(.|s) = N(tanh(mlp(s)), diag(exp(log_std)))
Each group yields the (K,) vector of per-member losses. Groups in the paper's order:
`value`, `critic`, `actor`, once per step each.

Defaults: CORL's `iql.py` (the reference implementation publishing D4RL scores): expectile 0.7, beta 3.0,
exp-advantage clip 100, Gaussian actor with a state-independent log-std, soft target rate 0.005, Adam 3e-4 for
the value net, the critics and the actor, 2 x 256 hidden layers, observations standardized.

The reference's actor cosine schedule and reward scaling are the learner's, not this loss's: run keys
`lr_schedule: {actor: cosine}` (CORL anneals the actor's rate to 0 over the run with CosineAnnealingLR) and
`reward_scale: return_range` (CORL's locomotion configs: r * 1000 / (max - min episode return); AntMaze:
`{scale: 1, bias: -1}`), both set by the presets `iql-<env>-<dataset>` (tune_configs/presets).

**Deviations**
- The defaults are constant learning rates and unscaled rewards (the presets carry the reference's).
- Actions are normalized to [-1, 1] before the log-likelihood (identical for D4RL's max_action = 1 tasks).
- No actor dropout option (CORL uses it only for Adroit).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..batch import Batch
from ..config import member, require
from ..nn.functional import expectile_loss, frozen_copy, params, soft_update, twin_min
from ..nn.policies import DeterministicActor, GaussianActor, TwinQ, ValueNet
from .base import AlgoConfig, Algorithm, Update


@dataclass(frozen=True)
class IQLConfig(AlgoConfig):
    expectile: float = member(0.7)
    """Expectile tau of the value loss, in (0, 1): 0.5 is the mean (SARSA), -> 1 approaches max_a Q."""
    beta: float = member(3.0)
    """Inverse temperature of the advantage weights exp(beta * A): 0 is BC, large beta maximizes Q."""
    exp_adv_max: float = 100.0
    """Upper clip of the advantage weights exp(beta * A)."""
    deterministic_actor: bool = False
    """Use a deterministic actor with an advantage-weighted squared error instead of the Gaussian NLL."""
    tau: float = 0.005
    """Polyak rate of the critics' soft target update."""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor."""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin critics."""
    value_lr: float = 3e-4
    """Adam learning rate of the value network."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0.0 < self.expectile < 1.0, "expectile", f"must be in (0, 1), got {self.expectile}")
        require(self.beta >= 0.0, "beta", f"must be >= 0, got {self.beta}")
        require(self.exp_adv_max > 0.0, "exp_adv_max", f"must be positive, got {self.exp_adv_max}")
        require(0.0 < self.tau <= 1.0, "tau", f"must be in (0, 1], got {self.tau}")
        for key in ("actor_lr", "critic_lr", "value_lr"):
            require(getattr(self, key) > 0.0, key, f"must be positive, got {getattr(self, key)}")


class IQL(Algorithm):
    name = "iql"
    networks = "actor, twin critics and value network"
    Config = IQLConfig

    def build(self, gens: list[torch.Generator]) -> None:
        spec, cfg = self.spec, self.cfg
        actor_cls = DeterministicActor if cfg.deterministic_actor else GaussianActor
        self.actor = actor_cls(spec.obs_dim, spec.action_dim, cfg.hidden, gens)
        self.critic = TwinQ(spec.obs_dim, spec.action_dim, cfg.hidden, gens)
        self.value = ValueNet(spec.obs_dim, cfg.hidden, gens)
        self.critic_target = frozen_copy(self.critic)

    def optim_groups(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        return {"value": (params(self.value), self.cfg.value_lr),
                "critic": (params(self.critic), self.cfg.critic_lr),
                "actor": (params(self.actor), self.cfg.actor_lr)}

    def update(self, batch: Batch, step: int) -> Update:
        b = self.prepare(batch)
        obs, act = b.observations, b.actions                              # (K, B, obs), (K, B, act)
        gamma = self.coef("discount")[:, None]                            # (K, 1)

        with torch.no_grad():
            target_q = twin_min(self.critic_target(obs, act))             # (K, B)
            next_v = self.value(b.next_observations)                      # (K, B), value before its update
            y = b.rewards + gamma * (1.0 - b.terminations) * next_v       # (K, B)

        v = self.value(obs)                                               # (K, B)
        adv = target_q - v                                                # (K, B)
        value_loss = expectile_loss(adv, self.coef("expectile")).mean(1)  # (K,)
        yield "value", value_loss, {"v_mean": v.detach().mean(1)}

        q = self.critic(obs, act)                                         # (K, 2, B)
        critic_loss = (q - y[:, None]).square().mean((1, 2))              # (K,) mean of the twins' MSEs
        yield "critic", critic_loss, {"q_mean": q.detach().mean((1, 2))}
        soft_update(self.critic_target, self.critic, self.cfg.tau)

        adv = adv.detach()
        weight = torch.exp(adv * self.coef("beta")[:, None]).clamp(max=self.cfg.exp_adv_max)  # (K, B)
        if self.cfg.deterministic_actor:
            nll = (self.actor(obs) - act).square().sum(-1)                # (K, B)
        else:
            nll = -self.actor.log_prob(obs, act)                          # (K, B)
        actor_loss = (weight * nll).mean(1)                               # (K,)
        yield "actor", actor_loss, {"adv_mean": adv.mean(1), "weight_mean": weight.mean(1)}

    def policy(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(obs)

    @torch.no_grad()
    def critic_values(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.critic(obs, actions)                                       # (K, 2, B)


ALGORITHM = IQL
