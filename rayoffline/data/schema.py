"""On-disk contract of a converted dataset directory.

DIR/
  metadata.json
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

metadata.json keys:
  schema_version, source, content_hash (sha256 over the partitions' content hashes),
  env_id (gymnasium id or null), env_spec (gymnasium EnvSpec JSON or null),
  observation_space {"type": "Box", "shape": [...], "low": [...], "high": [...], "dtype": "float32"},
  action_space {"type": "Box", "shape": [n], "low": [...], "high": [...]} | {"type": "Discrete", "n": n},
  num_transitions, num_episodes, num_terminations, num_truncations,
  return_stats {"mean", "std", "min", "max", "p5", "p25", "p50", "p75", "p95"},
  episode_length_stats {"mean", "min", "max"},
  obs_mean [...], obs_std [...], reward_mean, reward_std,
  ref_min_score, ref_max_score (null when the source has none),
  partitions [{"name", "source", "files", "num_transitions", "num_episodes",
               "content_hash" (sha256 over the partition's columns with its episode ids counted from 0, so the
               same source appended twice has the same hash: `append` refuses it without allow_duplicate),
               "notes" (what the conversion dropped or changed, e.g. rows without a next observation; [] if
               nothing), "duplicate_of" (only on a partition appended with allow_duplicate: the partition it
               repeats)}].
"""
from __future__ import annotations

SCHEMA_VERSION = 1
METADATA_FILE = "metadata.json"
COLUMNS = ("observations", "actions", "rewards", "next_observations", "terminations", "truncations",
           "episode_id", "step")
