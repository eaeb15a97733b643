"""On-disk contract of a converted dataset directory (a local path or a filesystem URI: s3://, gs://, file://).

DIR/
  _rayoffline.json       the dataset's metadata (`metadata.json` in datasets written before schema version 2;
                         still read, and renamed on the next append). The leading underscore makes Parquet
                         readers skip it: pandas.read_parquet(DIR) and pyarrow.parquet.read_table(DIR) read the
                         shards of every partition as one table, without filters.
  part-00000/            one partition per `convert` (part-00000) and per `append` (part-00001, ...)
    shard-00000.parquet  flat transitions, large row groups
    ...

Parquet columns (one row = one transition):
  observations       fixed_size_list<float32>[obs_dim]
  actions            fixed_size_list<float32>[act_dim]   (Box)   |  int64   (Discrete)
  rewards            float32
  next_observations  fixed_size_list<float32>[obs_dim]
  terminations       bool   (only these stop bootstrapping)
  truncations        bool   (the last transition of a truncated episode keeps its real next observation)
  episode_id         int64  (unique across partitions)
  step               int32  (index of the transition within its episode)
optional, after those:
  action_logp        float32 (the behavior policy's log-probability of the logged action: log-probability for
                     Discrete actions, log-density for Box actions, of the value stored in `actions`, in its units;
                     finite; a discrete one <= 0). Written when the source has it: RLlib recordings' `action_logp`
                     (older stacks' `action_prob`, logged), D4RL HDF5's `infos/action_log_probs`, or a column mapped
                     with `--map action_logp=COL` (log-probabilities) or `--map action_prob=COL` (probabilities: a
                     probability <= 0, or above 1 for a discrete action, is an error naming file, column and row).
                     Minari datasets are not read for it (sources/minari_datasets.py says why). Off-policy
                     evaluation uses it as the behavior policy (plain IS/PDIS need it; WIS/PDWIS/DR use it instead
                     of a fitted behavior model); training never reads it.

Metadata keys:
  schema_version, source, content_hash (sha256 over the partitions' content hashes),
  env_id (gymnasium id or null), env_spec (gymnasium EnvSpec JSON or null),
  observation_space {"type": "Box", "shape": [...], "low": [...], "high": [...], "dtype": "float32"},
  action_space {"type": "Box", "shape": [n], "low": [...], "high": [...]} | {"type": "Discrete", "n": n},
  num_transitions, num_episodes, num_terminations, num_truncations,
  return_stats {"mean", "std", "min", "max", "p5", "p25", "p50", "p75", "p95"},
  episode_length_stats {"mean", "min", "max"},
  obs_mean [...], obs_std [...], reward_mean, reward_std,
  ref_min_score, ref_max_score (null when the source has none),
  action_logp (true, only when EVERY partition has the `action_logp` column; absent otherwise),
  partitions [{"name", "source", "files", "num_transitions", "num_episodes",
               "content_hash" (of the partition's columns with its episode ids counted from 0, so the same
               source appended twice has the same hash: `append` refuses it without allow_duplicate; see below),
               "hash_piece_rows" (rows per hash piece, see below; absent in schema version 1),
               "notes" (what the conversion dropped or changed, e.g. rows without a next observation; [] if
               nothing), "duplicate_of" (only on a partition appended with allow_duplicate: the partition it
               repeats), "action_logp" (true, only on a partition whose files have that column)}].

Logged probabilities and `append`: a partition keeps the column exactly when its source had it; nothing is ever
filled in. So after appending a partition without the column to a dataset with it (or the reverse), the
dataset-level `action_logp` is absent, readers (holdout.load_episodes) report no logged probabilities for the
dataset, and OPE falls back to a fitted behavior model; `append` says so in a warning (and in the partition's
notes). Reading the shards as one table (pandas/pyarrow, above) then gives nulls, or drops the column, where a
partition lacks it.

Partition content hash (schema version 2): the partition's rows, columns in the order above with episode ids from
0 (`action_logp` last, only when the partition has it: the hash of data without it is unchanged), are cut into
pieces of R = hash_piece_rows rows (R = HASH_PIECE_BYTES // bytes per row as numpy columns, bools one byte: 118
bytes and R = 1,137,438 for Hopper's 11-dim observations and 3-dim actions). A piece's digest is sha256 over, per
column, "NAME:DTYPE:SHAPE;" and the column's bytes (metadata.content_hash of the piece). The partition hash is the
digest of its only piece when it has at most R rows - exactly schema version 1's hash, which hashed the whole
partition that way - and otherwise sha256 over "pieces:R:ROWS;" followed by the pieces' digests. It depends only
on the rows, not on how the source was laid out, how it was cut into blocks while converting, or how many shards
were written; pieces are hashed by the tasks that write them, so no process ever hashes the whole partition.
"""
from __future__ import annotations

SCHEMA_VERSION = 2
METADATA_FILE = "_rayoffline.json"
LEGACY_METADATA_FILE = "metadata.json"
"""The metadata file's name in schema version 1 (read, never written)."""
HASH_PIECE_BYTES = 128 << 20
"""Bytes of one content-hash piece (see the module docstring); part of the hash's definition: never change it
without bumping SCHEMA_VERSION (partitions record their hash_piece_rows)."""
COLUMNS = ("observations", "actions", "rewards", "next_observations", "terminations", "truncations",
           "episode_id", "step")
OPTIONAL_COLUMNS = ("action_logp",)
"""Columns a partition has only when its source had them (after COLUMNS, in this order)."""
