"""Warm starts: a new run whose networks begin from another run's weights (run key `init_from`).

`init_from` names a checkpoint file (checkpoints/step_*.pt) or a run directory (its latest checkpoint), e.g. the
registry's checkout of the `production` version a retraining job starts from. Only the networks come over: the
new run starts at step 0 with fresh optimizers, its own seeds and random streams, and its own per-member
coefficients (coef_* buffers come from the new config, so a warm start may change cql_alpha, the discount, ...).
Weights of a K=1 source are copied into every member of a K>1 run.

The observation normalization (obs_mean, obs_std) comes over too: the weights were trained on observations
normalized that way, and a dataset that grew since has moved its statistics. The run keeps the source's for its
whole life (they are in its checkpoints, which load_run and export read).

A source of another algorithm, other network shapes (hidden sizes, observation or action dimensions) or other
action bounds is refused before anything is written, naming the first key that differs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from . import checkpoint as ckpt

KEEP_NEW = ("coef_",)
"""Buffers the new run's config decides (prefixes of state_dict keys)."""


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's latest checkpoint."""
    p = Path(path)
    if p.is_dir():
        if not ckpt.list_checkpoints(p):
            raise ConfigError(f"config key 'init_from': {p} has no checkpoints/step_*.pt to start from")
        return ckpt.latest(p)
    if not p.is_file():
        raise ConfigError(f"config key 'init_from': {p} does not exist (a run directory or a checkpoint file)")
    return p


def load_source(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint path, its payload)."""
    where = resolve(path)
    try:
        return where, ckpt.load(where)
    except CheckpointError as e:
        raise ConfigError(f"config key 'init_from': {e}") from None


def initial_weights(algorithm, algo_name: str, path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict `algorithm` (K members of `algo_name`) starts from when warm-started from `path`;
    ConfigError when the source does not fit (module docstring)."""
    where, state = load_source(path)
    if state.get("algo") != algo_name:
        raise ConfigError(f"config key 'init_from': {where} holds a {state.get('algo')!r} model; this run trains "
                          f"{algo_name!r} (a warm start keeps the algorithm)")
    source = state["learner"]["algorithm"]
    target = algorithm.state_dict()
    k_src = int(state["learner"].get("members", len(state.get("seeds") or [1])))
    out: dict[str, torch.Tensor] = {}
    for name, t in target.items():
        if name.startswith(KEEP_NEW):
            out[name] = t
            continue
        if name not in source:
            raise ConfigError(f"config key 'init_from': {where} has no weights for {name!r} (another version of "
                              f"the algorithm's networks?)")
        s = source[name].to(t.device)
        if s.shape == t.shape:
            out[name] = s.to(t.dtype)
        elif (k_src == 1 and name not in algorithm.SHARED_STATE and s.dim() == t.dim() and s.dim() > 0
              and s.shape[1:] == t.shape[1:] and s.shape[0] * algorithm.K == t.shape[0]):
            # one member's rows (member-major, e.g. its C critics) repeated for every member, as pack_state stacks
            out[name] = torch.cat([s] * algorithm.K).to(t.dtype)
        else:
            raise ConfigError(f"config key 'init_from': {where}: {name!r} has shape {tuple(s.shape)}, this run's "
                              f"{tuple(t.shape)}; a warm start needs the same network sizes (algo.hidden) and "
                              f"the same observation and action dimensions, and a source with one member or "
                              f"as many as this run")
    extra = [n for n in source if n not in target]
    if extra:
        raise ConfigError(f"config key 'init_from': {where} has weights this run's networks lack ({extra[0]!r})")
    low, high = target.get("act_low"), target.get("act_high")
    if low is not None and not (torch.equal(source["act_low"].to(low.device), low)
                                and torch.equal(source["act_high"].to(high.device), high)):
        raise ConfigError(f"config key 'init_from': {where} was trained for actions in "
                          f"[{source['act_low'].tolist()}, {source['act_high'].tolist()}], this dataset's are "
                          f"[{low.tolist()}, {high.tolist()}]")
    return out


def warm_start(algorithm, algo_name: str, path: str | Path) -> None:
    """Load `path`'s weights into `algorithm` (before its learner is built)."""
    algorithm.load_state_dict(initial_weights(algorithm, algo_name, path))
