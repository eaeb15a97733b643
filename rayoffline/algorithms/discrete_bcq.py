"""Discrete BCQ: Q-learning restricted to actions the behavior policy would likely take.

Fujimoto, Conti, Ghavamzadeh, Pineau (2019), "Benchmarking Batch Deep Reinforcement Learning Algorithms",
NeurIPS Deep RL workshop. Per member k, batch means of (Q: online Q-network, Q': its target, G: the imitation
network, a behavior-cloned policy with logits l(s)):
    allowed(s) = { a : G(a|s) / max_b G(b|s) > threshold }  =  { a : l(s)_a - max_b l(s)_b > log threshold }
    a* = argmax_{a in allowed(s')} Q(s', a)
    y  = r + gamma (1 - term) Q'(s', a*)
    L_q = Huber_1(Q(s, a) - y) + CE(l(s), a) + logit_reg * mean_a l(s)_a^2
One group, `q`: as in the authors' code the Q-network and the imitation network are one module trained by one
optimizer on the summed loss (they share no parameters, so this equals two Adam optimizers with the same
learning rate, in one backward pass). Then Polyak averaging of the target: theta' <- tau theta + (1 - tau) theta'.
Acting: argmax_{a in allowed(s)} Q(s, a).

The two networks are the two copies of one member-batched MLP (ensemble of 2): copy 0 is Q, copy 1 is G,
run with one batched matmul per layer. As in the authors' code the target network copies (and averages) both;
only its Q copy is ever run.

Defaults: the authors' code (github.com/sfujim/BCQ, discrete_BCQ, non-Atari settings): 256-256 MLPs,
Adam 3e-4, Polyak tau 0.005 every step, logit penalty 1e-2, Huber loss, gamma 0.99; threshold 0.5 (below).

**Deviations**
- Threshold 0.5 instead of the paper's 0.3. With two actions and a behavior policy that replaces a share r of
  its actions by uniform random ones, the less likely action has ratio r / (2 - r), which exceeds 0.3 as soon
  as r > 0.46: on `builtin:cartpole-medium` (r = 0.55, ratio 0.38) a 0.3 filter lets every action through and
  discrete BCQ degenerates to offline DQN, whose greedy policy after 3000 updates ranged from 9 to 300 return
  over 8 seeds (hidden 128-128, batch 256). With 0.5 all 8 seeds reached 475-500 (behavior policy: 116).
- The batch size is the learner's (the authors use 64 for non-Atari tasks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import member, require
from ..nn.functional import frozen_copy, soft_update
from ..nn.members import MemberMLP
from .base import AlgoConfig, Algorithm, Update


@dataclass(frozen=True)
class DiscreteBCQConfig(AlgoConfig):
    lr: float = 3e-4
    """Adam learning rate of the Q-network and the imitation network (authors' non-Atari setting)."""
    tau: float = 0.005
    """Polyak factor of the target network, applied every step."""
    threshold: float = member(0.5)
    """Actions with G(a|s) / max_b G(b|s) at or below this are excluded from the argmax (the paper uses
    0.3, see the deviations)."""
    logit_reg: float = member(1e-2)
    """Weight of the L2 penalty on the imitation logits, mean_a l(s)_a^2."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.lr > 0.0, "lr", f"must be positive, got {self.lr}")
        require(0.0 < self.tau <= 1.0, "tau", f"must be in (0, 1], got {self.tau}")
        require(0.0 <= self.threshold < 1.0, "threshold",
                f"must be in [0, 1) (the most likely action has ratio 1), got {self.threshold}")
        require(self.logit_reg >= 0.0, "logit_reg", f"must be >= 0, got {self.logit_reg}")


class DiscreteBCQ(Algorithm):
    name = "discrete_bcq"
    networks = "Q-network and its imitation head"
    Config = DiscreteBCQConfig
    action_types = ("discrete",)

    def build(self, gens: list[torch.Generator]) -> None:
        # copy 0: Q(s, .), copy 1: imitation logits l(s); output (K*2, B, n)
        self.net = MemberMLP(self.spec.obs_dim, self.cfg.hidden, self.spec.action_dim, gens, ensemble=2)
        self.net_target = frozen_copy(self.net)

    def optim_groups(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        return {"q": (list(self.net.parameters()), self.cfg.lr)}

    def heads(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs (K, B, obs) -> (Q (K, B, n), imitation logits (K, B, n))."""
        out = self.net(obs)
        out = out.view(obs.shape[0], 2, *out.shape[1:])
        return out[:, 0], out[:, 1]

    def allowed(self, logits: torch.Tensor) -> torch.Tensor:
        """Actions whose probability ratio to the most likely one exceeds `threshold`: (K, B, n) bool."""
        log_threshold = torch.log(self.coef("threshold"))[:, None, None]  # -inf for threshold 0: all allowed
        return logits - logits.amax(-1, keepdim=True) > log_threshold

    @staticmethod
    def greedy(q: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """argmax of Q over the allowed actions: (K, B, n), (K, B, n) bool -> (K, B) int64."""
        return q.masked_fill(~allowed, -math.inf).argmax(-1)

    def update(self, batch, step: int) -> Update:
        b = self.prepare(batch)
        act = b.actions.unsqueeze(-1)                                                   # (K, B, 1) int64
        with torch.no_grad():
            q_next, logits_next = self.heads(b.next_observations)
            allowed_next = self.allowed(logits_next)                                    # (K, B, n)
            best_next = self.greedy(q_next, allowed_next).unsqueeze(-1)                 # (K, B, 1)
            q_next_target = self.net_target.forward_copy(b.next_observations, 0)        # (K, B, n), Q copy only
            target = b.rewards + self.coef("discount")[:, None] * (1.0 - b.terminations) \
                * q_next_target.gather(-1, best_next).squeeze(-1)
        q_all, logits = self.heads(b.observations)
        q_data = q_all.gather(-1, act).squeeze(-1)                                      # (K, B)
        td = nn.functional.huber_loss(q_data, target, reduction="none", delta=1.0).mean(-1)  # (K,)
        k, bs, n = logits.shape
        ce = nn.functional.cross_entropy(logits.reshape(k * bs, n), b.actions.reshape(k * bs),
                                         reduction="none").view(k, bs).mean(-1)         # (K,)
        logit_l2 = logits.square().mean((1, 2))                                         # (K,)
        loss = td + ce + self.coef("logit_reg") * logit_l2
        yield "q", loss, {"td_loss": td.detach(), "ce": ce.detach(), "logit_l2": logit_l2.detach(),
                                "q_mean": q_data.detach().mean(-1), "target_mean": target.mean(-1),
                                "allowed_frac": allowed_next.float().mean((1, 2))}
        soft_update(self.net_target, self.net, self.cfg.tau)

    def policy(self, obs: torch.Tensor) -> torch.Tensor:
        q, logits = self.heads(obs)
        return self.greedy(q, self.allowed(logits))

    @torch.no_grad()
    def critic_values(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        q = self.net.forward_copy(obs, 0)                                      # (K, B, n): the Q copy only
        return q.gather(-1, actions.unsqueeze(-1)).squeeze(-1).unsqueeze(1)    # (K, 1, B)


ALGORITHM = DiscreteBCQ
