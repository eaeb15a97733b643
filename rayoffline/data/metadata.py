"""The dataset's metadata file (schema.METADATA_FILE, `_rayoffline.json`; `metadata.json` in datasets written
before schema version 2, still read): reading (with errors that name the file), checking the Parquet files
against it, atomic writing, statistics from per-block partials and content hashes.

Statistics follow schema.py. Episode returns are undiscounted sums of the rewards of an episode's stored
transitions; observation mean/std are per dimension over `observations` (not `next_observations`).
Infinite space bounds are written as JSON `Infinity`/`-Infinity`, which Python's json reads back as floats.
Conversions compute statistics per block of whole episodes and merge them (`Moments.merge`, the episode
returns concatenated), so the driver never holds a whole dataset; see convert.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .schema import HASH_PIECE_BYTES, LEGACY_METADATA_FILE, METADATA_FILE, SCHEMA_VERSION
from .storage import Location, locate, read_parquet_metadata

REQUIRED_KEYS = ("schema_version", "source", "content_hash", "env_id", "observation_space", "action_space",
                 "num_transitions", "num_episodes", "obs_mean", "obs_std", "partitions")
PERCENTILES = (5, 25, 50, 75, 95)


def metadata_location(root: str | os.PathLike | Location) -> Location:
    """The metadata file of dataset directory `root`: METADATA_FILE, or LEGACY_METADATA_FILE in a dataset
    written before schema version 2 (METADATA_FILE when neither exists, for messages)."""
    root = locate(root)
    new = root / METADATA_FILE
    if new.is_file():
        return new
    old = root / LEGACY_METADATA_FILE
    return old if old.is_file() else new


def has_metadata(root: str | os.PathLike | Location) -> bool:
    """Whether `root` holds a dataset metadata file (either name)."""
    root = locate(root)
    return (root / METADATA_FILE).is_file() or (root / LEGACY_METADATA_FILE).is_file()


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of converted dataset directory `path` (a local path or a filesystem URI; or the metadata
    file itself): DataError naming the file if missing or corrupt."""
    loc = locate(path)
    if loc.name.endswith(".json") and not loc.is_dir():
        file = loc
    elif not loc.exists():
        raise DataError(f"{loc}: no such dataset directory (make one with `rayoffline data convert SOURCE --out DIR`)")
    else:
        file = metadata_location(loc)
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise DataError(f"{file}: missing; {file.parent} is not a converted dataset directory (make one with "
                        f"`rayoffline data convert SOURCE --out DIR`)") from None
    except OSError as e:
        if not file.exists():
            raise DataError(f"{file}: missing; {file.parent} is not a converted dataset directory (make one with "
                            f"`rayoffline data convert SOURCE --out DIR`)") from None
        raise DataError(f"{file}: cannot read ({e})") from e
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise DataError(f"{file}: corrupt JSON ({e}); restore it or convert the source again") from e
    if not isinstance(meta, dict):
        raise DataError(f"{file}: corrupt: expected a JSON object, found {type(meta).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise DataError(f"{file}: corrupt or not a rayoffline dataset: missing keys {', '.join(missing)}")
    version = meta["schema_version"]
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise DataError(f"{file}: schema_version {version!r} is newer than this rayoffline supports "
                        f"({SCHEMA_VERSION}); upgrade rayoffline")
    if not isinstance(meta["partitions"], list) or not all(
            isinstance(p, dict) and "name" in p and "files" in p for p in meta["partitions"]):
        raise DataError(f"{file}: corrupt: 'partitions' must be a list of {{name, files, ...}} objects")
    return meta


def dataset_file_rows(path: str | os.PathLike, meta: dict[str, Any]) -> list[tuple[Path | str, int]]:
    """(file, rows) of every Parquet file the metadata lists, checked against it: every listed file must exist
    and the row counts in the files' footers (no data is read) must add up to each partition's and the whole
    dataset's `num_transitions`. Files that the metadata does not list are not part of the dataset (e.g. a
    partition an append is still writing) and are ignored. A file is a Path for a local dataset, a URI string
    otherwise (open it with storage.open_parquet)."""
    root = locate(path)
    where = metadata_location(root)
    listed = [(p, root / p["name"] / f) for p in meta["partitions"] for f in p["files"]]
    present = root.files_exist([f for _, f in listed])
    missing = [f"{p['name']}/{f.name}" for (p, f), ok in zip(listed, present) if not ok]
    if missing:
        names = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        if len(missing) == len(listed):
            found = root.glob_parquet()
            raise DataError(f"{root}: no Parquet files: all {len(listed)} file(s) {where.name} lists are missing "
                            f"({names})" + (f"; found unlisted {', '.join(found[:3])}" if found else "")
                            + "; is it a converted dataset directory? Restore the files or convert the source again")
        raise DataError(f"{root}: {len(missing)} of {len(listed)} Parquet file(s) listed in {where.name} are "
                        f"missing: {names}; the dataset is incomplete - restore them or convert the source again")
    if not listed:
        raise DataError(f"{where}: lists no Parquet files (no partitions); convert a source into it again")
    out: list[tuple[Path | str, int]] = []
    part_rows: dict[str, int] = {}
    for part, f in listed:
        try:
            n = read_parquet_metadata(f).num_rows  # the footer only
        except Exception as e:  # noqa: BLE001 - any Arrow failure here means the file is unreadable
            raise DataError(f"{f}: unreadable Parquet file ({e}); restore it or convert the source again") from e
        out.append((f.public(), n))
        part_rows[part["name"]] = part_rows.get(part["name"], 0) + n
    for part in meta["partitions"]:
        want = part.get("num_transitions")
        if isinstance(want, int) and part_rows.get(part["name"], 0) != want:
            raise DataError(f"{root / part['name']}: its {len(part['files'])} Parquet file(s) hold "
                            f"{part_rows.get(part['name'], 0)} rows but {where.name} says partition {part['name']!r} "
                            f"has {want} transitions; a file was truncated, replaced or rewritten - restore it or "
                            f"convert the source again")
    total, want = sum(n for _, n in out), meta.get("num_transitions")
    if isinstance(want, int) and total != want:
        raise DataError(f"{root}: the Parquet files hold {total} rows but {where.name} says num_transitions is "
                        f"{want}; restore the dataset or convert the source again")
    return out


def write_metadata(directory: str | os.PathLike | Location, meta: dict[str, Any]) -> Path | str:
    """Write DIR/_rayoffline.json atomically and return its path.

    Locally: a temporary file in DIR, flushed, then os.replace; created with mode 0666 minus the umask, like
    the Parquet shards next to it (tempfile.mkstemp would make it 0600: unreadable to the team that reads the
    shards). On an object store: one PUT, which readers see whole or not at all. A `metadata.json` of a
    dataset written before schema version 2 is removed once the new file is in place (readers prefer the new
    name, and the old one would stop pandas/pyarrow from reading the directory)."""
    directory = locate(directory)
    final = directory / METADATA_FILE
    data = (json.dumps(meta, indent=1) + "\n").encode()
    if directory.local:
        tmp = os.path.join(directory.path, f".rayoffline.{uuid.uuid4().hex[:12]}.json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    else:
        final.write_bytes(data)
    legacy = directory / LEGACY_METADATA_FILE
    if legacy.is_file():
        try:
            if directory.local:
                os.unlink(legacy.path)
            else:
                directory.fs.delete_file(legacy.path)
        except OSError:
            pass
    return final.public()


def content_hash(columns: dict[str, np.ndarray]) -> str:
    """sha256 over the columns' names, dtypes, shapes and bytes, in the given order (deterministic)."""
    h = hashlib.sha256()
    for name, a in columns.items():
        a = np.ascontiguousarray(a)
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def combine_hashes(hashes: list[str]) -> str:
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def piece_rows(row_bytes: int) -> int:
    """Rows per content-hash piece for transitions of `row_bytes` bytes (as numpy columns; schema.py)."""
    return max(1, HASH_PIECE_BYTES // max(1, int(row_bytes)))


def piece_digest(parts: list[dict[str, np.ndarray]]) -> bytes:
    """sha256 of the rows of `parts` (consecutive slices of one piece, columns in schema order) exactly as
    `content_hash` of their concatenation: no column is concatenated, each slice is fed as it is."""
    h = hashlib.sha256()
    names = list(parts[0])
    n = sum(len(p[names[0]]) for p in parts)
    for name in names:
        first = parts[0][name]
        h.update(f"{name}:{first.dtype.str}:{(n, *first.shape[1:])};".encode())
        for p in parts:
            a = np.ascontiguousarray(p[name])
            if a.size:
                h.update(memoryview(a).cast("B"))
    return h.digest()


def partition_hash(digests: list[bytes], num_rows: int, rows_per_piece: int) -> str:
    """A partition's content hash from its pieces' digests (schema.py): the one piece's own digest (equal to
    `content_hash` of the whole partition, as before schema version 2) or sha256 over the digests in order."""
    if len(digests) == 1:
        return digests[0].hex()
    h = hashlib.sha256(f"pieces:{rows_per_piece}:{num_rows};".encode())
    for d in digests:
        h.update(d)
    return h.hexdigest()


def episode_stats(rewards: np.ndarray, episode_id: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """(return_stats, episode_length_stats) from per-transition rewards and episode ids."""
    returns, lengths = episode_returns(rewards, episode_id)
    return episode_stats_from(returns, lengths)


def episode_returns(rewards: np.ndarray, episode_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-episode (return, length), in episode id order."""
    _, inv = np.unique(episode_id, return_inverse=True)
    return np.bincount(inv, weights=rewards.astype(np.float64)), np.bincount(inv)


def episode_stats_from(returns: np.ndarray, lengths: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """(return_stats, episode_length_stats) from per-episode returns and lengths."""
    ret = {"mean": float(returns.mean()), "std": float(returns.std()), "min": float(returns.min()),
           "max": float(returns.max())}
    for q, v in zip(PERCENTILES, np.percentile(returns, PERCENTILES)):
        ret[f"p{q}"] = float(v)
    length = {"mean": float(lengths.mean()), "min": int(lengths.min()), "max": int(lengths.max())}
    return ret, length


@dataclass
class Moments:
    """Count, per-column mean and (population) std of one block: a partial that `merge` pools."""
    n: int
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> "Moments":
        mean, std = moments(x)
        return cls(len(x), mean, std)

    @staticmethod
    def merge(parts: list["Moments"]) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of the union; one non-empty part gives its own values exactly."""
        parts = [p for p in parts if p.n]
        if len(parts) == 1:
            return parts[0].mean, parts[0].std
        return pool_moments([(p.n, p.mean, p.std) for p in parts])


def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population) std in float64, in blocks to bound the temporary memory."""
    x2 = x.reshape(len(x), -1)
    step = 1 << 18
    n = max(len(x2), 1)
    s = np.zeros(x2.shape[1])
    for i in range(0, len(x2), step):
        s += x2[i:i + step].sum(0, dtype=np.float64)
    mean = s / n
    var = np.zeros_like(mean)  # second pass over mean-free blocks: no E[x^2] - E[x]^2 cancellation
    for i in range(0, len(x2), step):
        var += np.square(x2[i:i + step].astype(np.float64) - mean).sum(0)
    return mean, np.sqrt(var / n)


def pool_moments(parts: list[tuple[int, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of a union from each part's (count, mean, std)."""
    n = sum(p[0] for p in parts)
    mean = sum(p[0] * np.asarray(p[1], np.float64) for p in parts) / n
    second = sum(p[0] * (np.square(np.asarray(p[2], np.float64)) + np.square(np.asarray(p[1], np.float64) - mean))
                 for p in parts) / n
    return mean, np.sqrt(np.maximum(second, 0.0))


def build_metadata(*, source: str, env_id: str | None, env_spec: str | None, observation_space: dict,
                   action_space: dict, num_transitions: int, returns: np.ndarray, lengths: np.ndarray,
                   num_terminations: int, num_truncations: int, obs_mean, obs_std, reward_mean: float,
                   reward_std: float, ref_min_score, ref_max_score, partitions: list[dict]) -> dict[str, Any]:
    """The metadata in schema.py's key order. `returns`/`lengths`: one entry per episode of every partition."""
    ret, length = episode_stats_from(returns, lengths)
    out = {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "content_hash": combine_hashes([p["content_hash"] for p in partitions]),
        "env_id": env_id,
        "env_spec": env_spec,
        "observation_space": observation_space,
        "action_space": action_space,
        "num_transitions": int(num_transitions),
        "num_episodes": int(len(returns)),
        "num_terminations": int(num_terminations),
        "num_truncations": int(num_truncations),
        "return_stats": ret,
        "episode_length_stats": length,
        "obs_mean": [float(x) for x in obs_mean],
        "obs_std": [float(x) for x in obs_std],
        "reward_mean": float(reward_mean),
        "reward_std": float(reward_std),
        "ref_min_score": None if ref_min_score is None else float(ref_min_score),
        "ref_max_score": None if ref_max_score is None else float(ref_max_score),
    }
    if partitions and all(p.get("action_logp") for p in partitions):
        out["action_logp"] = True
    out["partitions"] = partitions
    return out


def has_action_logp(meta: dict[str, Any]) -> bool:
    """Whether every partition of the dataset has the logged log-probability column `action_logp` (schema.py)."""
    parts = meta.get("partitions") or []
    return bool(meta.get("action_logp")) and bool(parts) and all(p.get("action_logp") for p in parts)
