"""Loading for learners: worker `rank` of `world_size` reads its share of a converted dataset into tensors.

Datasets are local directories or filesystem URIs (s3://, gs://, file://; see storage.py).

Shares: the dataset's Parquet files (all partitions, in partition then shard order, exactly as the metadata
lists them) are dealt out whole, balanced by transitions: largest file first (by the row count in its
footer; ties by position), each onto the rank holding the fewest transitions so far (ties: the lowest rank),
deterministically; a rank reads its files in dataset order. When that leaves some rank more than
SHARE_SLACK above an even share (fewer files than workers, or files of very different sizes), the
concatenated rows are split instead into `world_size` contiguous ranges of near-equal size. Either way the
shares are disjoint and together hold every transition exactly once. Before any share is planned, every
listed file must exist and the row counts in their footers must match the metadata's counts (a missing or
truncated shard is an error naming it, never a silently smaller dataset).

`load` reads a share into one contiguous tensor per field: only the six Batch columns are read, each
fixed-size-list column is flattened by Arrow and copied once into a preallocated numpy array (no per-row
Python), then `torch.from_numpy` wraps it and `.to(device)` moves it (no copy on the CPU). `iter_chunks`
reads the same share as a stream of Batches whose size is bounded by a memory budget.
"""
from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ..errors import ConfigError, DataError
from .metadata import dataset_file_rows, metadata_location, read_metadata
from .schema import COLUMNS
from .storage import locate, open_parquet

if TYPE_CHECKING:
    import torch

    from ..batch import Batch

FIELDS = COLUMNS[:6]
"""The Batch fields in Batch order (rayoffline.batch.FIELDS, a test checks): named here so that importing the
data layer (every `rayoffline data` command) does not import torch, which alone costs more than a second."""

_FLOAT_FIELDS = ("observations", "next_observations")


SHARE_SLACK = 0.25
"""Whole files are dealt out only while no rank's share exceeds an even share by more than this fraction."""


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a converted dataset directory or URI (DataError naming the file if missing or corrupt)."""
    return read_metadata(path)


def dataset_files(path: str | os.PathLike, meta: dict[str, Any] | None = None) -> list[Path | str]:
    """Parquet files of a converted dataset as its metadata lists them, in partition then shard order (Paths for
    a local dataset, URIs otherwise)."""
    return [f for f, _ in dataset_file_rows(path, load_metadata(path) if meta is None else meta)]


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of one Parquet file (a Path, or a URI string)."""
    path: Path | str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def shard_plan(path: str | os.PathLike, rank: int = 0, world_size: int = 1,
               meta: dict[str, Any] | None = None) -> list[Segment]:
    """The segments worker `rank` of `world_size` reads (see the module docstring); the files are checked
    against the metadata first (`dataset_file_rows`)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size")
    rows = dataset_file_rows(path, load_metadata(path) if meta is None else meta)
    files, counts = [f for f, _ in rows], [n for _, n in rows]
    total = sum(counts)
    owner = _deal(counts, world_size)
    if owner is not None:
        return [Segment(f, 0, n) for f, n, r in zip(files, counts, owner) if r == rank and n > 0]
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    plan, offset = [], 0
    for f, n in zip(files, counts):
        s, e = max(lo, offset), min(hi, offset + n)
        if s < e:
            plan.append(Segment(f, s - offset, e - offset))
        offset += n
    return plan


def _deal(counts: list[int], world_size: int) -> list[int] | None:
    """The rank of each file when whole files are dealt out largest first onto the least-loaded rank; None when
    that leaves a rank more than SHARE_SLACK above an even share (the caller splits rows instead)."""
    if len(counts) < world_size:
        return None
    heap = [(0, r) for r in range(world_size)]
    owner = [0] * len(counts)
    for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + counts[i], r))
    most = max(load for load, _ in heap)
    return owner if most <= (1 + SHARE_SLACK) * sum(counts) / world_size else None


@dataclass(frozen=True)
class _Layout:
    obs_dim: int
    act_dim: int | None  # None: discrete

    @property
    def row_bytes(self) -> int:
        """Bytes of one transition as loaded tensors."""
        act = 8 if self.act_dim is None else 4 * self.act_dim
        return 4 * (2 * self.obs_dim + 3) + act

    def alloc(self, n: int) -> dict[str, np.ndarray]:
        return {
            "observations": np.empty((n, self.obs_dim), np.float32),
            "actions": (np.empty(n, np.int64) if self.act_dim is None else np.empty((n, self.act_dim), np.float32)),
            "rewards": np.empty(n, np.float32),
            "next_observations": np.empty((n, self.obs_dim), np.float32),
            "terminations": np.empty(n, np.float32),
            "truncations": np.empty(n, np.float32),
        }


def _layout(meta: dict[str, Any], where) -> _Layout:
    try:
        obs_dim = int(np.prod(meta["observation_space"]["shape"]))
        act = meta["action_space"]
        if act["type"] == "Discrete":
            return _Layout(obs_dim, None)
        return _Layout(obs_dim, int(np.prod(act["shape"])))
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{metadata_location(where)}: malformed observation_space/action_space ({e!r})") from e


def row_bytes(meta: dict[str, Any], where: Any = ".") -> int:
    """Bytes of one transition as loaded tensors (float32 observations twice, reward and flags; actions) for
    the dataset described by `meta` (found at `where`, named in the error if the spaces are malformed)."""
    return _layout(meta, where).row_bytes


def _fill(out: dict[str, np.ndarray], pos: int, table, path, row0: int) -> int:
    """Copy an Arrow table's Batch columns into `out` at row `pos`; returns rows written."""
    import pyarrow as pa

    n = table.num_rows
    for name in FIELDS:
        dst = out[name]
        width = dst.shape[1] if dst.ndim == 2 else None
        col = table.column(name)
        at = pos
        for chunk in getattr(col, "chunks", [col]):  # Table: ChunkedArray; RecordBatch: Array
            m = len(chunk)
            if m == 0:
                continue
            if chunk.null_count:
                bad = int(np.flatnonzero(chunk.is_null().to_numpy(zero_copy_only=False))[0])
                raise DataError(f"{path}: column '{name}' row {row0 + at - pos + bad}: null value; "
                                f"re-convert the source")
            if width is not None:
                if not (pa.types.is_fixed_size_list(chunk.type) or pa.types.is_list(chunk.type)
                        or pa.types.is_large_list(chunk.type)):
                    raise DataError(f"{path}: column '{name}' has type {chunk.type}, expected "
                                    f"fixed_size_list<float32>[{width}]")
                flat = chunk.flatten().to_numpy(zero_copy_only=False)
                if flat.size != m * width:
                    raise DataError(f"{path}: column '{name}' holds {flat.size // max(m, 1)}-dim rows, "
                                    f"the dataset's metadata says {width}")
                dst[at:at + m] = flat.reshape(m, width)
            else:
                if pa.types.is_nested(chunk.type):
                    raise DataError(f"{path}: column '{name}' has type {chunk.type}, expected a scalar column")
                dst[at:at + m] = chunk.to_numpy(zero_copy_only=False)
            at += m
    return n



def _row_groups_overlapping(md, seg) -> tuple[list[int], int]:
    """Indices of the row groups that hold rows [seg.start, seg.stop) and the file row the first starts at."""
    groups, first, offset = [], 0, 0
    for i in range(md.num_row_groups):
        n = md.row_group(i).num_rows
        if offset < seg.stop and offset + n > seg.start:
            if not groups:
                first = offset
            groups.append(i)
        offset += n
    return groups, first

def _read_segment(seg: Segment, columns: list[str]):
    """Arrow table of `seg`'s rows, reading only the row groups that overlap it."""
    try:
        pf = open_parquet(seg.path)
        md = pf.metadata
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise DataError(f"{seg.path}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}")
        if seg.start == 0 and seg.stop == md.num_rows:
            return pf.read(columns=columns, use_threads=True)
        groups, first = _row_groups_overlapping(md, seg)
        table = pf.read_row_groups(groups, columns=columns, use_threads=True)
        return table.slice(seg.start - first, len(seg))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - Arrow raises many types for bad files
        raise DataError(f"{seg.path}: unreadable Parquet file ({e})") from e


def _root(path: str | os.PathLike) -> Path | str:
    """A dataset given as a path or URI, as dataset_file_rows hands back its files (Path locally, else URI)."""
    return locate(path).public()


def _to_batch(arrays: dict[str, np.ndarray], device: torch.device | str) -> Batch:
    import torch

    from ..batch import Batch

    return Batch(**{k: torch.from_numpy(v).to(device) for k, v in arrays.items()})


def load(path: str | os.PathLike, rank: int = 0, world_size: int = 1,
         device: torch.device | str = "cpu", part: str = "train") -> Batch:
    """Worker `rank` of `world_size`: its share of the converted dataset at `path` as one Batch of
    contiguous tensors on `device` (float32; discrete actions int64 of shape (N,)). `path`: a local directory
    or a filesystem URI. part: 'train' (the default: without the episodes the metadata holds out, see
    holdout.py), 'holdout' or 'all'."""
    from .holdout import check_part, keep_mask

    root = _root(path)
    meta = load_metadata(root)
    held = check_part(part, meta, root)
    layout = _layout(meta, root)
    plan = shard_plan(root, rank, world_size, meta)
    total = sum(len(s) for s in plan)
    if total == 0:
        raise DataError(f"{root}: rank {rank} of {world_size} gets no transitions; the dataset is smaller "
                        f"than the number of workers")
    out = layout.alloc(total)
    pos = 0
    columns = list(FIELDS) + (["episode_id"] if held is not None else [])
    for seg in plan:
        table = _read_segment(seg, columns)
        if table.num_rows != len(seg):
            raise DataError(f"{seg.path}: expected {len(seg)} rows, read {table.num_rows}")
        if held is not None:
            table = _keep(table, keep_mask(table.column("episode_id").to_numpy(), held, part))
        pos += _fill(out, pos, table, seg.path, seg.start)
        del table
    if pos == 0:
        raise DataError(f"{root}: rank {rank} of {world_size} gets no {part} transitions (the held-out split took "
                        f"every episode of its share)" if world_size > 1 else f"{root}: no {part} transitions")
    if pos < total:
        out = {k: v[:pos] for k, v in out.items()}
    return _to_batch(out, device)


def _keep(table, mask):
    import pyarrow as pa
    return table if mask is None else table.filter(pa.array(mask))


def _reader_reserve(pf) -> int:
    """Bytes Arrow's Parquet reader holds besides the record batch it returns: per column about two copies
    of a page (decompressed page and decoded values, plus a dictionary page when dictionary-encoded),
    bounded by the column chunk's size for small row groups. Pages default to ~1 MiB. Measured with
    pyarrow's allocator on files written by pyarrow's defaults (2x-2.5x the column chunk, <= ~3 MiB)."""
    md = pf.metadata
    per_col: dict[str, int] = {}
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        for j in range(rg.num_columns):
            c = rg.column(j)
            top = c.path_in_schema.split(".")[0]
            if top in FIELDS:
                per_col[top] = max(per_col.get(top, 0), c.total_uncompressed_size)
    return sum(min(5 * n // 2, 4 << 20) for n in per_col.values()) + _READ_BUFFER


_READ_BUFFER = 256 << 10
_CHUNKS_RESIDENT = 6  # Arrow's batch + its builders (~3), our copy, the caller's previous chunk, margin


def iter_chunks(path: str | os.PathLike, rank: int = 0, world_size: int = 1,
                memory_budget_bytes: int = 256 << 20, device: torch.device | str = "cpu",
                part: str = "train") -> Iterator[Batch]:
    """Stream worker `rank`'s share as Batches, for shares larger than memory.

    Resident at any time: Arrow's reader buffers (a few pages per column, estimated from the file's
    metadata, ~2-4 MiB per column for large row groups with default writer settings), the record batch
    Arrow returns and its builders (about three chunks' worth), the chunk being copied out and the
    previous chunk the caller may still hold: the chunk size is (memory_budget_bytes - reader reserve) / 6,
    so the whole stays within the budget. Concatenated, the chunks equal `load(path, rank, world_size, part=part)`
    (held-out rows are dropped from each chunk; empty chunks are not yielded).
    """
    from .holdout import check_part, keep_mask

    root = _root(path)
    meta = load_metadata(root)
    held = check_part(part, meta, root)
    columns = list(FIELDS) + (["episode_id"] if held is not None else [])
    layout = _layout(meta, root)
    for seg in shard_plan(root, rank, world_size, meta):
        try:
            pf = open_parquet(seg.path, buffer_size=_READ_BUFFER, pre_buffer=False)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{seg.path}: unreadable Parquet file ({e})") from e
        missing = [c for c in FIELDS if c not in pf.schema_arrow.names]
        if missing:
            raise DataError(f"{seg.path}: missing column(s) {', '.join(missing)}")
        reserve = _reader_reserve(pf)
        rows = (int(memory_budget_bytes) - reserve) // (_CHUNKS_RESIDENT * layout.row_bytes)
        if rows < 1:
            raise ConfigError(f"memory_budget_bytes={memory_budget_bytes} is too small for {seg.path}: "
                              f"the Parquet reader needs ~{reserve} bytes plus {_CHUNKS_RESIDENT} x {layout.row_bytes} "
                              f"bytes per row of a chunk")
        md = pf.metadata
        groups, first = _row_groups_overlapping(md, seg)
        if not groups:
            continue
        at = first  # file row of the next record batch
        try:
            batches = pf.iter_batches(batch_size=rows, row_groups=groups, columns=columns, use_threads=False)
            for rb in batches:
                s, e = max(seg.start, at), min(seg.stop, at + rb.num_rows)
                if s < e:
                    piece = rb.slice(s - at, e - s)
                    if held is not None:
                        piece = _keep(piece, keep_mask(piece.column("episode_id").to_numpy(), held, part))
                    if piece.num_rows:
                        out = layout.alloc(piece.num_rows)
                        _fill(out, 0, piece, seg.path, s)
                        del piece
                        yield _to_batch(out, device)
                at += rb.num_rows
                del rb
                if at >= seg.stop:
                    break
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{seg.path}: unreadable Parquet file ({e})") from e
