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
from ..config import field_docs, from_dict, merge, parse_overrides, to_dict
from ..errors import CheckpointError, ConfigError, RayOfflineError
from ..spec import EnvSpec
from . import checkpoint as ckpt
from .config import RunConfig
from .logger import RunLogger
from .loop import Learner

RUN_KEYS = {f.name for f in dataclasses.fields(RunConfig)}


# ----- configuration ------------------------------------------------------------------------------------
def _load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f)
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
    algo_raw = raw.pop("algo", None) or {}
    if not isinstance(algo_raw, dict):
        raise ConfigError("config key 'algo': expected a mapping of algorithm fields")
    members_raw = raw.pop("members", None)
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


def _config_to_yaml(cfg: dict[str, Any], data: str) -> dict[str, Any]:
    out: dict[str, Any] = {"algo_name": cfg["algo_name"], "data": data, **to_dict(cfg["run"])}
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
def train(algo: str | None, data: str | None, out: str | Path, steps: int | None = None,
          config: dict[str, Any] | str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None,
          seed: int | None = None, resume: bool = False) -> dict[str, Any]:
    """Train `algo` on `data` (a converted dataset dir or builtin:NAME) into run directory `out`.

    Returns the result dict also written to OUT/result.json. With resume=True, continues the run in `out`
    from its latest checkpoint (its saved config; `steps` may extend it)."""
    run_dir = Path(out)
    start = 0
    state = None
    state_path: Path | None = None
    if data is not None and not data.startswith(("builtin:", "minari:")):
        data = str(Path(data).resolve())  # config.yaml must find it again from any working directory
    if resume:
        saved = run_dir / "config.yaml"
        if not saved.exists():
            raise CheckpointError(f"{run_dir}: nothing to resume (no config.yaml)")
        sc = _load_yaml(saved)
        saved_algo, saved_data = sc.pop("algo_name"), sc.pop("data")
        for given, was, what in ((algo, saved_algo, "algorithm"), (data, saved_data, "dataset")):
            if given is not None and given != was:
                raise ConfigError(f"--resume: {run_dir} was trained with {what} {was!r}, not {given!r}; a resumed "
                                  f"run keeps its algorithm, dataset and seeds (start a new run to change them)")
        if config is not None or seed is not None:
            raise ConfigError("--resume continues the run's saved config.yaml; --config/--seed cannot change it")
        extra = parse_overrides(overrides) if isinstance(overrides, list) else _nest_dict(overrides or {})
        frozen = sorted(k for k in extra if k in ("algo", "members", "seed"))
        if frozen:
            raise ConfigError(f"--resume: config key '{frozen[0]}' cannot change in a resumed run (the checkpoint's "
                              f"networks, optimizers and coefficients were trained with the saved value); start a "
                              f"new run instead")
        algo, data = saved_algo, saved_data
        cfg = build_config(algo, sc, extra, steps=steps)
        found = ckpt.list_checkpoints(run_dir)
        if found:  # else the run crashed before its first checkpoint: start it again from step 0
            state_path = found[-1]
            state = ckpt.load(state_path)
            if state["algo"] != algo:
                raise CheckpointError(f"{state_path}: checkpoint is for '{state['algo']}', config says '{algo}'")
            start = int(state["step"])
        if cfg["run"].steps < start:
            raise ConfigError(f"--steps {cfg['run'].steps} is below the {start} steps {run_dir} has already trained")
    else:
        if algo is None or data is None:
            raise ConfigError("train needs an algorithm (--algo) and a dataset (--data)")
        cfg = build_config(algo, config, overrides, steps=steps, seed=seed)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"run directory {run_dir} already exists and is not empty; choose another --out "
                              f"or pass --resume to continue it")
    run: RunConfig = cfg["run"]
    if run.threads:
        torch.set_num_threads(run.threads)
    device = _device(run.device)
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
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(_config_to_yaml(cfg, data), sort_keys=False))

    def payload() -> dict[str, Any]:
        return {"algo": cfg["algo_name"], "learner": learner.state_dict(),
                "member_configs": [to_dict(c) for c in cfg["members"]], "seeds": list(cfg["seeds"]),
                "run_config": to_dict(run), "data": data, "metadata": meta}

    logger = RunLogger(run_dir, algorithm.K, run.steps, start, run.progress)
    last_eval: dict[str, Any] | None = None
    t_start = time.perf_counter()
    train_time, train_steps = 0.0, 0
    try:
        t0, s0 = time.perf_counter(), start
        for step in range(start + 1, run.steps + 1):
            learner.step(step)
            logger.advance()
            if step % run.log_every == 0 or step == run.steps:
                metrics = learner.pop_metrics()  # the one host sync of the interval
                now = time.perf_counter()
                train_time += now - t0
                train_steps += step - s0
                metrics["perf/updates_per_s"] = (step - s0) / max(now - t0, 1e-9)
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
    finally:
        logger.close()
    if start >= run.steps:  # resumed a finished run: nothing trained, evaluate what is there
        last_eval = _evaluate(algorithm, meta, run.eval_episodes, run.seed) if run.eval_episodes else None
    result = _result(cfg, meta, last_eval, run, train_steps / train_time if train_time > 0 else None,
                     time.perf_counter() - t_start)
    _atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2) + "\n")
    return result


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
        "behavior_return_mean": behavior, "updates_per_s": updates_per_s, "wall_s": wall_s,
        "dataset": meta.get("source"),
    }


# ----- evaluation of a finished run -----------------------------------------------------------------------
def load_run(run_dir: str | Path, device: str = "cpu"):
    """Rebuild the algorithm of `run_dir` from its latest checkpoint. Returns (algorithm, metadata, state)."""
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
    algorithm, meta, state = load_run(run_dir)
    ev = _evaluate(algorithm, meta, episodes, int(state["run_config"].get("seed", 0)))
    out = {"step": int(state["step"]), "episodes": episodes, "eval_return_mean": ev["return_mean"],
           "eval_return_std": ev["return_std"], "normalized_score": ev["normalized_score"],
           "behavior_return_mean": (meta.get("return_stats") or {}).get("mean")}
    _atomic_write_text(Path(run_dir) / "eval.json", json.dumps(out, indent=2) + "\n")
    return out


# ----- CLI glue -----------------------------------------------------------------------------------------
def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def train_from_cli(args: argparse.Namespace) -> int:
    result = train(args.algo, args.data, args.out, steps=args.steps, config=args.config, overrides=args.set,
                   seed=args.seed, resume=args.resume)
    print(f"{result['algo']}: {result['steps']} steps, eval return {_fmt(result['eval_return_mean'])} "
          f"+- {_fmt(result['eval_return_std'])} (behavior {_fmt(result['behavior_return_mean'])}), "
          f"normalized score {_fmt(result['normalized_score'])}, {_fmt(result['updates_per_s'])} updates/s; "
          f"wrote {Path(args.out) / 'result.json'}")
    return 0


def eval_from_cli(args: argparse.Namespace) -> int:
    out = evaluate_run(args.run_dir, episodes=args.episodes)
    for k, (m, s, n) in enumerate(zip(out["eval_return_mean"], out["eval_return_std"], out["normalized_score"])):
        print(f"member {k} @ step {out['step']}: return {_fmt(m)} +- {_fmt(s)} over {out['episodes']} episodes, "
              f"normalized score {_fmt(n)} (behavior {_fmt(out['behavior_return_mean'])})")
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
            lines.append(f"    algo.{f.name} = {default!r}{member}: {docs.get(f.name, '')}")
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
    if out.exists() and any(out.iterdir()):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = out.with_name(f"{out.name}-{stamp}")
    print(f"rayoffline demo: IQL on builtin:pendulum-medium -> {out}")
    result = train("iql", "builtin:pendulum-medium", out, steps=steps or DEMO_STEPS,
                   overrides={"eval_episodes": 10, "log_every": 1000})
    print(f"IQL eval return {_fmt(result['eval_return_mean'])} +- {_fmt(result['eval_return_std'])} over "
          f"{result['eval_episodes']} episodes; behavior policy (dataset mean) {_fmt(result['behavior_return_mean'])}; "
          f"normalized score {_fmt(result['normalized_score'])}; {_fmt(result['updates_per_s'])} updates/s")
    return 0


__all__ = ["train", "evaluate_run", "load_run", "build_config", "describe_algorithms", "demo", "RayOfflineError"]
