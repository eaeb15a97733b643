"""D4RL-style HDF5: one file of row-aligned arrays, episodes as consecutive rows.

Keys (override with a mapping FIELD=KEY, nested keys as `group/key`):
  observations (N, obs_dim), actions (N, act_dim) float | (N,) int, rewards (N,), terminals (N,), timeouts (N,),
  optional next_observations (N, obs_dim).

An episode ends after a row with `terminals` or `timeouts` set (or at the end of the file). Without
`next_observations`, next observations come from the next row of the same episode; convert.py documents
what happens at an episode's last row. `env_id` is read from the file's attributes when it has one.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...errors import DataError
from ._common import (Chunk, SourceData, as_actions, as_flags, as_next_observations, as_observations, as_rewards,
                      check_lengths, episode_keys_from_flags)
from .columnar import check_mapping

D4RL_KEYS = {"observations": "observations", "actions": "actions", "rewards": "rewards",
             "terminations": "terminals", "truncations": "timeouts", "next_observations": "next_observations"}
HDF5_SUFFIXES = (".hdf5", ".h5", ".he5")


def is_hdf5(path: Path) -> bool:
    if path.suffix.lower() in HDF5_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def read_hdf5(path: Path, mapping: dict[str, str] | None = None) -> SourceData:
    import h5py

    mapping = check_mapping(mapping)
    for k in mapping:
        if k not in D4RL_KEYS:
            raise DataError(f"{path}: field {k!r} cannot be mapped for an HDF5 file (episodes follow terminals/"
                            f"timeouts); mappable: {', '.join(D4RL_KEYS)}")
        if isinstance(mapping[k], list):
            raise DataError(f"{path}: column mapping {k}={','.join(mapping[k])}: an HDF5 field maps to one key "
                            f"(an (N, dim) array), not a list of keys")
    keys = {f: mapping.get(f, k) for f, k in D4RL_KEYS.items()}
    file = str(path)
    try:
        h5 = h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise DataError(f"{file}: cannot open as HDF5 ({e}); is the file complete?") from e
    with h5:
        arrays = {}
        for f, k in keys.items():
            if k not in h5:
                if f == "next_observations":
                    continue
                present = sorted(h5.keys())
                raise DataError(f"{file}: missing dataset (column) {k!r} for {f}; keys present: "
                                f"{', '.join(present)}" + (f". Map another key with --map {f}=KEY" if present else ""))
            node = h5[k]
            if not isinstance(node, h5py.Dataset):
                raise DataError(f"{file}: {k!r} is a group, not an array; Dict observations are not supported yet")
            try:
                arrays[f] = node[()]
            except (OSError, ValueError, TypeError) as e:
                raise DataError(f"{file}: cannot read dataset {k!r} ({e})") from e
        env_id = h5.attrs.get("env_id", h5.attrs.get("env_name"))
    check_lengths(file, {keys[f]: (len(a) if np.ndim(a) else 0) for f, a in arrays.items()})
    obs = as_observations(arrays["observations"], file, keys["observations"])
    term = as_flags(arrays["terminations"], file, keys["terminations"])
    trunc = as_flags(arrays["truncations"], file, keys["truncations"])
    nxt = None
    if "next_observations" in arrays:
        nxt = as_next_observations(arrays["next_observations"], file, keys["next_observations"], obs,
                                   keys["observations"])
    chunk = Chunk(file=file, columns=dict(keys), observations=obs,
                  actions=as_actions(arrays["actions"], file, keys["actions"]),
                  rewards=as_rewards(arrays["rewards"], file, keys["rewards"]),
                  terminations=term, truncations=trunc, next_observations=nxt,
                  episode_key=episode_keys_from_flags(term | trunc))
    if isinstance(env_id, bytes):
        env_id = env_id.decode()
    return SourceData(source_id=f"hdf5:{os.path.abspath(path)}", chunks=[chunk],
                      env_id=str(env_id) if env_id is not None else None)
