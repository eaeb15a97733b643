"""Convert logged data into flat-transition Parquet shards + the metadata file (schema.py), streaming: no source
is ever held whole in one process.

    convert("minari:mujoco/hopper/medium-v0", "data/hopper-medium")       # Minari by id (or a directory)
    convert("builtin:pendulum-medium", "data/pendulum-medium")            # built-in Minari dataset
    convert("d4rl_hopper.hdf5", "s3://bucket/hopper")                     # D4RL-style HDF5, to object storage
    convert("rllib_out/", "data/cartpole")                                # RLlib-recorded Parquet
    convert("log.csv", "data/mine", mapping={"observations": "obs_*", "actions": "a", "rewards": "r",
                                             "terminations": "done"})
    append("new_logs/", to="data/cartpole")                               # new partition part-00001

Pipeline: `plan_source` (sources/) cuts the source into blocks that no episode crosses (Minari and HDF5 by
episode ranges, Parquet/CSV by files and row ranges), reading only metadata and, for large files, the flag
or episode-id columns. Each block is then read, checked and assembled by one task (`_assemble_block`: the
readers check dtype, shape, nulls and finiteness; `_check_block` checks the files against each other and the
actions against the space; `_assemble` orders rows into episodes and sets the episode ends), which returns
the block as an Arrow table plus a summary: counts, per-episode returns and lengths, observation and reward
moments, action ranges for spaces that are inferred. The driver merges the summaries in block order, which
gives each block its first row and episode id in the partition, and hands row ranges of the assembled
blocks to write tasks (`_write_file`): one per Parquet file, which also hashes the content-hash pieces that
start in its range (schema.py), so no process ever hashes or holds the whole partition. The driver keeps
only summaries and per-episode returns; blocks wait in Ray's object store until their rows are written, at
most a few files' worth at a time.

Sources up to LOCAL_WRITE_MAX_BYTES run the same pipeline in this process, without starting Ray (a 100-row CSV
converts in under a second, not ~15 s); larger ones run it in Ray tasks. The files, the statistics and the
metadata are the same either way (tested). A source of one block gives byte for byte what the converter
gave before it streamed.

Where the output goes: a local path (or file://) is written into a hidden sibling directory and renamed into
place (append: a hidden directory inside the dataset, renamed, then the metadata replaced): a failed
conversion leaves nothing behind. A filesystem URI without directory rename (s3://, gs://, ...) is written in
place with the metadata file last; readers find a dataset by that file and read only the files it lists, so
they never see half a dataset, and a failure deletes what was written. Concurrent appends are serialized by a
lock on local directories only (object stores: one appender at a time, or the last metadata write wins).

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
  `notes` in the metadata. Blocks never split an episode, so this is the same per block as for the whole.

Logged action probabilities: when the source has them (schema.py: `action_logp`), they travel with their rows
through all of the above (ordering, dropped rows) into the optional `action_logp` column, and into the content
hash; a partition records `"action_logp": true`, and the dataset does when every partition has them (`append`
warns when it mixes partitions with and without).

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
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, DataWarning, DuplicatePartition, RayOfflineError
from .metadata import (Moments, build_metadata, episode_returns, partition_hash, piece_digest, piece_rows,
                       pool_moments, read_metadata, write_metadata)
from .schema import COLUMNS, OPTIONAL_COLUMNS
from .sources import Block, Chunk, SourceData, SourcePlan, plan_source, read_block
from .storage import Location, locate, open_parquet

DEFAULT_SHARDS = 8
"""Most Parquet files per partition by default up to 8 x MAX_SHARD_BYTES: DESIGN asks for at least 4 files per
intended worker (8 = 2 workers). Fewer for small data, see SHARD_BYTES; more for large data, see
MAX_SHARD_BYTES."""
SHARD_BYTES = 16 << 20
"""Default shard size: a partition gets one file per SHARD_BYTES of transitions (as numpy columns), at least 1
and at most DEFAULT_SHARDS. Below ~16 MiB another file buys no read parallelism (a worker reads 16 MiB in tens
of milliseconds) and only adds footers and file opens; loaders split row ranges when there are fewer files
than workers. So a 100-row CSV becomes one file, a 1M-transition Hopper dataset (~113 MiB) eight."""
MAX_SHARD_BYTES = 256 << 20
"""Largest default shard: partitions over DEFAULT_SHARDS x MAX_SHARD_BYTES (2 GiB) get one file per
MAX_SHARD_BYTES (20M Hopper transitions, 2.2 GiB: 9 files), so that a write task, and a worker's share,
stays a few hundred MiB and split-mode training has a file for every worker."""
ROW_GROUP_ROWS = 1 << 20
"""Rows per Parquet row group (large: loaders read whole columns)."""

BLOCK_BYTES = 64 << 20
"""Target size of a block (uncompressed source bytes): what one task reads, checks and assembles at once.
A task holds ~4-5x its block while it works."""
LOCAL_WRITE_MAX_BYTES = 64 << 20
"""Sources up to this size (uncompressed, as planned) are converted in this process without starting Ray:
Ray's fixed cost (start-up, worker processes: 10-15 s on a 2-core machine) dwarfs converting 64 MiB (about a
second). Larger sources are converted in Ray tasks. Environment override: RAYOFFLINE_LOCAL_WRITE_MAX_BYTES
(0: always through Ray)."""

_TASKS = max(2, os.cpu_count() or 1)
"""Conversion tasks (reading and assembling a block, or writing a file) at once: no more than this node has
cores, although a local Ray instance offers more CPU slots than that: each new Ray worker process costs seconds
to start on a small machine, and a task holds several times its block in memory."""

__all__ = ["convert", "append", "read_metadata", "DEFAULT_SHARDS", "SHARD_BYTES", "default_shards"]


def default_shards(cols: dict[str, np.ndarray] | int) -> int:
    """Parquet files for a partition of these columns (or this many bytes as numpy columns) when --shards is
    not given (see SHARD_BYTES and MAX_SHARD_BYTES)."""
    nbytes = cols if isinstance(cols, (int, np.integer)) else sum(a.nbytes for a in cols.values())
    small = int(min(DEFAULT_SHARDS, max(1, -(-nbytes // SHARD_BYTES))))
    return max(small, int(-(-nbytes // MAX_SHARD_BYTES)))


# ---------------------------------------------------------------------------------------------------------
# public API

def convert(source: str, out: str | os.PathLike, shards: int | None = None, mapping: dict[str, str] | None = None,
            env_id: str | None = None, holdout: float | None = None, holdout_seed: int = 0) -> dict[str, Any]:
    """Convert `source` into a new dataset directory `out` (which must not exist); returns its metadata.

    source: `minari:ID`, `builtin:NAME`, a Minari dataset directory, a D4RL-style .hdf5 file, RLlib-recorded
    Parquet (file or directory), or Parquet/CSV file(s) with `mapping` (FIELD=COLUMN, see sources/columnar.py).
    out: a local directory, or a filesystem URI (s3://bucket/key, gs://..., file:///...).
    shards: number of Parquet files (default: one per 16 MiB of transitions, 1 to 8, and one per 256 MiB
    beyond 2 GiB, see `default_shards`; never more than the number of transitions).
    env_id: gymnasium id to record for evaluation (overrides the source's).
    holdout: hold out this fraction of the episodes (chosen by `holdout_seed`, see holdout.py) for off-policy
    evaluation; training never samples them. Recorded in the metadata; later appends are split the same way.

    A local `out` is written into a hidden sibling directory and renamed into place at the end; on an object
    store the metadata file is written last. Either way a failed conversion leaves nothing behind.
    """
    shards = _check_shards(shards)
    if holdout is not None:
        from .holdout import check_fraction
        holdout = check_fraction(holdout)
    out_loc = _output(out)
    if out_loc.exists():
        raise DataError(f"{out_loc}: output directory already exists; convert never overwrites - choose a new "
                        f"--out or delete it first (to add data to a converted dataset use `rayoffline data append`)")
    plan = plan_source(source, mapping, BLOCK_BYTES)
    spaces = _resolve_spaces(plan, env_id=env_id)

    created = tmp = None
    if out_loc.local:
        out_path = Path(out_loc.path)
        created = _missing_ancestor(out_path.parent)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:12]}"
        stage = locate(tmp)
    else:
        stage = out_loc
    try:
        stage.mkdir()
        res = _convert_partition(plan, spaces, stage / "part-00000", shards, first_id=0)
        part = res.partition("part-00000")
        obs_mean, obs_std = Moments.merge(res.obs)
        r_mean, r_std = Moments.merge(res.rew)
        meta = build_metadata(
            source=res.source_id, env_id=spaces.env_id, env_spec=spaces.env_spec,
            observation_space=res.obs_space, action_space=res.act_space, num_transitions=res.rows,
            returns=res.returns, lengths=res.lengths, num_terminations=res.terminations,
            num_truncations=res.truncations, obs_mean=obs_mean, obs_std=obs_std, reward_mean=float(r_mean[0]),
            reward_std=float(r_std[0]), ref_min_score=plan.ref_min_score, ref_max_score=plan.ref_max_score,
            partitions=[part])
        if holdout is not None:
            from .holdout import extend
            meta["holdout"] = extend([stage / "part-00000" / f for f in part["files"]], holdout, holdout_seed)
        write_metadata(stage, meta)
        if tmp is not None:
            if out_loc.exists():
                raise DataError(f"{out_loc}: appeared while converting (another process?); nothing was written")
            os.rename(tmp, out_loc.path)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
        else:
            out_loc.rmtree()
        raise
    _warn(res.notes)
    return meta


def _output(out: str | os.PathLike) -> Location:
    """Where to write: a URI as given, a local path made absolute (messages name it so)."""
    s = os.fspath(out)
    from .storage import is_uri
    return locate(s if is_uri(s) else str(Path(s).expanduser().absolute()))


def append(source: str, to: str | os.PathLike, mapping: dict[str, str] | None = None,
           shards: int | None = None, allow_duplicate: bool = False) -> dict[str, Any]:
    """Add `source` to converted dataset `to` (a local directory or a filesystem URI) as a new partition
    part-0000N; returns the updated metadata.

    Existing files are never touched: locally the partition is written into a hidden directory inside `to`,
    renamed to part-0000N, and only then the metadata file is replaced atomically (on an object store the
    partition is written under its final name, which readers ignore until the new metadata lists it).
    Observation shape and action space must match the dataset's (actions are checked against its bounds); new
    episodes get ids after the existing ones. On any failure the dataset is left exactly as it was.

    shards: Parquet files of the new partition (default: by size as in `convert`, see `default_shards`).
    allow_duplicate: a partition's content hash covers its transitions with episode ids counted from 0 within
    the partition, so the same source appended twice has the hash of the partition it repeats; that is refused
    (duplicate transitions would weigh those episodes twice) unless allow_duplicate=True, which is recorded in
    the new partition as "duplicate_of": NAME.
    """
    root = _output(to)
    read_metadata(root)  # a clear error before anything else when `to` is not a dataset
    with _append_lock(root):
        return _append_locked(source, root, mapping, shards, allow_duplicate)


@contextlib.contextmanager
def _append_lock(root: Location):
    """Appends to one local dataset run one at a time: an advisory lock on the directory itself (no lock file,
    so a failed append leaves the directory exactly as it was; readers never take it). Object stores have no
    such lock (see the module docstring)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    if not root.local:
        yield
        return
    fd = os.open(root.path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _append_locked(source: str, root: Location, mapping: dict[str, str] | None, shards: int | None,
                   allow_duplicate: bool) -> dict[str, Any]:
    shards = _check_shards(shards)
    meta = read_metadata(root)
    plan = plan_source(source, mapping, BLOCK_BYTES)
    spaces = _resolve_spaces(plan, existing=meta)
    old = _existing(root, meta)
    first_id = old.max_id + 1

    name = f"part-{_next_partition_index(root, meta):05d}"
    final = root / name
    if root.local:
        tmp = root / f".{name}.tmp-{uuid.uuid4().hex[:12]}"
    else:
        tmp = final  # unlisted until the metadata names it
    moved = False
    try:
        tmp.mkdir()
        res = _convert_partition(plan, spaces, tmp, shards, first_id=first_id)
        part_hash = res.content_hash  # episode ids still count from 0: the partition's own content
        same = [p for p in meta["partitions"] if p.get("content_hash") == part_hash]
        if same and not allow_duplicate:
            p = same[0]
            raise DuplicatePartition(f"{res.source_id}: its {res.rows} transitions are already in {root} as "
                                     f"partition {p['name']} (from {p.get('source')}, same content hash "
                                     f"{part_hash[:12]}); appending them again would count those episodes twice - "
                                     f"pass --allow-duplicate (allow_duplicate=True) if that is what you want",
                                     p["name"])
        others = [p["name"] for p in meta["partitions"] if bool(p.get("action_logp")) != bool(res.action_logp)]
        if others:  # a mix: the dataset as a whole has no logged probabilities (schema.py)
            res.notes.append(_logp_note(res.source_id, name, bool(res.action_logp), others))
        part = res.partition(name)
        if same:
            part["duplicate_of"] = same[0]["name"]
        new_mean, new_std = Moments.merge(res.obs)
        obs_mean, obs_std = pool_moments([(int(meta["num_transitions"]), meta["obs_mean"], meta["obs_std"]),
                                          (res.rows, new_mean, new_std)])
        r_mean, r_std = Moments.merge(old.rew + res.rew)
        new_meta = build_metadata(
            source=meta["source"], env_id=meta.get("env_id"), env_spec=meta.get("env_spec"),
            observation_space=meta["observation_space"], action_space=meta["action_space"],
            num_transitions=old.rows + res.rows, returns=np.concatenate([old.returns, res.returns]),
            lengths=np.concatenate([old.lengths, res.lengths]),
            num_terminations=old.terminations + res.terminations, num_truncations=old.truncations + res.truncations,
            obs_mean=obs_mean, obs_std=obs_std, reward_mean=float(r_mean[0]), reward_std=float(r_std[0]),
            ref_min_score=meta.get("ref_min_score"), ref_max_score=meta.get("ref_max_score"),
            partitions=list(meta["partitions"]) + [part])
        for k, v in meta.items():  # keep keys we do not manage (written by newer code or by hand)
            if k != "action_logp":  # build_metadata decides it from the partitions
                new_meta.setdefault(k, v)
        if meta.get("holdout"):  # the new partition is split as the dataset's first ones were
            from .holdout import extend
            h = meta["holdout"]
            new_meta["holdout"] = extend([tmp / f for f in part["files"]], float(h["fraction"]),
                                         int(h.get("seed", 0)), h)
        if tmp is not final:
            if final.exists():
                raise DataError(f"{final}: appeared while appending (another process?); nothing was changed")
            os.rename(tmp.path, final.path)
            moved = True
        write_metadata(root, new_meta)
    except BaseException:
        tmp.rmtree()
        if moved:
            final.rmtree()
        raise
    _warn(res.notes)
    return new_meta


def _logp_note(source_id: str, name: str, has: bool, others: list[str]) -> str:
    """What appending a partition with (or without) logged action probabilities to a dataset whose partitions
    `others` lack (have) them means (schema.py): the dataset as a whole no longer has them."""
    listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
    which = (f"with logged action probabilities (column action_logp), but partition(s) {listed} have none" if has
             else f"without logged action probabilities, but partition(s) {listed} have them (column action_logp)")
    return (f"{source_id}: appended as {name} {which}; nothing is filled in, so the dataset as a whole has none now: "
            f"off-policy evaluation fits a behavior model (wis, pdwis, dr) and refuses is and pdis")


def _warn(notes: list[str]) -> None:
    """What the user should know about a finished conversion (also in the partition's `notes` in the metadata);
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


class _Spaces:
    """What the driver knows about the spaces before reading data; None: inferred from the blocks."""

    def __init__(self, obs_space: dict | None, act_space: dict | None, env_id: str | None, env_spec: str | None,
                 appended: bool):
        self.obs_space, self.act_space, self.env_id, self.env_spec = obs_space, act_space, env_id, env_spec
        self.appended = appended


def _resolve_spaces(plan: SourcePlan, env_id: str | None = None, existing: dict | None = None) -> _Spaces:
    """The spaces (and env id/spec to record) from the source, `env_id`, or `existing` (the metadata of the
    dataset being appended to: its spaces win and the source's must match)."""
    from .sources.minari_datasets import space_json

    env_spec = plan.env_spec
    out_env_id = plan.env_id
    obs_space, act_space = plan.observation_space, plan.action_space
    if existing is not None:
        where = "the dataset being appended to"
        for label, ours, theirs in (("observation", plan.observation_space, existing["observation_space"]),
                                    ("action", plan.action_space, existing["action_space"])):
            if ours is not None and not _same_space(ours, theirs):
                raise DataError(f"{plan.source_id}: {label} space {_space_str(ours) if label == 'action' else ours['shape']} "
                                f"does not match {where} ({_space_str(theirs) if label == 'action' else theirs['shape']})")
        return _Spaces(existing["observation_space"], existing["action_space"], out_env_id, env_spec, True)
    if env_id is not None:
        out_env_id = env_id
        env_spec = None
    want_env = env_id or (plan.env_id if obs_space is None or act_space is None else None)
    made = _env_spaces(want_env) if want_env else None
    if made is not None:
        if env_id is not None or env_spec is None:
            env_spec = made[2]
        if obs_space is None:
            obs_space = space_json(made[0], f"env {want_env}", "observation")
        if act_space is None:
            act_space = space_json(made[1], f"env {want_env}", "action")
    return _Spaces(obs_space, act_space, out_env_id, env_spec, False)


def _check_block(data: SourceData, obs_space: dict | None, act_space: dict | None, appended: bool) -> dict:
    """Check one block's chunks against each other and against the known spaces (in a conversion task); returns
    what the driver needs to check blocks against each other and to infer unknown spaces."""
    chunks = [c for c in data.chunks if len(c)]
    first = chunks[0]
    d0 = first.observations.shape[1]
    for c in chunks[1:]:
        if c.observations.shape[1] != d0:
            raise DataError(f"observation dimension changes between files: {first.file} has {d0} values per row "
                            f"in column {first.columns['observations']!r}, {c.file} has {c.observations.shape[1]} "
                            f"in column {c.columns['observations']!r}; all files must hold one observation space")
        if c.discrete != first.discrete or (not c.discrete and c.actions.shape[1] != first.actions.shape[1]):
            raise DataError(f"action space changes between files: {first.file} has {_kind(first)} actions in "
                            f"column {first.columns['actions']!r}, {c.file} has {_kind(c)} in column "
                            f"{c.columns['actions']!r}")
    for c in chunks[1:]:
        if (c.action_logp is None) != (first.action_logp is None):
            a, b = (first, c) if c.action_logp is None else (c, first)
            raise DataError(f"{b.file}: has no logged action probabilities but {a.file} has them (column "
                            f"{a.columns['action_logp']!r}); all files need the same columns")
    info: dict[str, Any] = {"file": first.file, "obs_column": first.columns["observations"], "obs_dim": d0,
                            "act_column": first.columns["actions"], "kind": _kind(first), "discrete": first.discrete,
                            "logp_column": first.columns.get("action_logp") if first.action_logp is not None else None}
    if obs_space is not None:
        want_d = int(np.prod(obs_space["shape"]))
        if want_d != d0:
            raise DataError(f"{first.file}: observations have {d0} values per row (column "
                            f"{first.columns['observations']!r}) but the observation space has shape "
                            f"{obs_space['shape']}" + (" (the dataset being appended to)" if appended else ""))
    if act_space is not None:
        for c in chunks:
            _check_actions(c, act_space, appended=appended)
    elif first.discrete:
        for c in chunks:
            if c.actions.min() < 0:
                r = int(np.argmax(c.actions < 0))
                raise DataError(f"{c.file}: column {c.columns['actions']!r} holds the negative discrete action "
                                f"{int(c.actions[r])} at {c.describe(r)}; Discrete actions are 0..n-1")
        info["act_max"] = max(int(c.actions.max()) for c in chunks)
    else:
        info["act_lo"] = np.min([c.actions.min(0) for c in chunks], axis=0)
        info["act_hi"] = np.max([c.actions.max(0) for c in chunks], axis=0)
    return info


def _kind(x: Chunk) -> str:
    return "discrete (integer)" if x.discrete else f"continuous with {x.actions.shape[1]} values"


def _check_blocks_agree(first: dict, other: dict) -> None:
    """Blocks must hold one observation and action space (the messages _check_block gives within a block)."""
    if other["obs_dim"] != first["obs_dim"]:
        raise DataError(f"observation dimension changes between files: {first['file']} has {first['obs_dim']} values "
                        f"per row in column {first['obs_column']!r}, {other['file']} has {other['obs_dim']} in column "
                        f"{other['obs_column']!r}; all files must hold one observation space")
    if other["kind"] != first["kind"]:
        raise DataError(f"action space changes between files: {first['file']} has {first['kind']} actions in "
                        f"column {first['act_column']!r}, {other['file']} has {other['kind']} in column "
                        f"{other['act_column']!r}")
    if (other["logp_column"] is None) != (first["logp_column"] is None):
        a, b = (first, other) if other["logp_column"] is None else (other, first)
        raise DataError(f"{b['file']}: has no logged action probabilities but {a['file']} has them (column "
                        f"{a['logp_column']!r}); all files need the same columns (convert them separately and "
                        f"`rayoffline data append` the others)")


def _infer_spaces(spaces: _Spaces, infos: list[dict]) -> tuple[dict, dict]:
    """The observation and action spaces: the known ones, else inferred from the blocks (module docstring)."""
    obs_space, act_space = spaces.obs_space, spaces.act_space
    if obs_space is None:
        d0 = infos[0]["obs_dim"]
        obs_space = {"type": "Box", "shape": [d0], "low": [-np.inf] * d0, "high": [np.inf] * d0, "dtype": "float32"}
    if act_space is None:
        if infos[0]["discrete"]:
            act_space = {"type": "Discrete", "n": max(i["act_max"] for i in infos) + 1}
        else:
            lo = np.min([i["act_lo"] for i in infos], axis=0)
            hi = np.max([i["act_hi"] for i in infos], axis=0)
            if lo.min() >= -1.0 and hi.max() <= 1.0:
                lo, hi = np.full_like(lo, -1.0), np.full_like(hi, 1.0)
            act_space = {"type": "Box", "shape": [len(lo)], "low": [float(x) for x in lo],
                         "high": [float(x) for x in hi]}
    return obs_space, act_space


# ---------------------------------------------------------------------------------------------------------
# episodes

def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _assemble(data: SourceData) -> tuple[dict[str, np.ndarray], int, tuple[int, int, int, int] | None]:
    """Whole columns in schema order: rows grouped by episode (first-appearance order), ordered by step; the
    number of episodes; what was dropped at episode ends when next observations are derived (rows dropped, of
    rows, how many of those were truncated, single-row episodes that vanished: see the module docstring and
    `_drop_note`), else None. No rows left is not an error here (a block may lose every row); the caller
    checks the whole source."""
    chunks = [c for c in data.chunks if len(c)]
    derive = chunks[0].next_observations is None
    obs = _cat([c.observations for c in chunks])
    act = _cat([c.actions for c in chunks])
    rew = _cat([c.rewards for c in chunks])
    term = _cat([c.terminations for c in chunks]).copy()
    trunc = _cat([c.truncations for c in chunks]).copy()
    nxt = None if derive else _cat([c.next_observations for c in chunks])
    logp = _cat([c.action_logp for c in chunks]) if chunks[0].action_logp is not None else None
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
        if logp is not None:
            logp = logp[perm]

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

    drops = None
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
        drops = (int(dropped.size), int(n), int(trunc[dropped].sum()), int((~ok).sum()))
        trunc[prev[ok]] = True
        if dropped.size:
            keep = ~drop
            obs, act, rew, nxt, term, trunc, eid = (obs[keep], act[keep], rew[keep], nxt[keep], term[keep],
                                                    trunc[keep], eid[keep])
            if logp is not None:
                logp = logp[keep]
        n = len(rew)
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
    if logp is not None:  # the optional column, after the schema's (schema.py)
        cols["action_logp"] = np.ascontiguousarray(logp, dtype=np.float32)
    assert tuple(cols) == COLUMNS + (("action_logp",) if logp is not None else ())
    return cols, len(starts), drops


# ---------------------------------------------------------------------------------------------------------
# writing

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


def _next_partition_index(root: Location, meta: dict) -> int:
    used = [-1]
    for name in [p["name"] for p in meta["partitions"]] + root.listdir():
        m = re.fullmatch(r"part-(\d+)", name)
        if m:
            used.append(int(m.group(1)))
    return max(used) + 1


def _to_table(cols: dict[str, np.ndarray]):
    import pyarrow as pa

    arrays = {}
    for k, a in cols.items():
        if a.ndim == 2:
            arrays[k] = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
        else:
            arrays[k] = pa.array(a)
    return pa.table(arrays)


def _write_shard(table, loc: Location) -> None:
    """The one Parquet writer: every shard of every partition is written by this function, in this process
    (small sources) or in a Ray task (large ones), so both paths make the same files. A local file is written
    aside and renamed, so it is never half there; an object store shows an object only once it is whole."""
    import pyarrow.parquet as pq

    if not loc.local:
        loc.parent.mkdir()
        pq.write_table(table, loc.path, filesystem=loc.fs, row_group_size=ROW_GROUP_ROWS)
        return
    os.makedirs(os.path.dirname(loc.path), exist_ok=True)  # also on a node that does not share the driver's disk
    tmp = f"{loc.path}.tmp-{os.getpid()}"
    try:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
        os.replace(tmp, loc.path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


# ---------------------------------------------------------------------------------------------------------
# the pipeline: blocks assembled by tasks, merged in order by the driver, written by file tasks

def _assemble_block(block: Block, obs_space: dict | None, act_space: dict | None, appended: bool):
    """Read, check and assemble one block (a conversion task): (summary, Arrow table of its rows or None)."""
    data = read_block(block)
    summary: dict[str, Any] = {"all_files": [c.file for c in data.chunks], "rllib": bool(data.extra.get("rllib")),
                               "src_rows": sum(len(c) for c in data.chunks), "rows": 0, "drops": None}
    if not summary["src_rows"]:
        return summary, None
    summary["info"] = _check_block(data, obs_space, act_space, appended)
    summary["files"] = [c.file for c in data.chunks if len(c)]
    cols, num_episodes, drops = _assemble(data)
    summary["drops"] = drops
    n = len(cols["rewards"])
    if n == 0:
        return summary, None
    returns, lengths = episode_returns(cols["rewards"], cols["episode_id"])
    summary.update(rows=n, episodes=num_episodes, returns=returns, lengths=lengths,
                   terminations=int(cols["terminations"].sum()), truncations=int(cols["truncations"].sum()),
                   obs=Moments.of(cols["observations"]), rew=Moments.of(cols["rewards"]),
                   nbytes=int(sum(a.nbytes for a in cols.values())))
    return summary, _to_table(cols)


def _drop_note(source_id: str, dropped: int, n: int, n_trunc: int, lost: int) -> str:
    return (f"{source_id}: dropped {dropped} of {n} rows: without a next-observation column a row's "
            f"next observation is the next row's, so the last row of each episode that does not end in a "
            f"termination ({n_trunc} truncated, {dropped - n_trunc} without either flag) has "
            f"none; the row before it now ends the episode as truncated"
            + (f" ({lost} single-row episodes vanished)" if lost else "")
            + ". Map next_observations=COLUMN to keep every row")


class _Result:
    """A converted partition: what the metadata needs."""

    def __init__(self, **kw: Any):
        self.__dict__.update(kw)

    def partition(self, name: str) -> dict[str, Any]:
        out = {"name": name, "source": self.source_id, "files": self.files, "num_transitions": int(self.rows),
               "num_episodes": int(len(self.returns)), "content_hash": self.content_hash,
               "hash_piece_rows": int(self.piece_rows), "notes": list(self.notes)}
        if self.action_logp:  # only then: metadata of data without the column is what it always was
            out["action_logp"] = True
        return out


def _local_write_max_bytes() -> int:
    env = os.environ.get("RAYOFFLINE_LOCAL_WRITE_MAX_BYTES")
    return int(env) if env else LOCAL_WRITE_MAX_BYTES


def _convert_partition(plan: SourcePlan, spaces: _Spaces, part_dir: Location, shards: int | None,
                       first_id: int) -> _Result:
    """Convert the planned source into Parquet files in `part_dir` (episode ids from `first_id`): in this
    process for a source up to LOCAL_WRITE_MAX_BYTES, else in Ray tasks."""
    runner = _InProcess() if plan.nbytes <= _local_write_max_bytes() else _run_on_ray()
    try:
        return _Pipeline(plan, spaces, part_dir, shards, first_id, runner).run()
    except BaseException:
        runner.abort()
        raise


class _Pipeline:
    """The driver's side (module docstring): blocks are processed strictly in plan order, so errors, episode
    ids, files and hashes are the same whatever order the tasks finish in."""

    def __init__(self, plan: SourcePlan, spaces: _Spaces, part_dir: Location, shards: int | None, first_id: int,
                 runner: Any):
        self.plan, self.spaces, self.part_dir, self.shards, self.first_id, self.run_ = (plan, spaces, part_dir,
                                                                                     shards, first_id, runner)
        self.pending: deque = deque()  # (block index, handle): submitted, not processed yet
        self.blocks: list[dict[str, Any]] = []  # processed blocks with rows: row0, rows, ep0, table, nbytes
        self.rows = self.episodes = self.src_rows = self.in_bytes = self.out_bytes = 0
        self.all_files: list[str] = []
        self.files_nonempty: list[str] = []
        self.infos: list[dict] = []
        self.returns: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.obs: list[Moments] = []
        self.rew: list[Moments] = []
        self.terms = self.truncs = 0
        self.drops = np.zeros(4, np.int64)  # dropped, of rows, truncated, vanished episodes
        self.any_drops = False
        self.rllib = False
        self.n_files: int | None = None
        self.piece_rows = self.row_bytes = 0
        self.launched_end = 0
        self.writes: list[tuple[str, Any, int]] = []  # (file name, handle, rows)

    # --- the loop --------------------------------------------------------------------------------------------
    def run(self) -> _Result:
        blocks = self.plan.blocks
        nxt = 0
        while True:
            while (nxt < len(blocks) and len(self.pending) + self.run_.writing() < _TASKS
                   and (not self.pending or self._room())):
                b = blocks[nxt]
                self.pending.append((nxt, self.run_.assemble(b, self.spaces)))
                nxt += 1
            if not self.pending:
                if nxt == len(blocks):
                    break
                self.run_.wait_write()  # every slot is writing: the next block waits for one
                continue
            i, handle = self.pending.popleft()
            self._take(blocks[i], self.run_.summary(handle), self.run_.table(handle))
            if nxt < len(blocks) or self.pending:
                self._launch(done=False)
        self._finish_checks()
        self._launch(done=True)
        digests: list[bytes] = []
        names: list[str] = []
        for name, handle, rows in self.writes:
            res = self.run_.result(handle)
            if res["rows"] != rows:  # a bug to report, not bad input
                raise RuntimeError(f"{self.part_dir / name}: {res['rows']} rows written, {rows} expected")
            digests.extend(res["digests"])
            names.append(name)
        found = set(self.part_dir.listdir())
        missing = [f for f in names if f not in found]
        if missing:
            raise DataError(f"{self.part_dir}: {len(names) - len(missing)} Parquet file(s) written here, expected "
                            f"{len(names)}; when Ray runs on several machines, --out must be on a filesystem they "
                            f"all share (or an object store)")
        source_id = self.plan.source_id
        if self.rllib and source_id.split(":", 1)[0] in ("parquet", "csv"):
            source_id = "rllib:" + source_id.split(":", 1)[1]
        notes = [_drop_note(source_id, *map(int, self.drops))] if self.any_drops and self.drops[0] else []
        obs_space, act_space = _infer_spaces(self.spaces, self.infos)
        return _Result(source_id=source_id, obs_space=obs_space, act_space=act_space, rows=self.rows,
                       action_logp=self.infos[0]["logp_column"] is not None,
                       returns=np.concatenate(self.returns), lengths=np.concatenate(self.lengths),
                       terminations=self.terms, truncations=self.truncs, obs=self.obs, rew=self.rew, notes=notes,
                       files=names, piece_rows=self.piece_rows,
                       content_hash=partition_hash(digests, self.rows, self.piece_rows))

    def _room(self) -> bool:
        """Whether another block may be assembled now: the blocks held for writing stay within about one file,
        one hash piece and two blocks (always true before the first file is sized)."""
        if self.n_files is None or not self.rows:
            return True
        held = sum(b["nbytes"] for b in self.blocks if b["table"] is not None)
        per_block = max(b["nbytes"] for b in self.blocks)
        file_bytes = self._estimated_rows() * self.row_bytes / self.n_files
        return held + len(self.pending) * per_block < file_bytes + self.piece_rows * self.row_bytes + 2 * per_block

    def _take(self, block: Block, s: dict, table: Any) -> None:
        """Merge one block's summary (in plan order)."""
        self.in_bytes += block.nbytes
        self.all_files.extend(s["all_files"])
        self.src_rows += s["src_rows"]
        self.rllib |= s["rllib"]
        if s["drops"] is not None:
            self.any_drops = True
            self.drops += np.asarray(s["drops"], np.int64)
        if "info" in s:
            if self.infos:
                _check_blocks_agree(self.infos[0], s["info"])
            self.infos.append(s["info"])
            self.files_nonempty.extend(s["files"])
        if not s["rows"]:
            return
        self.blocks.append({"row0": self.rows, "rows": s["rows"], "ep0": self.episodes, "table": table,
                            "nbytes": s["nbytes"]})
        self.rows += s["rows"]
        self.episodes += s["episodes"]
        self.out_bytes += s["nbytes"]
        self.returns.append(s["returns"])
        self.lengths.append(s["lengths"])
        self.obs.append(s["obs"])
        self.rew.append(s["rew"])
        self.terms += s["terminations"]
        self.truncs += s["truncations"]
        if not self.row_bytes:
            self.row_bytes = s["nbytes"] // s["rows"]
            self.piece_rows = piece_rows(self.row_bytes)

    def _estimated_rows(self) -> int:
        """Rows the partition will have: those assembled, and the rest of the plan at the rate seen so far."""
        rest = max(self.plan.nbytes - self.in_bytes, 0)
        return self.rows + int(rest * self.rows / max(self.in_bytes, 1))

    def _finish_checks(self) -> None:
        """Errors about the whole source, once every block is in."""
        if not self.src_rows:
            files = ", ".join(self.all_files) or self.plan.source_id
            raise DataError(f"{files}: no transitions (empty dataset); nothing to convert")
        if not self.rows:
            raise DataError(f"{', '.join(self.files_nonempty)}: no transitions left (empty dataset): every episode "
                            f"has a single row and no next observation; provide next observations (map "
                            f"next_observations=COLUMN)")

    # --- files ---------------------------------------------------------------------------------------------
    def _launch(self, done: bool) -> None:
        """Start the write tasks whose rows (and hash pieces) are all assembled: file boundaries follow the
        estimated total until the last block is in, then np.linspace over what is left (a source of one block
        gets exactly the files it got before streaming)."""
        if not self.rows:
            return
        if self.n_files is None:
            if self.shards is not None:
                self.n_files = self.shards
            else:
                self.n_files = default_shards(self._estimated_rows() * self.row_bytes if not done else self.out_bytes)
        while len(self.writes) < self.n_files and self.launched_end < self.rows:
            left = self.n_files - len(self.writes)
            if done:
                k = max(1, min(left, self.rows - self.launched_end))
                bounds = np.linspace(self.launched_end, self.rows, k + 1).round().astype(np.int64)
                for a, b in zip(bounds[:-1], bounds[1:]):
                    self._write(int(a), int(b), done=True)
                return
            if left == 1:
                return  # the last file ends where the data does
            est = max(self._estimated_rows(), self.rows)
            end = int(round(self.launched_end + (est - self.launched_end) / left))
            end = max(end, self.launched_end + 1)
            last_piece = (end - 1) // self.piece_rows * self.piece_rows
            need = max(end, last_piece + self.piece_rows if last_piece >= self.launched_end else end)
            if need > self.rows:
                return
            self._write(self.launched_end, end, done=False)

    def _write(self, start: int, end: int, done: bool) -> None:
        r = self.piece_rows
        first_piece = -(-start // r) * r
        pieces = [(p, min(p + r, self.rows) if done else p + r) for p in range(first_piece, end, r)]
        hi = max([end] + [b for _, b in pieces])
        use = [b for b in self.blocks if b["row0"] < hi and b["row0"] + b["rows"] > start]
        while self.run_.writing() >= _TASKS:  # no more tasks at once than this node has cores
            self.run_.wait_write()
        name = _shard_name(len(self.writes))
        job = {"path": self.part_dir / name, "start": start, "end": end, "pieces": pieces, "first_id": self.first_id,
               "blocks": [(b["row0"], b["ep0"]) for b in use]}
        self.writes.append((name, self.run_.write(job, [b["table"] for b in use]), end - start))
        self.launched_end = end
        for b in self.blocks:  # no later file needs rows before `end`
            if b["row0"] + b["rows"] <= end:
                b["table"] = None


def _slices(blocks: list[tuple[tuple[int, int], Any]], start: int, stop: int) -> list[tuple[Any, int]]:
    """(table slice, episode id offset) of the rows [start, stop) of the partition."""
    out = []
    for (row0, ep0), t in blocks:
        lo, hi = max(start, row0), min(stop, row0 + t.num_rows)
        if lo < hi:
            out.append((t.slice(lo - row0, hi - lo), ep0))
    return out


def _numpy_columns(t, ep0: int) -> dict[str, np.ndarray]:
    """An assembled table slice as the numpy columns content_hash sees (episode ids offset by ep0)."""
    import pyarrow as pa

    out = {}
    for name in COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if c in t.column_names):
        col = t.column(name)
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        if pa.types.is_fixed_size_list(arr.type):
            out[name] = arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
        else:
            out[name] = arr.to_numpy(zero_copy_only=False)
    if ep0:
        out["episode_id"] = out["episode_id"] + ep0
    return out


def _with_ids(t, offset: int):
    """The table with `offset` added to its episode ids."""
    if not offset:
        return t
    import pyarrow as pa
    import pyarrow.compute as pc

    i = t.schema.get_field_index("episode_id")
    return t.set_column(i, "episode_id", pc.add(t.column(i), pa.scalar(offset, pa.int64())))


def _write_file(job: dict, *tables) -> dict[str, Any]:
    """Write rows [start, end) of the partition as one Parquet file and hash the pieces that start in them (a
    write task). `tables`: the assembled blocks that hold those rows, and the rows of the pieces."""
    import pyarrow as pa

    blocks = list(zip(job["blocks"], tables))
    parts = [_with_ids(t, ep0 + job["first_id"]) for t, ep0 in _slices(blocks, job["start"], job["end"])]
    table = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
    _write_shard(table, job["path"])
    digests = [piece_digest([_numpy_columns(t, ep0) for t, ep0 in _slices(blocks, a, b)]) for a, b in job["pieces"]]
    from .storage import read_parquet_metadata
    return {"rows": read_parquet_metadata(job["path"]).num_rows, "digests": digests}


class _InProcess:
    """Runs the pipeline's tasks in this process, as they are submitted."""

    def assemble(self, block: Block, sp: _Spaces):
        return _assemble_block(block, sp.obs_space, sp.act_space, sp.appended)

    def summary(self, handle):
        return handle[0]

    def table(self, handle):
        return handle[1]

    def write(self, job: dict, tables: list):
        return _write_file(job, *tables)

    def result(self, handle):
        return handle

    def writing(self) -> int:
        return 0

    def wait_write(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _run_on_ray() -> "_OnRay":
    """The pipeline's tasks as Ray tasks (starting or joining Ray)."""
    return _OnRay()


class _OnRay:
    """Runs the pipeline's tasks as Ray tasks, preferring this node (so a cluster without a shared filesystem
    still reads the source and leaves the files where the driver is)."""

    def __init__(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from .._ray import ensure_ray

        ensure_ray()
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self._assemble = ray.remote(_assemble_block).options(num_returns=2, scheduling_strategy=here)
        self._write = ray.remote(_write_file).options(scheduling_strategy=here)
        self._refs: list[Any] = []
        self._writing: list[Any] = []

    def assemble(self, block: Block, sp: _Spaces):
        refs = self._assemble.remote(block, sp.obs_space, sp.act_space, sp.appended)
        self._refs.append(refs[0])  # the summary's: holding the table's would keep every block in the object store
        return refs

    def summary(self, handle):
        return _get(handle[0])

    def table(self, handle):
        return handle[1]

    def write(self, job: dict, tables: list):
        ref = self._write.remote(job, *tables)
        self._refs.append(ref)
        self._writing.append(ref)
        return ref

    def result(self, handle):
        return _get(handle)

    def writing(self) -> int:
        """Write tasks still running."""
        import ray

        if self._writing:
            _, self._writing = ray.wait(self._writing, num_returns=len(self._writing), timeout=0)
        return len(self._writing)

    def wait_write(self) -> None:
        import ray

        _, self._writing = ray.wait(self._writing, num_returns=1)

    def abort(self) -> None:
        """Stop what is still running and wait until it has: nothing may write after the caller cleans up."""
        import ray

        for ref in self._refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=False)
        with contextlib.suppress(Exception):
            ray.wait(self._refs, num_returns=len(self._refs), timeout=60)


def _get(ref):
    """ray.get, re-raising a task's own error (a DataError: one line naming file, column and row) as itself."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, (RayOfflineError, OSError)):
            raise cause from None
        raise


# ---------------------------------------------------------------------------------------------------------
# the dataset being appended to

class _Existing:
    """Per-episode returns and lengths, counts and reward moments of a dataset's partitions (one pass over its
    scalar columns, a record batch at a time)."""

    def __init__(self) -> None:
        self.rows = self.terminations = self.truncations = 0
        self.max_id = -1
        self.returns = np.zeros(0)
        self.lengths = np.zeros(0, np.int64)
        self.rew: list[Moments] = []


def _existing(root: Location, meta: dict) -> _Existing:
    import pyarrow as pa

    from .metadata import dataset_file_rows

    out = _Existing()
    names = ["rewards", "episode_id", "terminations", "truncations"]
    ids, sums, counts = [], [], []
    for path, _ in dataset_file_rows(root, meta):  # every listed file there, with the row counts metadata says
        try:
            for rb in open_parquet(path).iter_batches(batch_size=ROW_GROUP_ROWS, columns=names):
                r = rb.column(0).to_numpy(zero_copy_only=False)
                e = rb.column(1).to_numpy(zero_copy_only=False)
                u, inv = np.unique(e, return_inverse=True)
                ids.append(u)
                sums.append(np.bincount(inv, weights=r.astype(np.float64)))
                counts.append(np.bincount(inv))
                out.rew.append(Moments.of(r))
                out.rows += len(r)
                out.terminations += int(np.count_nonzero(rb.column(2).to_numpy(zero_copy_only=False)))
                out.truncations += int(np.count_nonzero(rb.column(3).to_numpy(zero_copy_only=False)))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read this shard of the dataset being appended to "
                            f"({type(e).__name__}: {e}); the dataset is damaged - convert it again") from e
    if ids:
        u, inv = np.unique(np.concatenate(ids), return_inverse=True)
        out.returns = np.bincount(inv, weights=np.concatenate(sums))
        out.lengths = np.bincount(inv, weights=np.concatenate(counts)).astype(np.int64)
        out.max_id = int(u[-1])
    return out
