"""Member-batched building blocks: every weight carries a leading member dimension.

A network with K members holds K independent copies of its weights stacked as (K, in, out) and runs them with
one batched matmul: input (K, B, in) -> output (K, B, out). An ensemble of E networks per member (e.g. twin
critics, E=2) is stored as K*E members, member-major: index k*E + e.

Initialization is per member: member k draws its weights from its own generator, so member k of a K-member
network equals the K=1 network built with member k's seed, whatever K is. A layer's scheme is one of
- "default": PyTorch's nn.Linear default, U(-1/sqrt(in), 1/sqrt(in)) for weight and bias;
- "orthogonal": torch.nn.init.orthogonal_ of the (out, in) matrix with the given gain, zero bias;
- "xavier": torch.nn.init.xavier_uniform_ of the (out, in) matrix with the given gain, zero bias;
the latter two fill nn.Linear's (out, in) layout from the member's generator and store its transpose, so a member
copy equals the nn.Linear weight the same generator would give.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from .rng import mix_seed

STREAM_INIT, STREAM_NOISE, STREAM_SAMPLE, STREAM_EVAL = 0, 1, 2, 3
INITS = ("default", "orthogonal", "xavier")


def init_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """CPU generators for weight initialization, one per member (device-independent weights)."""
    return [torch.Generator().manual_seed(mix_seed(s, STREAM_INIT)) for s in seeds]


class MemberLinear(nn.Module):
    """y[m] = x[m] @ W[m] + b[m] for each of M members. W: (M, in, out), b: (M, 1, out).

    init: "default" (bound `init_scale` instead of 1/sqrt(in) when given), "orthogonal" or "xavier" with `gain`
    (module docstring)."""

    def __init__(self, in_features: int, out_features: int, gens: Sequence[torch.Generator], ensemble: int = 1,
                 init_scale: float | None = None, init: str = "default", gain: float = 1.0) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown init '{init}', expected one of {INITS}")
        self.in_features, self.out_features, self.ensemble = in_features, out_features, ensemble
        # PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        bound = init_scale if init_scale is not None else 1.0 / math.sqrt(in_features)
        ws, bs = [], []
        for g in gens:
            for _ in range(ensemble):
                if init == "default":
                    ws.append(torch.empty(in_features, out_features).uniform_(-bound, bound, generator=g))
                    bs.append(torch.empty(1, out_features).uniform_(-bound, bound, generator=g))
                    continue
                w = torch.empty(out_features, in_features)  # nn.Linear's layout: what the init's gain refers to
                if init == "orthogonal":
                    nn.init.orthogonal_(w, gain=gain, generator=g)
                else:
                    nn.init.xavier_uniform_(w, gain=gain, generator=g)
                ws.append(w.t().contiguous())
                bs.append(torch.zeros(1, out_features))
        self.weight = nn.Parameter(torch.stack(ws))  # (M, in, out)
        self.bias = nn.Parameter(torch.stack(bs))    # (M, 1, out)

    @property
    def members(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (M, B, in) -> (M, B, out)
        return torch.baddbmm(self.bias, x, self.weight)


class MemberMLP(nn.Module):
    """ReLU MLP with K members (times `ensemble` copies each): (K, B, in) -> (K*E, B, out).

    With ensemble E > 1 the input is shared by the E copies of a member and the output's leading dim is
    K*E (member-major); use `.view(K, E, B, out)` to split it. `init`/`gain` set the hidden layers' scheme,
    `last_init`/`last_gain` the output layer's (MemberLinear); the defaults are PyTorch's.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, gens: Sequence[torch.Generator],
                 ensemble: int = 1, activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu,
                 last_init_scale: float | None = None, init: str = "default", gain: float = 1.0,
                 last_init: str = "default", last_gain: float = 1.0) -> None:
        super().__init__()
        dims = [in_dim, *hidden, out_dim]
        last = len(dims) - 2
        self.ensemble = ensemble
        self.activation = activation
        # layers are built in order, so each member's generator is drawn layer by layer as before
        self.layers = nn.ModuleList(
            MemberLinear(a, b, gens, ensemble, init_scale=(last_init_scale if i == last else None),
                         init=(last_init if i == last else init), gain=(last_gain if i == last else gain))
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ensemble > 1:
            k, b, d = x.shape
            x = x.unsqueeze(1).expand(k, self.ensemble, b, d).reshape(k * self.ensemble, b, d)
        *hidden, last = self.layers
        for layer in hidden:
            x = self._activate(layer(x))
        return last(x)

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        # A layer's output is a fresh tensor that no backward reads (baddbmm saves only its inputs), so ReLU can
        # run in place: one memory pass and one allocation fewer per hidden layer (~6% of an IQL update on CPU).
        return torch.relu_(h) if self.activation is torch.relu else self.activation(h)

    def forward_copy(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Run only ensemble copy `index` of every member: (K, B, in) -> (K, B, out). Costs 1/E of `forward`
        (e.g. TD3's and BCQ's actor loss, which reads only the first critic)."""
        e = self.ensemble
        *hidden, last = self.layers
        for layer in hidden:
            w = layer.weight.view(-1, e, *layer.weight.shape[1:])[:, index]  # (K, in, out) strided view
            bias = layer.bias.view(-1, e, *layer.bias.shape[1:])[:, index]
            x = self._activate(torch.baddbmm(bias, x, w))
        w = last.weight.view(-1, e, *last.weight.shape[1:])[:, index]
        bias = last.bias.view(-1, e, *last.bias.shape[1:])[:, index]
        return torch.baddbmm(bias, x, w)
