"""D4RL-style HDF5: one file of row-aligned arrays, episodes as consecutive rows.

Keys (override with a mapping FIELD=KEY, nested keys as `group/key`):
  observations (N, obs_dim), actions (N, act_dim) float | (N,) int, rewards (N,), terminals (N,), timeouts (N,),
  optional next_observations (N, obs_dim), optional infos/action_log_probs (N,): the behavior policy's
  log-probability of each action (D4RL's MuJoCo datasets carry it), stored as the `action_logp` column
  (schema.py). Map another key with action_logp=KEY, or probabilities with action_prob=KEY (their log is
  stored). D4RL's values are taken as they are: rayoffline cannot check that they belong to the stored actions.

An episode ends after a row with `terminals` or `timeouts` set (or at the end of the file). Without
`next_observations`, next observations come from the next row of the same episode; convert.py documents
what happens at an episode's last row. `env_id` is read from the file's attributes when it has one.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...errors import DataError
from ._common import (LOGP_FIELDS, Chunk, RowDescriber, SourceData, as_action_logp, as_actions, as_flags,
                      as_next_observations, as_observations, as_rewards, check_lengths, choose_cuts, describe_row,
                      episode_keys_from_flags)
from .columnar import check_mapping

D4RL_KEYS = {"observations": "observations", "actions": "actions", "rewards": "rewards",
             "terminations": "terminals", "truncations": "timeouts", "next_observations": "next_observations"}
D4RL_LOGP_KEY = "infos/action_log_probs"
HDF5_SUFFIXES = (".hdf5", ".h5", ".he5")


def is_hdf5(path: Path) -> bool:
    if path.suffix.lower() in HDF5_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def _open_checked(path: Path, mapping: dict[str, str] | None):
    """(h5py File, field -> key, fields present) with the keys checked: what every reader of the file needs."""
    import h5py

    mapping = check_mapping(mapping)
    for k in mapping:
        if k not in D4RL_KEYS and k not in LOGP_FIELDS:
            raise DataError(f"{path}: field {k!r} cannot be mapped for an HDF5 file (episodes follow terminals/"
                            f"timeouts); mappable: {', '.join(tuple(D4RL_KEYS) + LOGP_FIELDS)}")
        if isinstance(mapping[k], list):
            raise DataError(f"{path}: column mapping {k}={','.join(mapping[k])}: an HDF5 field maps to one key "
                            f"(an (N, dim) array), not a list of keys")
    keys = {f: mapping.get(f, k) for f, k in D4RL_KEYS.items()}
    logp_field = next((f for f in LOGP_FIELDS if f in mapping), None)
    if logp_field is not None:
        keys[logp_field] = mapping[logp_field]
    file = str(path)
    try:
        h5 = h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise DataError(f"{file}: cannot open as HDF5 ({e}); is the file complete?") from e
    present = []
    try:
        if logp_field is None and D4RL_LOGP_KEY in h5:
            keys["action_logp"] = D4RL_LOGP_KEY
        for f, k in keys.items():
            if k not in h5:
                if f == "next_observations":
                    continue
                names = sorted(h5.keys())
                raise DataError(f"{file}: missing dataset (column) {k!r} for {f}; keys present: "
                                f"{', '.join(names)}" + (f". Map another key with --map {f}=KEY" if names else ""))
            if not isinstance(h5[k], h5py.Dataset):
                raise DataError(f"{file}: {k!r} is a group, not an array; Dict observations are not supported yet")
            present.append(f)
    except BaseException:
        h5.close()
        raise
    return h5, keys, present


def plan_hdf5(path: Path, mapping: dict[str, str] | None, block_bytes: int):
    """A D4RL-style file cut into row ranges at episode ends (`terminals | timeouts`), ~block_bytes each; a file
    up to block_bytes is one block and is read exactly as before streaming."""
    from ._common import Block, SourcePlan

    file = str(path)
    h5, keys, present = _open_checked(path, mapping)
    with h5:
        shapes = {f: h5[keys[f]].shape for f in present}
        itemsizes = {f: h5[keys[f]].dtype.itemsize for f in present}
        env_id = h5.attrs.get("env_id", h5.attrs.get("env_name"))
        check_lengths(file, {keys[f]: (shp[0] if len(shp) else 0) for f, shp in shapes.items()})
        n = shapes["observations"][0] if shapes["observations"] else 0
        row_bytes = sum(itemsizes[f] * int(np.prod(shp[1:], dtype=np.int64)) for f, shp in shapes.items())
        cuts: list[int] = []
        if n * row_bytes > block_bytes:
            term = as_flags(_read(h5, keys["terminations"], file), file, keys["terminations"])
            trunc = as_flags(_read(h5, keys["truncations"], file), file, keys["truncations"])
            ends = np.flatnonzero(term | trunc) + 1
            cuts = choose_cuts(n, ends, max(1, block_bytes // max(row_bytes, 1)))
    if isinstance(env_id, bytes):
        env_id = env_id.decode()
    bounds = [0, *cuts, n]
    whole = len(bounds) == 2
    blocks = [Block("hdf5", {"path": file, "mapping": dict(mapping or {}), "start": a, "stop": b, "whole": whole},
                    rows=b - a, nbytes=(b - a) * row_bytes) for a, b in zip(bounds[:-1], bounds[1:])]
    return SourcePlan(source_id=f"hdf5:{os.path.abspath(path)}", blocks=blocks, files=[file],
                      env_id=str(env_id) if env_id is not None else None)


def _read(h5, key: str, file: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
    try:
        node = h5[key]
        return node[()] if start is None or node.ndim == 0 else node[start:stop]
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"{file}: cannot read dataset {key!r} ({e})") from e


def read_hdf5_block(args: dict) -> SourceData:
    """Rows [start, stop) of the file (the whole file when `whole`), checked; row numbers in messages are the
    file's."""
    path = Path(args["path"])
    if args.get("whole", True):
        return read_hdf5(path, args.get("mapping"))
    start, stop = int(args["start"]), int(args["stop"])
    file = str(path)
    h5, keys, present = _open_checked(path, args.get("mapping"))
    with h5:
        arrays = {f: _read(h5, keys[f], file, start, stop) for f in present}
    describe = RowDescriber(start, stop)
    return SourceData(source_id=f"hdf5:{os.path.abspath(path)}", chunks=[_chunk(file, keys, arrays, describe)])


def _chunk(file: str, keys: dict[str, str], arrays: dict[str, np.ndarray], describe=describe_row) -> Chunk:
    obs = as_observations(arrays["observations"], file, keys["observations"], describe)
    term = as_flags(arrays["terminations"], file, keys["terminations"], describe)
    trunc = as_flags(arrays["truncations"], file, keys["truncations"], describe)
    nxt = None
    if "next_observations" in arrays:
        nxt = as_next_observations(arrays["next_observations"], file, keys["next_observations"], obs,
                                   keys["observations"], describe)
    actions = as_actions(arrays["actions"], file, keys["actions"], describe)
    logp = None
    columns = dict(keys)
    for f in LOGP_FIELDS:
        if f in arrays:
            logp = as_action_logp(arrays[f], file, keys[f], f, actions.ndim == 1, describe)
            columns["action_logp"] = keys[f]
    return Chunk(file=file, columns=columns, observations=obs, actions=actions,
                 rewards=as_rewards(arrays["rewards"], file, keys["rewards"], describe),
                 terminations=term, truncations=trunc, next_observations=nxt,
                 episode_key=episode_keys_from_flags(term | trunc), describe=describe, action_logp=logp)


def read_hdf5(path: Path, mapping: dict[str, str] | None = None) -> SourceData:
    """The whole file, checked."""
    file = str(path)
    h5, keys, present = _open_checked(path, mapping)
    with h5:
        arrays = {f: _read(h5, keys[f], file) for f in present}
        env_id = h5.attrs.get("env_id", h5.attrs.get("env_name"))
    check_lengths(file, {keys[f]: (len(a) if np.ndim(a) else 0) for f, a in arrays.items()})
    chunk = _chunk(file, keys, arrays)
    if isinstance(env_id, bytes):
        env_id = env_id.decode()
    return SourceData(source_id=f"hdf5:{os.path.abspath(path)}", chunks=[chunk],
                      env_id=str(env_id) if env_id is not None else None)
