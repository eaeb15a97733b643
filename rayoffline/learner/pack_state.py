"""Members in and out of a learner's state (DESIGN.md: "Packs").

A learner's state (`Learner.state_dict()`) holds K members side by side: every network weight and buffer is
stacked member-major along dim 0 (except the few the members share, `Algorithm.SHARED_STATE`), the optimizer
keeps one chunk per (member, parameter) with its own step count, and the random streams are lists with one
entry per member. So a member's state is a slice, and a pack's state is its members' slices concatenated:

    select(state, [2, 5])        -> the state of a K=2 learner holding members 2 and 5
    concat([state_a, state_b])   -> the state of a learner holding a's members, then b's

Both produce exactly what `Learner.state_dict()` of such a learner would hold, so a member's slice is an
ordinary checkpoint (loadable as a run of its own), and members join and leave a pack between steps by
rebuilding its learner from `concat` of the slices it keeps. Pure functions on CPU tensors; no Ray, no I/O.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..algorithms.base import Algorithm


def members_of(state: dict[str, Any]) -> int:
    return int(state["members"])


def select(state: dict[str, Any], idx: Sequence[int],
           shared: frozenset[str] = Algorithm.SHARED_STATE) -> dict[str, Any]:
    """The state of a learner holding only members `idx` (in that order) of `state`'s K members."""
    k = members_of(state)
    idx = [int(i) for i in idx]
    if not idx or any(not 0 <= i < k for i in idx):
        raise ValueError(f"member indices {idx} outside 0..{k - 1}")
    _refuse_split(state)
    algo = {}
    for name, t in state["algorithm"].items():
        if name in shared:
            algo[name] = t
            continue
        rows = _rows(name, t, k)
        algo[name] = torch.cat([t[i * rows:(i + 1) * rows] for i in idx])
    out = {
        "algorithm": type(state["algorithm"])(algo),
        "algorithm_extra": {key: [v[i] for i in idx] for key, v in state["algorithm_extra"].items()},
        "optimizers": {g: _select_optimizer(o, k, idx) for g, o in state["optimizers"].items()},
        "sampler_rng": [state["sampler_rng"][i] for i in idx],
        "data_parallel": {"mode": "replicate", "world": 1},
        "members": len(idx),
        "member_steps": [state["member_steps"][i] for i in idx],
    }
    if "reward_transform" in state:
        out["reward_transform"] = list(state["reward_transform"])
    return out


def concat(states: Sequence[dict[str, Any]], shared: frozenset[str] = Algorithm.SHARED_STATE) -> dict[str, Any]:
    """The state of a learner holding the members of `states` one after another. The states must come from
    learners of the same algorithm and shapes (the optimizers' settings are taken from the first)."""
    if not states:
        raise ValueError("no states to concatenate")
    for s in states:
        _refuse_split(s)
    first = states[0]
    if any(set(s["algorithm"]) != set(first["algorithm"]) for s in states):
        raise ValueError("the states hold different networks (another algorithm or configuration)")
    algo = {}
    for name, t in first["algorithm"].items():
        algo[name] = t if name in shared else torch.cat([s["algorithm"][name] for s in states])
    optimizers = {}
    for g, o in first["optimizers"].items():
        parts = [s["optimizers"][g] for s in states]
        sizes = [_chunks_per_member(p, members_of(s)) for p, s in zip(parts, states)]
        if len(set(sizes)) != 1:
            raise ValueError(f"optimizer group '{g}' has {sizes[0]} and {sizes[1]} parameters per member")
        per = sizes[0]
        merged: dict[int, Any] = {}
        base = 0
        for p, s in zip(parts, states):
            for i, v in p["state"].items():
                merged[base + int(i)] = v
            base += per * members_of(s)
        optimizers[g] = {"state": merged, "param_groups": [{**o["param_groups"][0], "params": list(range(base))}]}
    transforms = {tuple(s["reward_transform"]) for s in states if "reward_transform" in s}
    if len(transforms) > 1:
        raise ValueError(f"the states were trained with different reward transforms {sorted(transforms)}")
    out = {
        "algorithm": type(first["algorithm"])(algo),
        "algorithm_extra": {key: [x for s in states for x in s["algorithm_extra"][key]]
                            for key in first["algorithm_extra"]},
        "optimizers": optimizers,
        "sampler_rng": [x for s in states for x in s["sampler_rng"]],
        "data_parallel": {"mode": "replicate", "world": 1},
        "members": sum(members_of(s) for s in states),
        "member_steps": [x for s in states for x in s["member_steps"]],
    }
    if transforms:
        out["reward_transform"] = list(transforms.pop())
    return out


def to_cpu(state: Any) -> Any:
    """A copy of a (nested) state with every tensor on the CPU, for checkpoints and for sending elsewhere."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return type(state)((k, to_cpu(v)) for k, v in state.items())
    if isinstance(state, list):
        return [to_cpu(v) for v in state]
    if isinstance(state, tuple):
        return tuple(to_cpu(v) for v in state)
    return state


def _rows(name: str, t: torch.Tensor, k: int) -> int:
    if t.dim() == 0 or t.shape[0] % k:
        raise ValueError(f"state entry '{name}' of shape {tuple(t.shape)} is not stacked over {k} members")
    return t.shape[0] // k


def _chunks_per_member(opt: dict[str, Any], k: int) -> int:
    n = len(opt["param_groups"][0]["params"])
    if n % k:
        raise ValueError(f"an optimizer with {n} parameter chunks does not split over {k} members")
    return n // k


def _select_optimizer(opt: dict[str, Any], k: int, idx: list[int]) -> dict[str, Any]:
    per = _chunks_per_member(opt, k)
    state = {}
    for j, i in enumerate(idx):
        for p in range(per):
            v = opt["state"].get(i * per + p)
            if v is not None:
                state[j * per + p] = v
    return {"state": state, "param_groups": [{**opt["param_groups"][0], "params": list(range(len(idx) * per))}]}


def _refuse_split(state: dict[str, Any]) -> None:
    if "rank_streams" in state:
        raise ValueError("a split-mode data-parallel state has per-rank streams; it cannot be cut into members")
