"""Source readers: each turns one kind of input into `Chunk`s of whole numpy columns (see _common.py).

  minari:ID | builtin:NAME | Minari dataset directory      -> minari_datasets.py
  *.hdf5 / *.h5 (D4RL layout)                            -> hdf5.py
  *.parquet / *.csv / a directory of them (RLlib or mapped) -> columnar.py
  a converted dataset directory (metadata.json)           -> columnar.py, spaces from its metadata
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ...errors import DataError
from ..schema import METADATA_FILE
from ._common import FIELDS, Chunk, SourceData
from .columnar import SUFFIXES, read_columnar
from .hdf5 import is_hdf5, read_hdf5
from .minari_datasets import find_data_dir, local_dataset_dir, read_minari

__all__ = ["FIELDS", "Chunk", "SourceData", "read_source"]


def _no_mapping(source: str, mapping) -> None:
    if mapping:
        raise DataError(f"{source}: a column mapping (--map) applies to Parquet, CSV and HDF5 files only; "
                        f"Minari datasets name their own fields")


def read_source(source: str | os.PathLike, mapping: dict[str, str] | None = None) -> SourceData:
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
        return read_minari(data_dir, source_id=s, label=f"{s} ({path})")
    if s.startswith("builtin:"):
        _no_mapping(s, mapping)
        from ..builtin import minari_dataset_path

        path = Path(minari_dataset_path(s[len("builtin:"):]))
        data_dir = find_data_dir(path)
        if data_dir is None:
            raise DataError(f"{s}: {path} holds no Minari data (no data/metadata.json)")
        return read_minari(data_dir, source_id=s, label=f"{s} ({path})")
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
            return read_minari(data_dir, source_id=f"minari-dir:{os.path.abspath(path)}")
        meta_path = path / METADATA_FILE
        if meta_path.is_file():
            return _read_converted(path, meta_path, mapping)
        return read_columnar(path, mapping)
    if is_hdf5(path):
        return read_hdf5(path, mapping)
    if path.suffix.lower() in SUFFIXES:
        return read_columnar(path, mapping)
    raise DataError(f"{path}: unknown file type {path.suffix or '(no suffix)'!r}; expected .hdf5/.h5 (D4RL layout), "
                    f".parquet or .csv, or a directory (Minari dataset or Parquet/CSV files)")


def _read_converted(path: Path, meta_path: Path, mapping) -> SourceData:
    """A directory converted earlier (e.g. to re-shard it): its Parquet files, spaces from its metadata."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_path}: cannot read ({e})") from e
    if not isinstance(meta, dict) or "schema_version" not in meta:
        return read_columnar(path, mapping)
    data = read_columnar(path, mapping)
    data.source_id = f"rayoffline:{os.path.abspath(path)}"
    data.observation_space = meta.get("observation_space")
    data.action_space = meta.get("action_space")
    data.env_id, data.env_spec = meta.get("env_id"), meta.get("env_spec")
    data.ref_min_score, data.ref_max_score = meta.get("ref_min_score"), meta.get("ref_max_score")
    return data
