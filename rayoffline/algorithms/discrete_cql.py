"""Discrete CQL: conservative Q-learning, CQL(H), on a double-DQN base.

Kumar, Zhou, Tucker, Levine (2020), "Conservative Q-Learning for Offline Reinforcement Learning", NeurIPS.
Per member k, batch means of (Q: online network, Q': target network):
    a* = argmax_a Q(s', a)                                             (double DQN action selection)
    y  = r + gamma (1 - term) Q'(s', a*)
    L_td  = Huber_1(Q(s, a) - y)                                       (smooth L1 with threshold 1)
    L_cql = logsumexp_a Q(s, a) - Q(s, a_data)
    L_q   = L_td + cql_alpha * L_cql
One group, `q`, then Polyak averaging of the target network: theta' <- tau theta + (1 - tau) theta'.
Acting is greedy: argmax_a Q(s, a).

Defaults follow d3rlpy's `DiscreteCQL` (double DQN, Huber TD loss, one Q network, alpha 1.0, gamma 0.99) where
that is sensible for small control tasks; see the deviations.

**Deviations**
- Target network: Polyak averaging with tau = 0.005 every step instead of d3rlpy's hard copy every 8000 steps
  (and the paper's Atari QR-DQN schedule); small datasets learn within a few thousand updates this way.
- Learning rate 1e-3 instead of d3rlpy's Atari value 6.25e-5, for the same reason.
- The paper's discrete experiments use a QR-DQN base on Atari; this is the double-DQN base of d3rlpy's
  `DiscreteCQL`, with an MLP Q-network (`hidden`, 2 x 256) instead of the Nature CNN.
- The batch size is the learner's (d3rlpy uses 32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import member, require
from ..nn.functional import frozen_copy, soft_update
from ..nn.policies import DiscreteQ
from .base import AlgoConfig, Algorithm, Update


@dataclass(frozen=True)
class DiscreteCQLConfig(AlgoConfig):
    lr: float = 1e-3
    """Adam learning rate of the Q-network."""
    tau: float = 0.005
    """Polyak factor of the target Q-network, applied every step."""
    cql_alpha: float = member(1.0)
    """Weight of the CQL(H) penalty logsumexp_a Q(s, a) - Q(s, a_data) (d3rlpy: 1.0)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.lr > 0.0, "lr", f"must be positive, got {self.lr}")
        require(0.0 < self.tau <= 1.0, "tau", f"must be in (0, 1], got {self.tau}")
        require(self.cql_alpha >= 0.0, "cql_alpha", f"must be >= 0, got {self.cql_alpha}")


class DiscreteCQL(Algorithm):
    name = "discrete_cql"
    networks = "Q-network"
    Config = DiscreteCQLConfig
    action_types = ("discrete",)

    def build(self, gens: list[torch.Generator]) -> None:
        self.q = DiscreteQ(self.spec.obs_dim, self.spec.action_dim, self.cfg.hidden, gens)
        self.q_target = frozen_copy(self.q)

    def optim_groups(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        return {"q": (list(self.q.parameters()), self.cfg.lr)}

    def update(self, batch, step: int) -> Update:
        b = self.prepare(batch)
        act = b.actions.unsqueeze(-1)                                                   # (K, B, 1) int64
        with torch.no_grad():
            best_next = self.q(b.next_observations).argmax(-1, keepdim=True)            # (K, B, 1)
            q_next = self.q_target(b.next_observations).gather(-1, best_next).squeeze(-1)  # (K, B)
            target = b.rewards + self.coef("discount")[:, None] * (1.0 - b.terminations) * q_next
        q_all = self.q(b.observations)                                                  # (K, B, n)
        q_data = q_all.gather(-1, act).squeeze(-1)                                      # (K, B)
        td = nn.functional.huber_loss(q_data, target, reduction="none", delta=1.0).mean(-1)  # (K,)
        penalty = (torch.logsumexp(q_all, dim=-1) - q_data).mean(-1)                    # (K,)
        loss = td + self.coef("cql_alpha") * penalty
        yield "q", loss, {"td_loss": td.detach(), "cql_penalty": penalty.detach(),
                                "q_mean": q_data.detach().mean(-1), "target_mean": target.mean(-1)}
        soft_update(self.q_target, self.q, self.cfg.tau)

    def policy(self, obs: torch.Tensor) -> torch.Tensor:
        return self.q(obs).argmax(-1)

    @torch.no_grad()
    def critic_values(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.q(obs).gather(-1, actions.unsqueeze(-1)).squeeze(-1).unsqueeze(1)  # (K, 1, B)


ALGORITHM = DiscreteCQL
