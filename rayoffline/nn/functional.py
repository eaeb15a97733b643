"""Small shared functions for the algorithms. Shapes: K members, B batch rows."""
from __future__ import annotations

import copy

import torch


@torch.no_grad()
def soft_update(target: torch.nn.Module, online: torch.nn.Module, tau: float) -> None:
    """Polyak averaging: target <- (1 - tau) * target + tau * online."""
    t = [p for p in target.parameters()]
    o = [p for p in online.parameters()]
    torch._foreach_lerp_(t, o, tau)


@torch.no_grad()
def hard_update(target: torch.nn.Module, online: torch.nn.Module) -> None:
    for t, o in zip(target.parameters(), online.parameters()):
        t.copy_(o)


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A target network: a deep copy that never receives gradients."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


def expectile_loss(diff: torch.Tensor, expectile: torch.Tensor) -> torch.Tensor:
    """Asymmetric L2 of IQL: |tau - 1(diff < 0)| * diff^2. diff (K, B); expectile (K,) -> (K, B)."""
    weight = torch.where(diff > 0, expectile[:, None], 1.0 - expectile[:, None])
    return weight * diff.square()


def twin_min(q: torch.Tensor) -> torch.Tensor:
    """Minimum over the twin-critic dim: (K, 2, ...) -> (K, ...)."""
    return q.min(dim=1).values


def member_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the leading member dim: (K, ...) -> (K,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def params(*modules: torch.nn.Module) -> list[torch.nn.Parameter]:
    out: list[torch.nn.Parameter] = []
    for m in modules:
        out.extend(p for p in m.parameters() if p.requires_grad)
    return out

