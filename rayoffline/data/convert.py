"""Convert logged data into flat-transition Parquet shards + metadata.json (schema.py), through Ray Data for
large partitions.

    convert("minari:mujoco/hopper/medium-v0", "data/hopper-medium")       # Minari by id (or a directory)
    convert("builtin:pendulum-medium", "data/pendulum-medium")            # built-in Minari dataset
    convert("d4rl_hopper.hdf5", "data/hopper")                            # D4RL-style HDF5
    convert("rllib_out/", "data/cartpole")                                # RLlib-recorded Parquet
    convert("log.csv", "data/mine", mapping={"observations": "obs_*", "actions": "a", "rewards": "r",
                                             "terminations": "done"})
    append("new_logs/", to="data/cartpole")                               # new partition part-00001

Pipeline: a reader (sources/) loads whole columns per file and checks dtype, shape, nulls and finiteness;
`_check_spaces` checks the files against each other and the action space; `_assemble` orders rows into
episodes and sets the episode ends; `_write_partition` cuts the table into `shards` slices and writes slice i
as shard-0000i.parquet (large row groups) with `_write_shard`: in this process for a partition of at most
LOCAL_WRITE_MAX_BYTES (no Ray started: a 100-row CSV converts in ~3 s, not ~15), else in Ray Data write tasks
(one per slice). The files are the same either way.

Episode ends (the contract every learner relies on):
- Only `terminations` stop bootstrapping. The last transition of a truncated episode keeps its real next
  observation with terminations=0, truncations=1.
- An episode that the data ends without either flag (a file cut mid-episode, an RLlib chunk) is marked
  truncated at its last stored transition: it has a real successor that we merely did not record.
- A flag on a transition that is not the last of its episode is an error (rows of one episode follow it).
- Sources without next observations (D4RL HDF5 without `next_observations`, mapped Parquet/CSV without one):
  the next observation is the next row of the same episode. At the last row of an episode there is no
  successor: a *terminal* row is kept (its next observation is set to its own observation; it is never used
  because terminations=1 stops bootstrapping, and dropping it would erase every termination from D4RL-style
  data), a non-terminal last row (timeout or end of data) is dropped, and the row before it becomes the
  episode's last transition with truncations=1 (its next observation, the dropped row's observation, is real).
  This is D4RL's `qlearning_dataset` behaviour for timeouts, without its bogus cross-episode successors.
  How many rows were dropped is said in a `DataWarning` (the CLI prints it) and kept in the partition's
  `notes` in metadata.json.

Spaces: Minari datasets (and converted directories) carry theirs. Otherwise, with `env_id` (or an env id in
the HDF5 attributes) whose env gymnasium can make, the env's spaces are used; else they are inferred:
observations Box(-inf, inf); integer actions Discrete(max + 1); float actions Box([-1, 1]) when every action
lies in [-1, 1], else Box(per-dimension min, max). Actions outside a known space are an error naming the row.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, DataWarning
from .metadata import (build_metadata, content_hash, dataset_file_rows, moments, pool_moments, read_metadata,
                       write_metadata)
from .schema import COLUMNS
from .sources import Chunk, SourceData, read_source

DEFAULT_SHARDS = 8
"""Most Parquet files per partition by default: DESIGN asks for at least 4 files per intended worker (8 = 2
workers). Fewer for small data, see SHARD_BYTES."""
SHARD_BYTES = 16 << 20
"""Default shard size: a partition gets one file per SHARD_BYTES of transitions (as written to Arrow), at least 1
and at most DEFAULT_SHARDS. Below ~16 MiB another file buys no read parallelism (a worker reads 16 MiB in tens
of milliseconds) and only adds footers and file opens; loaders split row ranges when there are fewer files than workers. So a
100-row CSV becomes one file, a 1M-transition Hopper dataset (~130 MiB) eight."""
ROW_GROUP_ROWS = 1 << 20
"""Rows per Parquet row group (large: loaders read whole columns)."""

LOCAL_WRITE_MAX_BYTES = 64 << 20
"""Partitions up to this size (as Arrow columns) are written in this process without starting Ray: Ray's
fixed cost (start-up, worker processes: 10-15 s on a 2-core machine) dwarfs writing 64 MiB of Parquet (well
under a second), and the data is in this process's memory already. Larger partitions go through Ray Data.
The same `_write_shard` writes either way. Environment override: RAYOFFLINE_LOCAL_WRITE_MAX_BYTES (0: always
through Ray Data)."""

_WRITE_TASKS = max(2, os.cpu_count() or 1)
"""Concurrent write tasks: each new Ray worker process costs seconds to start on a small machine, and
writing is I/O bound, so no more tasks than this node has cores."""

__all__ = ["convert", "append", "read_metadata", "DEFAULT_SHARDS", "SHARD_BYTES", "default_shards"]


def default_shards(cols: dict[str, np.ndarray]) -> int:
    """Parquet files for a partition of these columns when --shards is not given (see SHARD_BYTES)."""
    nbytes = sum(a.nbytes for a in cols.values())
    return int(min(DEFAULT_SHARDS, max(1, -(-nbytes // SHARD_BYTES))))


# ---------------------------------------------------------------------------------------------------------
# public API

def convert(source: str, out: str | os.PathLike, shards: int | None = None, mapping: dict[str, str] | None = None,
            env_id: str | None = None) -> dict[str, Any]:
    """Convert `source` into a new dataset directory `out` (which must not exist); returns its metadata.

    source: `minari:ID`, `builtin:NAME`, a Minari dataset directory, a D4RL-style .hdf5 file, RLlib-recorded
    Parquet (file or directory), or Parquet/CSV file(s) with `mapping` (FIELD=COLUMN, see sources/columnar.py).
    shards: number of Parquet files (default: one per 16 MiB of transitions, 1 to 8, see `default_shards`;
    never more than the number of transitions).
    env_id: gymnasium id to record for evaluation (overrides the source's).

    Everything is written into a hidden sibling directory and renamed into place at the end, so a failed
    conversion leaves nothing behind.
    """
    shards = _check_shards(shards)
    out_path = Path(out).expanduser().absolute()
    if out_path.exists() or out_path.is_symlink():
        raise DataError(f"{out_path}: output directory already exists; convert never overwrites - choose a new "
                        f"--out or delete it first (to add data to a converted dataset use `rayoffline data append`)")
    data = read_source(source, mapping)
    obs_space, act_space, env_id_out, env_spec = _check_spaces(data, env_id=env_id)
    cols, num_episodes, notes = _assemble(data)

    created = _missing_ancestor(out_path.parent)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
        part = _write_partition(cols, tmp / "part-00000", shards or default_shards(cols), data.source_id,
                                num_episodes, content_hash(cols), notes=notes)
        obs_mean, obs_std = moments(cols["observations"])
        meta = build_metadata(
            source=data.source_id, env_id=env_id_out, env_spec=env_spec, observation_space=obs_space,
            action_space=act_space, rewards=cols["rewards"], episode_id=cols["episode_id"],
            num_terminations=int(cols["terminations"].sum()), num_truncations=int(cols["truncations"].sum()),
            obs_mean=obs_mean, obs_std=obs_std, ref_min_score=data.ref_min_score,
            ref_max_score=data.ref_max_score, partitions=[part])
        write_metadata(tmp, meta)
        if out_path.exists() or out_path.is_symlink():
            raise DataError(f"{out_path}: appeared while converting (another process?); nothing was written")
        os.rename(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    _warn(notes)
    return meta


def append(source: str, to: str | os.PathLike, mapping: dict[str, str] | None = None,
           shards: int | None = None, allow_duplicate: bool = False) -> dict[str, Any]:
    """Add `source` to converted dataset `to` as a new partition part-0000N; returns the updated metadata.

    Existing files are never touched: the partition is written into a hidden directory inside `to`, renamed to
    part-0000N, and only then metadata.json is replaced atomically. Observation shape and action space must
    match the dataset's (actions are checked against its bounds); new episodes get ids after the existing
    ones. On any failure the dataset is left exactly as it was.

    shards: Parquet files of the new partition (default: by size as in `convert`, see `default_shards`).
    allow_duplicate: a partition's content hash covers its transitions with episode ids counted from 0 within
    the partition, so the same source appended twice has the hash of the partition it repeats; that is refused
    (duplicate transitions would weigh those episodes twice) unless allow_duplicate=True, which is recorded in
    the new partition as "duplicate_of": NAME.
    """
    root = Path(to).expanduser().absolute()
    read_metadata(root)  # a clear error before anything else when `to` is not a dataset
    with _append_lock(root):
        return _append_locked(source, root, mapping, shards, allow_duplicate)


@contextlib.contextmanager
def _append_lock(root: Path):
    """Appends to one dataset run one at a time: an advisory lock on the directory itself (no lock file, so a
    failed append leaves the directory exactly as it was; readers never take it)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _append_locked(source: str, root: Path, mapping: dict[str, str] | None, shards: int | None,
                   allow_duplicate: bool) -> dict[str, Any]:
    shards = _check_shards(shards)
    meta = read_metadata(root)
    old = _read_existing_scalars(root, meta)
    data = read_source(source, mapping)
    _check_spaces(data, existing=meta)
    cols, num_episodes, notes = _assemble(data)
    part_hash = content_hash(cols)  # episode ids still count from 0: the partition's own content
    same = [p for p in meta["partitions"] if p.get("content_hash") == part_hash]
    if same and not allow_duplicate:
        p = same[0]
        raise DataError(f"{data.source_id}: its {len(cols['rewards'])} transitions are already in {root} as partition "
                        f"{p['name']} (from {p.get('source')}, same content hash {part_hash[:12]}); appending them "
                        f"again would count those episodes twice - pass --allow-duplicate (allow_duplicate=True) "
                        f"if that is what you want")
    shards = shards or default_shards(cols)
    first_id = int(old["episode_id"].max()) + 1 if len(old["episode_id"]) else 0
    cols["episode_id"] = cols["episode_id"] + first_id

    name = f"part-{_next_partition_index(root, meta):05d}"
    final = root / name
    tmp = root / f".{name}.tmp-{uuid.uuid4().hex[:12]}"
    moved = False
    try:
        tmp.mkdir()
        part = _write_partition(cols, tmp, shards, data.source_id, num_episodes, part_hash, name=name, notes=notes)
        if same:
            part["duplicate_of"] = same[0]["name"]
        new_mean, new_std = moments(cols["observations"])
        obs_mean, obs_std = pool_moments([(int(meta["num_transitions"]), meta["obs_mean"], meta["obs_std"]),
                                          (len(cols["rewards"]), new_mean, new_std)])
        new_meta = build_metadata(
            source=meta["source"], env_id=meta.get("env_id"), env_spec=meta.get("env_spec"),
            observation_space=meta["observation_space"], action_space=meta["action_space"],
            rewards=np.concatenate([old["rewards"], cols["rewards"]]),
            episode_id=np.concatenate([old["episode_id"], cols["episode_id"]]),
            num_terminations=int(old["terminations"].sum() + cols["terminations"].sum()),
            num_truncations=int(old["truncations"].sum() + cols["truncations"].sum()),
            obs_mean=obs_mean, obs_std=obs_std, ref_min_score=meta.get("ref_min_score"),
            ref_max_score=meta.get("ref_max_score"), partitions=list(meta["partitions"]) + [part])
        for k, v in meta.items():  # keep keys we do not manage (written by newer code or by hand)
            new_meta.setdefault(k, v)
        if final.exists():
            raise DataError(f"{final}: appeared while appending (another process?); nothing was changed")
        os.rename(tmp, final)
        moved = True
        write_metadata(root, new_meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved:
            shutil.rmtree(final, ignore_errors=True)
        raise
    _warn(notes)
    return new_meta


def _warn(notes: list[str]) -> None:
    """What the user should know about a finished conversion (also in the partition's `notes` in metadata.json);
    the CLI prints these as `rayoffline: warning: ...` lines."""
    for note in notes:
        warnings.warn(note, DataWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------------------
# checks across files and against the spaces

def _check_shards(shards: int | None) -> int | None:
    """A valid --shards, or None for the size-based default (`default_shards`)."""
    if shards is None:
        return None
    if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1:
        raise DataError(f"--shards {shards!r}: must be a positive integer (number of Parquet files)")
    return int(shards)


def _space_str(space: dict) -> str:
    if space["type"] == "Discrete":
        return f"Discrete({space['n']})"
    return f"Box(low={space['low']}, high={space['high']})"


def _env_spaces(env_id: str) -> tuple[Any, Any, str | None] | None:
    """(observation_space, action_space, EnvSpec JSON) of a gymnasium env, or None if it cannot be made."""
    try:
        import gymnasium as gym

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            env = gym.make(env_id)
            spaces = env.observation_space, env.action_space
            env.close()
            try:
                spec_json = gym.spec(env_id).to_json()
            except Exception:
                spec_json = None
        return spaces[0], spaces[1], spec_json
    except Exception as e:
        warnings.warn(f"env id {env_id!r}: gymnasium cannot make this env ({type(e).__name__}: {e}); "
                      f"its id is recorded but the spaces are inferred from the data", DataWarning, stacklevel=3)
        return None


def _infer_action_space(chunks: list[Chunk]) -> dict:
    if chunks[0].discrete:
        for c in chunks:
            if len(c) and c.actions.min() < 0:
                r = int(np.argmax(c.actions < 0))
                raise DataError(f"{c.file}: column {c.columns['actions']!r} holds the negative discrete action "
                                f"{int(c.actions[r])} at {c.describe(r)}; Discrete actions are 0..n-1")
        n = max(int(c.actions.max()) for c in chunks if len(c)) + 1
        return {"type": "Discrete", "n": n}
    lo = np.min([c.actions.min(0) for c in chunks if len(c)], axis=0)
    hi = np.max([c.actions.max(0) for c in chunks if len(c)], axis=0)
    if lo.min() >= -1.0 and hi.max() <= 1.0:
        lo, hi = np.full_like(lo, -1.0), np.full_like(hi, 1.0)
    return {"type": "Box", "shape": [len(lo)], "low": [float(x) for x in lo], "high": [float(x) for x in hi]}


def _check_spaces(data: SourceData, env_id: str | None = None, existing: dict | None = None):
    """Check the chunks against each other and against the spaces; returns (obs_space, act_space, env_id, spec).

    `existing`: the metadata of the dataset being appended to; its spaces win and the source's must match.
    """
    from .sources.minari_datasets import space_json

    chunks = [c for c in data.chunks if len(c)]
    if not chunks:
        files = ", ".join(c.file for c in data.chunks) or data.source_id
        raise DataError(f"{files}: no transitions (empty dataset); nothing to convert")
    first = chunks[0]
    d0 = first.observations.shape[1]
    for c in chunks[1:]:
        if c.observations.shape[1] != d0:
            raise DataError(f"observation dimension changes between files: {first.file} has {d0} values per row "
                            f"in column {first.columns['observations']!r}, {c.file} has {c.observations.shape[1]} "
                            f"in column {c.columns['observations']!r}; all files must hold one observation space")
        if c.discrete != first.discrete or (not c.discrete and c.actions.shape[1] != first.actions.shape[1]):
            def kind(x: Chunk) -> str:
                return "discrete (integer)" if x.discrete else f"continuous with {x.actions.shape[1]} values"
            raise DataError(f"action space changes between files: {first.file} has {kind(first)} actions in "
                            f"column {first.columns['actions']!r}, {c.file} has {kind(c)} in column "
                            f"{c.columns['actions']!r}")

    env_spec = data.env_spec
    out_env_id = data.env_id
    obs_space, act_space = data.observation_space, data.action_space
    if existing is not None:
        where = "the dataset being appended to"
        for label, ours, theirs in (("observation", data.observation_space, existing["observation_space"]),
                                    ("action", data.action_space, existing["action_space"])):
            if ours is not None and not _same_space(ours, theirs):
                raise DataError(f"{data.source_id}: {label} space {_space_str(ours) if label == 'action' else ours['shape']} "
                                f"does not match {where} ({_space_str(theirs) if label == 'action' else theirs['shape']})")
        obs_space, act_space = existing["observation_space"], existing["action_space"]
    else:
        if env_id is not None:
            out_env_id = env_id
            env_spec = None
        want_env = env_id or (data.env_id if obs_space is None or act_space is None else None)
        made = _env_spaces(want_env) if want_env else None
        if made is not None:
            if env_id is not None or env_spec is None:
                env_spec = made[2]
            if obs_space is None:
                obs_space = space_json(made[0], f"env {want_env}", "observation")
            if act_space is None:
                act_space = space_json(made[1], f"env {want_env}", "action")
        if obs_space is None:
            obs_space = {"type": "Box", "shape": [d0], "low": [-np.inf] * d0, "high": [np.inf] * d0,
                         "dtype": "float32"}
        if act_space is None:
            act_space = _infer_action_space(chunks)

    # the data against the spaces
    want_d = int(np.prod(obs_space["shape"]))
    if want_d != d0:
        raise DataError(f"{first.file}: observations have {d0} values per row (column "
                        f"{first.columns['observations']!r}) but the observation space has shape "
                        f"{obs_space['shape']}" + (" (the dataset being appended to)" if existing else ""))
    for c in chunks:
        _check_actions(c, act_space, appended=existing is not None)
    return obs_space, act_space, out_env_id, env_spec


def _same_space(a: dict, b: dict) -> bool:
    if a.get("type") != b.get("type"):
        return False
    if a["type"] == "Discrete":
        return int(a["n"]) == int(b["n"])
    return list(a["shape"]) == list(b["shape"])


def _check_actions(c: Chunk, space: dict, appended: bool = False) -> None:
    col = c.columns["actions"]
    ctx = " of the dataset being appended to" if appended else ""
    if space["type"] == "Discrete":
        if not c.discrete:
            raise DataError(f"{c.file}: column {col!r} holds continuous actions but the action space{ctx} is "
                            f"{_space_str(space)}; discrete actions must be integers")
        n = int(space["n"])
        bad = (c.actions < 0) | (c.actions >= n)
        if bad.any():
            r = int(np.argmax(bad))
            raise DataError(f"{c.file}: column {col!r} holds action {int(c.actions[r])} at {c.describe(r)}, outside "
                            f"the action space{ctx} {_space_str(space)} ({int(bad.sum())} row(s) affected)")
        return
    if c.discrete:
        raise DataError(f"{c.file}: column {col!r} holds integer (discrete) actions but the action space{ctx} is "
                        f"{_space_str(space)}; store continuous actions as floats")
    dim = int(space["shape"][0])
    if c.actions.shape[1] != dim:
        raise DataError(f"{c.file}: column {col!r} has {c.actions.shape[1]} values per row but the action "
                        f"space{ctx} has {dim} dimensions")
    low = np.asarray(space["low"], dtype=np.float32)
    high = np.asarray(space["high"], dtype=np.float32)
    bad = ((c.actions < low) | (c.actions > high)).any(axis=1)
    if bad.any():
        r = int(np.argmax(bad))
        raise DataError(f"{c.file}: column {col!r} holds action {c.actions[r].tolist()} at {c.describe(r)}, outside "
                        f"the action space{ctx} {_space_str(space)} ({int(bad.sum())} row(s) affected); clip the "
                        f"actions or fix the space")


# ---------------------------------------------------------------------------------------------------------
# episodes

def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _assemble(data: SourceData) -> tuple[dict[str, np.ndarray], int, list[str]]:
    """Whole columns in schema order: rows grouped by episode (first-appearance order), ordered by step; the
    number of episodes; notes on what the user should know (rows dropped at episode ends, see the module doc)."""
    chunks = [c for c in data.chunks if len(c)]
    derive = chunks[0].next_observations is None
    obs = _cat([c.observations for c in chunks])
    act = _cat([c.actions for c in chunks])
    rew = _cat([c.rewards for c in chunks])
    term = _cat([c.terminations for c in chunks]).copy()
    trunc = _cat([c.truncations for c in chunks]).copy()
    nxt = None if derive else _cat([c.next_observations for c in chunks])
    key = _cat([c.episode_key for c in chunks])
    n = len(rew)
    src_chunk = np.repeat(np.arange(len(chunks), dtype=np.int32), [len(c) for c in chunks])
    src_row = _cat([np.arange(len(c), dtype=np.int64) for c in chunks])

    # episode number = rank of the key's first appearance
    uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    eid = rank[inv.reshape(-1)]
    if any(c.order is not None for c in chunks):
        order = _cat([c.order if c.order is not None else np.arange(len(c), dtype=np.int64) for c in chunks])
        perm = np.lexsort((np.arange(n), order, eid))
    else:
        perm = np.lexsort((np.arange(n), eid))
    if not (perm[1:] > perm[:-1]).all():
        obs, act, rew, term, trunc, eid = obs[perm], act[perm], rew[perm], term[perm], trunc[perm], eid[perm]
        src_chunk, src_row = src_chunk[perm], src_row[perm]
        if nxt is not None:
            nxt = nxt[perm]

    is_last = np.ones(n, dtype=bool)
    is_last[:-1] = eid[1:] != eid[:-1]
    early = (term | trunc) & ~is_last
    if early.any():
        i = int(np.argmax(early))
        c = chunks[src_chunk[i]]
        flag = "terminations" if term[i] else "truncations"
        nxt_i = i + 1
        c2 = chunks[src_chunk[nxt_i]]
        raise DataError(f"{c.file}: {c.describe(int(src_row[i]))} ends its episode (column {c.columns[flag]!r} is "
                        f"set) but the episode continues at {c2.describe(int(src_row[nxt_i]))}"
                        + ("" if c2 is c else f" of {c2.file}")
                        + "; a flag may only be set on an episode's last transition (check the episode id and "
                          "step columns)")

    notes: list[str] = []
    if derive:
        nxt = np.empty_like(obs)
        nxt[:-1] = obs[1:]
        ends = np.flatnonzero(is_last & term)
        nxt[ends] = obs[ends]  # placeholder: never used, terminations=1 stops bootstrapping
        drop = is_last & ~term
        dropped = np.flatnonzero(drop)
        prev = dropped - 1
        ok = prev >= 0
        ok[ok] = eid[prev[ok]] == eid[dropped[ok]]
        if dropped.size:
            n_trunc = int(trunc[dropped].sum())
            lost = int((~ok).sum())
            notes.append(
                f"{data.source_id}: dropped {dropped.size} of {n} rows: without a next-observation column a row's "
                f"next observation is the next row's, so the last row of each episode that does not end in a "
                f"termination ({n_trunc} truncated, {dropped.size - n_trunc} without either flag) has "
                f"none; the row before it now ends the episode as truncated"
                + (f" ({lost} single-row episodes vanished)" if lost else "")
                + ". Map next_observations=COLUMN to keep every row")
        trunc[prev[ok]] = True
        if dropped.size:
            keep = ~drop
            obs, act, rew, nxt, term, trunc, eid = (obs[keep], act[keep], rew[keep], nxt[keep], term[keep],
                                                    trunc[keep], eid[keep])
        n = len(rew)
        if n == 0:
            files = ", ".join(c.file for c in chunks)
            raise DataError(f"{files}: no transitions left (empty dataset): every episode has a single row and no "
                            f"next observation; provide next observations (map next_observations=COLUMN)")
        is_last = np.ones(n, dtype=bool)
        is_last[:-1] = eid[1:] != eid[:-1]
    # an episode the data ends without a flag was cut short: truncated, its next observation is real
    trunc |= is_last & ~term

    new_episode = np.ones(n, dtype=bool)
    new_episode[1:] = is_last[:-1]
    episode_id = np.cumsum(new_episode, dtype=np.int64) - 1
    starts = np.flatnonzero(new_episode)
    step = (np.arange(n, dtype=np.int64) - np.repeat(starts, np.diff(np.append(starts, n)))).astype(np.int32)
    cols = {"observations": np.ascontiguousarray(obs), "actions": np.ascontiguousarray(act),
            "rewards": np.ascontiguousarray(rew), "next_observations": np.ascontiguousarray(nxt),
            "terminations": np.ascontiguousarray(term), "truncations": np.ascontiguousarray(trunc),
            "episode_id": episode_id, "step": step}
    assert tuple(cols) == COLUMNS
    return cols, len(starts), notes


# ---------------------------------------------------------------------------------------------------------
# writing (in this process, or through Ray Data for large partitions)

def _missing_ancestor(path: Path) -> Path | None:
    """The highest ancestor of `path` (or itself) that does not exist yet: what we must remove on failure."""
    missing = None
    p = path
    while not p.exists():
        missing = p
        if p.parent == p:
            break
        p = p.parent
    return missing


def _next_partition_index(root: Path, meta: dict) -> int:
    used = [-1]
    for name in [p["name"] for p in meta["partitions"]] + [p.name for p in root.iterdir()]:
        m = re.fullmatch(r"part-(\d+)", name)
        if m:
            used.append(int(m.group(1)))
    return max(used) + 1


def _read_existing_scalars(root: Path, meta: dict) -> dict[str, np.ndarray]:
    """rewards, episode_id, terminations, truncations of every existing partition (for the new statistics)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ["rewards", "episode_id", "terminations", "truncations"]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for path, _ in dataset_file_rows(root, meta):  # every listed file there, with the row counts metadata says
        try:
            t = pq.read_table(path, columns=names)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read this shard of the dataset being appended to "
                            f"({type(e).__name__}: {e}); the dataset is damaged - convert it again") from e
        for k in names:
            parts[k].append(t.column(k).to_numpy())
    return {k: (np.concatenate(v) if v else np.zeros(0, dtype=np.int64 if k == "episode_id" else np.float32))
            for k, v in parts.items()}


def _to_table(cols: dict[str, np.ndarray]):
    import pyarrow as pa

    arrays = {}
    for k, a in cols.items():
        if a.ndim == 2:
            arrays[k] = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
        else:
            arrays[k] = pa.array(a)
    return pa.table(arrays)


def _write_shard(table, path: str) -> None:
    """The one Parquet writer: every shard of every partition is written by this function, in this process
    (small partitions) or in a Ray Data write task (large ones), so both paths make the same files. Written
    aside and renamed, so a shard file is never half there."""
    import pyarrow.parquet as pq

    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


def _local_write_max_bytes() -> int:
    env = os.environ.get("RAYOFFLINE_LOCAL_WRITE_MAX_BYTES")
    return int(env) if env else LOCAL_WRITE_MAX_BYTES


def _write_through_ray(slices: list, part_dir: Path) -> None:
    """Ray Data writes slice i as shard i (task i), with `_write_shard`."""
    import ray
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    from .._ray import ensure_ray, quiet_ray_data

    class ShardSink(Datasink):
        def write(self, blocks, ctx) -> None:
            import pyarrow as pa

            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [t for t in tables if t.num_rows]
            if tables:
                os.makedirs(part_dir, exist_ok=True)  # also on a node that does not share the driver's disk
                _write_shard(pa.concat_tables(tables), str(part_dir / _shard_name(ctx.task_idx)))

    ensure_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # write tasks prefer this node, so a cluster without a shared filesystem still leaves the files here
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    with quiet_ray_data():
        ray.data.from_arrow(slices).write_datasink(ShardSink(), ray_remote_args={"scheduling_strategy": here},
                                                   concurrency=min(len(slices), _WRITE_TASKS))


def _episode_range(md) -> tuple[int, int] | None:
    """(min, max) episode_id of a Parquet file from its row-group statistics."""
    idx = md.schema.to_arrow_schema().get_field_index("episode_id")
    lo, hi = [], []
    for g in range(md.num_row_groups):
        st = md.row_group(g).column(idx).statistics
        if st is None or not st.has_min_max:
            return None
        lo.append(st.min)
        hi.append(st.max)
    return (int(min(lo)), int(max(hi))) if lo else None


def _write_partition(cols: dict[str, np.ndarray], part_dir: Path, shards: int, source_id: str, num_episodes: int,
                     part_hash: str, name: str | None = None, notes: list[str] | None = None) -> dict[str, Any]:
    """Write the columns as `shards` Parquet files shard-00000.parquet, ... in `part_dir` (created).

    Small partitions (Arrow size <= LOCAL_WRITE_MAX_BYTES) are written in this process, large ones by Ray Data
    write tasks; both with `_write_shard` on the same slices, so the files are the same either way (tested).
    """
    import pyarrow.parquet as pq

    n = len(cols["rewards"])
    k = max(1, min(shards, n))
    table = _to_table(cols)
    bounds = np.linspace(0, n, k + 1).round().astype(np.int64)
    slices = [table.slice(int(a), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:])]
    part_dir.mkdir(parents=True, exist_ok=True)
    if table.nbytes <= _local_write_max_bytes():
        for i, piece in enumerate(slices):
            _write_shard(piece, str(part_dir / _shard_name(i)))
    else:
        _write_through_ray(slices, part_dir)
    found = sorted(p.name for p in part_dir.iterdir() if p.name.endswith(".parquet"))
    files = [_shard_name(i) for i in range(k)]
    if found != files:
        raise DataError(f"{part_dir}: {len(found)} Parquet file(s) written here, expected {k}; when Ray runs on "
                        f"several machines, --out must be on a filesystem they all share")
    for i, f in enumerate(files):
        md = pq.ParquetFile(part_dir / f).metadata
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        if md.num_rows != hi - lo or _episode_range(md) != (int(cols["episode_id"][lo]), int(cols["episode_id"][hi - 1])):
            # Ray Data numbered its write tasks differently from the slices: a bug to report, not bad input
            raise RuntimeError(f"{part_dir / f}: rows do not match slice {lo}:{hi} of the table (Ray Data write order)")
    return {"name": name or part_dir.name, "source": source_id, "files": files, "num_transitions": int(n),
            "num_episodes": int(num_episodes), "content_hash": part_hash, "notes": list(notes or [])}
