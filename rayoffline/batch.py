"""Batch: the one transition container passed between the data layer, the learner and the algorithms."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

FIELDS = ("observations", "actions", "rewards", "next_observations", "terminations", "truncations")


@dataclass(frozen=True)
class Batch:
    """Transitions with Minari field names. Leading dims `*L` are (B,) for a plain batch, (K, B) for a
    member batch (each of K members its own sample) or (N,) for a whole loaded dataset.

    Only `terminations` stop bootstrapping; a truncated transition still bootstraps from its real
    next observation.
    """

    observations: torch.Tensor       # (*L, obs_dim) float32
    actions: torch.Tensor            # (*L, act_dim) float32, or (*L,) int64 for discrete actions
    rewards: torch.Tensor            # (*L,) float32
    next_observations: torch.Tensor  # (*L, obs_dim) float32
    terminations: torch.Tensor       # (*L,) float32 in {0, 1}
    truncations: torch.Tensor        # (*L,) float32 in {0, 1}

    def __len__(self) -> int:
        return self.rewards.shape[-1]

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def index(self, idx: torch.Tensor) -> "Batch":
        """Gather rows: idx (*I,) int64 -> a Batch with leading dims (*I,)."""
        return Batch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})
