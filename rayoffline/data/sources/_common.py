"""What every source reader hands to the converter, and the checks they share.

A reader turns one input file (or one Minari dataset) into a `Chunk`: whole numpy columns in the file's
own row order, already checked for dtype, shape, nulls and non-finite values, each error naming the file,
the column and the row. The converter then checks the chunks against each other and against the action
space, and assembles episodes (`rayoffline.data.convert`). A chunk may carry the behavior policy's logged
log-probabilities of its actions (`action_logp`, schema.py), read from a log-probability or a probability column
(`as_action_logp`). Messages say how they count: "row 37 (0-based)" for
Parquet and HDF5, "line 39" of the file for CSV (the header is line 1), "episode 3, step 5" for Minari.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ...errors import DataError

FIELDS = ("observations", "actions", "rewards", "next_observations", "terminations", "truncations",
          "episode_id", "step")
LOGP_FIELDS = ("action_logp", "action_prob")
"""Optional fields that become the `action_logp` column: a log-probability, or a probability (its log is stored).
At most one of them per source."""


def describe_row(row: int) -> str:
    return f"row {row} (0-based)"


class RowDescriber:
    """describe_row for a block that starts at file row `offset`: messages keep naming rows of the file, and
    counts say which rows they cover (`scope`)."""

    def __init__(self, offset: int, stop: int):
        self.offset = int(offset)
        self.scope = f"rows {offset}-{stop - 1} of this file"

    def __call__(self, row: int) -> str:
        return describe_row(row + self.offset)


@dataclass
class Chunk:
    """Transitions from one file, in the file's row order (n rows)."""

    file: str
    """Path (or id) named in error messages."""
    columns: dict[str, str]
    """Field -> the source's column (or HDF5 key) it came from, named in error messages."""
    observations: np.ndarray
    """(n, obs_dim) float32"""
    actions: np.ndarray
    """(n, act_dim) float32 for Box actions | (n,) int64 for Discrete actions"""
    rewards: np.ndarray
    """(n,) float32"""
    terminations: np.ndarray
    """(n,) bool"""
    truncations: np.ndarray
    """(n,) bool"""
    episode_key: np.ndarray
    """(n,) int64: which episode each row belongs to; equal keys across chunks of a source are one episode."""
    next_observations: np.ndarray | None = None
    """(n, obs_dim) float32, or None: derived from the next row of the same episode (see convert.py)."""
    order: np.ndarray | None = None
    """(n,) int64 position within the episode (a `step`/`t` column), or None: the file's row order."""
    describe: Callable[[int], str] = describe_row
    """Row index -> where it is in the source ("row 17", "episode 3, step 5")."""
    action_logp: np.ndarray | None = None
    """(n,) float32 log-probability (discrete) or log-density (continuous) of each logged action under the
    behavior policy, or None: the source has none (schema.py)."""

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def discrete(self) -> bool:
        return self.actions.ndim == 1


@dataclass(frozen=True)
class Block:
    """A contiguous stretch of a source (in its own row order) that no episode crosses: what one conversion
    task reads, checks and assembles. `args` say what to read (picklable: they travel to Ray workers)."""

    kind: str
    """Reader: "minari", "hdf5" or "columnar"."""
    args: dict[str, Any]
    rows: int
    """Source rows (before episode assembly drops any)."""
    nbytes: int
    """Estimated bytes of the block's columns once read (uncompressed)."""


@dataclass(kw_only=True)
class SourceInfo:
    """What a source says about itself (shared by its plan and the data read from it)."""

    source_id: str
    observation_space: dict[str, Any] | None = None
    """Schema-style space (see schema.py) when the source describes it; None: infer from the data."""
    action_space: dict[str, Any] | None = None
    env_id: str | None = None
    env_spec: str | None = None
    """gymnasium EnvSpec JSON when the source carries it."""
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class SourcePlan(SourceInfo):
    """A source cut into blocks, and what it says about itself (as SourceData, without the data)."""

    blocks: list[Block]
    files: list[str]
    """Every input file (or dataset) named in messages about the whole source."""

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)


def choose_cuts(n: int, allowed: np.ndarray, target_rows: int) -> list[int]:
    """Row positions (strictly inside 0..n) where to cut n rows into stretches of at least `target_rows`, each
    cut taken from the sorted `allowed` positions (episode ends); the last stretch may be shorter."""
    cuts: list[int] = []
    last = 0
    target_rows = max(1, int(target_rows))
    while n - last > target_rows:
        i = int(np.searchsorted(allowed, last + target_rows))
        if i == len(allowed) or allowed[i] >= n:
            break
        last = int(allowed[i])
        cuts.append(last)
    return cuts


@dataclass(kw_only=True)
class SourceData(SourceInfo):
    """Everything a reader found: chunks plus what the source says about itself."""

    chunks: list[Chunk]


# ---------------------------------------------------------------------------------------------------------
# checks on whole arrays (no per-row Python)

def first_true(mask: np.ndarray) -> int:
    """Index of the first True of a 1-D bool mask (caller knows there is one)."""
    return int(np.argmax(mask))


def check_numeric(arr: np.ndarray, file: str, column: str, what: str = "numbers") -> None:
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{file}: column {column!r} has dtype {arr.dtype} but must hold {what}; "
                        f"map another column or fix the file")


def check_finite(arr: np.ndarray, file: str, column: str, describe: Callable[[int], str] = describe_row,
                 row_offset: np.ndarray | None = None) -> None:
    """Raise naming the first row of `arr` holding NaN or +-inf."""
    if arr.dtype.kind != "f" or arr.size == 0:
        return
    bad = ~np.isfinite(arr)
    if bad.ndim > 1:
        bad = bad.reshape(len(bad), -1).any(axis=1)
    if bad.any():
        r = first_true(bad)
        n_bad = int(bad.sum())
        value = arr[r].tolist()
        first = arr[r].reshape(-1)[~np.isfinite(arr[r].reshape(-1))][0]
        kind = "NaN (not a number)" if np.isnan(first) else f"{'-' if first < 0 else '+'}inf"
        src = int(row_offset[r]) if row_offset is not None else r
        scope = getattr(describe, "scope", "this file")
        raise DataError(f"{file}: column {column!r} holds {kind} at {describe(src)} (value {value}; {n_bad} row(s) "
                        f"with NaN or inf in {scope}); drop or repair those rows before converting")


def as_flags(arr: np.ndarray, file: str, column: str, describe: Callable[[int], str] = describe_row) -> np.ndarray:
    """A termination/truncation column as bool: bool, or numbers that are all 0 or 1."""
    arr = np.asarray(arr)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"{file}: column {column!r} has shape {arr.shape[1:]} per row but must be one flag per row")
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "iuf":
        raise DataError(f"{file}: column {column!r} has dtype {arr.dtype} but must be bool (or 0/1)")
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        r = first_true(bad)
        raise DataError(f"{file}: column {column!r} must be bool or 0/1 but holds {arr[r].item()!r} at "
                        f"{describe(r)}")
    return arr != 0


def as_observations(arr: np.ndarray, file: str, column: str,
                    describe: Callable[[int], str] = describe_row) -> np.ndarray:
    """(n, obs_dim) float32 from a 1-D (obs_dim 1 is NOT assumed) or 2-D numeric array."""
    arr = np.asarray(arr)
    check_numeric(arr, file, column)
    if arr.ndim == 1:
        raise DataError(f"{file}: column {column!r} holds one scalar per row but observations must be vectors "
                        f"(n, obs_dim); for numbered scalar columns map them as observations=PREFIX_*")
    if arr.ndim > 2:
        raise DataError(f"{file}: column {column!r} has shape {arr.shape[1:]} per row: image or multi-dimensional "
                        f"observations are not supported yet; flatten them to vectors first")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    check_finite(out, file, column, describe)
    return out


def as_next_observations(arr: np.ndarray, file: str, column: str, obs: np.ndarray, obs_column: str,
                         describe: Callable[[int], str] = describe_row) -> np.ndarray:
    """Like as_observations, and the width must match the observations'."""
    nxt = as_observations(arr, file, column, describe)
    if nxt.shape[1] != obs.shape[1]:
        raise DataError(f"{file}: column {column!r} has {nxt.shape[1]} values per row but {obs_column!r} has "
                        f"{obs.shape[1]}; they must match")
    return nxt


def as_actions(arr: np.ndarray, file: str, column: str,
               describe: Callable[[int], str] = describe_row) -> np.ndarray:
    """Integer (or bool) scalars -> Discrete (n,) int64; floats -> Box (n, act_dim) float32."""
    arr = np.asarray(arr)
    check_numeric(arr, file, column)
    if arr.ndim > 2:
        raise DataError(f"{file}: column {column!r} has shape {arr.shape[1:]} per row; actions must be a "
                        f"vector (Box) or one integer (Discrete) per row")
    if arr.dtype.kind in "biu" and (arr.ndim == 1 or arr.shape[1] == 1):
        return np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)
    if arr.ndim == 1:
        arr = arr[:, None]
    out = np.ascontiguousarray(arr, dtype=np.float32)
    check_finite(out, file, column, describe)
    return out


def as_rewards(arr: np.ndarray, file: str, column: str,
               describe: Callable[[int], str] = describe_row) -> np.ndarray:
    arr = np.asarray(arr)
    check_numeric(arr, file, column)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"{file}: column {column!r} has shape {arr.shape[1:]} per row but rewards must be one "
                        f"number per row")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    check_finite(out, file, column, describe)
    return out


def episode_keys_from_flags(ends: np.ndarray, offset: int = 0) -> np.ndarray:
    """Episode key of each row when episodes are consecutive rows ending where `ends` is True."""
    key = np.zeros(len(ends), dtype=np.int64)
    if len(ends) > 1:
        np.cumsum(ends[:-1], out=key[1:])
    return key + offset


def check_lengths(file: str, lengths: dict[str, int]) -> None:
    """All columns of a file must have as many rows."""
    values = set(lengths.values())
    if len(values) > 1:
        desc = ", ".join(f"{k!r}: {v}" for k, v in lengths.items())
        raise DataError(f"{file}: columns have different numbers of rows ({desc}); every column needs one "
                        f"entry per transition")


LOGP_TOLERANCE = 1e-5
"""A discrete action's logged probability may exceed 1 by this much (float32 round-off in the logging code);
its log-probability may exceed 0 by as much."""


def as_action_logp(arr: np.ndarray, file: str, column: str, field: str, discrete: bool,
                   describe: Callable[[int], str] = describe_row) -> np.ndarray:
    """The behavior policy's logged log-probabilities as (n,) float32, from a column mapped to `field`
    (`action_logp`: log-probabilities as they are; `action_prob`: probabilities, logged here). Errors name the
    first bad row: a non-number, NaN or inf, a probability <= 0 (the behavior policy could not have taken the
    action), or for discrete actions a probability above 1."""
    arr = np.asarray(arr)
    check_numeric(arr, file, column)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"{file}: column {column!r} ({field}) has shape {arr.shape[1:]} per row but must hold one "
                        f"number per row: the {'log-' if field == 'action_logp' else ''}probability of the logged "
                        f"action (of the whole action, not per dimension)")
    x = np.ascontiguousarray(arr, dtype=np.float64)
    check_finite(x, file, column, describe)
    what = "a discrete action's probability" if discrete else "a density"
    if field == "action_prob":
        bad = (x <= 0) | ((x > 1 + LOGP_TOLERANCE) if discrete else False)
        if bad.any():
            r = first_true(bad)
            why = ("is <= 0: the behavior policy could not have taken the logged action" if x[r] <= 0
                   else "is above 1, impossible for a discrete action's probability")
            raise DataError(f"{file}: column {column!r} (action_prob) holds {float(x[r])!r} at {describe(r)}, which "
                            f"{why} ({int(bad.sum())} row(s) affected); fix the column, or map log-probabilities "
                            f"with --map action_logp=COLUMN")
        with np.errstate(divide="ignore"):
            x = np.log(x)
    elif discrete:
        bad = x > LOGP_TOLERANCE
        if bad.any():
            r = first_true(bad)
            raise DataError(f"{file}: column {column!r} (action_logp) holds {float(x[r])!r} at {describe(r)}: a log-"
                            f"probability above 0, impossible for {what} ({int(bad.sum())} row(s) affected); is it "
                            f"a probability? Map it with --map action_prob={column}")
    out = x.astype(np.float32)
    if not np.isfinite(out).all():  # a tiny probability or a huge log-density beyond float32
        r = first_true(~np.isfinite(out))
        raise DataError(f"{file}: column {column!r} ({field}) at {describe(r)}: log-probability {float(x[r])!r} "
                        f"does not fit in float32; fix the column")
    return out
