"""RunConfig (the learner's settings: everything that is not the algorithm's math) and how a run's config
is assembled.

A run's configuration is one mapping:

    steps: 20000            # RunConfig fields
    batch_size: 256
    algo:                   # the algorithm's Config fields
      expectile: 0.7
    members:                # optional: K > 1 members trained in one pass, each a dict of
      - {cql_alpha: 1.0}    # per-member overrides of `algo` fields, plus an optional `seed`
      - {cql_alpha: 5.0, seed: 1}

It comes from defaults < the YAML file < `--set key=value` < explicit arguments (steps, seed).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .. import algorithms
from ..config import from_dict, load_yaml, merge, parse_overrides, plain, require, to_dict
from ..errors import ConfigError
from .shaping import check_lr_schedule, check_reward_scale


@dataclass(frozen=True)
class RunConfig:
    steps: int = 100_000
    """Number of gradient updates (per member)."""
    batch_size: int = 256
    """Transitions per member per update."""
    seed: int = 0
    """Run seed: default seed of every member; also seeds evaluation environments."""
    device: str = "auto"
    """'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'."""
    threads: int = 0
    """torch intra-op threads on CPU; 0 (auto): 1, or the CPUs Ray allots when the run is a Ray task or actor
    (2 threads: 1.3-2x faster alone, 1.6-4x slower beside one busy process; benchmarks/threads.py)."""
    log_every: int = 1000
    """Fetch metrics from the device, write TensorBoard/metrics.jsonl every this many steps."""
    eval_every: int = 0
    """Online evaluation every this many steps (0: only at the end)."""
    eval_episodes: int = 10
    """Episodes per member per evaluation (run in parallel in a vectorized env)."""
    diagnostics: str = "basic"
    """Training diagnostics (`diag/*`: critic vs returns, TD error, policy-to-data distance, disagreement) and
    warning flags, computed with each online evaluation (`eval_every` and the end; also with eval_episodes 0) on
    the held-out episodes, else on a sample of training episodes: 'basic', 'full' (also fits a behavior model
    once per run, for `diag/behavior_nll`) or 'off'."""
    diagnostics_episodes: int = 20
    """At most this many episodes (chosen by `seed`) are scored by the diagnostics."""
    ope: tuple[str, ...] = ()
    """Off-policy estimators to compute at each evaluation point on the dataset's held-out episodes, logged as
    `ope/<estimator>` per member (a Tune metric for data without an environment): fqe, wis, pdwis, dr, mb, and
    is, pdis on data with logged action probabilities
    (rayoffline/evaluation/offpolicy.py). Each point fits FQE (and the first one the behavior/dynamics models)."""
    ope_steps: int = 5000
    """FQE updates per OPE point (run key `ope`)."""
    checkpoint_every: int = 10_000
    """Checkpoint every this many steps (always at the end; 0: only at the end)."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep on disk."""
    progress: str = "auto"
    """Progress display: 'auto' (a bar on a terminal, else a line per log interval), 'on' (a bar) or 'off'."""
    num_workers: int = 0
    """Ray Train workers, data-parallel (0: train in this process, without Ray)."""
    gpus_per_worker: float = 0.0
    """GPUs per Ray Train worker (NCCL between workers when > 0, else gloo on CPUs)."""
    cpus_per_worker: float = 1.0
    """CPUs per Ray Train worker (also its torch threads when threads is 0)."""
    data_mode: str = "auto"
    """How Ray Train workers get data: 'replicate' (each holds all of it and takes its slice of one global
    batch stream: N workers compute the update of one worker with the global batch), 'split' (each holds
    its share of the shards, balanced by transitions), or 'auto' (replicate when the dataset fits
    memory_budget_gb, else split)."""
    memory_budget_gb: float = 0.0
    """Per-worker memory for the dataset in data_mode auto; 0: half the worker's GPU memory, or half this
    machine's RAM divided among the workers."""
    max_failures: int = 0
    """Ray Train restarts of the worker group from the last checkpoint after a worker fails."""
    placement: str = "pack"
    """Worker placement across nodes: 'pack' or 'spread'."""
    address: str = ""
    """Ray cluster to join ('auto' or 'ray://HOST:10001'); empty: $RAY_ADDRESS, else a local Ray."""
    reward_scale: Any = "none"
    """Reward transform applied where the learner samples (never to evaluation returns): 'none',
    'return_range' (r * 1000 / (max - min episode return of the dataset), IQL's locomotion setting) or
    {scale: S, bias: B} (r * S + B)."""
    lr_schedule: Any = "constant"
    """Learning-rate schedule, one for every optimizer group or a mapping group -> schedule (unnamed groups stay
    constant), e.g. {actor: cosine}: 'constant', 'cosine' (to 0 over `steps`) or 'linear_warmup' (from 0 over
    lr_warmup_steps). `rayoffline algos` names each algorithm's groups."""
    lr_warmup_steps: int = 1000
    """Steps of a linear_warmup schedule."""
    compile: str = "auto"
    """Run each update as compiled graphs (torch.compile; on CUDA also replayed as a CUDA graph): 'on', 'off',
    or 'auto' (on for a single-process run with at least 20,000 steps left, on CPUs only at K=1, where it
    measured 1.03-1.51x the eager step, against 0.94-1.34x at K=16; off for shorter runs, which would not win
    back 20-150 s of compiling, and for data-parallel workers). Compile time is reported apart (result.json
    compile_s), not in updates/s."""
    init_from: str = ""
    """Warm start: a run directory or checkpoint file whose network weights (and observation normalization) this
    run starts from, at step 0 with fresh optimizers (rayoffline/learner/warm.py); same algorithm and network
    sizes. Empty: random initialization."""
    precision: str = "fp32"
    """'fp32', or 'bf16': the algorithms' forward passes under bfloat16 autocast (matmuls in bf16; weights,
    gradients and Adam state stay fp32). For GPUs with bf16 tensor cores; CPUs without bf16 units run it slower."""

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        require(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        require(self.eval_episodes >= 0, "eval_episodes", f"must be >= 0, got {self.eval_episodes}")
        require(self.diagnostics in ("off", "basic", "full"), "diagnostics",
                f"'basic', 'full' or 'off', got {self.diagnostics!r}")
        from ..evaluation.offpolicy import RUN_ESTIMATORS
        bad = [x for x in self.ope if x not in RUN_ESTIMATORS]
        require(not bad, "ope", f"unknown or unsupported estimator {bad[0]!r} (at a run's eval points: "
                                f"{', '.join(RUN_ESTIMATORS)})" if bad else "")
        require(self.ope_steps >= 1, "ope_steps", f"must be >= 1, got {self.ope_steps}")
        require(self.diagnostics_episodes >= 1, "diagnostics_episodes",
                f"must be >= 1, got {self.diagnostics_episodes}")
        require(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        require(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")
        require(self.progress in ("auto", "on", "off"), "progress", f"'auto', 'on' or 'off', got {self.progress!r}")
        require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        require(self.gpus_per_worker >= 0, "gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        require(self.cpus_per_worker > 0, "cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        require(self.data_mode in ("auto", "replicate", "split"), "data_mode",
                f"'auto', 'replicate' or 'split', got {self.data_mode!r}")
        require(self.memory_budget_gb >= 0, "memory_budget_gb", f"must be >= 0, got {self.memory_budget_gb}")
        require(self.max_failures >= -1, "max_failures", f"must be >= 0 (or -1: unlimited), got {self.max_failures}")
        require(self.placement in ("pack", "spread"), "placement", f"'pack' or 'spread', got {self.placement!r}")
        require(self.num_workers == 0 or self.batch_size % self.num_workers == 0, "batch_size",
                f"the global batch {self.batch_size} must be divisible by num_workers {self.num_workers}")
        require(self.lr_warmup_steps >= 1, "lr_warmup_steps", f"must be >= 1, got {self.lr_warmup_steps}")
        require(self.compile in ("auto", "on", "off"), "compile", f"'auto', 'on' or 'off', got {self.compile!r}")
        require(self.compile != "on" or self.num_workers <= 1, "compile", compile_refused(self.num_workers))
        require(self.precision in ("fp32", "bf16"), "precision", f"'fp32' or 'bf16', got {self.precision!r}")
        check_reward_scale(self.reward_scale)
        check_lr_schedule(self.lr_schedule)
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
                f"'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")


def compile_refused(workers: int) -> str:
    """Why `compile: on` cannot run with `workers` data-parallel workers (the config check and the learner's)."""
    return (f"compile: on is not supported with {workers} data-parallel workers (the gradient all-reduce runs "
            f"between backward and the optimizer step); use compile: off or auto")


RUN_KEYS = {f.name for f in dataclasses.fields(RunConfig)}


def load_config_file(path: str | Path) -> dict[str, Any]:
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
        raw = load_config_file(config)
    elif config:
        raw = json.loads(json.dumps(config))  # deep copy of plain data
    if overrides:
        merge(raw, parse_overrides(overrides) if isinstance(overrides, list) else nest_dotted(overrides))
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


def nest_dotted(d: dict[str, Any]) -> dict[str, Any]:
    """{"algo.lr": 0.1, "steps": 5} -> {"algo": {"lr": 0.1}, "steps": 5}."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        for part in reversed(str(key).split(".")[1:]):
            value = {part: value}
        merge(out, {str(key).split(".")[0]: value})
    return out


def config_to_yaml(cfg: dict[str, Any], data: str, data_hash: str | None = None,
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
