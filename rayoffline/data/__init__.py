"""Data layer: streaming converters to sharded Parquet (in-process or Ray tasks), builtin datasets, inspection,
loading; datasets on local paths or filesystem URIs (storage.py)."""

# builtin datasets, loading, inspection (issue 2, loading side)
from .builtin import behavior_policy, behavior_return, minari_dataset_path, resolve  # noqa: E402,F401
from .inspect import inspect  # noqa: E402,F401
from .load import iter_chunks, load, load_metadata  # noqa: E402,F401
from .storage import is_uri, register_filesystem  # noqa: E402,F401

# conversion, append and validation (issue 2, converter side)
from .convert import append, convert, read_metadata  # noqa: E402,F401
