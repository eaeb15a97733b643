"""metadata.json: reading (with errors that name the file), checking the Parquet files against it, atomic
writing, statistics and content hashes.

Statistics follow schema.py. Episode returns are undiscounted sums of the rewards of an episode's stored
transitions; observation mean/std are per dimension over `observations` (not `next_observations`).
Infinite space bounds are written as JSON `Infinity`/`-Infinity`, which Python's json reads back as floats.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .schema import METADATA_FILE, SCHEMA_VERSION

REQUIRED_KEYS = ("schema_version", "source", "content_hash", "env_id", "observation_space", "action_space",
                 "num_transitions", "num_episodes", "obs_mean", "obs_std", "partitions")
PERCENTILES = (5, 25, 50, 75, 95)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata.json of converted dataset directory `path` (DataError naming the file if missing/corrupt)."""
    path = Path(path).expanduser()
    file = path / METADATA_FILE if path.is_dir() or not path.name.endswith(".json") else path
    if not path.exists():
        raise DataError(f"{path}: no such dataset directory (make one with `rayoffline data convert SOURCE --out DIR`)")
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise DataError(f"{file}: missing; {path} is not a converted dataset directory (make one with "
                        f"`rayoffline data convert SOURCE --out DIR`)") from None
    except OSError as e:
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


def dataset_file_rows(path: str | os.PathLike, meta: dict[str, Any]) -> list[tuple[Path, int]]:
    """(file, rows) of every Parquet file metadata.json lists, checked against it: every listed file must exist
    and the row counts in the files' footers (no data is read) must add up to each partition's and the whole
    dataset's `num_transitions`. Files on disk that metadata.json does not list are not part of the dataset
    (e.g. a partition an append is still writing) and are ignored."""
    import pyarrow.parquet as pq

    root = Path(path)
    where = root / METADATA_FILE
    listed = [(p, root / p["name"] / f) for p in meta["partitions"] for f in p["files"]]
    missing = [f for _, f in listed if not f.is_file()]
    if missing:
        names = ", ".join(str(f.relative_to(root)) for f in missing[:5]) + (", ..." if len(missing) > 5 else "")
        if len(missing) == len(listed):
            found = sorted(str(f.relative_to(root)) for f in root.glob("part-*/*.parquet"))
            raise DataError(f"{root}: no Parquet files: all {len(listed)} file(s) {where.name} lists are missing "
                            f"({names})" + (f"; found unlisted {', '.join(found[:3])}" if found else "")
                            + "; is it a converted dataset directory? Restore the files or convert the source again")
        raise DataError(f"{root}: {len(missing)} of {len(listed)} Parquet file(s) listed in {where.name} are "
                        f"missing: {names}; the dataset is incomplete - restore them or convert the source again")
    if not listed:
        raise DataError(f"{where}: lists no Parquet files (no partitions); convert a source into it again")
    out: list[tuple[Path, int]] = []
    part_rows: dict[str, int] = {}
    for part, f in listed:
        try:
            n = pq.read_metadata(f).num_rows  # the footer only
        except Exception as e:  # noqa: BLE001 - any Arrow failure here means the file is unreadable
            raise DataError(f"{f}: unreadable Parquet file ({e}); restore it or convert the source again") from e
        out.append((f, n))
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


def write_metadata(directory: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write DIR/metadata.json atomically: a temporary file in DIR, flushed, then os.replace.

    The file is created with mode 0666 minus the umask, like the Parquet shards next to it (tempfile.mkstemp
    would make it 0600: unreadable to the team that reads the shards)."""
    directory = Path(directory)
    final = directory / METADATA_FILE
    tmp = directory / f".metadata.{uuid.uuid4().hex[:12]}.json.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return final


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


def episode_stats(rewards: np.ndarray, episode_id: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """(return_stats, episode_length_stats) from per-transition rewards and episode ids."""
    _, inv = np.unique(episode_id, return_inverse=True)
    returns = np.bincount(inv, weights=rewards.astype(np.float64))
    lengths = np.bincount(inv)
    ret = {"mean": float(returns.mean()), "std": float(returns.std()), "min": float(returns.min()),
           "max": float(returns.max())}
    for q, v in zip(PERCENTILES, np.percentile(returns, PERCENTILES)):
        ret[f"p{q}"] = float(v)
    length = {"mean": float(lengths.mean()), "min": int(lengths.min()), "max": int(lengths.max())}
    return ret, length


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
                   action_space: dict, rewards: np.ndarray, episode_id: np.ndarray, num_terminations: int,
                   num_truncations: int, obs_mean, obs_std, ref_min_score, ref_max_score,
                   partitions: list[dict]) -> dict[str, Any]:
    """metadata.json in schema.py's key order. `rewards`/`episode_id` cover every partition."""
    ret, length = episode_stats(rewards, episode_id)
    r_mean, r_std = moments(rewards)
    return {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "content_hash": combine_hashes([p["content_hash"] for p in partitions]),
        "env_id": env_id,
        "env_spec": env_spec,
        "observation_space": observation_space,
        "action_space": action_space,
        "num_transitions": int(len(rewards)),
        "num_episodes": int(len(np.unique(episode_id))),
        "num_terminations": int(num_terminations),
        "num_truncations": int(num_truncations),
        "return_stats": ret,
        "episode_length_stats": length,
        "obs_mean": [float(x) for x in obs_mean],
        "obs_std": [float(x) for x in obs_std],
        "reward_mean": float(r_mean[0]),
        "reward_std": float(r_std[0]),
        "ref_min_score": None if ref_min_score is None else float(ref_min_score),
        "ref_max_score": None if ref_max_score is None else float(ref_max_score),
        "partitions": partitions,
    }
