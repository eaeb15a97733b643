"""What the learner applies around an algorithm's math: learning-rate schedules and the reward transform.

Learning-rate schedules (`lr_schedule`, `lr_warmup_steps` run keys) are per optimizer group and a pure function
of the member's step, so a resumed run (and a member restored into a sweep's pack) continues on exactly the
rate it would have had: there is no scheduler state to save. With t the updates a member has had before this
one, T the run's `steps`, W `lr_warmup_steps` and lr the group's configured rate:

    constant        lr
    cosine          lr * (1 + cos(pi * t / T)) / 2       (torch's CosineAnnealingLR stepped once per update,
                                                         from lr at the first update towards 0 at the last)
    linear_warmup   lr * min(1, (t + 1) / W)             (then constant)

The reward transform (`reward_scale` run key) maps each sampled reward r to r * scale + bias where the learner
draws its batches, never in the algorithms and never in evaluation returns:

    none            scale 1, bias 0
    return_range    scale 1000 / (max - min episode return of the dataset), bias 0 (IQL's locomotion setting;
                    the per-episode returns are the dataset's `return_stats` in its metadata)
    {scale, bias}   as given (e.g. IQL's AntMaze r - 1: {scale: 1, bias: -1}; CQL's AntMaze: {scale: 10, bias: -5})
"""
from __future__ import annotations

import math
from typing import Any, Callable

from ..errors import ConfigError

SCHEDULES = ("constant", "cosine", "linear_warmup")
Schedule = Callable[[int], float]
"""t (updates the member had before this one) -> factor of the group's learning rate."""


def check_lr_schedule(value: Any) -> None:
    """Validate the `lr_schedule` run key's form (group names are checked against the algorithm later)."""
    if isinstance(value, str):
        if value not in SCHEDULES:
            raise ConfigError(f"config key 'lr_schedule': unknown schedule {value!r}; one of {', '.join(SCHEDULES)}, "
                              f"or a mapping of optimizer group to schedule, e.g. {{actor: cosine}}")
        return
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"config key 'lr_schedule': expected one of {', '.join(SCHEDULES)} or a mapping of "
                          f"optimizer group to schedule (e.g. {{actor: cosine}}), got {value!r}")
    for group, kind in value.items():
        if kind not in SCHEDULES:
            raise ConfigError(f"config key 'lr_schedule.{group}': unknown schedule {kind!r}; one of "
                              f"{', '.join(SCHEDULES)}")


def schedules(run: Any, algo_name: str, groups: list[str]) -> dict[str, Schedule]:
    """The non-constant schedules of `run` (a RunConfig) by optimizer group; a group `lr_schedule` names
    that the algorithm does not have is an error naming the key and the algorithm's groups."""
    value = run.lr_schedule
    if isinstance(value, str):
        kinds = {g: value for g in groups}
    else:
        unknown = [g for g in value if g not in groups]
        if unknown:
            raise ConfigError(f"config key 'lr_schedule.{unknown[0]}': algorithm '{algo_name}' has no optimizer "
                              f"group {unknown[0]!r}; its groups: {', '.join(groups)}")
        kinds = {g: value.get(g, "constant") for g in groups}
    return {g: _schedule(kind, run.steps, run.lr_warmup_steps) for g, kind in kinds.items() if kind != "constant"}


def _schedule(kind: str, total: int, warmup: int) -> Schedule:
    if kind == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    if kind == "linear_warmup":
        return lambda t: min(1.0, (t + 1) / warmup)
    raise AssertionError(kind)


def check_reward_scale(value: Any) -> None:
    """Validate the `reward_scale` run key's form."""
    if value in ("none", "return_range"):
        return
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"scale", "bias"})
        if unknown:
            raise ConfigError(f"config key 'reward_scale.{unknown[0]}': unknown key; reward_scale takes "
                              f"{{scale: S, bias: B}}")
        for key in ("scale", "bias"):
            v = value.get(key, 1.0 if key == "scale" else 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"config key 'reward_scale.{key}': expected a finite number, got {v!r}")
        return
    raise ConfigError(f"config key 'reward_scale': expected none, return_range or {{scale: S, bias: B}}, "
                      f"got {value!r}")


def reward_transform(value: Any, meta: dict[str, Any], data: str) -> tuple[float, float]:
    """(scale, bias) of the `reward_scale` setting on the dataset with metadata `meta` (named `data`)."""
    if value == "none":
        return 1.0, 0.0
    if value == "return_range":
        stats = meta.get("return_stats") or {}
        lo, hi = stats.get("min"), stats.get("max")
        if lo is None or hi is None:
            raise ConfigError(f"config key 'reward_scale': return_range needs the episode returns of {data}, but "
                              f"its metadata has no return_stats; give {{scale: S, bias: B}} instead")
        span = float(hi) - float(lo)
        if not span > 1e-8 * max(1.0, abs(float(hi))):
            n = meta.get("num_episodes")
            raise ConfigError(
                f"config key 'reward_scale': return_range divides by the spread of episode returns, but every "
                f"episode of {data} ({n} episode{'s' if n != 1 else ''}) returns {float(hi):g}; give the scale "
                f"explicitly instead, e.g. reward_scale: {{scale: 1.0, bias: 0.0}}")
        return 1000.0 / span, 0.0
    return float(value.get("scale", 1.0)), float(value.get("bias", 0.0))
