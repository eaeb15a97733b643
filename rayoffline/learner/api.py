"""Training and evaluation entry points shared by the CLI and Python (`rayoffline.train`).

A run's configuration is one mapping:

    steps: 20000            # RunConfig fields (rayoffline.learner.config)
    batch_size: 256
    algo:                   # the algorithm's Config fields
      expectile: 0.7
    members:                # optional: K > 1 members trained in one pass, each a dict of
      - {cql_alpha: 1.0}    # per-member overrides of `algo` fields, plus an optional `seed`
      - {cql_alpha: 5.0, seed: 1}

It comes from defaults < the YAML file < `--set key=value` < explicit arguments (steps, seed).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import algorithms
from ..config import field_docs, from_dict, load_yaml, merge, parse_overrides, plain, to_dict
from ..errors import CheckpointError, ConfigError, RayOfflineError
from ..spec import EnvSpec
from . import checkpoint as ckpt
from .config import RunConfig
from .logger import RunLogger
from .loop import Learner
from .threads import set_threads

RUN_KEYS = {f.name for f in dataclasses.fields(RunConfig)}


# ----- configuration ------------------------------------------------------------------------------------
def _load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            d = load_yaml(f.read())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return d


def build_config(algo: str, config: dict[str, Any] | str | Path | None = None,
                 overrides: list[str] | dict[str, Any] | None = None, steps: int | None = None,
                 seed: int | None = None) -> dict[str, Any]:
    """Merge the config sources and validate them. Returns {'algo_name', 'run', 'members', 'seeds'}."""
    raw: dict[str, Any] = {}
    if isinstance(config, (str, Path)):
        raw = _load_yaml(config)
    elif config:
        raw = json.loads(json.dumps(config))  # deep copy of plain data
    if overrides:
        merge(raw, parse_overrides(overrides) if isinstance(overrides, list) else _nest_dict(overrides))
    if steps is not None:
        raw["steps"] = steps
    if seed is not None:
        raw["seed"] = seed
    cls = algorithms.get(algo)
    algo_raw = plain(raw.pop("algo", None)) or {}
    if not isinstance(algo_raw, dict):
        raise ConfigError("config key 'algo': expected a mapping of algorithm fields")
    members_raw = plain(raw.pop("members", None))
    unknown = sorted(set(raw) - RUN_KEYS)
    if unknown:
        raise ConfigError(f"unknown config key '{unknown[0]}'; run keys: {', '.join(sorted(RUN_KEYS))}; "
                          f"algorithm keys go under 'algo.' (see `rayoffline algos`)")
    run = from_dict(RunConfig, raw)
    if members_raw is None:
        members_raw = [{}]
    if not isinstance(members_raw, list) or not members_raw or not all(isinstance(m, dict) for m in members_raw):
        raise ConfigError("config key 'members': expected a non-empty list of mappings of per-member overrides")
    configs, seeds = [], []
    for i, m in enumerate(members_raw):
        m = dict(m)
        s = m.pop("seed", run.seed)
        if not isinstance(s, int) or isinstance(s, bool):
            raise ConfigError(f"config key 'members[{i}].seed': expected an integer, got {s!r}")
        try:
            configs.append(from_dict(cls.Config, {**algo_raw, **m}, prefix="algo."))
        except ConfigError as e:
            raise ConfigError(f"{e} (member {i})" if len(members_raw) > 1 else str(e)) from None
        seeds.append(s)
    return {"algo_name": algo, "run": run, "members": configs, "seeds": seeds}


def _nest_dict(d: dict[str, Any]) -> dict[str, Any]:
    """{"algo.lr": 0.1, "steps": 5} -> {"algo": {"lr": 0.1}, "steps": 5}."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        for part in reversed(str(key).split(".")[1:]):
            value = {part: value}
        merge(out, {str(key).split(".")[0]: value})
    return out


def _config_to_yaml(cfg: dict[str, Any], data: str, data_hash: str | None = None,
                    data_changes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"algo_name": cfg["algo_name"], "data": data, **to_dict(cfg["run"])}
    if data_hash is not None:
        out["data_hash"] = data_hash  # what --resume checks the dataset against
    if data_changes:
        out["data_changes"] = data_changes  # resumes that continued on changed data (--allow-data-change)
    out["algo"] = to_dict(cfg["members"][0])
    if len(cfg["members"]) > 1 or cfg["seeds"][0] != cfg["run"].seed:
        base = out["algo"]
        out["members"] = [{**{k: v for k, v in to_dict(c).items() if base.get(k) != v}, "seed": s}
                          for c, s in zip(cfg["members"], cfg["seeds"])]
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        ckpt.publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device': {name!r} requested but CUDA is not available on this machine")
    return dev


def _dataset(data: str) -> tuple[Path, dict[str, Any]]:
    from .. import data as data_mod
    path = data_mod.resolve(data)
    return Path(path), data_mod.read_metadata(path)


def _build_algorithm(cfg: dict[str, Any], meta: dict[str, Any], device: torch.device):
    cls = algorithms.get(cfg["algo_name"])
    spec = EnvSpec.from_metadata(meta)
    return cls(spec, cfg["members"], cfg["seeds"], device=device, obs_mean=meta.get("obs_mean"),
               obs_std=meta.get("obs_std"))


# ----- training -----------------------------------------------------------------------------------------
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


def _check_data_identity(run_dir: Path, saved_data: str, given: str | None, saved_hash: str | None,
                         allow_change: bool) -> tuple[str, str | None, dict[str, Any] | None]:
    """The dataset a resumed run continues on. Returns (data, its content hash, the recorded change or None).

    A resumed run must see the data it was trained on: the content hash recorded with the run is compared to
    the dataset's. A moved dataset is accepted under `--data NEW_PATH` when its hash matches; changed data (an
    append, a re-conversion) only with allow_change, and the change is recorded in config.yaml."""
    data = given if given is not None else saved_data
    try:
        _, meta = _dataset(data)
    except RayOfflineError as e:
        if given is None:
            raise ConfigError(f"--resume: the run's dataset {saved_data} cannot be read ({e}); if it moved, pass "
                              f"--resume --data NEW_PATH") from None
        raise
    new_hash = meta.get("content_hash")
    if saved_hash is None or new_hash == saved_hash:
        return data, new_hash, None
    where = f"{data}" if given is None else f"--data {data}"
    if not allow_change:
        raise ConfigError(
            f"--resume: {where} has changed since {run_dir} was trained on it (content hash {new_hash[:12]} != "
            f"{saved_hash[:12]}: data appended or converted again); pass --allow-data-change to continue on the "
            f"new data (recorded in config.yaml), or start a new run")
    return data, new_hash, {"from_hash": saved_hash, "to_hash": new_hash, "data": data}


def train(algo: str | None, data: str | None, out: str | Path, steps: int | None = None,
          config: dict[str, Any] | str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None,
          seed: int | None = None, resume: bool = False, allow_data_change: bool = False) -> dict[str, Any]:
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

    Returns:
        dict with eval_return_mean/std and normalized_score of the best member, `members` (one entry per
        member with its seed, config and scores), behavior_return_mean, updates_per_s (passes of all K
        members per second), member_updates_per_s, wall_s.

    Example:
        >>> import rayoffline
        >>> r = rayoffline.train("iql", "builtin:pendulum-medium", "runs/iql", steps=20000)
        >>> r["eval_return_mean"], r["normalized_score"]
    """
    run_dir = Path(out)
    start = 0
    state = None
    state_path: Path | None = None
    history: list[dict[str, Any]] = []
    if data is not None and not data.startswith(("builtin:", "minari:")):
        data = str(Path(data).resolve())  # config.yaml must find it again from any working directory
    _resolve_run_dir(run_dir, resume)
    if allow_data_change and not resume:
        raise ConfigError("--allow-data-change only applies with --resume")
    if resume:
        sc = _load_yaml(run_dir / "config.yaml")
        saved_algo, saved_data = sc.pop("algo_name", None), sc.pop("data", None)
        saved_hash = sc.pop("data_hash", None)
        history = list(sc.pop("data_changes", None) or [])
        if saved_algo is None or saved_data is None:
            raise CheckpointError(f"{run_dir / 'config.yaml'}: lacks algo_name/data; not written by rayoffline train")
        if algo is not None and algo != saved_algo:
            raise ConfigError(f"--resume: {run_dir} was trained with algorithm {saved_algo!r}, not {algo!r}; a "
                              f"resumed run keeps its algorithm, dataset and seeds (start a new run to change them)")
        if config is not None or seed is not None:
            raise ConfigError("--resume continues the run's saved config.yaml; --config/--seed cannot change it")
        extra = parse_overrides(overrides) if isinstance(overrides, list) else _nest_dict(overrides or {})
        frozen = sorted(k for k in extra if k in ("algo", "members", "seed"))
        if frozen:
            raise ConfigError(f"--resume: config key '{frozen[0]}' cannot change in a resumed run (the checkpoint's "
                              f"networks, optimizers and coefficients were trained with the saved value); start a "
                              f"new run instead")
        algo = saved_algo
        cfg = build_config(algo, sc, extra, steps=steps)
        found = ckpt.list_checkpoints(run_dir)
        if found:  # else the run crashed before its first checkpoint: start it again from step 0
            state_path = found[-1]
            state = ckpt.load(state_path)
            if state["algo"] != algo:
                raise CheckpointError(f"{state_path}: checkpoint is for '{state['algo']}', config says '{algo}'")
            start = int(state["step"])
            saved_hash = (state.get("metadata") or {}).get("content_hash", saved_hash)
        data, data_hash, change = _check_data_identity(run_dir, saved_data, data, saved_hash, allow_data_change)
        if change is not None:
            history.append({"step": start, **change})
        if cfg["run"].steps < start:
            raise ConfigError(f"--steps {cfg['run'].steps} is below the {start} steps {run_dir} has already trained")
    else:
        if algo is None or data is None:
            raise ConfigError("train needs an algorithm (--algo) and a dataset (--data)")
        cfg = build_config(algo, config, overrides, steps=steps, seed=seed)
    run: RunConfig = cfg["run"]
    device = _device(run.device)
    threads = set_threads(run.threads, device)
    data_dir, meta = _dataset(data)
    algorithm = _build_algorithm(cfg, meta, device)  # validates the action space before anything is written
    if run.eval_episodes:  # fail now, not after training, when the environment cannot be recovered
        from ..evaluation.rollout import make_env
        make_env(meta.get("env_id"), meta.get("env_spec"))

    from .. import data as data_mod
    batch = data_mod.load(data_dir, device=device)
    learner = Learner(algorithm, batch, run.batch_size)
    if state is not None:
        learner.load_state_dict(state["learner"], where=str(state_path))
    say = _printer(run.progress)
    if resume:
        say(f"resuming {run_dir} at step {start} of {run.steps}"
            + (f" from {state_path.name}" if state_path is not None else " (no checkpoint yet: from the start)")
            + (f"; dataset changed (content hash {history[-1]['from_hash'][:12]} -> {history[-1]['to_hash'][:12]}), "
               f"recorded in config.yaml" if change is not None else ""))
    say(f"{cfg['algo_name']}: {algorithm.K} member{'s' if algorithm.K > 1 else ''}, {run.steps} steps of batch "
        f"{run.batch_size} on {meta.get('num_transitions')} transitions, {device.type}"
        + (f" ({threads} thread{'s' if threads > 1 else ''})" if device.type == "cpu" else "") + f" -> {run_dir}")

    created = not run_dir.exists()
    fresh = state is None and not resume
    finished_steps = 0
    logger = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(
            _config_to_yaml(cfg, data, meta.get("content_hash"), history), sort_keys=False))
        logger = RunLogger(run_dir, algorithm.K, run.steps, start, run.progress)
        result = _drive(run_dir, cfg, run, data, meta, algorithm, learner, logger, start, say)
        finished_steps = run.steps - start
    except BaseException:
        if logger is not None:
            finished_steps = logger.steps_done
            logger.close()
            logger = None
        if fresh and finished_steps == 0:  # nothing trained: leave nothing that blocks running it again
            _remove_new_run(run_dir, created)
        raise
    finally:
        if logger is not None:
            logger.close()
    return result


def _drive(run_dir: Path, cfg: dict[str, Any], run: RunConfig, data: str, meta: dict[str, Any], algorithm,
           learner: Learner, logger: RunLogger, start: int, say) -> dict[str, Any]:
    def payload() -> dict[str, Any]:
        return {"algo": cfg["algo_name"], "learner": learner.state_dict(),
                "member_configs": [to_dict(c) for c in cfg["members"]], "seeds": list(cfg["seeds"]),
                "run_config": to_dict(run), "data": data, "metadata": meta}

    k = algorithm.K
    last_eval: dict[str, Any] | None = None
    t_start = time.perf_counter()
    train_time, train_steps = 0.0, 0
    t0, s0 = time.perf_counter(), start
    for step in range(start + 1, run.steps + 1):
        learner.step(step)
        logger.advance()
        if step % run.log_every == 0 or step == run.steps:
            metrics = learner.pop_metrics()  # the one host sync of the interval
            now = time.perf_counter()
            train_time += now - t0
            train_steps += step - s0
            rate = (step - s0) / max(now - t0, 1e-9)
            metrics["perf/updates_per_s"] = rate
            metrics["perf/member_updates_per_s"] = rate * k
            logger.log(step, metrics)
            t0, s0 = time.perf_counter(), step
        if step == run.steps or (run.checkpoint_every and step % run.checkpoint_every == 0):
            tc = time.perf_counter()
            ckpt.save(run_dir, step, payload(), keep=run.keep_checkpoints)
            t0 += time.perf_counter() - tc
        evaluate_now = run.eval_episodes > 0 and (
            step == run.steps or (run.eval_every and step % run.eval_every == 0))
        if evaluate_now:
            te = time.perf_counter()
            last_eval = _evaluate(algorithm, meta, run.eval_episodes, run.seed)
            logger.log(step, {"eval/return_mean": last_eval["return_mean"],
                              "eval/return_std": last_eval["return_std"],
                              **({"eval/normalized_score": last_eval["normalized_score"]}
                                 if last_eval["normalized_score"][0] is not None else {})})
            t0 += time.perf_counter() - te
    if start >= run.steps:  # resumed a finished run: nothing trained, evaluate what is there
        last_eval = _evaluate(algorithm, meta, run.eval_episodes, run.seed) if run.eval_episodes else None
    result = _result(cfg, meta, last_eval, run, train_steps / train_time if train_time > 0 else None,
                     time.perf_counter() - t_start)
    _atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def _remove_new_run(run_dir: Path, created: bool) -> None:
    """Undo what a fresh run wrote before its first update (its directory was new or empty)."""
    import shutil
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for p in run_dir.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _printer(progress: str):
    """Status lines on stderr unless progress is 'off' (a terminal shows the progress bar besides)."""
    def say(msg: str) -> None:
        if progress != "off":
            print(msg, file=sys.stderr, flush=True)
    return say


def _evaluate(algorithm, meta: dict[str, Any], episodes: int, seed: int) -> dict[str, Any]:
    from ..evaluation.rollout import evaluate
    return evaluate(algorithm, meta, episodes, seed=seed)


def _result(cfg: dict[str, Any], meta: dict[str, Any], ev: dict[str, Any] | None, run: RunConfig,
            updates_per_s: float | None, wall_s: float) -> dict[str, Any]:
    k = len(cfg["members"])
    members = []
    for i in range(k):
        members.append({
            "seed": cfg["seeds"][i], "algo": to_dict(cfg["members"][i]),
            "eval_return_mean": ev["return_mean"][i] if ev else None,
            "eval_return_std": ev["return_std"][i] if ev else None,
            "normalized_score": ev["normalized_score"][i] if ev else None,
        })
    best = max(range(k), key=lambda i: members[i]["eval_return_mean"]) if ev else 0
    behavior = (meta.get("return_stats") or {}).get("mean")
    return {
        "algo": cfg["algo_name"], "steps": run.steps, "members": members, "best_member": best,
        "eval_return_mean": members[best]["eval_return_mean"], "eval_return_std": members[best]["eval_return_std"],
        "normalized_score": members[best]["normalized_score"], "eval_episodes": run.eval_episodes if ev else 0,
        "behavior_return_mean": behavior, "members_per_pass": k, "updates_per_s": updates_per_s,
        "member_updates_per_s": updates_per_s * k if updates_per_s is not None else None, "wall_s": wall_s,
        "dataset": meta.get("source"),
    }


# ----- evaluation of a finished run -----------------------------------------------------------------------
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
    ev = _evaluate(algorithm, meta, episodes, int(state["run_config"].get("seed", 0)))
    out = {"step": int(state["step"]), "episodes": episodes, "eval_return_mean": ev["return_mean"],
           "eval_return_std": ev["return_std"], "normalized_score": ev["normalized_score"],
           "behavior_return_mean": (meta.get("return_stats") or {}).get("mean"),
           "members": [{"seed": s, "algo": c} for s, c in zip(state["seeds"], state["member_configs"])]}
    _atomic_write_text(Path(run_dir) / "eval.json", json.dumps(out, indent=2) + "\n")
    return out


# ----- CLI glue -----------------------------------------------------------------------------------------
def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _rate(result: dict[str, Any]) -> str:
    ups, k = result.get("updates_per_s"), result.get("members_per_pass", 1)
    if ups is None:
        return "no updates this time"
    if k > 1:
        return f"{ups:.3g} passes/s = {ups * k:.3g} member-updates/s (K={k})"
    return f"{ups:.1f} updates/s"


def member_table(members: list[dict[str, Any]], means: list, stds: list, scores: list,
                 best: int | None) -> list[str]:
    """One row per member: its seed and the coefficients that differ between members, return, score."""
    keys = sorted({k for m in members for k, v in m["algo"].items() if v != members[0]["algo"].get(k)})
    head = ["member", "seed", *keys, "return (mean +- std)", "normalized"]
    rows = []
    for i, m in enumerate(members):
        rows.append([f"{i}{' *' if i == best else ''}", str(m["seed"]), *[f"{m['algo'].get(k)}" for k in keys],
                     f"{_fmt(means[i])} +- {_fmt(stds[i])}", _fmt(scores[i])])
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    return ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in [head, *rows]]


def format_result(result: dict[str, Any], run_dir: str | Path) -> str:
    """The summary `rayoffline train` prints: one line for K=1, a member table (best marked *) for K>1."""
    where = f"wrote {Path(run_dir) / 'result.json'}"
    behavior = _fmt(result["behavior_return_mean"])
    members = result["members"]
    if len(members) == 1:
        ev = (f"eval return {_fmt(result['eval_return_mean'])} +- {_fmt(result['eval_return_std'])} over "
              f"{result['eval_episodes']} episodes (behavior {behavior}), normalized score "
              f"{_fmt(result['normalized_score'])}" if result["eval_episodes"] else "not evaluated (eval_episodes 0)")
        return f"{result['algo']}: {result['steps']} steps, {ev}; {_rate(result)}; {where}"
    lines = [f"{result['algo']}: {len(members)} members, {result['steps']} steps; {_rate(result)}"]
    if result["eval_episodes"]:
        lines.append(f"eval over {result['eval_episodes']} episodes per member; behavior policy (dataset mean) "
                     f"{behavior}; * best member")
        lines += member_table(members, [m["eval_return_mean"] for m in members],
                              [m["eval_return_std"] for m in members], [m["normalized_score"] for m in members],
                              result["best_member"])
    else:
        lines.append("not evaluated (eval_episodes 0)")
    lines.append(where)
    return "\n".join(lines)


def train_from_cli(args: argparse.Namespace) -> int:
    result = train(args.algo, args.data, args.out, steps=args.steps, config=args.config, overrides=args.set,
                   seed=args.seed, resume=args.resume, allow_data_change=args.allow_data_change)
    print(format_result(result, args.out))
    return 0


def eval_from_cli(args: argparse.Namespace) -> int:
    out = evaluate_run(args.run_dir, episodes=args.episodes)
    means = out["eval_return_mean"]
    if len(means) == 1:
        print(f"step {out['step']}: return {_fmt(means[0])} +- {_fmt(out['eval_return_std'][0])} over "
              f"{out['episodes']} episodes, normalized score {_fmt(out['normalized_score'][0])} "
              f"(behavior {_fmt(out['behavior_return_mean'])}); wrote {Path(args.run_dir) / 'eval.json'}")
        return 0
    best = max(range(len(means)), key=lambda i: means[i])
    print(f"step {out['step']}: {len(means)} members, {out['episodes']} episodes each; behavior policy "
          f"{_fmt(out['behavior_return_mean'])}; * best member")
    print("\n".join(member_table(out["members"], means, out["eval_return_std"], out["normalized_score"], best)))
    print(f"wrote {Path(args.run_dir) / 'eval.json'}")
    return 0


def describe_algorithms() -> str:
    lines = []
    for name in algorithms.names():
        cls = algorithms.get(name)
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or name).strip().splitlines()[0]
        lines.append(f"{name}  [{', '.join(cls.action_types)} actions]  {doc}")
        docs = field_docs(cls.Config)
        for f in dataclasses.fields(cls.Config):
            member = " (per member)" if f.metadata.get("member") else ""
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
            doc = docs.get(f.name, "")
            if f.name == "hidden" and doc.startswith("Hidden layer widths of the algorithm's MLPs"):
                doc = f"Hidden layer widths of the {cls.networks}."
            lines.append(f"    algo.{f.name} = {default!r}{member}: {doc}")
        lines.append("")
    lines.append("run settings (all algorithms)")
    docs = field_docs(RunConfig)
    for f in dataclasses.fields(RunConfig):
        lines.append(f"    {f.name} = {f.default!r}: {docs.get(f.name, '')}")
    return "\n".join(lines)


DEMO_STEPS = 10_000


def demo(out: str | Path = "runs/demo", steps: int | None = None) -> int:
    """The main job on an embedded dataset: IQL on builtin:pendulum-medium, evaluated next to the behavior."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = out.with_name(f"{out.name}-{stamp}")
    print(f"rayoffline demo: IQL on builtin:pendulum-medium -> {out}")
    result = train("iql", "builtin:pendulum-medium", out, steps=DEMO_STEPS if steps is None else steps,
                   overrides={"eval_episodes": 10, "log_every": 1000})
    print(f"IQL eval return {_fmt(result['eval_return_mean'])} +- {_fmt(result['eval_return_std'])} over "
          f"{result['eval_episodes']} episodes; behavior policy (dataset mean) {_fmt(result['behavior_return_mean'])}; "
          f"normalized score {_fmt(result['normalized_score'])}; {_rate(result)}")
    return 0


__all__ = ["train", "evaluate_run", "load_run", "build_config", "describe_algorithms", "demo", "RayOfflineError"]
