"""The Python API of training and evaluation (`rayoffline.train`, `evaluate_run`, `load_run`).

`train` assembles a run's config (rayoffline.learner.config), checks what a resume may continue on, and hands
a RunSpec to the one worker function (rayoffline.learner.worker.run_training). The CLI's commands print what
these return (rayoffline.learner.commands).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from .. import algorithms
from ..config import from_dict, parse_overrides
from ..errors import CheckpointError, ConfigError, RayOfflineError
from ..spec import EnvSpec
from . import checkpoint as ckpt
from .config import build_config, load_config_file, nest_dotted
from .threads import set_threads
from .worker import RunSpec, _build_algorithm, evaluate_members, open_dataset, run_training

__all__ = ["train", "evaluate_run", "load_run", "build_config"]


def _resolve_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse an --out that cannot hold a new run (a file, a non-empty directory) with the reason."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir}: is a file, not a run directory; choose a directory path")
    if resume:
        if not run_dir.is_dir():
            raise CheckpointError(f"--resume: run directory {run_dir} does not exist")
        if not (run_dir / "config.yaml").exists():
            raise CheckpointError(f"--resume: {run_dir} is not a rayoffline run directory (no config.yaml)")
        return
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if (run_dir / "config.yaml").exists():
            raise ConfigError(f"run directory {run_dir} already exists and holds a run; choose another --out or pass "
                              f"--resume to continue it")
        raise ConfigError(f"--out {run_dir}: directory exists and is not empty (and is not a rayoffline run); "
                          f"choose a new or empty directory")


_UNKNOWN = object()


def _split_ids(meta: dict[str, Any] | None) -> list[int]:
    """The held-out episode ids a dataset's metadata records ([] without a split)."""
    h = (meta or {}).get("holdout") or {}
    return [int(i) for i in h.get("episode_ids", [])]


def _check_data_identity(run_dir: Path, saved_data: str, given: str | None, saved_hash: str | None,
                         allow_change: bool, saved_meta: Any = _UNKNOWN) -> tuple[str, str | None,
                                                                                  dict[str, Any] | None]:
    """The dataset a resumed run continues on. Returns (data, its content hash, the recorded change or None).

    A resumed run must see the data it was trained on: the content hash recorded with the run is compared to
    the dataset's. A moved dataset is accepted under `--data NEW_PATH` when its hash matches; changed data (an
    append, a re-conversion) only with allow_change, and the change is recorded in config.yaml."""
    data = given if given is not None else saved_data
    try:
        _, meta = open_dataset(data)
    except RayOfflineError as e:
        if given is None:
            raise ConfigError(f"--resume: the run's dataset {saved_data} cannot be read ({e}); if it moved, pass "
                              f"--resume --data NEW_PATH") from None
        raise
    new_hash = meta.get("content_hash")
    where = f"{data}" if given is None else f"--data {data}"
    if saved_meta is not _UNKNOWN and _split_ids(saved_meta) != _split_ids(meta) and \
            (saved_hash is None or new_hash == saved_hash):
        # same transitions, another held-out split (`data split --replace`, or a split made after the run began):
        # training would now sample other episodes
        before, after = len(_split_ids(saved_meta)), len(_split_ids(meta))
        if not allow_change:
            raise ConfigError(f"--resume: {where}'s held-out split has changed since {run_dir} was trained on it "
                              f"({before} -> {after} held-out episodes): training would sample other episodes; pass "
                              f"--allow-data-change to continue (recorded in config.yaml), or start a new run")
        return data, new_hash, {"from_hash": saved_hash, "to_hash": new_hash, "data": data,
                                "held_out_episodes": [before, after]}
    if saved_hash is None or new_hash == saved_hash:
        return data, new_hash, None
    if not allow_change:
        raise ConfigError(
            f"--resume: {where} has changed since {run_dir} was trained on it (content hash {new_hash[:12]} != "
            f"{saved_hash[:12]}: data appended or converted again); pass --allow-data-change to continue on the "
            f"new data (recorded in config.yaml), or start a new run")
    return data, new_hash, {"from_hash": saved_hash, "to_hash": new_hash, "data": data}


def _from_config_file(config: dict[str, Any] | str | Path | None, algo: str | None,
                      data: str | None) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """A config that names its algorithm and dataset (a sweep's best.yaml, a run's config.yaml) supplies them
    when --algo/--data are not given; given and different, it is an error. The run records config.yaml keeps
    (data_hash, data_changes) are dropped: they describe the old run, not the new one."""
    if config is None:
        return None, algo, data
    raw = load_config_file(config) if isinstance(config, (str, Path)) else json.loads(json.dumps(config))
    where = f"{config}" if isinstance(config, (str, Path)) else "config"
    named_algo, named_data = raw.pop("algo_name", None), raw.pop("data", None)
    raw.pop("data_hash", None)
    raw.pop("data_changes", None)
    if named_algo is not None and algo is not None and named_algo != algo:
        raise ConfigError(f"{where}: algo_name is {named_algo!r} but --algo says {algo!r}; drop one of them")
    if named_data is not None and data is not None and str(named_data) != str(data):
        from ..data import is_uri
        if is_uri(str(named_data)) or str(Path(str(named_data)).resolve()) != str(data):
            raise ConfigError(f"{where}: data is {named_data!r} but --data says {data!r}; drop one of them")
    if data is None and named_data is not None:
        data = str(named_data)
    return raw, algo or named_algo, data


def train(algo: str | None, data: str | None, out: str | Path, steps: int | None = None,
          config: dict[str, Any] | str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None,
          seed: int | None = None, resume: bool = False, allow_data_change: bool = False,
          verbose: bool = False, preset: str | None = None) -> dict[str, Any]:
    """Train an offline RL algorithm on a converted dataset; returns the result (also OUT/result.json).

    Args:
        algo: algorithm name (`rayoffline algos` lists them: bc, td3_bc, iql, cql, bcq, discrete_cql,
            discrete_bcq). May be None with resume=True.
        data: a converted dataset directory, or builtin:NAME (converted on first use). May be None with
            resume=True; given with resume=True, the run continues on a moved copy of its dataset (the
            content hash must match).
        out: run directory (config.yaml, metrics.jsonl, tb/, checkpoints/, result.json); must be new or empty.
        steps: gradient updates (per member); default RunConfig.steps (100,000).
        config: a YAML file path or a mapping of run keys, `algo:` fields and optional `members:`.
        overrides: `["algo.cql_alpha=5", ...]` as on the command line, or {"algo.cql_alpha": 5, ...}.
        seed: run seed (default 0); every member's seed unless `members:` gives its own.
        resume: continue the run in `out` from its latest checkpoint with its saved config (`steps` may
            extend it; run settings such as log_every may change; algorithm, data and seeds may not).
        allow_data_change: with resume=True, continue although the dataset's content changed since the run
            started (the change is recorded in config.yaml under data_changes).
        verbose: Ray Train runs: show Ray's own logs and the workers' output on the terminal (they always go
            to RUN_DIR/ray.log and Ray's session directory).
        preset: a reference preset's name (tune_configs/presets/NAME.yaml, e.g. 'iql-hopper-medium'): its
            algorithm, dataset and settings beneath `config` and `overrides`; `algo` may be None, `data`
            replaces the preset's dataset.

    Returns:
        dict with eval_return_mean/std and normalized_score of the best member, `members` (one entry per
        member with its seed, config and scores), behavior_return_mean, updates_per_s (passes of all K
        members per second), member_updates_per_s, wall_s.

    Example:
        >>> import rayoffline
        >>> r = rayoffline.train("iql", "builtin:pendulum-medium", "runs/iql", steps=20000)
        >>> r["eval_return_mean"], r["normalized_score"]
    """
    submitted = time.time()
    from ..data import is_uri
    if isinstance(out, str) and out.startswith("file://"):
        out = out[len("file://"):]
    elif is_uri(out):
        raise ConfigError(f"--out {out}: a run directory on object storage is not supported yet; use a local path, "
                          f"or shared storage (NFS/EFS) mounted at the same path on every node (datasets, --data, "
                          f"may be URIs)")
    run_dir = Path(out)
    start = 0
    state = None
    state_path: Path | None = None
    history: list[dict[str, Any]] = []
    change: dict[str, Any] | None = None
    if data is not None and not data.startswith(("builtin:", "minari:")) and not is_uri(data):
        data = str(Path(data).resolve())  # config.yaml must find it again from any working directory
    _resolve_run_dir(run_dir, resume)
    if allow_data_change and not resume:
        raise ConfigError("--allow-data-change only applies with --resume")
    if resume:
        sc = load_config_file(run_dir / "config.yaml")
        saved_algo, saved_data = sc.pop("algo_name", None), sc.pop("data", None)
        saved_hash = sc.pop("data_hash", None)
        history = list(sc.pop("data_changes", None) or [])
        if saved_algo is None or saved_data is None:
            raise CheckpointError(f"{run_dir / 'config.yaml'}: lacks algo_name/data; not written by rayoffline train")
        if algo is not None and algo != saved_algo:
            raise ConfigError(f"--resume: {run_dir} was trained with algorithm {saved_algo!r}, not {algo!r}; a "
                              f"resumed run keeps its algorithm, dataset and seeds (start a new run to change them)")
        if config is not None or seed is not None or preset is not None:
            raise ConfigError("--resume continues the run's saved config.yaml; --config/--seed/--preset cannot "
                              "change it")
        extra = parse_overrides(overrides) if isinstance(overrides, list) else nest_dotted(overrides or {})
        frozen = sorted(k for k in extra if k in ("algo", "members", "seed"))
        if frozen:
            raise ConfigError(f"--resume: config key '{frozen[0]}' cannot change in a resumed run (the checkpoint's "
                              f"networks, optimizers and coefficients were trained with the saved value); start a "
                              f"new run instead")
        algo = saved_algo
        cfg = build_config(algo, sc, extra, steps=steps)
        found = ckpt.list_checkpoints(run_dir)
        saved_meta: Any = _UNKNOWN
        if found:  # else the run crashed before its first checkpoint: start it again from step 0
            state_path = found[-1]
            state = ckpt.load(state_path)
            saved_meta = state.get("metadata")
            if state["algo"] != algo:
                raise CheckpointError(f"{state_path}: checkpoint is for '{state['algo']}', config says '{algo}'")
            start = int(state["step"])
            saved_hash = (state.get("metadata") or {}).get("content_hash", saved_hash)
        data, data_hash, change = _check_data_identity(run_dir, saved_data, data, saved_hash, allow_data_change,
                                                       saved_meta)
        if change is not None:
            history.append({"step": start, **change})
        if cfg["run"].steps < start:
            raise ConfigError(f"--steps {cfg['run'].steps} is below the {start} steps {run_dir} has already trained")
    else:
        config, algo, data = _from_config_file(config, algo, data)
        if preset is not None:
            from . import presets
            config, algo, data = presets.apply(preset, algo, data, config)
        if data is not None and not data.startswith(("builtin:", "minari:")) and not is_uri(data):
            data = str(Path(data).resolve())
        if algo is None or data is None:
            raise ConfigError("train needs an algorithm (--algo) and a dataset (--data)")
        cfg = build_config(algo, config, overrides, steps=steps, seed=seed)
        if preset is not None:
            presets.check_action_space(preset, open_dataset(data)[1], data)
    if cfg["run"].init_from and not resume:  # refuse a source that does not fit before anything starts
        from .warm import initial_weights
        init = str(Path(cfg["run"].init_from).resolve())
        cfg["run"] = dataclasses.replace(cfg["run"], init_from=init)
        initial_weights(_build_algorithm(cfg, open_dataset(data)[1], torch.device("cpu")), cfg["algo_name"], init)
    spec = RunSpec(cfg=cfg, data=data, run_dir=str(run_dir), resume=resume,
                   checkpoint=str(state_path) if state_path is not None else None, data_changes=history,
                   data_changed_now=resume and change is not None, submitted=submitted)
    if cfg["run"].num_workers > 0:
        from .distributed import train_on_ray
        return train_on_ray(spec, start, verbose=verbose)
    return run_training(spec)


def load_run(run_dir: str | Path, device: str = "cpu"):
    """Rebuild the algorithm of `run_dir` from its latest checkpoint. Returns (algorithm, metadata, state)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: is a file, not a run directory")
    if not ckpt.list_checkpoints(run_dir):
        if (run_dir / "config.yaml").exists():
            raise CheckpointError(f"{run_dir}: the run has no checkpoint yet (it has not reached its first "
                                  f"checkpoint_every or its end); continue it with `rayoffline train --resume --out "
                                  f"{run_dir}`")
        raise CheckpointError(f"{run_dir}: not a rayoffline run directory (no config.yaml, no checkpoints/)")
    path = ckpt.latest(run_dir)
    state = ckpt.load(path)
    try:
        cls = algorithms.get(state["algo"])
        configs = [from_dict(cls.Config, c, prefix="algo.") for c in state["member_configs"]]
    except ConfigError as e:
        raise CheckpointError(f"{path}: incompatible with this version of rayoffline ({e})") from None
    meta = state["metadata"]
    algorithm = cls(EnvSpec.from_metadata(meta), configs, state["seeds"], device=torch.device(device),
                    obs_mean=meta.get("obs_mean"), obs_std=meta.get("obs_std"))
    try:
        algorithm.load_state_dict(state["learner"]["algorithm"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: network weights do not fit '{state['algo']}' ({str(e).splitlines()[0]})") \
            from None
    return algorithm, meta, state


def evaluate_run(run_dir: str | Path, episodes: int = 10) -> dict[str, Any]:
    """Evaluate the latest checkpoint of `run_dir` online for `episodes` episodes per member; writes eval.json.

    Returns {"step", "episodes", "eval_return_mean", "eval_return_std", "normalized_score" (lists, one entry
    per member), "behavior_return_mean", "members" (each member's seed and per-member coefficients)}."""
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ConfigError(f"--episodes must be a positive integer, got {episodes!r}")
    algorithm, meta, state = load_run(run_dir)
    set_threads(int(state["run_config"].get("threads", 0)))
    ev = evaluate_members(algorithm, meta, episodes, int(state["run_config"].get("seed", 0)))
    out = {"step": int(state["step"]), "episodes": episodes, "eval_return_mean": ev["return_mean"],
           "eval_return_std": ev["return_std"], "normalized_score": ev["normalized_score"],
           "behavior_return_mean": (meta.get("return_stats") or {}).get("mean"),
           "members": [{"seed": s, "algo": c} for s, c in zip(state["seeds"], state["member_configs"])]}
    ckpt.atomic_write_json(Path(run_dir) / "eval.json", out)
    return out
