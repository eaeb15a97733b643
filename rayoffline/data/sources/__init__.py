"""Source readers: each turns one kind of input into `Chunk`s of whole numpy columns (see _common.py).

  minari:ID | builtin:NAME | Minari dataset directory      -> minari_datasets.py
  *.hdf5 / *.h5 (D4RL layout)                            -> hdf5.py
  *.parquet / *.csv / a directory of them (RLlib or mapped) -> columnar.py
  a converted dataset directory (_rayoffline.json)        -> columnar.py, spaces from its metadata

Streaming: `plan_source` cuts a source into `Block`s that no episode crosses (Minari by episode ranges, HDF5
by row ranges at episode ends, Parquet/CSV by files and row ranges) from metadata and at most the flag or
episode-id columns; `read_block` reads one block as `SourceData` (what a conversion task does). A source up
to the block size is one block whose reading is `read_source`'s.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import fields
from pathlib import Path

from ...errors import DataError
from ..metadata import metadata_location
from ._common import FIELDS, Block, Chunk, SourceData, SourceInfo, SourcePlan
from .columnar import SUFFIXES, plan_columnar, read_columnar_block
from .hdf5 import is_hdf5, plan_hdf5, read_hdf5_block
from .minari_datasets import find_data_dir, local_dataset_dir, plan_minari, read_minari_block

__all__ = ["FIELDS", "Block", "Chunk", "SourceData", "SourcePlan", "plan_source", "read_block", "read_source"]

_UNBOUNDED = 1 << 62


def read_source(source: str | os.PathLike, mapping: dict[str, str] | None = None) -> SourceData:
    """The whole source as one SourceData (one block)."""
    plan = plan_source(source, mapping, block_bytes=_UNBOUNDED)
    data = read_block(plan.blocks[0])
    _describe(data, plan)
    return data


def read_block(block: Block) -> SourceData:
    """The chunks of one block of a plan (checked as read_source checks them); the source's own description
    (spaces, env id, references) is the plan's, not repeated here."""
    if block.kind == "minari":
        return read_minari_block(block.args)
    if block.kind == "hdf5":
        return read_hdf5_block(block.args)
    return read_columnar_block(block.args)


def _describe(data: SourceData, plan: SourcePlan) -> None:
    """Copy what the plan says about the source onto data read from it."""
    if not data.source_id.startswith("rllib:"):
        data.source_id = plan.source_id
    for f in fields(SourceInfo):
        if f.name not in ("source_id", "extra") and getattr(plan, f.name) is not None:
            setattr(data, f.name, getattr(plan, f.name))
    data.extra = {**plan.extra, **data.extra}


def _no_mapping(source: str, mapping) -> None:
    if mapping:
        raise DataError(f"{source}: a column mapping (--map) applies to Parquet, CSV and HDF5 files only; "
                        f"Minari datasets name their own fields")


def plan_source(source: str | os.PathLike, mapping: dict[str, str] | None, block_bytes: int) -> SourcePlan:
    """The source cut into blocks of ~block_bytes (see the module docstring)."""
    s = os.fspath(source)
    if s.startswith("minari:"):
        _no_mapping(s, mapping)
        ds_id = s[len("minari:"):]
        if not ds_id:
            raise DataError("minari:: empty dataset id (e.g. minari:mujoco/hopper/medium-v0)")
        path = local_dataset_dir(ds_id)
        data_dir = find_data_dir(path)
        if data_dir is None:
            raise DataError(f"{s}: {path} holds no Minari data (no data/metadata.json)")
        return plan_minari(data_dir, source_id=s, label=f"{s} ({path})", block_bytes=block_bytes)
    if s.startswith("builtin:"):
        _no_mapping(s, mapping)
        from ..builtin import minari_dataset_path

        path = Path(minari_dataset_path(s[len("builtin:"):]))
        data_dir = find_data_dir(path)
        if data_dir is None:
            raise DataError(f"{s}: {path} holds no Minari data (no data/metadata.json)")
        return plan_minari(data_dir, source_id=s, label=f"{s} ({path})", block_bytes=block_bytes)
    path = Path(s).expanduser()
    if not path.exists():
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", s):
            raise DataError(f"source {s!r}: unknown kind {s.split(':', 1)[0]!r}; use minari:ID, builtin:NAME or "
                            f"a path to a Minari dataset, an .hdf5 file, or Parquet/CSV file(s)")
        raise DataError(f"source {s!r} not found: no such file or directory")
    if path.is_dir():
        data_dir = find_data_dir(path)
        if data_dir is not None:
            _no_mapping(s, mapping)
            return plan_minari(data_dir, source_id=f"minari-dir:{os.path.abspath(path)}", label=None,
                               block_bytes=block_bytes)
        meta_path = metadata_location(path)
        if meta_path.is_file():
            return _plan_converted(path, Path(meta_path.path), mapping, block_bytes)
        return plan_columnar(path, mapping, block_bytes)
    if is_hdf5(path):
        return plan_hdf5(path, mapping, block_bytes)
    if path.suffix.lower() in SUFFIXES:
        return plan_columnar(path, mapping, block_bytes)
    raise DataError(f"{path}: unknown file type {path.suffix or '(no suffix)'!r}; expected .hdf5/.h5 (D4RL layout), "
                    f".parquet or .csv, or a directory (Minari dataset or Parquet/CSV files)")


def _plan_converted(path: Path, meta_path: Path, mapping, block_bytes: int) -> SourcePlan:
    """A directory converted earlier (e.g. to re-shard it): its Parquet files, spaces from its metadata."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_path}: cannot read ({e})") from e
    plan = plan_columnar(path, mapping, block_bytes)
    if not isinstance(meta, dict) or "schema_version" not in meta:
        return plan
    plan.source_id = f"rayoffline:{os.path.abspath(path)}"
    plan.observation_space = meta.get("observation_space")
    plan.action_space = meta.get("action_space")
    plan.env_id, plan.env_spec = meta.get("env_id"), meta.get("env_spec")
    plan.ref_min_score, plan.ref_max_score = meta.get("ref_min_score"), meta.get("ref_max_score")
    return plan
