"""Behavior cloning, for continuous and discrete actions.

Continuous (deterministic policy pi(s) = tanh(mlp(s)) in the normalized action space [-1, 1]):
    L_actor = E_{(s, a) ~ D} [ mean_j (pi(s)_j - a_j)^2 ]        a normalized to [-1, 1]
Discrete (categorical policy with logits l(s) over n actions):
    L_actor = E_{(s, a) ~ D} [ -log softmax(l(s))_a ]            pi(s) = argmax_a l(s)_a

One group, `actor`, updated once per step. Per member k the loss is the mean over its batch; the yielded
loss is the (K,) vector of per-member losses.

Reference: the behavior-cloning baseline as implemented by d3rlpy (`BC` with its default deterministic
policy, `DiscreteBC`), which also supplies the defaults: Adam, learning rate 1e-3.

**Deviations**
- Discrete BC has no L2 penalty on the logits (d3rlpy's `DiscreteBC` adds beta * mean(logits^2) with
  beta = 0.5); plain cross-entropy is the textbook objective and learns CartPole as well.
- The batch size is the learner's (d3rlpy uses 100).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import require
from ..nn.members import MemberMLP
from ..nn.policies import DeterministicActor
from .base import AlgoConfig, Algorithm, Update


@dataclass(frozen=True)
class BCConfig(AlgoConfig):
    lr: float = 1e-3
    """Adam learning rate of the policy (d3rlpy's BC default)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.lr > 0.0, "lr", f"must be positive, got {self.lr}")


class BC(Algorithm):
    name = "bc"
    networks = "policy network"
    Config = BCConfig
    action_types = ("continuous", "discrete")

    def build(self, gens: list[torch.Generator]) -> None:
        spec, cfg = self.spec, self.cfg
        if spec.discrete:
            self.actor: nn.Module = MemberMLP(spec.obs_dim, cfg.hidden, spec.action_dim, gens)  # logits
        else:
            self.actor = DeterministicActor(spec.obs_dim, spec.action_dim, cfg.hidden, gens)

    def optim_groups(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        return {"actor": (list(self.actor.parameters()), self.cfg.lr)}

    def update(self, batch, step: int) -> Update:
        b = self.prepare(batch)
        out = self.actor(b.observations)  # (K, B, act) actions in [-1, 1], or (K, B, n) logits
        if self.spec.discrete:
            k, bs, n = out.shape
            ce = nn.functional.cross_entropy(out.reshape(k * bs, n), b.actions.reshape(k * bs),
                                             reduction="none").view(k, bs).mean(1)  # (K,)
            with torch.no_grad():
                acc = (out.argmax(-1) == b.actions).float().mean(1)
            yield "actor", ce, {"ce": ce.detach(), "accuracy": acc}
        else:
            mse = (out - b.actions).square().mean((1, 2))  # (K,)
            yield "actor", mse, {"mse": mse.detach()}

    def policy(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.actor(obs)
        return out.argmax(-1) if self.spec.discrete else out


ALGORITHM = BC
