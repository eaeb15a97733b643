"""Built-in datasets: scripted behavior policies on Pendulum-v1 and CartPole-v1, stored as Minari datasets.

`builtin:NAME` works wherever a dataset is accepted, with nothing downloaded:

  pendulum-random   uniform torques in [-2, 2]
  pendulum-medium   the expert controller, but half of the steps take a uniform random torque and the rest
                    carry Gaussian noise (std 1.0): it often swings up, rarely holds the top for long
  pendulum-expert   energy-pumping swing-up, then a PD balance controller near the top; noise std 0.1
  cartpole-random   uniform actions
  cartpole-medium   the expert rule with 55% of the actions replaced by uniform random ones
  cartpole-expert   a linear rule on (x, x_dot, theta, theta_dot) with 2% random actions; ~500 return

Every dataset is collected from whole episodes as they come out of `gym.make(env_id)` (Pendulum-v1 ends
by truncation after 200 steps, CartPole-v1 by termination or by truncation after 500), at least
`MIN_TRANSITIONS` transitions, and is deterministic in `seed`. The normalized-score references are the
mean returns of the random (`ref_min_score`) and expert (`ref_max_score`) policies over
`REF_EPISODES` evaluation episodes on their own seeds (`reference_scores`).

Cache (`$RAYOFFLINE_CACHE`, default ~/.cache/rayoffline):

  minari/<name>-v<BUILD_VERSION>/data/...   the Minari dataset (MINARI_DATASETS_PATH-style root)
  converted/<name>-v<BUILD_VERSION>/        the converted Parquet directory (see schema.py)
  locks/, tmp/                              build locks and half-built output

Each artifact is built in tmp/ and renamed into place, so a crash never leaves a half-built entry; builders
in concurrent processes serialize on a file lock (and a lost rename race is tolerated anyway).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import DataError
from .schema import METADATA_FILE

BUILD_VERSION = 1
"""Bump when a policy, seed or size changes: cache entries carry it in their name, so old ones are ignored."""
MIN_TRANSITIONS = 20_000
"""Each builtin dataset holds at least this many transitions (whole episodes)."""
REF_EPISODES = 50
"""Episodes per reference score (random and expert policies)."""
DEFAULT_SEED = 0
_REF_SEED = 10_007  # evaluation seeds for reference scores, disjoint in purpose from the dataset seeds


@dataclass(frozen=True)
class Builtin:
    name: str
    """`<env>-<quality>`, the part after `builtin:`."""
    env_id: str
    """Gymnasium id the data was collected in."""
    quality: str
    """random | medium | expert."""
    description: str


_ENVS = {"pendulum": "Pendulum-v1", "cartpole": "CartPole-v1"}
_QUALITIES = ("random", "medium", "expert")
_DESCRIPTIONS = {
    "pendulum-random": "uniform random torques",
    "pendulum-medium": "energy-based swing-up + PD balance; 50% uniform random torques, noise std 1.0",
    "pendulum-expert": "energy-based swing-up + PD balance; noise std 0.1",
    "cartpole-random": "uniform random actions",
    "cartpole-medium": "linear balance rule; 55% uniform random actions",
    "cartpole-expert": "linear balance rule; 2% uniform random actions",
}
BUILTINS: dict[str, Builtin] = {
    f"{env}-{q}": Builtin(f"{env}-{q}", env_id, q, _DESCRIPTIONS[f"{env}-{q}"])
    for env, env_id in _ENVS.items() for q in _QUALITIES
}


def names() -> tuple[str, ...]:
    """Names accepted after `builtin:`."""
    return tuple(BUILTINS)


def get(name: str) -> Builtin:
    """The builtin called `name` (with or without the `builtin:` prefix); DataError listing the known ones."""
    name = name.removeprefix("builtin:")
    if name not in BUILTINS:
        known = ", ".join(f"builtin:{n}" for n in BUILTINS)
        raise DataError(f"unknown builtin dataset {name!r}; known: {known}")
    return BUILTINS[name]


# ---------------------------------------------------------------------------------------------------------
# Scripted behavior policies
# ---------------------------------------------------------------------------------------------------------

def _pendulum_controller(obs: np.ndarray) -> float:
    """Swing-up + balance for Pendulum-v1 (g=10, m=l=1: theta_ddot = 15 sin(theta) + 3 u, theta=0 upright).

    E = 0.5 theta_dot^2 + 15 (cos(theta) - 1) is 0 at the upright rest point and dE/dt = 3 u theta_dot, so
    full torque along sign(-E theta_dot) pumps energy towards the top; near the top (cos > 0.85, slow enough
    to catch) a PD law u = -(10 theta + 2 theta_dot) balances (closed loop theta_ddot ~ -15 theta - 6 theta_dot).
    """
    c, s, w = float(obs[0]), float(obs[1]), float(obs[2])
    if c > 0.85 and abs(w) < 4.0 + 4.0 * (c - 0.85) / 0.15:
        u = -(10.0 * np.arctan2(s, c) + 2.0 * w)
    else:
        energy = 0.5 * w * w + 15.0 * (c - 1.0)
        u = 2.0 if w == 0.0 else 2.0 * np.sign(-energy * w)
    return float(np.clip(u, -2.0, 2.0))


def _cartpole_controller(obs: np.ndarray) -> int:
    """Push right when the pole (with some look-ahead and cart-centering terms) leans right."""
    x, v, th, w = (float(o) for o in obs)
    return int(th + 0.5 * w + 0.05 * x + 0.1 * v > 0.0)


# (probability of a uniform random action, std of Gaussian noise on the controller's torque)
_MIXING = {
    "pendulum-random": (1.0, 0.0), "pendulum-medium": (0.5, 1.0), "pendulum-expert": (0.0, 0.1),
    "cartpole-random": (1.0, 0.0), "cartpole-medium": (0.55, 0.0), "cartpole-expert": (0.02, 0.0),
}


class ScriptedPolicy:
    """Callable behavior policy of a builtin dataset: `policy(obs) -> action` in the env's own format
    (float32 array of shape (1,) for Pendulum, int for CartPole). Stochastic, seeded, single-env."""

    def __init__(self, name: str, seed: int = DEFAULT_SEED):
        self.spec = get(name)
        self.random_prob, self.noise_std = _MIXING[self.spec.name]
        self.discrete = self.spec.env_id.startswith("CartPole")
        self.rng = np.random.default_rng([seed, zlib.crc32(self.spec.name.encode())])

    def __call__(self, obs: np.ndarray):
        rng = self.rng
        if self.discrete:
            if self.random_prob >= 1.0 or rng.random() < self.random_prob:
                return int(rng.integers(2))
            return _cartpole_controller(obs)
        if self.random_prob >= 1.0 or rng.random() < self.random_prob:
            u = rng.uniform(-2.0, 2.0)
        else:
            u = _pendulum_controller(obs)
            if self.noise_std > 0.0:
                u = float(np.clip(u + self.noise_std * rng.standard_normal(), -2.0, 2.0))
        return np.array([u], dtype=np.float32)


def behavior_policy(name: str, seed: int = DEFAULT_SEED) -> ScriptedPolicy:
    """The scripted policy that collected `builtin:NAME` (a fresh, seeded instance)."""
    return ScriptedPolicy(name, seed)


def behavior_return(name: str, episodes: int = 20, seed: int = _REF_SEED + 1) -> float:
    """Mean online return of the behavior policy of `builtin:NAME` over `episodes` fresh episodes (seeds
    apart from the dataset's): the bar an offline learner trained on it should clear."""
    eps = rollout(name, episodes=episodes, seed=seed, env_seed_base=seed * 1000)
    return float(np.mean([e.ret for e in eps]))


# ---------------------------------------------------------------------------------------------------------
# Collection
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Episode:
    observations: np.ndarray  # (T+1, obs_dim) float32: reset observation, then every next observation
    actions: np.ndarray       # (T, 1) float32 | (T,) int64
    rewards: np.ndarray       # (T,) float64 (as the env returns them)
    terminations: np.ndarray  # (T,) bool
    truncations: np.ndarray   # (T,) bool
    seed: int                 # env reset seed

    @property
    def ret(self) -> float:
        return float(self.rewards.sum())


def rollout(name: str, episodes: int | None = None, min_transitions: int | None = None,
            seed: int = DEFAULT_SEED, env_seed_base: int | None = None,
            policy: Callable[[np.ndarray], object] | None = None) -> list[Episode]:
    """Run the behavior policy of `name` for `episodes` whole episodes or until `min_transitions` are
    collected. Deterministic in (`seed`, `env_seed_base`)."""
    import gymnasium as gym

    spec = get(name)
    if (episodes is None) == (min_transitions is None):
        raise ValueError("give exactly one of episodes, min_transitions")
    policy = policy or behavior_policy(spec.name, seed)
    if env_seed_base is None:
        env_seed_base = int(np.random.default_rng([seed, zlib.crc32(spec.name.encode()), 1]).integers(2**30))
    env = gym.make(spec.env_id)
    out: list[Episode] = []
    total = 0
    try:
        while (len(out) < episodes) if episodes is not None else (total < min_transitions):
            ep_seed = env_seed_base + len(out)
            obs, _ = env.reset(seed=ep_seed)
            obs_l, act_l, rew_l, term_l, trunc_l = [obs], [], [], [], []
            while True:
                a = policy(obs)
                obs, r, term, trunc, _ = env.step(a)
                obs_l.append(obs)
                act_l.append(a)
                rew_l.append(r)
                term_l.append(term)
                trunc_l.append(trunc)
                if term or trunc:
                    break
            actions = (np.asarray(act_l, dtype=np.int64) if isinstance(act_l[0], int)
                       else np.asarray(act_l, dtype=np.float32))
            out.append(Episode(np.asarray(obs_l, dtype=np.float32), actions, np.asarray(rew_l, np.float64),
                               np.asarray(term_l, bool), np.asarray(trunc_l, bool), ep_seed))
            total += len(rew_l)
    finally:
        env.close()
    return out


def collect(name: str, seed: int = DEFAULT_SEED) -> list[Episode]:
    """The episodes of `builtin:NAME` (what `minari_dataset_path` stores)."""
    return rollout(name, min_transitions=MIN_TRANSITIONS, seed=seed)


@lru_cache(maxsize=None)
def reference_scores(env: str) -> tuple[float, float]:
    """(ref_min_score, ref_max_score) for env `pendulum` or `cartpole`: mean returns of the random and
    expert scripted policies over REF_EPISODES episodes with fixed evaluation seeds."""
    if env not in _ENVS:
        raise DataError(f"unknown builtin environment {env!r}; known: {', '.join(_ENVS)}")
    scores = []
    for q in ("random", "expert"):
        eps = rollout(f"{env}-{q}", episodes=REF_EPISODES, seed=_REF_SEED, env_seed_base=_REF_SEED * 1000)
        scores.append(float(np.mean([e.ret for e in eps])))
    return scores[0], scores[1]


# ---------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------

def cache_root() -> Path:
    """`$RAYOFFLINE_CACHE`, default ~/.cache/rayoffline."""
    return Path(os.environ.get("RAYOFFLINE_CACHE") or Path.home() / ".cache" / "rayoffline").expanduser()


def dataset_id(name: str) -> str:
    """Minari dataset id of a builtin (also its cache entry name)."""
    return f"{get(name).name}-v{BUILD_VERSION}"


def minari_root() -> Path:
    """MINARI_DATASETS_PATH-style root that holds the builtin Minari datasets."""
    return cache_root() / "minari"


_THREAD_LOCK = threading.RLock()  # flock is per open file; also serialize threads of one process
_STALE_TMP_S = 6 * 3600


@contextlib.contextmanager
def _build_lock(key: str) -> Iterator[None]:
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with _THREAD_LOCK, open(locks / f"{key}.lock", "a+") as fh:
        try:
            import fcntl
            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX: rely on the rename race being tolerated
            pass
        yield  # the lock goes with the file handle


def _tmp_dir(prefix: str) -> Path:
    tmp = cache_root() / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in tmp.iterdir():  # leftovers of crashed builds
        try:
            if now - old.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=tmp))


def _publish(built: Path, final: Path) -> None:
    """Rename a finished build into place; if another builder won the race, keep theirs."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(built, final)
    except OSError:
        if not final.exists():
            raise


@contextlib.contextmanager
def _minari_datasets_path(path: Path) -> Iterator[None]:
    """Minari picks where to write from MINARI_DATASETS_PATH; point it at `path` for the duration."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def _episode_buffers(episodes: list[Episode]):
    from minari.data_collector import EpisodeBuffer

    return [EpisodeBuffer(id=i, seed=e.seed, observations=e.observations, actions=e.actions,
                          rewards=e.rewards, terminations=e.terminations, truncations=e.truncations)
            for i, e in enumerate(episodes)]


def build_minari_dataset(name: str, root: Path, seed: int = DEFAULT_SEED) -> Path:
    """Collect `builtin:NAME` and write it as Minari dataset `dataset_id(name)` under `root` (a
    MINARI_DATASETS_PATH-style directory). Returns the dataset directory (it holds `data/`)."""
    import minari

    spec = get(name)
    env = spec.name.split("-")[0]
    ref_min, ref_max = reference_scores(env)
    episodes = collect(spec.name, seed)
    ds_id = dataset_id(spec.name)
    with _THREAD_LOCK, _minari_datasets_path(root), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Minari nags about author_email and code_permalink
        minari.create_dataset_from_buffers(
            dataset_id=ds_id, buffer=_episode_buffers(episodes), env=spec.env_id, eval_env=spec.env_id,
            algorithm_name=f"rayoffline scripted {spec.quality} policy", author="rayoffline",
            code_permalink=f"rayoffline.data.builtin (BUILD_VERSION {BUILD_VERSION})",
            description=f"builtin:{spec.name} ({spec.env_id}): {spec.description}; seed {seed}",
            ref_min_score=ref_min, ref_max_score=ref_max, data_format="hdf5")
    return root / ds_id


def minari_dataset_path(name: str) -> Path:
    """Directory of the Minari dataset behind `builtin:NAME` (it holds `data/`; open it with
    `minari.MinariDataset(path / "data")`, or by id `dataset_id(name)` with MINARI_DATASETS_PATH =
    `minari_root()`). Built and cached on first use."""
    ds_id = dataset_id(name)
    final = minari_root() / ds_id
    if (final / "data" / "metadata.json").exists():
        return final
    with _build_lock(f"minari-{ds_id}"):
        if (final / "data" / "metadata.json").exists():  # built while we waited for the lock
            return final
        tmp = _tmp_dir(f"minari-{ds_id}")
        try:
            built = build_minari_dataset(name, tmp)
            _publish(built, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def converted_path(name: str) -> Path:
    """Where the converted `builtin:NAME` lives in the cache (whether built yet or not)."""
    return cache_root() / "converted" / dataset_id(name)


def resolve(spec: str | os.PathLike) -> Path | str:
    """A converted dataset directory for `spec`: a directory holding the dataset metadata (a local path, returned
    as a Path, or a filesystem URI such as s3://bucket/ds, returned as given), or `builtin:NAME` (built and
    converted into the cache on first use)."""
    from .metadata import has_metadata
    from .storage import locate

    s = os.fspath(spec)
    if s.startswith("builtin:"):
        return _resolve_builtin(s[len("builtin:"):])
    if s.startswith("minari:"):
        raise DataError(f"{s}: a Minari source must be converted first: "
                        f"rayoffline data convert {s} --out DIR, then pass DIR")
    loc = locate(s)
    if not loc.exists():
        raise DataError(f"dataset {s!r} not found: expected a converted dataset directory (made by "
                        f"`rayoffline data convert SOURCE --out DIR`) or builtin:NAME "
                        f"(known: {', '.join(names())})")
    if not loc.is_dir() or not has_metadata(loc):
        raise DataError(f"{loc}: not a converted dataset directory (no {METADATA_FILE}); "
                        f"convert it first with `rayoffline data convert {s} --out DIR`")
    return loc.public()


def _resolve_builtin(name: str) -> Path:
    get(name)  # unknown name -> DataError
    from .metadata import has_metadata

    final = converted_path(name)
    if has_metadata(final):
        return final
    minari_dataset_path(name)  # outside the convert lock: it has its own
    with _build_lock(f"converted-{dataset_id(name)}"):
        if has_metadata(final):
            return final
        from .convert import convert

        tmp = _tmp_dir(f"converted-{dataset_id(name)}")
        try:
            out = tmp / "out"
            convert(f"builtin:{name}", out)
            _publish(out, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
