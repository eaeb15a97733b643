"""Actors and critics with a leading member dim K. All actions here live in the normalized space [-1, 1]
(the algorithm base maps dataset actions into it and `act` maps back), so every policy ends in tanh.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .members import MemberMLP

LOG_2PI = math.log(2.0 * math.pi)


class DeterministicActor(nn.Module):
    """a = tanh(mlp(s)). (K, B, obs) -> (K, B, act)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], gens: Sequence[torch.Generator]) -> None:
        super().__init__()
        self.net = MemberMLP(obs_dim, hidden, act_dim, gens)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs))


class GaussianActor(nn.Module):
    """N(tanh(mlp(s)), exp(log_std)) with a state-independent log_std per member (IQL's policy).
    log_prob of dataset actions is exact (no squashing), the mean is the deterministic action."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], gens: Sequence[torch.Generator],
                 log_std_min: float = -20.0, log_std_max: float = 2.0) -> None:
        super().__init__()
        self.net = MemberMLP(obs_dim, hidden, act_dim, gens)
        self.log_std = nn.Parameter(torch.zeros(len(gens), 1, act_dim))  # (K, 1, act)
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def forward(self, obs: torch.Tensor) -> torch.Tensor:  # deterministic action (K, B, act)
        return torch.tanh(self.net(obs))

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:  # -> (K, B)
        mean = self.forward(obs)
        log_std = self.log_std.clamp(self.log_std_min, self.log_std_max)
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z.square() - log_std - 0.5 * LOG_2PI).sum(-1)


class TanhGaussianActor(nn.Module):
    """SAC's squashed Gaussian: u ~ N(mu(s), sigma(s)), a = tanh(u). (K, B, obs) -> (K, B, act).

    The network's second head h(s) gives log sigma = clamp(h(s), log_std_min, log_std_max). With
    `log_std_offset` set, log sigma = clamp(m * h(s) + c, ...) with learnable per-member scalars m (started at
    1) and c (started at `log_std_offset`), parameters `log_std_multiplier` and `log_std_offset` of shape (K,)
    (the reference CQL policy's Scalar pair); unset (None), the actor has no such parameters.
    `init`/`gain`/`last_init`/`last_gain` go to the MemberMLP.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], gens: Sequence[torch.Generator],
                 log_std_min: float = -20.0, log_std_max: float = 2.0, log_std_offset: float | None = None,
                 init: str = "default", gain: float = 1.0, last_init: str = "default",
                 last_gain: float = 1.0) -> None:
        super().__init__()
        self.act_dim = act_dim
        self.net = MemberMLP(obs_dim, hidden, 2 * act_dim, gens, init=init, gain=gain, last_init=last_init,
                             last_gain=last_gain)
        self.log_std_min, self.log_std_max = log_std_min, log_std_max
        self.affine = log_std_offset is not None
        if self.affine:
            self.log_std_multiplier = nn.Parameter(torch.ones(len(gens)))                       # (K,)
            self.log_std_offset = nn.Parameter(torch.full((len(gens),), float(log_std_offset)))  # (K,)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:  # deterministic action tanh(mu)
        return torch.tanh(self.net(obs)[..., : self.act_dim])

    def dist(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(obs)
        mean, log_std = out[..., : self.act_dim], out[..., self.act_dim:]
        if self.affine:  # (K,) scalars against (K, ..., act)
            shape = (-1,) + (1,) * (log_std.dim() - 1)
            log_std = self.log_std_multiplier.view(shape) * log_std + self.log_std_offset.view(shape)
        return mean, log_std.clamp(self.log_std_min, self.log_std_max)

    def sample(self, obs: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterized sample with standard-normal noise eps (same shape as the action).
        Returns (action (K, B, act), log_prob (K, B))."""
        mean, log_std = self.dist(obs)
        return self.squash(mean, log_std, eps)

    @staticmethod
    def squash(mean: torch.Tensor, log_std: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a = tanh(mean + eps * exp(log_std)) and its log-density; mean/log_std broadcast against eps
        (e.g. (K, B, 1, act) against N samples (K, B, N, act)). Returns (a, log_prob summed over act)."""
        u = mean + eps * torch.exp(log_std)
        a = torch.tanh(u)
        # log N(u) - sum log(1 - tanh(u)^2), the latter in the stable form 2 (log 2 - u - softplus(-2u))
        logp = (-0.5 * eps.square() - log_std - 0.5 * LOG_2PI).sum(-1)
        logp = logp - (2.0 * (math.log(2.0) - u - nn.functional.softplus(-2.0 * u))).sum(-1)
        return a, logp

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor, margin: float = 1e-6) -> torch.Tensor:
        """Log-density of given actions in [-1, 1] (clipped to +-(1 - margin) before atanh): (K, B)."""
        mean, log_std = self.dist(obs)
        a = actions.clamp(-1.0 + margin, 1.0 - margin)
        u = torch.atanh(a)
        z = (u - mean) * torch.exp(-log_std)
        logp = (-0.5 * z.square() - log_std - 0.5 * LOG_2PI).sum(-1)
        return logp - (2.0 * (math.log(2.0) - u - nn.functional.softplus(-2.0 * u))).sum(-1)


class TwinQ(nn.Module):
    """E (default 2) Q-networks per member on concat(s, a): (K, B, obs), (K, B, act) -> (K, E, B).
    `init`/`gain`/`last_init`/`last_gain` go to the MemberMLP."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], gens: Sequence[torch.Generator],
                 ensemble: int = 2, init: str = "default", gain: float = 1.0, last_init: str = "default",
                 last_gain: float = 1.0) -> None:
        super().__init__()
        self.ensemble = ensemble
        self.net = MemberMLP(obs_dim + act_dim, hidden, 1, gens, ensemble=ensemble, init=init, gain=gain,
                             last_init=last_init, last_gain=last_gain)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        k, b, _ = obs.shape
        return self.net(torch.cat([obs, actions], dim=-1)).view(k, self.ensemble, b)

    def q1(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The first critic only: (K, B, obs), (K, B, act) -> (K, B), half the cost of `forward`."""
        return self.net.forward_copy(torch.cat([obs, actions], dim=-1), 0).squeeze(-1)


class ValueNet(nn.Module):
    """V(s): (K, B, obs) -> (K, B)."""

    def __init__(self, obs_dim: int, hidden: Sequence[int], gens: Sequence[torch.Generator]) -> None:
        super().__init__()
        self.net = MemberMLP(obs_dim, hidden, 1, gens)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


class DiscreteQ(nn.Module):
    """Q(s, .) over n actions: (K, B, obs) -> (K, B, n)."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: Sequence[int], gens: Sequence[torch.Generator]) -> None:
        super().__init__()
        self.net = MemberMLP(obs_dim, hidden, n_actions, gens)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)
