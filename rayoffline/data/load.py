"""Loading for learners: worker `rank` of `world_size` reads its share of a converted dataset into tensors.

Shares: the dataset's Parquet files (all partitions, in partition then shard order, exactly as metadata.json
lists them) are dealt out whole, round-robin: file i goes to rank i % world_size. With fewer files than
workers, the concatenated rows are split instead into `world_size` contiguous ranges of near-equal size. Either way the shares are disjoint and
together hold every transition exactly once. Before any share is planned, every listed file must exist and
the row counts in their footers must match metadata.json's counts (a missing or truncated shard is an error
naming it, never a silently smaller dataset).

`load` reads a share into one contiguous tensor per field: only the six Batch columns are read, each
fixed-size-list column is flattened by Arrow and copied once into a preallocated numpy array (no per-row
Python), then `torch.from_numpy` wraps it and `.to(device)` moves it (no copy on the CPU). `iter_chunks`
reads the same share as a stream of Batches whose size is bounded by a memory budget.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ..errors import ConfigError, DataError
from .metadata import dataset_file_rows, read_metadata
from .schema import COLUMNS, METADATA_FILE

if TYPE_CHECKING:
    import torch

    from ..batch import Batch

FIELDS = COLUMNS[:6]
"""The Batch fields in Batch order (rayoffline.batch.FIELDS, a test checks): named here so that importing the
data layer (every `rayoffline data` command) does not import torch, which alone costs more than a second."""

_FLOAT_FIELDS = ("observations", "next_observations")


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """metadata.json of a converted dataset directory (DataError naming the file if missing or corrupt)."""
    return read_metadata(path)


def dataset_files(path: str | os.PathLike, meta: dict[str, Any] | None = None) -> list[Path]:
    """Parquet files of a converted dataset as metadata.json lists them, in partition then shard order."""
    return [f for f, _ in dataset_file_rows(path, load_metadata(path) if meta is None else meta)]


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of one Parquet file."""
    path: Path
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def shard_plan(path: str | os.PathLike, rank: int = 0, world_size: int = 1,
               meta: dict[str, Any] | None = None) -> list[Segment]:
    """The segments worker `rank` of `world_size` reads (see the module docstring); the files are checked
    against metadata.json first (`dataset_file_rows`)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size")
    rows = dataset_file_rows(path, load_metadata(path) if meta is None else meta)
    files, counts = [f for f, _ in rows], [n for _, n in rows]
    if len(files) >= world_size:
        return [Segment(f, 0, n) for f, n in list(zip(files, counts))[rank::world_size] if n > 0]
    total = sum(counts)
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    plan, offset = [], 0
    for f, n in zip(files, counts):
        s, e = max(lo, offset), min(hi, offset + n)
        if s < e:
            plan.append(Segment(f, s - offset, e - offset))
        offset += n
    return plan


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


def _layout(meta: dict[str, Any], where: Path) -> _Layout:
    try:
        obs_dim = int(np.prod(meta["observation_space"]["shape"]))
        act = meta["action_space"]
        if act["type"] == "Discrete":
            return _Layout(obs_dim, None)
        return _Layout(obs_dim, int(np.prod(act["shape"])))
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{where / METADATA_FILE}: malformed observation_space/action_space ({e!r})") from e


def _fill(out: dict[str, np.ndarray], pos: int, table, path: Path, row0: int) -> int:
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
                                    f"metadata.json says {width}")
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
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(seg.path)
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


def _to_batch(arrays: dict[str, np.ndarray], device: torch.device | str) -> Batch:
    import torch

    from ..batch import Batch

    return Batch(**{k: torch.from_numpy(v).to(device) for k, v in arrays.items()})


def load(path: str | os.PathLike, rank: int = 0, world_size: int = 1,
         device: torch.device | str = "cpu") -> Batch:
    """Worker `rank` of `world_size`: its share of the converted dataset at `path` as one Batch of
    contiguous tensors on `device` (float32; discrete actions int64 of shape (N,))."""
    root = Path(path)
    meta = load_metadata(root)
    layout = _layout(meta, root)
    plan = shard_plan(root, rank, world_size, meta)
    total = sum(len(s) for s in plan)
    if total == 0:
        raise DataError(f"{root}: rank {rank} of {world_size} gets no transitions; the dataset is smaller "
                        f"than the number of workers")
    out = layout.alloc(total)
    pos = 0
    for seg in plan:
        table = _read_segment(seg, list(FIELDS))
        if table.num_rows != len(seg):
            raise DataError(f"{seg.path}: expected {len(seg)} rows, read {table.num_rows}")
        pos += _fill(out, pos, table, seg.path, seg.start)
        del table
    return _to_batch(out, device)


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
                memory_budget_bytes: int = 256 << 20, device: torch.device | str = "cpu") -> Iterator[Batch]:
    """Stream worker `rank`'s share as Batches, for shares larger than memory.

    Resident at any time: Arrow's reader buffers (a few pages per column, estimated from the file's
    metadata, ~2-4 MiB per column for large row groups with default writer settings), the record batch
    Arrow returns and its builders (about three chunks' worth), the chunk being copied out and the
    previous chunk the caller may still hold: the chunk size is (memory_budget_bytes - reader reserve) / 6,
    so the whole stays within the budget. Concatenated, the chunks equal `load(path, rank, world_size)`.
    """
    import pyarrow.parquet as pq

    root = Path(path)
    meta = load_metadata(root)
    layout = _layout(meta, root)
    for seg in shard_plan(root, rank, world_size, meta):
        try:
            pf = pq.ParquetFile(seg.path, buffer_size=_READ_BUFFER, pre_buffer=False)
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
            batches = pf.iter_batches(batch_size=rows, row_groups=groups, columns=list(FIELDS), use_threads=False)
            for rb in batches:
                s, e = max(seg.start, at), min(seg.stop, at + rb.num_rows)
                if s < e:
                    part = rb.slice(s - at, e - s)
                    out = layout.alloc(e - s)
                    _fill(out, 0, part, seg.path, s)
                    del part
                    yield _to_batch(out, device)
                at += rb.num_rows
                del rb
                if at >= seg.stop:
                    break
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{seg.path}: unreadable Parquet file ({e})") from e
