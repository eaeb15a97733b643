"""Out-of-core training data: a window of a worker's share in memory, refilled in the background.

When a worker's share of a dataset exceeds its memory budget, `WindowedData` keeps `window_rows`
consecutive transitions of the share (read by `iter_chunks`, so the Parquet reader's own buffers count
against the budget too) as the learner's data, while a background thread reads the next window. After
`steps_per_window` learner steps the windows swap; passes over the share repeat for as long as the run
lasts (the window boundaries shift from pass to pass unless the share is a multiple of the window). Resume
restarts the window stream at the share's beginning: an out-of-core run does not resume bit-exactly.

Memory: the current window, the next one being filled, and the reader's chunk working set. The reader gets
0.2 of the budget, or more when Arrow's page buffers for the files' row groups need it (up to ~4 MiB a
column, ~15 MiB for the six columns of files with large row groups, plus 8k-row chunks); each window gets
0.3 of the rest. Measured (tests/data/test_window.py, 2-core machine, budget 56 MB, share 224 MB, Arrow's
default jemalloc pool): the peak growth of resident memory in steady state was 1.04x, 1.05x and 1.38x the
budget over three runs (0.45 of the rest reached 1.24-1.50x; on a machine at load 6 single runs measured
1.2-1.63x: allocator timing, so the test takes the lower of two runs), after a first pass has paid the reader's
one-time costs (~40 MB of code pages, thread pools and pool arenas, not proportional to the budget). Arrow's
reader holds more than load._reader_reserve estimates for large row groups; the margin covers it.

Bias (documented for users): within a window sampling is uniform; with steps_per_window = window_rows /
batch (the default) every transition is drawn about once per pass on average, as with uniform sampling of
the whole share, but samples within a stretch of updates come from one window of consecutive transitions
(mostly whole episodes), so minibatches are more correlated than uniform sampling over the whole share:
in effect a replay buffer that turns over window by window. Larger windows (a larger budget) reduce it.
"""
from __future__ import annotations

import os
import threading
from typing import Iterator

import torch

from ..batch import FIELDS, Batch
from .load import _reader_reserve, iter_chunks, load_metadata, row_bytes
from .metadata import dataset_file_rows
from .storage import locate, open_parquet

READER_SHARE = 0.2  # of the budget at least, for iter_chunks
READER_CHUNK_ROWS = 8192  # at least this many rows per chunk read
WINDOW_SHARE = 0.3  # of what the reader leaves, for each of the two windows (measured: see the module docstring)


class WindowedData:
    """The learner's data source for shares larger than memory (see the module docstring).

    `data` is the current window (a Batch on `device`); `after_step()` swaps in the next window once
    `steps_per_window` steps have used the current one."""

    def __init__(self, path: str | os.PathLike, rank: int, world_size: int, budget_bytes: int, batch_size: int,
                 device: torch.device | str = "cpu", steps_per_window: int | None = None) -> None:
        self.path, self.rank, self.world = locate(path).public(), rank, world_size  # a Path, or a URI
        self.device = torch.device(device)
        meta = load_metadata(self.path)
        self.row_bytes = row_bytes(meta, self.path)
        # Arrow's reader holds up to ~4 MiB of page buffers per column whatever the chunk size
        # (load._reader_reserve); the reader gets that plus room for useful chunks, the windows the rest
        files = dataset_file_rows(self.path, meta)
        reserve = max((_reader_reserve(open_parquet(f)) for f, _ in files[:4]), default=0)
        self.reader_budget = max(int(budget_bytes * READER_SHARE), reserve + READER_CHUNK_ROWS * 6 * self.row_bytes)
        self.window_rows = max(batch_size, int((budget_bytes - self.reader_budget) * WINDOW_SHARE) // self.row_bytes)
        self.steps_per_window = steps_per_window or max(1, self.window_rows // batch_size)
        self.windows_loaded = 0
        self.stalled_s = 0.0  # time the learner waited for the next window
        self._chunks = self._endless_chunks()
        self._leftover: tuple[Batch, int] | None = None
        self.data = self._read_window()
        self._steps = 0
        self._next: Batch | None = None
        self._error: BaseException | None = None
        self._thread = self._start_fill()

    @property
    def n(self) -> int:
        return int(self.data.rewards.shape[0])

    def _endless_chunks(self) -> Iterator[Batch]:
        while True:
            got = False
            for chunk in iter_chunks(self.path, self.rank, self.world, memory_budget_bytes=self.reader_budget):
                got = True
                yield chunk
            if not got:
                return

    def _read_window(self) -> Batch:
        """The next window_rows transitions of the (endless) share, copied chunk by chunk into one
        preallocated window (no concatenation: the chunks never coexist with a second copy)."""
        out: dict[str, torch.Tensor] = {}
        rows = 0
        while rows < self.window_rows:
            chunk, start = self._leftover if self._leftover is not None else (next(self._chunks), 0)
            take = min(len(chunk) - start, self.window_rows - rows)
            for f in FIELDS:
                src = getattr(chunk, f)
                if f not in out:
                    out[f] = torch.empty((self.window_rows, *src.shape[1:]), dtype=src.dtype)
                out[f][rows:rows + take] = src[start:start + take]
            rows += take
            # the rest of a chunk starts the next window
            self._leftover = (chunk, start + take) if start + take < len(chunk) else None
            del chunk
        self.windows_loaded += 1
        return Batch(**{f: t.to(self.device) for f, t in out.items()})

    def _fill(self) -> None:
        try:
            self._next = self._read_window()
        except BaseException as e:  # noqa: BLE001 - re-raised in the learner's thread at the swap
            self._error = e

    def _start_fill(self) -> threading.Thread:
        t = threading.Thread(target=self._fill, name="rayoffline-window", daemon=True)
        t.start()
        return t

    def after_step(self) -> bool:
        """Count a learner step; swap windows when the current one is used up. Returns True on a swap."""
        self._steps += 1
        if self._steps < self.steps_per_window:
            return False
        import time
        t = time.perf_counter()
        self._thread.join()
        self.stalled_s += time.perf_counter() - t
        if self._error is not None:
            raise self._error
        self.data, self._next = self._next, None  # the old window is freed here
        self._steps = 0
        self._thread = self._start_fill()
        return True

    def close(self) -> None:
        self._thread.join()
