"""Small synthetic datasets and specs shared by the algorithm and learner tests."""
from __future__ import annotations

import torch

from rayoffline.batch import Batch
from rayoffline.spec import EnvSpec

CONT = EnvSpec(obs_dim=5, action_dim=2, discrete=False, action_low=(-2.0, -1.0), action_high=(2.0, 1.0),
               env_id=None)
DISC = EnvSpec(obs_dim=4, action_dim=3, discrete=True, env_id=None)


def spec_for(cls) -> EnvSpec:
    return CONT if "continuous" in cls.action_types else DISC


def random_data(spec: EnvSpec, n: int = 512, seed: int = 0) -> Batch:
    """N transitions (N, ...) with in-range actions and a few terminations/truncations."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, spec.obs_dim, generator=g)
    nxt = obs + 0.1 * torch.randn(n, spec.obs_dim, generator=g)
    if spec.discrete:
        act = torch.randint(spec.action_dim, (n,), generator=g)
    else:
        low, high = torch.tensor(spec.action_low), torch.tensor(spec.action_high)
        act = low + (high - low) * torch.rand(n, spec.action_dim, generator=g)
    term = (torch.rand(n, generator=g) < 0.05).float()
    trunc = ((torch.rand(n, generator=g) < 0.05) & (term == 0)).float()
    return Batch(observations=obs, actions=act, rewards=torch.randn(n, generator=g), next_observations=nxt,
                 terminations=term, truncations=trunc)

