"""Columnar files: RLlib-recorded Parquet, and any Parquet/CSV with a column mapping.

Column mapping: FIELD=COLUMN for FIELD in observations, actions, rewards, next_observations, terminations,
truncations, episode_id, step. COLUMN is a list column (fixed-size or variable lists whose rows all have one
length, Ray tensor columns), a scalar column, or `PREFIX_*` for numbered scalar columns PREFIX_0, PREFIX_1, ...
stacked into a vector, or an explicit list of scalar columns ["x", "y", "z"] stacked in that order (CLI:
`--map observations=x,y,z`; observations, next_observations and actions only). A field left out of the mapping
uses the column of its own name when there is one, then RLlib's name for it (obs, new_obs, terminateds,
truncateds, eps_id, t): RLlib output needs no mapping.

Required: observations, actions, rewards, terminations. Optional:
  next_observations  absent -> taken from the next row of the same episode (see convert.py for the ends)
  truncations        absent -> all False (an episode the data ends without a flag still counts as truncated)
  episode_id         absent -> episodes are consecutive rows of one file, ending after a termination or
                     truncation; present -> any type (ints, RLlib's uuid strings); equal ids in different
                     files are one episode (RLlib writes long episodes in several chunks)
  step               absent -> row order; present -> rows of an episode are ordered by it (RLlib's `t`)
  action_logp        the behavior policy's log-probability (discrete) or log-density (continuous) of the logged
                     action, one number per row (schema.py); absent -> a column `action_logp` (RLlib's new API
                     stack records it with its extra model outputs), else `action_prob` (older RLlib stacks), else
                     none. Or map `action_prob=COLUMN` for probabilities (their log is stored; a probability <= 0,
                     or above 1 for a discrete action, is an error). Never both.

RLlib compresses `obs`/`new_obs` by default (`output_compress_columns`): base64 strings of LZ4-compressed
pickles. They are decoded row by row (the only per-row Python in the converters) with `pickle` - only convert
recordings you trust, exactly as RLlib itself would when reading them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ...errors import DataError
from ._common import (FIELDS, LOGP_FIELDS, Chunk, RowDescriber, SourceData, as_action_logp, as_actions, as_flags,
                      as_next_observations, as_observations, as_rewards, check_finite, check_lengths, choose_cuts,
                      describe_row, episode_keys_from_flags)

RLLIB_COLUMNS = {"observations": "obs", "actions": "actions", "rewards": "rewards", "next_observations": "new_obs",
                 "terminations": "terminateds", "truncations": "truncateds", "episode_id": "eps_id", "step": "t"}
REQUIRED = ("observations", "actions", "rewards", "terminations")
SUFFIXES = (".parquet", ".pq", ".csv")
VECTOR_FIELDS = ("observations", "next_observations", "actions")
CSV_NAN = ("nan", "NaN", "-nan", "-NaN")
"""CSV text that Arrow would read as null by default but we read as the float NaN: an error then says "NaN" for
a literal nan and "empty" only for a missing value (an empty field, NA, NULL, #N/A, ...: Arrow's other nulls)."""
CSV_NULL = "null: an empty field or NA/NULL/#N/A"
"""Fields that may be mapped to a list of scalar columns (stacked into one vector per row)."""


def list_files(path: Path) -> list[Path]:
    """The Parquet/CSV files of `path` (a file, or a directory searched recursively), in sorted order."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                   and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{path}: no .parquet or .csv files found in this directory (nor below it)")
    return files


def check_mapping(mapping: dict[str, Any] | None) -> dict[str, Any]:
    """FIELD -> COLUMN (a name or PREFIX_*) or a list of column names (stacked into a vector, in that order)."""
    mapping = dict(mapping or {})
    for k, v in mapping.items():
        if k not in FIELDS + LOGP_FIELDS:
            raise DataError(f"column mapping {k}={v}: unknown field {k!r}; fields are "
                            f"{', '.join(FIELDS + LOGP_FIELDS)}")
        if isinstance(v, (list, tuple)):
            if not v or not all(isinstance(c, str) and c for c in v):
                raise DataError(f"column mapping {k}={v!r}: a column list needs one or more non-empty names")
            if len(set(v)) != len(v):
                dup = next(c for c in v if list(v).count(c) > 1)
                raise DataError(f"column mapping {k}={','.join(v)}: column {dup!r} is listed twice")
            if k not in VECTOR_FIELDS:
                raise DataError(f"column mapping {k}={','.join(v)}: {k} takes one column, got {len(v)}; only "
                                f"{', '.join(VECTOR_FIELDS)} take a list of columns")
            mapping[k] = list(v)
        elif not isinstance(v, str) or not v:
            raise DataError(f"column mapping {k}={v!r}: empty column name")
    if all(f in mapping for f in LOGP_FIELDS):
        raise DataError(f"column mapping action_logp={mapping['action_logp']}, action_prob={mapping['action_prob']}: "
                        f"map one of them (log-probabilities or probabilities of the logged actions), not both")
    return mapping


def _read_table(path: Path):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".csv":
            nulls = [v for v in pcsv.ConvertOptions().null_values if v not in CSV_NAN]
            return pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(null_values=nulls))
        return pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        kind = "CSV" if path.suffix.lower() == ".csv" else "Parquet"
        raise DataError(f"{path}: cannot read this {kind} file ({type(e).__name__}: {e}); is it complete and "
                        f"really {kind}?") from e


def resolve_mapping(file: str, names: list[str], mapping: dict[str, str]) -> tuple[dict[str, Any], bool]:
    """Field -> column name (or list of column names for PREFIX_*), and whether RLlib's names were used."""
    present = set(names)
    out: dict[str, Any] = {}
    rllib = False
    for f in FIELDS:
        spec = mapping.get(f)
        if spec is None:
            if f in present:
                out[f] = f
            elif RLLIB_COLUMNS[f] in present:
                out[f] = RLLIB_COLUMNS[f]
                rllib = True
            continue
        if isinstance(spec, list):  # explicit column list, stacked in the given order
            absent = [c for c in spec if c not in present]
            if absent:
                raise DataError(f"{file}: column(s) {', '.join(map(repr, absent))} (mapped to {f}) not found; "
                                f"columns present: {', '.join(names)}")
            out[f] = list(spec)
        elif spec.endswith("*"):
            prefix = spec[:-1]
            pat = re.compile(re.escape(prefix) + r"(\d+)$")
            idx = sorted((int(m.group(1)), n) for n in names if (m := pat.match(n)))
            if not idx:
                raise DataError(f"{file}: column mapping {f}={spec} matches no column (looked for "
                                f"{prefix}0, {prefix}1, ...); columns present: {', '.join(names)}")
            want = list(range(len(idx)))
            if [i for i, _ in idx] != want:
                missing = sorted(set(want) - {i for i, _ in idx})
                raise DataError(f"{file}: column mapping {f}={spec}: numbered columns must run {prefix}0.."
                                f"{prefix}{len(idx) - 1} without gaps; missing {prefix}{missing[0] if missing else '?'}")
            out[f] = [n for _, n in idx]
        else:
            if spec not in present:
                raise DataError(f"{file}: column {spec!r} (mapped to {f}) not found; columns present: "
                                f"{', '.join(names)}")
            out[f] = spec
    mapped = [f for f in LOGP_FIELDS if f in mapping]
    if mapped:
        f, col = mapped[0], mapping[mapped[0]]
        if isinstance(col, list) or col.endswith("*"):
            raise DataError(f"{file}: column mapping {f}={col if isinstance(col, str) else ','.join(col)}: {f} takes "
                            f"one column (one number per row)")
        if col not in present:
            raise DataError(f"{file}: column {col!r} (mapped to {f}) not found; columns present: {', '.join(names)}")
        out[f] = col
    else:
        for f in LOGP_FIELDS:  # RLlib's new API stack writes action_logp, older stacks action_prob
            if f in present:
                out[f] = f
                break
    for f in REQUIRED:
        if f not in out:
            raise DataError(f"{file}: missing column for {f!r}: no column named {f!r}"
                            + (f" or {RLLIB_COLUMNS[f]!r}" if RLLIB_COLUMNS[f] != f else "")
                            + f"; columns present: {', '.join(names)}. Map one with --map {f}=COLUMN")
    return out, rllib


def _unpack_rllib(arr, file: str, column: str, describe: Callable[[int], str] = describe_row) -> np.ndarray:
    """RLlib's compressed column: one base64(lz4(pickle(ndarray))) string per row."""
    import base64
    import pickle

    try:
        import lz4.frame
    except ImportError as e:  # pragma: no cover - lz4 comes with ray[rllib]
        raise DataError(f"{file}: column {column!r} holds RLlib-compressed values; install lz4 to read them") from e
    values = arr.to_pylist()
    rows = []
    for r, v in enumerate(values):
        try:
            rows.append(np.asarray(pickle.loads(lz4.frame.decompress(base64.b64decode(v))), dtype=np.float64))
        except Exception as e:
            raise DataError(f"{file}: column {column!r} holds text/bytes that are not RLlib-compressed arrays "
                            f"({describe(r)}: {type(e).__name__}); it must hold numbers or lists of numbers") from e
    shapes = {x.shape for x in rows}
    if len(shapes) > 1:
        first = rows[0].shape
        r = next(i for i, x in enumerate(rows) if x.shape != first)
        raise DataError(f"{file}: column {column!r} has shape {rows[r].shape} at {describe(r)} but {first} at "
                        f"{describe(0)}; "
                        f"all rows need the same shape")
    return np.stack(rows) if rows else np.zeros((0, 0))


def arrow_to_numpy(col, file: str, column: str, allow_packed: bool = False,
                   describe: Callable[[int], str] = describe_row, null: str = "null") -> np.ndarray:
    """A Parquet/CSV column as numpy: (n,) for scalars, (n, k) for list/tensor columns of one length k.
    `describe` names a row in messages; `null` says what a null is in this format (CSV: an empty field, NA...)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if isinstance(arr, pa.ChunkedArray):  # pragma: no cover - combine_chunks of an extension column
        arr = pa.concat_arrays(arr.chunks)
    if isinstance(arr.type, pa.BaseExtensionType):
        shape = getattr(arr.type, "shape", None)
        if shape is not None and len(shape) > 1:
            raise DataError(f"{file}: column {column!r} holds tensors of shape {tuple(shape)}: image or "
                            f"multi-dimensional values are not supported yet; flatten them to vectors first")
        arr = arr.storage
    if arr.null_count:
        r = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{file}: column {column!r} is empty ({null}) at {describe(r)}; every transition needs a "
                        f"value")
    t = arr.type
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        n = len(arr)
        if pa.types.is_fixed_size_list(t):
            width = t.list_size
        else:
            lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
            width = int(lengths[0]) if n else 0
            bad = lengths != width
            if bad.any():
                r = int(np.argmax(bad))
                raise DataError(f"{file}: column {column!r} has {int(lengths[r])} values at {describe(r)} but "
                                f"{width} at {describe(0)} (wrong shape); every row needs the same length")
        values = arr.flatten()
        vt = values.type
        if pa.types.is_fixed_size_list(vt) or pa.types.is_list(vt) or pa.types.is_large_list(vt):
            raise DataError(f"{file}: column {column!r} holds nested lists: image or multi-dimensional values "
                            f"are not supported yet; flatten them to vectors first")
        if values.null_count:
            r = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]) // max(width, 1)
            raise DataError(f"{file}: column {column!r} has an empty ({null}) entry at {describe(r)}")
        if not (pa.types.is_integer(vt) or pa.types.is_floating(vt) or pa.types.is_boolean(vt)):
            raise DataError(f"{file}: column {column!r} holds lists of {vt} but must hold numbers")
        return values.to_numpy(zero_copy_only=False).reshape(n, width)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        if allow_packed:
            return _unpack_rllib(arr, file, column, describe)
        raise DataError(f"{file}: column {column!r} has dtype {t} but must hold numbers or lists of numbers")
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return arr.to_numpy(zero_copy_only=False)
    raise DataError(f"{file}: column {column!r} has dtype {t} but must hold numbers or lists of numbers")


def _field_array(table, file: str, spec, field: str, describe: Callable[[int], str] = describe_row,
                 null: str = "null") -> np.ndarray:
    if isinstance(spec, list):  # numbered (PREFIX_*) or listed scalar columns
        cols = [arrow_to_numpy(table.column(c), file, c, describe=describe, null=null) for c in spec]
        for c, a in zip(spec, cols):
            if a.ndim != 1:
                raise DataError(f"{file}: column {c!r} (part of {field}) must hold one number per row")
            check_finite(a, file, c, describe)  # names the column itself, not the group
        return np.stack(cols, axis=1)
    packable = ("observations", "next_observations") + LOGP_FIELDS  # RLlib compresses what it is told to
    return arrow_to_numpy(table.column(spec), file, spec, allow_packed=field in packable, describe=describe, null=null)


def csv_line_describer(path: Path) -> Callable[[int], str]:
    """Data row (0-based, as Arrow reads it) -> "line N" of the CSV file, the header being line 1.

    Called on the error path only: Python's csv module then counts physical lines up to that row, so quoted
    fields that span lines and blank lines (which Arrow skips) are counted as a text editor shows them."""
    starts: list[int] = []
    state: dict[str, Any] = {}

    def lines() -> Iterator[int]:
        import csv

        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f)
            prev, header = 0, True
            for rec in reader:
                start, prev = prev + 1, reader.line_num
                if not rec:  # a blank line: Arrow skips it too
                    continue
                if header:
                    header = False
                    continue
                yield start

    def describe(row: int) -> str:
        it = state.setdefault("it", lines())
        while len(starts) <= row:
            nxt = next(it, None)
            if nxt is None:
                return f"data row {row} (0-based, after the header)"
            starts.append(nxt)
        return f"line {starts[row]}"

    return describe


def _read_rows(path: Path, start: int, stop: int):
    """Rows [start, stop) of a Parquet file: only the row groups that hold them are read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        groups, first, offset = [], 0, 0
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if offset < stop and offset + n > start:
                if not groups:
                    first = offset
                groups.append(i)
            offset += n
        return pf.read_row_groups(groups).slice(start - first, stop - start)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read this Parquet file ({type(e).__name__}: {e}); is it complete and "
                        f"really Parquet?") from e


def _names(spec: dict[str, Any], mapping: dict[str, Any]) -> dict[str, str]:
    """How messages name each field's column: a PREFIX_* mapping as given, a column list joined."""
    return {f: (s if isinstance(s, str) else mapping[f] if isinstance(mapping.get(f), str) else ",".join(s))
            for f, s in spec.items()}


def read_columnar(path: Path, mapping: dict[str, str] | None) -> SourceData:
    """Every file of `path`, whole, checked."""
    return read_units(path, [(str(f), None, None) for f in list_files(path)], mapping)


def read_columnar_block(args: dict) -> SourceData:
    return read_units(Path(args["source"]), args["units"], args.get("mapping"))


def read_units(path: Path, units: list[tuple[str, int | None, int | None]], mapping: dict[str, str] | None) -> SourceData:
    """Files (or row ranges [start, stop) of Parquet files) of source `path`, in order, checked; rows of a range
    are named by their row in the file."""
    import pyarrow as pa
    import pyarrow.compute as pc

    mapping = check_mapping(mapping)
    files = [Path(f) for f, _, _ in units]
    chunks: list[Chunk] = []
    raw_ids: list[Any] = []
    any_rllib = False
    key_offset = 0
    for fpath, (_, start, stop) in zip(files, units):
        file = str(fpath)
        table = _read_table(fpath) if start is None else _read_rows(fpath, start, stop)
        spec, rllib = resolve_mapping(file, table.column_names, mapping)
        any_rllib |= rllib
        names = _names(spec, mapping)
        csv = fpath.suffix.lower() == ".csv"
        describe = csv_line_describer(fpath) if csv else describe_row if start is None else RowDescriber(start, stop)
        null = CSV_NULL if csv else "null"
        arrays = {f: _field_array(table, file, s, f, describe, null) for f, s in spec.items() if f != "episode_id"}
        check_lengths(file, {names[f]: len(a) for f, a in arrays.items()})
        obs = as_observations(arrays["observations"], file, names["observations"], describe)
        nxt = None
        if "next_observations" in arrays:
            nxt = as_next_observations(arrays["next_observations"], file, names["next_observations"], obs,
                                       names["observations"], describe)
        term = as_flags(arrays["terminations"], file, names["terminations"], describe)
        trunc = (as_flags(arrays["truncations"], file, names["truncations"], describe) if "truncations" in arrays
                 else np.zeros(len(term), dtype=bool))
        order = None
        if "step" in arrays:
            step = arrays["step"]
            if step.ndim != 1 or step.dtype.kind not in "iu":
                raise DataError(f"{file}: column {names['step']!r} (step) must hold one integer per row, "
                                f"got dtype {step.dtype} and shape {step.shape[1:]}")
            order = step.astype(np.int64)
        if "episode_id" in spec:
            ids = table.column(spec["episode_id"]).combine_chunks()
            if ids.null_count:
                r = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
                raise DataError(f"{file}: column {names['episode_id']!r} (episode id) is empty ({null}) at "
                                f"{describe(r)}")
            if not (pa.types.is_integer(ids.type) or pa.types.is_string(ids.type)
                    or pa.types.is_large_string(ids.type) or pa.types.is_binary(ids.type)):
                raise DataError(f"{file}: column {names['episode_id']!r} (episode id) has dtype {ids.type}; "
                                f"episode ids must be integers or strings")
            raw_ids.append(ids)
            key = None
        else:
            raw_ids.append(None)
            key = episode_keys_from_flags(term | trunc, key_offset)
            key_offset = int(key[-1]) + 1 if len(key) else key_offset
        actions = as_actions(arrays["actions"], file, names["actions"], describe)
        logp = None
        for f in LOGP_FIELDS:
            if f in arrays:
                logp = as_action_logp(arrays[f], file, names[f], f, actions.ndim == 1, describe)
                names["action_logp"] = names[f]
        chunks.append(Chunk(
            file=file, columns=names, observations=obs, actions=actions,
            rewards=as_rewards(arrays["rewards"], file, names["rewards"], describe),
            terminations=term, truncations=trunc, next_observations=nxt, order=order,
            episode_key=key if key is not None else np.zeros(0, np.int64), describe=describe, action_logp=logp))
    have_ids = [r is not None for r in raw_ids]
    if any(have_ids) and not all(have_ids):
        a = files[have_ids.index(True)]
        b = files[have_ids.index(False)]
        raise DataError(f"{b}: has no episode id column but {a} has one; all files need the same columns")
    if all(have_ids):
        types = {r.type for r in raw_ids}
        if len(types) > 1:
            raw_ids = [r.cast(pa.string()) for r in raw_ids]
        codes = pc.dictionary_encode(pa.concat_arrays(raw_ids)).indices.to_numpy(zero_copy_only=False)
        codes = codes.astype(np.int64)
        start = 0
        for c in chunks:
            c.episode_key = codes[start:start + len(c)]
            start += len(c)
    for c in chunks:
        if c.next_observations is None and any(x.next_observations is not None for x in chunks):
            other = next(x for x in chunks if x.next_observations is not None)
            raise DataError(f"{c.file}: has no next-observation column but {other.file} has "
                            f"{other.columns['next_observations']!r}; all files need the same columns")
        if c.action_logp is None and any(x.action_logp is not None for x in chunks):
            other = next(x for x in chunks if x.action_logp is not None)
            raise DataError(f"{c.file}: has no logged action probabilities but {other.file} has them (column "
                            f"{other.columns['action_logp']!r}); all files need the same columns (convert them "
                            f"separately and `rayoffline data append` the others)")
    kind = "rllib" if any_rllib else ("csv" if all(f.suffix.lower() == ".csv" for f in files) else "parquet")
    return SourceData(source_id=f"{kind}:{os.path.abspath(path)}", chunks=chunks, extra={"rllib": any_rllib})


# ---------------------------------------------------------------------------------------------------------
# planning: blocks of whole files or row ranges that no episode crosses

def _footer(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read this Parquet file ({type(e).__name__}: {e}); is it complete and "
                        f"really Parquet?") from e


def _column_names(path: Path, md) -> list[str]:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    if md is not None:
        return md.schema.to_arrow_schema().names
    try:
        with pcsv.open_csv(path) as reader:
            return reader.schema.names
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read this CSV file ({type(e).__name__}: {e}); is it complete and "
                        f"really CSV?") from e


def _read_column(path: Path, column: str, md):
    """One column of a whole file (for planning: flags or episode ids)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        if md is None:
            nulls = [v for v in pcsv.ConvertOptions().null_values if v not in CSV_NAN]
            t = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(null_values=nulls, include_columns=[column]))
        else:
            t = pq.read_table(path, columns=[column])
    except (pa.ArrowException, OSError, ValueError) as e:
        kind = "CSV" if md is None else "Parquet"
        raise DataError(f"{path}: cannot read this {kind} file ({type(e).__name__}: {e}); is it complete and "
                        f"really {kind}?") from e
    return t.column(column).combine_chunks()


def plan_columnar(path: Path, mapping: dict[str, str] | None, block_bytes: int):
    """Blocks of ~block_bytes (uncompressed) of the files, in order, that no episode crosses.

    A source up to block_bytes is one block, read exactly as before streaming. Otherwise: a CSV file is never
    split; a Parquet file larger than block_bytes is split into row ranges at episode ends (without an
    episode id column: after a row with a termination or truncation flag, read for this) or where no episode
    id occurs on both sides (with one: the id column is read). Files without an episode id column never share
    an episode; with one, an episode whose rows lie in several files keeps those files, and everything between
    them, in one block."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from ._common import Block, SourcePlan

    mapping = check_mapping(mapping)
    files = list_files(path)
    mds = [None if f.suffix.lower() == ".csv" else _footer(f) for f in files]
    sizes = [os.path.getsize(f) if md is None else sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
             for f, md in zip(files, mds)]
    kind = "csv" if all(md is None for md in mds) else "parquet"  # "rllib" once a block has read RLlib's names
    source_id = f"{kind}:{os.path.abspath(path)}"
    if sum(sizes) <= block_bytes:
        units = [(str(f), None, None) for f in files]
        return SourcePlan(source_id=source_id, files=[str(f) for f in files], blocks=[Block(
            "columnar", {"source": str(path), "units": units, "mapping": mapping}, rows=sum(
                md.num_rows for md in mds if md is not None), nbytes=sum(sizes))])

    specs = []
    for f, md in zip(files, mds):
        spec, _ = resolve_mapping(str(f), _column_names(f, md), mapping)
        specs.append(spec)
    # the columns every file must share (read_units says the same about the files of one block)
    for field, what in (("episode_id", "an episode id column"), ("next_observations", "a next-observation column"),
                        ("logp", "logged action probabilities")):
        have = [field in s if field != "logp" else any(f in s for f in LOGP_FIELDS) for s in specs]
        if any(have) and not all(have):
            a, b = files[have.index(True)], files[have.index(False)]
            if field == "episode_id":
                raise DataError(f"{b}: has no episode id column but {a} has one; all files need the same columns")
            if field == "logp":
                raise DataError(f"{b}: has no logged action probabilities but {a} has them; all files need the same "
                                f"columns (convert them separately and `rayoffline data append` the others)")
            col = _names(specs[have.index(True)], mapping)["next_observations"]
            raise DataError(f"{b}: has no next-observation column but {a} has {col!r}; all files need the same "
                            f"columns")
    with_ids = "episode_id" in specs[0]

    # units: (file index, start, stop, nbytes); keys: the episode ids of each unit (with ids)
    units: list[tuple[int, int | None, int | None, int]] = []
    keys: list[Any] = []
    for i, (f, md, spec) in enumerate(zip(files, mds, specs)):
        rows = md.num_rows if md is not None else None
        split = md is not None and sizes[i] > block_bytes and rows > 1
        per_row = sizes[i] / max(rows or 1, 1)
        if with_ids:
            ids = _read_column(f, spec["episode_id"], md)
            ids = ids.filter(ids.is_valid()) if ids.null_count else ids  # nulls: read_units names them
            enc = pc.dictionary_encode(ids)
            codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            cuts: list[int] = []
            if split and len(codes) == rows:
                last = np.zeros(len(enc.dictionary), np.int64)
                np.maximum.at(last, codes, np.arange(len(codes)))
                reach = np.maximum.accumulate(last[codes])  # the farthest row an episode seen so far reaches
                allowed = np.flatnonzero(reach[:-1] == np.arange(len(codes) - 1)) + 1  # cut before row p
                cuts = choose_cuts(rows, allowed, max(1, int(block_bytes / per_row)))
            bounds = [0, *cuts, len(codes)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                whole = len(bounds) == 2
                units.append((i, None if whole else a, None if whole else b, int(sizes[i] * (b - a) / max(len(codes), 1))
                              if not whole else sizes[i]))
                keys.append(enc.dictionary.take(pa.array(np.unique(codes[a:b]))))
        elif split:
            term = as_flags(arrow_to_numpy(_read_column(f, spec["terminations"], md), str(f), spec["terminations"]),
                            str(f), spec["terminations"])
            ends = term
            if "truncations" in spec:
                ends = ends | as_flags(arrow_to_numpy(_read_column(f, spec["truncations"], md), str(f),
                                                      spec["truncations"]), str(f), spec["truncations"])
            cuts = choose_cuts(rows, np.flatnonzero(ends) + 1, max(1, int(block_bytes / per_row)))
            bounds = [0, *cuts, rows]
            for a, b in zip(bounds[:-1], bounds[1:]):
                units.append((i, a, b, int(per_row * (b - a))) if len(bounds) > 2 else (i, None, None, sizes[i]))
        else:
            units.append((i, None, None, sizes[i]))

    # boundaries between units that an episode crosses (its ids in both)
    crossed = np.zeros(len(units), bool)  # crossed[u]: an episode continues from unit u into u + 1
    if with_ids and len(units) > 1:
        kinds = {k.type for k in keys}
        typ = pa.int64() if all(pa.types.is_integer(t) for t in kinds) else pa.string()
        allk = pa.concat_arrays([k.cast(typ) for k in keys])
        unit = np.repeat(np.arange(len(units)), [len(k) for k in keys])
        g = pa.table({"k": allk, "u": unit}).group_by("k").aggregate([("u", "min"), ("u", "max")])
        lo = g.column("u_min").to_numpy()
        hi = g.column("u_max").to_numpy()
        span = hi > lo
        diff = np.zeros(len(units) + 1, np.int64)
        np.add.at(diff, lo[span], 1)
        np.add.at(diff, hi[span], -1)
        crossed = np.cumsum(diff)[:-1] > 0

    blocks: list[Block] = []
    cur: list[tuple[str, int | None, int | None]] = []
    acc = rows_acc = 0
    for u, (i, a, b, nb) in enumerate(units):
        cur.append((str(files[i]), a, b))
        acc += nb
        if mds[i] is not None:
            rows_acc += (b - a) if a is not None else mds[i].num_rows
        if u == len(units) - 1 or (acc >= block_bytes and not crossed[u]):
            blocks.append(Block("columnar", {"source": str(path), "units": cur, "mapping": mapping}, rows=rows_acc,
                                nbytes=acc))
            cur, acc, rows_acc = [], 0, 0
    return SourcePlan(source_id=source_id, files=[str(f) for f in files], blocks=blocks)
