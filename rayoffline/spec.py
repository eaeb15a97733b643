"""EnvSpec: what an algorithm needs to know about the environment, recovered from dataset metadata."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import DataError


@dataclass(frozen=True)
class EnvSpec:
    obs_dim: int
    """Size of the flat observation vector."""
    action_dim: int
    """Continuous: size of the Box action. Discrete: number of actions."""
    discrete: bool
    """True for a Discrete action space (actions are int64 indices of shape (B,))."""
    action_low: tuple[float, ...] | None = None
    """Continuous only: per-dimension lower bound of the action space."""
    action_high: tuple[float, ...] | None = None
    """Continuous only: per-dimension upper bound of the action space."""
    env_id: str | None = None
    """Gymnasium id to recover the environment for evaluation (None when unknown)."""

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "EnvSpec":
        """Build from a dataset's metadata (_rayoffline.json, formerly metadata.json; see rayoffline.data.schema)."""
        try:
            obs = meta["observation_space"]
            act = meta["action_space"]
            obs_dim = 1
            for d in obs["shape"]:
                obs_dim *= int(d)
            if act["type"] == "Discrete":
                return cls(obs_dim=obs_dim, action_dim=int(act["n"]), discrete=True, env_id=meta.get("env_id"))
            if act["type"] == "Box":
                low = tuple(float(x) for x in act["low"])
                high = tuple(float(x) for x in act["high"])
                return cls(obs_dim=obs_dim, action_dim=len(low), discrete=False,
                           action_low=low, action_high=high, env_id=meta.get("env_id"))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"dataset metadata (_rayoffline.json): malformed space description ({e!r})") from e
        raise DataError(f"dataset metadata (_rayoffline.json): unsupported action space type {act.get('type')!r} "
                        f"(Box or Discrete)")
