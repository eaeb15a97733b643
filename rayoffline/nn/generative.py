"""Generative models of the behavior policy with a leading member dim K (BCQ's conditional VAE).

Actions live in the normalized space [-1, 1], so the decoder ends in tanh.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .members import MemberMLP


class ConditionalVAE(nn.Module):
    """Conditional VAE of Fujimoto et al. (2018), member-batched.

    encoder E(s, a) -> (mu, log_sigma), each (K, B, latent), log_sigma clamped to [log_std_min, log_std_max]
    decoder D(s, z) = tanh(mlp(s, z)) -> (K, B, act) in [-1, 1]
    The encoder's two heads are one linear layer of width 2*latent (same init as two heads of width latent).
    """

    def __init__(self, obs_dim: int, act_dim: int, latent_dim: int, hidden: Sequence[int],
                 gens: Sequence[torch.Generator], log_std_min: float = -4.0, log_std_max: float = 15.0) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.log_std_min, self.log_std_max = log_std_min, log_std_max
        self.encoder = MemberMLP(obs_dim + act_dim, hidden, 2 * latent_dim, gens)
        self.decoder = MemberMLP(obs_dim + latent_dim, hidden, act_dim, gens)

    def encode(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(torch.cat([obs, actions], dim=-1))           # (K, B, 2*latent)
        mean, log_std = out[..., : self.latent_dim], out[..., self.latent_dim:]
        return mean, log_std.clamp(self.log_std_min, self.log_std_max)

    def decode(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """obs (K, B, obs), latent z (K, B, latent) -> action (K, B, act) in [-1, 1]."""
        return torch.tanh(self.decoder(torch.cat([obs, z], dim=-1)))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor,
                eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reparameterized reconstruction with standard-normal eps (K, B, latent).
        Returns (reconstruction (K, B, act), mean, log_std (K, B, latent))."""
        mean, log_std = self.encode(obs, actions)
        z = mean + torch.exp(log_std) * eps
        return self.decode(obs, z), mean, log_std
