"""Minari datasets, by id (`minari:ID`, under MINARI_DATASETS_PATH) or by directory.

A Minari episode stores T+1 observations for T steps, so every transition, including the last one of a
truncated episode, keeps its real next observation. HDF5-format datasets are read straight from
`data/main_data.hdf5` (only the five arrays we need, no `infos`); other formats go through Minari's storage.

Logged action probabilities (the `action_logp` column, schema.py) are not read from Minari datasets: Minari
records them nowhere by itself, and its `infos` hold T+1 entries per episode written by the environment (the reset's
and each step's), so where a policy's log-probability would sit in them is a convention of the collecting code,
not of the format. Export such data to Parquet with an `action_logp` column instead.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DataError
from ._common import Chunk, SourceData, as_actions, as_flags, as_observations, as_rewards, check_finite


def find_data_dir(path: Path) -> Path | None:
    """`path/data` or `path` itself when it holds a Minari metadata.json (with a data_format); else None."""
    for cand in (path / "data", path):
        meta = cand / "metadata.json"
        if meta.is_file():
            try:
                m = json.loads(meta.read_text())
            except (OSError, ValueError):
                if cand.name == "data":
                    return cand  # looks like Minari; read_minari names the broken file
                continue
            if isinstance(m, dict) and "data_format" in m:
                return cand
    return None


def local_dataset_dir(dataset_id: str) -> Path:
    """Directory of Minari dataset `dataset_id`; downloads it through Minari only when it is not local."""
    import minari
    from minari.storage import get_dataset_path

    root = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
    path = Path(get_dataset_path(dataset_id))
    if (path / "data").is_dir():
        return path
    try:
        minari.download_dataset(dataset_id)
    except Exception as e:  # no network, unknown id, ... : Minari raises many kinds
        raise DataError(f"minari:{dataset_id}: not found under MINARI_DATASETS_PATH ({root}) and downloading it "
                        f"through Minari failed ({type(e).__name__}: {e}). Download it where the network allows "
                        f"(`minari download {dataset_id}`) and copy it under MINARI_DATASETS_PATH, or pass the "
                        f"dataset directory instead") from e
    if not (path / "data").is_dir():
        raise DataError(f"minari:{dataset_id}: Minari reported a download but {path / 'data'} does not exist")
    return path


def space_json(space, file: str, what: str) -> dict[str, Any]:
    """A gymnasium space as schema.py describes it; anything but a 1-D Box (and Discrete actions) is refused."""
    import gymnasium as gym

    if isinstance(space, gym.spaces.Box):
        if len(space.shape) != 1:
            raise DataError(f"{file}: {what} space is Box{tuple(space.shape)}: image or multi-dimensional "
                            f"{what}s are not supported yet (only vectors)")
        out = {"type": "Box", "shape": [int(space.shape[0])], "low": [float(x) for x in space.low],
               "high": [float(x) for x in space.high]}
        if what == "observation":
            out["dtype"] = "float32"
        return out
    if isinstance(space, gym.spaces.Discrete) and what == "action":
        if int(space.start) != 0:
            raise DataError(f"{file}: Discrete action space starts at {int(space.start)}; only start=0 is supported")
        return {"type": "Discrete", "n": int(space.n)}
    raise DataError(f"{file}: {what} space {type(space).__name__} is not supported yet "
                    f"({'Box vectors' if what == 'observation' else 'Box or Discrete'} only); "
                    f"flatten Dict/Tuple {what}s before converting")


def _open_hdf5(data_dir: Path):
    import h5py

    path = data_dir / "main_data.hdf5"
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot open Minari's HDF5 data ({e})") from e


def _hdf5_ids(h5) -> list[int]:
    return sorted(int(k.split("_", 1)[1]) for k in h5.keys() if k.startswith("episode_"))


def _episodes_hdf5(data_dir: Path, file: str, ids: list[int] | None = None):
    import h5py

    path = data_dir / "main_data.hdf5"
    with _open_hdf5(data_dir) as h5:
        for i in (_hdf5_ids(h5) if ids is None else ids):
            g = h5[f"episode_{i}"]
            ep = {"id": i}
            for k in ("observations", "actions", "rewards", "terminations", "truncations"):
                if k not in g:
                    raise DataError(f"{path}: episode {i} has no {k!r}")
                node = g[k]
                if not isinstance(node, h5py.Dataset):
                    raise DataError(f"{file}: episode {i}: {k!r} is a group (Dict/Tuple space); not supported yet")
                ep[k] = node[()]
            yield ep


def _open(data_dir: Path, label: str | None):
    """(label, Minari metadata, MinariStorage, observation space, action space) of a Minari data directory."""
    from minari.dataset.minari_storage import MinariStorage

    file = label or str(data_dir.parent if data_dir.name == "data" else data_dir)
    meta_path = data_dir / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_path}: cannot read Minari metadata ({e})") from e
    try:
        storage = MinariStorage.read(data_dir)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{file}: cannot open as a Minari dataset ({type(e).__name__}: {e})") from e
    obs_space = space_json(storage.observation_space, file, "observation")
    act_space = space_json(storage.action_space, file, "action")
    return file, meta, storage, obs_space, act_space


def _about(meta: dict) -> dict[str, Any]:
    """env_id, env_spec, reference scores and extra of a Minari dataset's metadata (SourceData fields)."""
    env_id, env_spec = None, meta.get("env_spec")
    if env_spec:
        try:
            env_id = json.loads(env_spec)["id"]
        except (ValueError, KeyError, TypeError):
            env_id = None
    ref = {k: (float(meta[k]) if meta.get(k) is not None else None) for k in ("ref_min_score", "ref_max_score")}
    return dict(env_id=env_id, env_spec=env_spec or None, **ref, extra={"minari_dataset_id": meta.get("dataset_id")})


def plan_minari(data_dir: Path, source_id: str, label: str | None, block_bytes: int):
    """Blocks of whole episodes, ~block_bytes each: by episode id and stored length for HDF5 storage, by episode
    index (and the average length) for Minari's other storage formats. A dataset up to block_bytes is one
    block, read exactly as before streaming."""
    from ._common import Block, SourcePlan

    file, meta, storage, obs_space, act_space = _open(data_dir, label)
    obs_d = int(np.prod(obs_space["shape"]))
    act_b = 8 if act_space["type"] == "Discrete" else 4 * int(np.prod(act_space["shape"]))
    row_bytes = 8 * obs_d + act_b + 8 + 2  # observations + next, actions, reward (float64 in Minari), flags
    if meta.get("data_format") == "hdf5":
        with _open_hdf5(data_dir) as h5:
            ids = _hdf5_ids(h5)
            lengths = []
            for i in ids:
                g = h5[f"episode_{i}"]
                lengths.append(int(g["rewards"].shape[0]) if "rewards" in g and g["rewards"].shape else 0)
        keys: list[Any] = ids
    else:
        total_e, total_s = int(storage.total_episodes), int(storage.total_steps)
        keys = list(range(total_e))
        lengths = [total_s // max(total_e, 1)] * total_e
    per_block = max(1, block_bytes // row_bytes)
    groups: list[list[Any]] = [[]]
    rows = [0]
    for k, n in zip(keys, lengths):
        if rows[-1] >= per_block:
            groups.append([])
            rows.append(0)
        groups[-1].append(k)
        rows[-1] += n
    whole = len(groups) == 1
    args = {"data_dir": str(data_dir), "source_id": source_id, "label": label}
    blocks = [Block("minari", {**args, "episodes": None if whole else g}, rows=r, nbytes=r * row_bytes)
              for g, r in zip(groups, rows)]
    return SourcePlan(source_id=source_id, blocks=blocks, files=[file], observation_space=obs_space,
                      action_space=act_space, **_about(meta))


def read_minari_block(args: dict) -> SourceData:
    return read_minari(Path(args["data_dir"]), args["source_id"], args.get("label"), episodes=args.get("episodes"),
                       allow_empty=args.get("episodes") is not None)


def read_minari(data_dir: Path, source_id: str, label: str | None = None, episodes: list[int] | None = None,
                allow_empty: bool = False) -> SourceData:
    """The dataset's episodes (those of `episodes`: ids for HDF5 storage, indices otherwise; None: all),
    checked, as one chunk."""
    file, meta, storage, obs_space, act_space = _open(data_dir, label)
    wanted = episodes
    if meta.get("data_format") == "hdf5":
        episodes = _episodes_hdf5(data_dir, file, wanted)
    else:
        try:
            episodes = storage.get_episodes(range(storage.total_episodes) if wanted is None else wanted)
        except Exception as e:
            raise DataError(f"{file}: cannot read episodes ({type(e).__name__}: {e})") from e

    obs_l, next_l, act_l, rew_l, term_l, trunc_l, ids, lens = [], [], [], [], [], [], [], []
    for ep in episodes:
        eid = int(ep["id"])
        o = np.asarray(ep["observations"])
        t = len(np.asarray(ep["rewards"]).reshape(-1))
        if t == 0:
            continue
        if o.ndim < 1 or len(o) != t + 1:
            raise DataError(f"{file}: episode {eid} has {len(o) if o.ndim else 0} observations for {t} steps "
                            f"(expected {t + 1}: one more than steps)")
        for k in ("actions", "terminations", "truncations"):
            if len(ep[k]) != t:
                raise DataError(f"{file}: episode {eid}: {k!r} has {len(ep[k])} entries for {t} rewards")
        o2 = o.reshape(t + 1, -1)
        obs_l.append(o2[:-1])
        next_l.append(o2[1:])
        act_l.append(np.asarray(ep["actions"]))
        rew_l.append(np.asarray(ep["rewards"]).reshape(-1))
        term_l.append(np.asarray(ep["terminations"]).reshape(-1))
        trunc_l.append(np.asarray(ep["truncations"]).reshape(-1))
        ids.append(eid)
        lens.append(t)
    if not ids:
        if allow_empty:  # a block of empty episodes: the converter checks the whole source
            return SourceData(source_id=source_id, chunks=[], observation_space=obs_space, action_space=act_space,
                              **_about(meta))
        raise DataError(f"{file}: the dataset holds no transitions (empty dataset)")

    lens_a = np.asarray(lens, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens_a)[:-1]])
    ids_a = np.asarray(ids, dtype=np.int64)

    def describe(r: int) -> str:
        e = int(np.searchsorted(starts, r, side="right") - 1)
        return f"episode {int(ids_a[e])}, step {r - int(starts[e])}"

    def describe_next(r: int) -> str:
        return describe(r) + " (the observation after that step)"

    obs = as_observations(np.concatenate(obs_l), file, "observations", describe)
    nxt = np.ascontiguousarray(np.concatenate(next_l), dtype=np.float32)
    check_finite(nxt, file, "observations", describe_next)
    act_raw = np.concatenate(act_l)
    if act_space["type"] == "Discrete":
        act = np.ascontiguousarray(act_raw.reshape(-1)).astype(np.int64)
    else:
        act = as_actions(act_raw.astype(np.float32, copy=False), file, "actions", describe)
    columns = {"observations": "observations", "next_observations": "observations", "actions": "actions",
               "rewards": "rewards", "terminations": "terminations", "truncations": "truncations"}
    chunk = Chunk(file=file, columns=columns, observations=obs, actions=act,
                  rewards=as_rewards(np.concatenate(rew_l), file, "rewards", describe),
                  terminations=as_flags(np.concatenate(term_l), file, "terminations", describe),
                  truncations=as_flags(np.concatenate(trunc_l), file, "truncations", describe),
                  next_observations=nxt, episode_key=np.repeat(ids_a, lens_a), describe=describe)

    return SourceData(source_id=source_id, chunks=[chunk], observation_space=obs_space, action_space=act_space,
                      **_about(meta))
