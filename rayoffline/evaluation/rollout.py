"""Online evaluation: run every member's deterministic policy for N episodes in one vectorized env.

K members x N episodes become K*N sub-environments of a gymnasium SyncVectorEnv; one batched `act` call per
env step serves them all. Each sub-environment runs exactly one episode (its first), seeded
deterministically from the run seed, so members are compared on the same start states.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import DataError

EVAL_SEED_OFFSET = 1_000_003


def make_env(env_id: str | None, env_spec_json: str | None = None):
    import gymnasium as gym

    if env_spec_json:
        try:
            spec = gym.envs.registration.EnvSpec.from_json(env_spec_json)
            return lambda: gym.make(spec)
        except Exception:
            pass
    if not env_id:
        raise DataError("dataset metadata has no env_id: online evaluation needs the environment; "
                        "convert with --env-id ID or set eval_episodes=0")
    try:
        gym.spec(env_id)
    except Exception as e:
        raise DataError(f"environment '{env_id}' from the dataset metadata is not registered in gymnasium ({e})") \
            from None
    return lambda: gym.make(env_id)


def evaluate(algorithm: Any, metadata: dict[str, Any], episodes: int, seed: int = 0) -> dict[str, Any]:
    """Returns per-member lists: return_mean, return_std, normalized_score (None when no reference), returns
    (each member's per-episode returns)."""
    import gymnasium as gym

    k = algorithm.K
    factory = make_env(metadata.get("env_id"), metadata.get("env_spec"))
    envs = gym.vector.SyncVectorEnv([factory for _ in range(k * episodes)])
    try:
        obs, _ = envs.reset(seed=[seed + EVAL_SEED_OFFSET + i % episodes for i in range(k * episodes)])
        returns = np.zeros(k * episodes, dtype=np.float64)
        done = np.zeros(k * episodes, dtype=bool)
        while not done.all():
            o = torch.as_tensor(np.asarray(obs, dtype=np.float32).reshape(k, episodes, -1))
            a = algorithm.act(o).cpu().numpy()
            a = a.reshape(k * episodes, *a.shape[2:])
            obs, rew, term, trunc, _ = envs.step(a)
            returns += np.where(done, 0.0, rew)
            done |= np.asarray(term) | np.asarray(trunc)
            # gymnasium's next-step autoreset: the reset transition after `done` is ignored above
    finally:
        envs.close()
    per = returns.reshape(k, episodes)
    mean, std = per.mean(axis=1), per.std(axis=1)
    return {
        "return_mean": mean.tolist(),
        "return_std": std.tolist(),
        "normalized_score": [normalized_score(m, metadata) for m in mean.tolist()],
        "episodes": episodes,
        "returns": per.tolist(),
    }


def normalized_score(ret: float, metadata: dict[str, Any]) -> float | None:
    """D4RL convention: 100 * (return - ref_min) / (ref_max - ref_min); None without reference scores."""
    lo, hi = metadata.get("ref_min_score"), metadata.get("ref_max_score")
    if lo is None or hi is None or hi == lo:
        return None
    return 100.0 * (ret - lo) / (hi - lo)
