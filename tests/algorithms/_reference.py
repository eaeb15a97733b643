"""Independent reference pieces for the algorithm math tests.

Networks are re-run from weights read out of the algorithm's modules, one member (and one ensemble copy) at a
time, in float64 with plain matmuls, so nothing here shares code with `rayoffline.nn` beyond the parameter
layout (MemberLinear: weight (M, in, out), bias (M, 1, out); member-major M = K * E).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from rayoffline.batch import Batch
from rayoffline.nn.members import MemberMLP

Weights = list[tuple[torch.Tensor, torch.Tensor]]


def weights(mlp: MemberMLP, index: int) -> Weights:
    """Detached float64 copies of the layers of stacked member `index` (k * E + e for ensembles)."""
    return [(layer.weight[index].detach().double().clone(), layer.bias[index, 0].detach().double().clone())
            for layer in mlp.layers]


def mlp(ws: Weights, x: torch.Tensor) -> torch.Tensor:
    """ReLU MLP: (B, in) -> (B, out)."""
    x = x.double()
    for i, (w, b) in enumerate(ws):
        x = x @ w + b
        if i < len(ws) - 1:
            x = torch.clamp(x, min=0.0)
    return x


class RecordingRNG:
    """Stands in for `alg.rng`: draws from the real member streams and keeps every draw, in call order."""

    def __init__(self, rng) -> None:
        self.rng = rng
        self.draws: list[tuple[str, torch.Tensor]] = []

    def _record(self, kind: str, out: torch.Tensor) -> torch.Tensor:
        self.draws.append((kind, out.clone()))
        return out

    def randn(self, size):
        return self._record("randn", self.rng.randn(size))

    def rand(self, size):
        return self._record("rand", self.rng.rand(size))

    def randint(self, high, size):
        return self._record("randint", self.rng.randint(high, size))


def drive(alg, batch, step: int, on_yield: Callable[[str, torch.Tensor, dict], None] | None = None,
          optimizers: dict | None = None) -> list[str]:
    """Run one update the way the learner does (backward on the group, Adam step) and return the groups."""
    groups = alg.optim_groups()
    if optimizers is None:
        optimizers = {}
    for g, (params, lr) in groups.items():
        optimizers.setdefault(g, torch.optim.Adam(params, lr=lr))
    seen = []
    gen: Iterator = alg.update(batch, step)
    for group, loss, metrics in gen:
        seen.append(group)
        if on_yield is not None:
            on_yield(group, loss, metrics)
        params = groups[group][0]
        for p in params:
            p.grad = None
        torch.autograd.backward(loss.sum(), inputs=params)  # loss: (K,) per member
        optimizers[group].step()
    return seen


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-4,
                 atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.detach().double(), expected.double(), rtol=rtol, atol=atol, msg=what)


# A fixed member batch for specs with obs_dim 4: observations around a known mean/std that the algorithms
# are built with (obs_mean=OBS_MEAN, obs_std=OBS_STD), so normalization is part of what the tests check.
OBS_MEAN = torch.tensor([0.5, -0.2, 0.1, 0.0])
OBS_STD = torch.tensor([2.0, 1.0, 0.5, 1.5])


def norm(obs: torch.Tensor) -> torch.Tensor:
    """Standardized observations in float64."""
    return ((obs - OBS_MEAN) / OBS_STD).double()


def member_batch(seed: int, k: int, b: int, act_dim: int = 2, discrete: bool = False, reward_scale: float = 1.0,
                 term_every: int = 3) -> Batch:
    """(K, B) transitions: continuous actions in [-0.9, 0.9] or discrete ones in [0, act_dim), every
    `term_every`-th row terminal."""
    g = torch.Generator().manual_seed(seed)
    obs = OBS_MEAN + OBS_STD * torch.randn(k, b, 4, generator=g)
    actions = (torch.randint(act_dim, (k, b), generator=g) if discrete
               else torch.rand(k, b, act_dim, generator=g) * 1.8 - 0.9)
    return Batch(observations=obs, actions=actions, rewards=reward_scale * torch.randn(k, b, generator=g),
                 next_observations=obs + 0.3 * torch.randn(k, b, 4, generator=g),
                 terminations=(torch.arange(b) % term_every == 0).float().expand(k, b).clone(),
                 truncations=torch.zeros(k, b))


def huber(d: torch.Tensor) -> torch.Tensor:
    """Huber loss with threshold 1 (smooth L1), elementwise."""
    return torch.where(d.abs() <= 1.0, 0.5 * d ** 2, d.abs() - 0.5)
