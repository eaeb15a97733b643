"""Small source datasets for the converter tests, built in tmp directories (never downloaded)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# episode layout used across formats: (length, how it ends)
EPISODES = [(5, "term"), (4, "trunc"), (3, "trunc")]


def episodes(obs_dim=3, act_dim=1, discrete_n=None, layout=EPISODES, seed=0, act_scale=1.0):
    """Per-episode arrays Minari-style: observations has T+1 rows (the last is the real final observation)."""
    rng = np.random.default_rng(seed)
    out = []
    for length, end in layout:
        obs = rng.standard_normal((length + 1, obs_dim)).astype(np.float32)
        if discrete_n:
            act = rng.integers(discrete_n, size=length).astype(np.int64)
        else:
            act = (rng.uniform(-1, 1, (length, act_dim)) * act_scale).astype(np.float32)
        term = np.zeros(length, bool)
        trunc = np.zeros(length, bool)
        if end == "term":
            term[-1] = True
        elif end == "trunc":
            trunc[-1] = True
        out.append(dict(observations=obs, actions=act, rewards=rng.standard_normal(length).astype(np.float32),
                        terminations=term, truncations=trunc))
    return out


def make_minari(dataset_id: str, eps, env="Pendulum-v1", ref=(-1000.0, -100.0), **kw):
    """A Minari dataset from arrays (create_dataset_from_buffers; no DataCollector, so no jax)."""
    import minari
    from minari.data_collector import EpisodeBuffer

    bufs = [EpisodeBuffer(id=i, observations=e["observations"], actions=e["actions"], rewards=list(e["rewards"]),
                          terminations=list(e["terminations"]), truncations=list(e["truncations"]))
            for i, e in enumerate(eps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = dict(author="test", author_email="test@example.com", code_permalink="tests", algorithm_name="test",
                    description="test dataset")
        if ref is not None:
            args.update(ref_min_score=ref[0], ref_max_score=ref[1])
        args.update(kw)
        return minari.create_dataset_from_buffers(dataset_id, bufs, env=env, **args)


def flat_rows(eps):
    """Rows as D4RL stores them: one row per step, episodes back to back (no final observations)."""
    cat = {k: np.concatenate([e[k] if k != "observations" else e[k][:-1] for e in eps]) for k in eps[0]}
    cat["next_observations"] = np.concatenate([e["observations"][1:] for e in eps])
    cat["episode"] = np.concatenate([np.full(len(e["rewards"]), i) for i, e in enumerate(eps)])
    return cat


def fsl(a: np.ndarray):
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a).reshape(-1)), a.shape[1])


def write_parquet(path: Path, columns: dict, list_type: str = "fixed") -> Path:
    arrays = {}
    for k, v in columns.items():
        if isinstance(v, np.ndarray) and v.ndim == 2:
            arrays[k] = fsl(v) if list_type == "fixed" else pa.array(list(v.astype(np.float64)))
        else:
            arrays[k] = pa.array(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path)
    return path


def write_hdf5(path: Path, columns: dict) -> Path:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in columns.items():
            f.create_dataset(k, data=v)
    return path


def read_converted(out: Path) -> dict:
    """Every partition's rows, concatenated in partition/file order, as numpy columns."""
    import json

    meta = json.loads((out / "_rayoffline.json").read_text())
    tables = [pq.read_table(out / p["name"] / f) for p in meta["partitions"] for f in p["files"]]
    t = pa.concat_tables(tables)
    cols = {}
    for name in t.column_names:
        c = t.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(c.type):
            cols[name] = c.flatten().to_numpy().reshape(len(c), c.type.list_size)
        else:
            cols[name] = c.to_numpy(zero_copy_only=False)
    return cols
