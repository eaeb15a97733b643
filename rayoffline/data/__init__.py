"""Data layer: converters to sharded Parquet (through Ray Data), builtin datasets, inspection, loading."""
