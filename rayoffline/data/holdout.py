"""Held-out episodes: a split by episode, recorded in the dataset's metadata, that training never samples.

Off-policy evaluation and the training diagnostics score a policy on episodes it was not trained on. The split
is chosen once, at conversion (`rayoffline data convert ... --holdout 0.1`), or later for an existing dataset
(`rayoffline data split DIR --holdout 0.1`: the metadata file is replaced atomically, no shard is rewritten), and
every partition appended afterwards is split the same way.

Which episodes: per partition, the round(fraction * E) of its E episodes (at least one when E >= 2) whose
splitmix64 hash of (seed, episode_id) is smallest. That depends only on the seed and the episode ids, so the same
dataset, fraction and seed always give the same split, on any machine, and a partition appended later is split
without touching the earlier choice. The metadata records the result, so readers never recompute it:

    "holdout": {"fraction": 0.1, "seed": 0, "episode_ids": [...sorted...], "num_episodes": n,
                "num_transitions": m}

Readers: `rayoffline.data.load`, `iter_chunks` (hence out-of-core windows) and every training path behind them
read the `episode_id` column along with the Batch columns when the metadata has a split and drop the held-out
rows (`part="train"`, the default); OPE and the diagnostics read `part="holdout"` with `load_episodes`, which
also keeps each row's episode id and step, orders the rows by episode, and returns the behavior policy's logged
log-probabilities (`action_logp`, schema.py) when every partition of the dataset has them (None otherwise).

Dataset statistics (observation mean/std, return statistics) stay those of the whole dataset: they normalize
inputs and describe the data; the split is about which transitions the losses see.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

    from ..batch import Batch

PARTS = ("train", "holdout", "all")


def check_fraction(fraction: float, key: str = "--holdout") -> float:
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a fraction of the episodes in (0, 1), got {fraction!r}") from None
    if not 0.0 < f < 1.0:
        raise ConfigError(f"{key}: expected a fraction of the episodes in (0, 1), e.g. 0.1, got {fraction!r}")
    return f


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def choose(episode_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The held-out episode ids (sorted) among one partition's `episode_ids` (see the module docstring)."""
    ids = np.unique(np.asarray(episode_ids, dtype=np.int64))
    n = len(ids)
    if n < 2:
        return ids[:0]
    take = min(max(1, int(round(fraction * n))), n - 1)
    with np.errstate(over="ignore"):
        key = _splitmix64(ids.astype(np.uint64) + _splitmix64(np.array([seed], dtype=np.int64))[0])
    order = np.lexsort((ids, key))
    return np.sort(ids[order[:take]])


def held_out_ids(meta: dict[str, Any]) -> np.ndarray | None:
    """Sorted held-out episode ids of a dataset, or None when its metadata records no split."""
    h = meta.get("holdout")
    if not h:
        return None
    return np.asarray(h.get("episode_ids", []), dtype=np.int64)


def episode_index(files: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(episode ids, transitions per episode) of the Parquet files, reading only their episode_id column."""
    from .storage import open_parquet

    parts = []
    for f in files:
        try:
            pf = open_parquet(f)
            if "episode_id" not in pf.schema_arrow.names:
                raise DataError(f"{f}: missing column episode_id; re-convert the source")
            parts.append(pf.read(columns=["episode_id"]).column(0).to_numpy())
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - Arrow raises many types for bad files
            raise DataError(f"{f}: unreadable Parquet file ({e})") from e
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ids, counts = np.unique(np.concatenate(parts).astype(np.int64), return_counts=True)
    return ids, counts


def extend(partition_files: Sequence[Any], fraction: float, seed: int,
           previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `holdout` entry after splitting one more partition (its Parquet files) and adding it to `previous`."""
    ids, counts = episode_index(partition_files)
    held = choose(ids, fraction, seed)
    rows = int(counts[np.isin(ids, held)].sum())
    before = np.asarray((previous or {}).get("episode_ids", []), dtype=np.int64)
    return {"fraction": float(fraction), "seed": int(seed),
            "episode_ids": [int(i) for i in np.union1d(before, held)],
            "num_episodes": int(len(before) + len(held)),
            "num_transitions": int((previous or {}).get("num_transitions", 0)) + rows}


def split(path: str | os.PathLike, fraction: float, seed: int = 0, replace: bool = False) -> dict[str, Any]:
    """Record a held-out split in an existing dataset's metadata (no shard is rewritten); returns the new metadata.

    A dataset that already has a different split is refused unless `replace` (runs trained on the old split saw
    episodes the new one holds out)."""
    from .metadata import dataset_file_rows, metadata_location, read_metadata, write_metadata
    from .storage import locate

    fraction = check_fraction(fraction)
    root = locate(path)
    meta = read_metadata(root)
    old = meta.get("holdout")
    if old and not replace:
        if float(old.get("fraction", -1)) == fraction and int(old.get("seed", -1)) == int(seed):
            return meta
        raise ConfigError(f"{metadata_location(root)}: already holds out {old.get('num_episodes')} episodes "
                          f"(fraction {old.get('fraction')}, seed {old.get('seed')}); runs trained on it never saw "
                          f"them. Pass --replace to choose again with fraction {fraction}, seed {seed}")
    rows = dataset_file_rows(root, meta)  # checks every listed file exists with the rows the metadata says
    by_part: dict[str, list[Any]] = {}
    for p in meta["partitions"]:
        by_part[p["name"]] = []
    for f, _ in rows:
        name = str(f).replace("\\", "/").rstrip("/").split("/")[-2]
        by_part.setdefault(name, []).append(f)
    entry: dict[str, Any] | None = None
    for p in meta["partitions"]:
        entry = extend(by_part.get(p["name"], []), fraction, seed, entry)
    if entry is None or entry["num_episodes"] == 0:
        raise DataError(f"{root}: too few episodes to hold any out ({meta.get('num_episodes')} episodes; a partition "
                        f"needs at least 2)")
    new = dict(meta)
    new["holdout"] = entry
    write_metadata(root, new)
    return new


def keep_mask(episode_id: np.ndarray, held: np.ndarray, part: str) -> np.ndarray | None:
    """Rows of `part` among rows with these episode ids (None: keep every row)."""
    if part == "all":
        return None
    inside = np.isin(episode_id, held, assume_unique=False)
    return inside if part == "holdout" else ~inside


def check_part(part: str, meta: dict[str, Any], where: Any) -> np.ndarray | None:
    """The held-out ids that `part` filters by (None: no filtering); an error for part='holdout' without a split."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    held = held_out_ids(meta)
    if part == "holdout" and held is None:
        raise DataError(no_split_message(where))
    return None if part == "all" else held


def no_split_message(where: Any) -> str:
    return (f"{where}: the dataset has no held-out split; make one with `rayoffline data split {where} --holdout "
            f"0.1` (metadata only, no shard rewritten; runs trained before it saw every episode, so retrain them "
            f"for an unbiased estimate), or convert with `--holdout 0.1`")


@dataclass(frozen=True)
class EpisodeRows:
    """Whole episodes, their rows in (episode, step) order."""

    batch: "Batch"
    """The transitions, (N,) leading dims."""
    episode_id: np.ndarray
    """(N,) int64."""
    step: np.ndarray
    """(N,) int64: index within the episode."""
    starts: np.ndarray
    """(E,) row where each episode begins."""
    lengths: np.ndarray
    """(E,) rows of each episode."""
    action_logp: np.ndarray | None = None
    """(N,) float32: the behavior policy's logged log-probability (discrete) or log-density (continuous, of the
    dataset's actions in their own units) of each row's action (schema.py), or None: the dataset has none."""

    @property
    def num_episodes(self) -> int:
        return len(self.starts)

    def returns_to_go(self, gamma: float) -> np.ndarray:
        """(N,) discounted return from each row to its episode's end (in the data's reward units)."""
        return discounted_to_go(self.batch.rewards.detach().cpu().double().numpy(), self.starts, self.lengths, gamma)

    def padded(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """(E, T) array of per-row `values` laid out by episode and step (T: the longest episode)."""
        t = int(self.lengths.max()) if len(self.lengths) else 0
        out = np.full((len(self.starts), t), fill, dtype=np.float64)
        ep = np.repeat(np.arange(len(self.starts)), self.lengths)
        pos = np.arange(len(values)) - np.repeat(self.starts, self.lengths)
        out[ep, pos] = values
        return out

    def mask(self) -> np.ndarray:
        t = int(self.lengths.max()) if len(self.lengths) else 0
        return np.arange(t)[None, :] < self.lengths[:, None]


def discounted_to_go(rewards: np.ndarray, starts: np.ndarray, lengths: np.ndarray, gamma: float) -> np.ndarray:
    out = np.zeros(len(rewards), dtype=np.float64)
    for s, n in zip(starts.tolist(), lengths.tolist()):
        acc = 0.0
        for i in range(s + n - 1, s - 1, -1):
            acc = rewards[i] + gamma * acc
            out[i] = acc
    return out


def load_episodes(path: str | os.PathLike, part: str = "holdout", device: "torch.device | str" = "cpu",
                  max_episodes: int | None = None, seed: int = 0) -> EpisodeRows:
    """The episodes of `part` ('holdout', 'train' or 'all') with their ids and steps, ordered by (episode, step),
    and the logged log-probabilities of their actions when every partition has them (EpisodeRows.action_logp).
    max_episodes: keep at most this many (chosen at random by `seed`, then in id order)."""
    import pyarrow as pa
    import torch

    from ..batch import Batch
    from .load import FIELDS, _fill, _layout, _read_segment, _root, load_metadata, shard_plan
    from .metadata import has_action_logp

    root = _root(path)
    meta = load_metadata(root)
    held = check_part(part, meta, root)
    layout = _layout(meta, root)
    logged = has_action_logp(meta)
    tables, ids, steps = [], [], []
    for seg in shard_plan(root, 0, 1, meta):
        table = _read_segment(seg, list(FIELDS) + ["episode_id", "step"] + (["action_logp"] if logged else []))
        eid = table.column("episode_id").to_numpy()
        m = keep_mask(eid, held, part) if held is not None else None
        if m is not None:
            table = table.filter(pa.array(m))
            eid = eid[m]
        tables.append((seg, table))
        ids.append(eid.astype(np.int64))
        steps.append(table.column("step").to_numpy().astype(np.int64))
    eid = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    st = np.concatenate(steps) if steps else np.zeros(0, np.int64)
    if max_episodes is not None:
        uniq = np.unique(eid)
        if len(uniq) > max_episodes:
            pick = np.sort(np.random.default_rng(seed).choice(uniq, max_episodes, replace=False))
            sel = np.isin(eid, pick)
            keep = np.cumsum([0] + [t.num_rows for _, t in tables])
            new_tables = []
            for i, (seg, t) in enumerate(tables):
                new_tables.append((seg, t.filter(pa.array(sel[keep[i]:keep[i + 1]]))))
            tables, eid, st = new_tables, eid[sel], st[sel]
    out = layout.alloc(len(eid))
    pos = 0
    for seg, t in tables:
        pos += _fill(out, pos, t, seg.path, seg.start)
    logp = _logp_column(tables) if logged else None
    order = np.lexsort((st, eid))
    arrays = {k: v[order] for k, v in out.items()}
    eid, st = eid[order], st[order]
    if len(eid) == 0:
        raise DataError(f"{root}: no episodes in part '{part}'")
    new_ep = np.flatnonzero(np.r_[True, eid[1:] != eid[:-1]])
    lengths = np.diff(np.r_[new_ep, len(eid)])
    batch = Batch(**{k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()})
    return EpisodeRows(batch, eid, st, new_ep, lengths, None if logp is None else logp[order])


def _logp_column(tables: list) -> np.ndarray:
    """The `action_logp` column of (segment, table) pairs as one (N,) float32 array, checked: no nulls, finite."""
    import pyarrow as pa

    parts = []
    for seg, t in tables:
        col = t.column("action_logp")
        if col.null_count or not pa.types.is_floating(col.type):
            raise DataError(f"{seg.path}: column 'action_logp' has type {col.type}"
                            + (f" and {col.null_count} null(s)" if col.null_count else "")
                            + "; expected float32 log-probabilities without nulls (schema.py); re-convert the source")
        a = col.to_numpy().astype(np.float32, copy=False)
        if not np.isfinite(a).all():
            raise DataError(f"{seg.path}: column 'action_logp' holds {int((~np.isfinite(a)).sum())} value(s) that are "
                            f"not finite (e.g. {a[~np.isfinite(a)][0]}); re-convert the source")
        parts.append(a)
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
