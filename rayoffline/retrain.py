"""Scheduled retraining: `rayoffline retrain JOB.yaml` appends new data, trains a candidate, evaluates it beside the
policy in service and promotes it through the model registry only when it is better.

A job file (every key but `name`, `registry` and `data.dataset` has a default):

    name: pendulum-daily               # names the job's runs and its records in the registry
    registry: s3://bucket/models        # a model registry (rayoffline/registry; created when missing)
    alias: production                   # the alias the job gates (default production)
    work_dir: retrain                   # where candidate runs go: WORK_DIR/<name>-<data hash>/ (a local path)
    data:
      dataset: data/pendulum            # a converted dataset (path or URI); `append`s go into it
      append: [logs/2026-12-02.parquet] # sources appended first (one partition each); one already in the
      map: {observations: obs}          #   dataset (same content hash) is skipped, so a re-run appends nothing
      holdout: 0.1                      # a dataset without a held-out split gets one (`data split`), seed below
      holdout_seed: 0
    train:
      algo: iql                         # default: the algorithm of the version warm-started from
      steps: 20000
      config: {algo: {expectile: 0.7}, num_workers: 0}   # run keys / algo fields, or a YAML file; num_workers > 0
                                        #   trains with Ray Train
      sweep: null                       # or a sweep YAML: the candidate is the best trial's best member
      warm_start: true                  # true: from the alias's version (none yet: from scratch); false; or a
                                        #   version id / alias
    evaluate:
      estimators: [fqe]                 # OPE on the dataset's held-out episodes, candidate and incumbent in one fit
      fqe_steps: 20000
      fqe: {}                           # FQEConfig keys (hidden, lr, tau, target_period, ...)
      online_episodes: 10               # where the dataset names an environment; 0: none
      seed: 0
      device: auto                      # of the evaluation's fits: cuda when there is one, else cpu
    gate:
      metric: auto                      # online | ope/<estimator>; auto: online where evaluated, else the first
      margin: 0.0                       #   estimator
      confidence: 0.95                  # level of the candidate's interval
      first: promote                    # an alias with no version yet: promote | refuse

The rule: promote when the lower end of the candidate's `confidence` interval on the gate metric lies above the
incumbent's estimate plus `margin` (OPE: the bootstrap over held-out episodes; online: the bootstrap over
episodes). Both policies are scored on the same held-out episodes (one member-batched FQE fit, the candidate's
discount) and, online, from the same start states.

Steps, and what a kill at each leaves behind (production changes only in the last, atomic step):
1. Check everything that can be checked before training (the registry is writable, the warm-start source exists
   and fits, the dataset's spaces are the incumbent's, the config and the gate metric are valid).
2. Append and split the data. An append is atomic (data/convert.py); a re-run skips sources already appended.
3. Train the candidate in WORK_DIR/<name>-<data content hash>/: a re-run on the same data resumes it from its last
   checkpoint (a sweep resumes through Ray Tune), a finished one is reused.
4. Evaluate the candidate and the incumbent (OPE, online).
5. Register the candidate (a version exists once complete; a re-run finds the version this job already
   registered for the same run and step instead of adding another), record the decision with its evidence.
   (A re-run after the job promoted, with no new data, finds the alias already on its candidate and stops.)
6. Promote: a compare-and-swap of the alias from the incumbent read in step 1 (registry/store.py). Another job
   that promoted meanwhile makes this one fail with a conflict, recorded as a decision; the alias keeps the
   other job's version.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from .errors import ConfigError, DataError, DuplicatePartition, RayOfflineError

FAULT_ENV = "RAYOFFLINE_RETRAIN_FAULT"
"""Tests only: `before_promote` kills the job (SIGKILL) right before it promotes."""
GATE_FIRST = ("promote", "refuse")


def _err(key: str, msg: str) -> ConfigError:
    return ConfigError(f"job key '{key}': {msg}")


@dataclass(frozen=True)
class JobData:
    dataset: str
    append: tuple[str, ...] = ()
    map: dict[str, Any] | None = None
    holdout: float = 0.1
    holdout_seed: int = 0


@dataclass(frozen=True)
class JobTrain:
    algo: str | None = None
    steps: int | None = None
    config: Any = None
    sweep: str | None = None
    warm_start: Any = True


@dataclass(frozen=True)
class JobEvaluate:
    estimators: tuple[str, ...] = ("fqe",)
    fqe_steps: int = 20_000
    fqe: dict[str, Any] = field(default_factory=dict)
    online_episodes: int = 10
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class JobGate:
    metric: str = "auto"
    margin: float = 0.0
    confidence: float = 0.95
    first: str = "promote"


@dataclass(frozen=True)
class Job:
    name: str
    registry: str
    data: JobData
    alias: str = "production"
    work_dir: str = "retrain"
    train: JobTrain = JobTrain()
    evaluate: JobEvaluate = JobEvaluate()
    gate: JobGate = JobGate()
    source: str = "job"
    """Where the job came from (its file), for messages and records."""


def _section(raw: dict[str, Any], key: str, cls, where: str) -> Any:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise _err(key, f"expected a mapping, got {value!r} ({where})")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise _err(f"{key}.{unknown[0]}", f"unknown key; {key} takes {', '.join(sorted(names))} ({where})")
    return value


def load_job(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> Job:
    """The job of a YAML file or mapping, `overrides` ("gate.margin=5") applied; ConfigError naming the key."""
    from .config import merge, parse_overrides
    if isinstance(source, dict):
        raw, where = json.loads(json.dumps(source)), "job"
    else:
        where = str(source)
        try:
            raw = yaml.safe_load(Path(source).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{source}: job file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a job file is a mapping (name, registry, data, train, evaluate, gate)")
    if overrides:  # values as YAML reads them: gate.margin=5 is a number, data.append=[a, b] a list
        def typed(v: Any) -> Any:
            if isinstance(v, dict):
                return {k: typed(x) for k, x in v.items()}
            try:
                return yaml.safe_load(str(v))
            except yaml.YAMLError:
                return str(v)
        raw = merge(raw, typed(parse_overrides(overrides)))
    top = {f.name for f in dataclasses.fields(Job)} - {"source"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise _err(unknown[0], f"unknown key; a job takes {', '.join(sorted(top))} ({where})")
    for key in ("name", "registry"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise _err(key, f"required: a non-empty string ({where})")
    if not all(c.isalnum() or c in "-_." for c in raw["name"]):
        raise _err("name", f"{raw['name']!r}: letters, digits, '-', '_' and '.' only (it names directories)")
    d = _section(raw, "data", JobData, where)
    if not isinstance(d.get("dataset"), str) or not d["dataset"]:
        raise _err("data.dataset", f"required: the converted dataset the job trains on ({where})")
    if d["dataset"].startswith(("builtin:", "minari:")):
        raise _err("data.dataset", f"{d['dataset']} names a shared cached conversion, which a job must not append "
                                   f"to or split; convert a copy of your own (`rayoffline data convert "
                                   f"{d['dataset']} --out DIR`) and name DIR")
    append = d.get("append") or []
    if isinstance(append, str):
        append = [append]
    if not isinstance(append, list) or not all(isinstance(a, str) and a for a in append):
        raise _err("data.append", f"expected a list of source paths, got {d.get('append')!r}")
    holdout = d.get("holdout", 0.1)
    if not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
        raise _err("data.holdout", f"a fraction in (0, 1), got {holdout!r}")
    data = JobData(dataset=d["dataset"], append=tuple(append), map=d.get("map"), holdout=float(holdout),
                   holdout_seed=int(d.get("holdout_seed", 0)))
    t = _section(raw, "train", JobTrain, where)
    steps = t.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise _err("train.steps", f"a positive integer, got {steps!r}")
    warm = t.get("warm_start", True)
    if not isinstance(warm, (bool, str)):
        raise _err("train.warm_start", f"true, false, or a version id / alias, got {warm!r}")
    if t.get("sweep") is not None and not isinstance(t["sweep"], (str, dict)):
        raise _err("train.sweep", f"a sweep YAML file or mapping, got {t['sweep']!r}")
    if t.get("sweep") is not None and t.get("config") is not None:
        raise _err("train.config", "a sweep carries its own config (its `config:`); give train.sweep or "
                                   "train.config, not both")
    train = JobTrain(algo=t.get("algo"), steps=steps, config=t.get("config"), sweep=t.get("sweep"), warm_start=warm)
    e = _section(raw, "evaluate", JobEvaluate, where)
    from .evaluation.offpolicy import RUN_ESTIMATORS, parse_estimators
    estimators = parse_estimators(e.get("estimators", ["fqe"]), key="job key 'evaluate.estimators'")
    bad = [x for x in estimators if x not in RUN_ESTIMATORS]
    if bad:
        raise _err("evaluate.estimators", f"{bad[0]!r} cannot gate a job (one of {', '.join(RUN_ESTIMATORS)})")
    for key in ("fqe_steps", "online_episodes", "seed"):
        v = e.get(key, getattr(JobEvaluate, key))
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "fqe_steps" else 0):
            raise _err(f"evaluate.{key}", f"expected an integer >= {1 if key == 'fqe_steps' else 0}, got {v!r}")
    if not isinstance(e.get("fqe", {}), dict):
        raise _err("evaluate.fqe", f"a mapping of FQE settings, got {e.get('fqe')!r}")
    device = e.get("device", "auto")
    if not isinstance(device, str) or not (device in ("auto", "cpu") or device.startswith("cuda")):
        raise _err("evaluate.device", f"'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    evaluate = JobEvaluate(estimators=estimators, fqe_steps=e.get("fqe_steps", 20_000), fqe=dict(e.get("fqe") or {}),
                           online_episodes=e.get("online_episodes", 10), seed=e.get("seed", 0), device=device)
    g = _section(raw, "gate", JobGate, where)
    gate = JobGate(**g)
    if gate.metric != "auto" and gate.metric != "online" and gate.metric not in {f"ope/{x}" for x in estimators}:
        raise _err("gate.metric", f"{gate.metric!r}: auto, online, or ope/<estimator> of evaluate.estimators "
                                  f"({', '.join('ope/' + x for x in estimators)})")
    if gate.metric == "online" and evaluate.online_episodes == 0:
        raise _err("gate.metric", "online needs evaluate.online_episodes > 0")
    if not isinstance(gate.margin, (int, float)) or isinstance(gate.margin, bool) or not math.isfinite(gate.margin):
        raise _err("gate.margin", f"a finite number, got {gate.margin!r}")
    if not isinstance(gate.confidence, (int, float)) or not 0 < gate.confidence < 1:
        raise _err("gate.confidence", f"a level in (0, 1), e.g. 0.95, got {gate.confidence!r}")
    if gate.first not in GATE_FIRST:
        raise _err("gate.first", f"{gate.first!r}: one of {', '.join(GATE_FIRST)}")
    alias = raw.get("alias", "production")
    from .registry.store import _check_alias
    try:
        _check_alias(alias)
    except RayOfflineError as e2:
        raise _err("alias", str(e2)) from None
    return Job(name=raw["name"], registry=raw["registry"], data=data, alias=alias,
               work_dir=str(raw.get("work_dir") or "retrain"), train=train, evaluate=evaluate, gate=gate, source=where)


# ----- the job ----------------------------------------------------------------------------------------------
def run_job(source: str | Path | dict[str, Any], overrides: list[str] | None = None,
            say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a retraining job (module docstring). Returns the decision record (also in the registry)."""
    from .data.holdout import held_out_ids, split
    from .learner.worker import open_dataset
    from .registry import Registry

    job = load_job(source, overrides)
    t0 = time.time()
    # 1. what can be checked before anything changes
    registry = Registry.open(job.registry, create=True)
    _probe(registry, job)
    incumbent = registry.alias(job.alias)
    inc_info = registry.get(incumbent) if incumbent is not None else None
    inc_dir = registry.checkout(incumbent) if incumbent is not None else None
    warm = _warm_source(registry, job, incumbent)
    warm_info = registry.get(warm) if warm is not None else None
    warm_dir = registry.checkout(warm) if warm is not None else None
    data_dir, meta = open_dataset(job.data.dataset)
    algo = _algo(job, warm_info, inc_info)
    _check_spaces(meta, inc_dir, incumbent, job, data_dir)
    if warm_dir is not None and job.train.sweep is None:
        _check_warm(job, algo, meta, warm_dir, warm)
    if job.evaluate.online_episodes > 0 and meta.get("env_id"):  # an environment that cannot be made: say so now
        from .evaluation.rollout import make_env
        make_env(meta.get("env_id"), meta.get("env_spec"))
    # 2. data
    appended = []
    for src in job.data.append:
        from .data import append as append_data
        try:
            append_data(src, data_dir, mapping=job.data.map)
            appended.append(src)
            say(f"retrain: appended {src}")
        except DuplicatePartition as e:
            say(f"retrain: {src} is already in the dataset as {e.partition}; skipped")
    _, meta = open_dataset(job.data.dataset)
    if held_out_ids(meta) is None:
        split(data_dir, job.data.holdout, seed=job.data.holdout_seed)
        say(f"retrain: held out {job.data.holdout:g} of the episodes for evaluation (seed {job.data.holdout_seed})")
        _, meta = open_dataset(job.data.dataset)
    from .evaluation.offpolicy import check_run_ope
    check_run_ope(job.evaluate.estimators, meta, data_dir, key="job key 'evaluate.estimators'")
    run_id = f"{job.name}-{meta['content_hash'][:12]}"
    work = Path(job.work_dir).resolve() / run_id  # absolute in every record (a relative one is the cwd's)
    if inc_info is not None and inc_info.job.get("run_id") == run_id:
        say(f"retrain {job.name}: {job.alias} already holds {incumbent}, this job's candidate for this data "
            f"(content hash {meta['content_hash'][:12]}); nothing to do")
        return {"job": job.name, "run_id": run_id, "alias": job.alias, "outcome": "unchanged",
                "candidate": {"version": incumbent}, "reason": "already promoted for this data"}
    # 3. train
    cand_dir, member = _train(job, algo, str(data_dir), warm_dir, work, say)
    # 4. evaluate
    say("retrain: evaluating the candidate" + (f" and {incumbent}" if incumbent else ""))
    evidence = _evaluate(job, cand_dir, member, inc_dir, str(data_dir), meta)
    # 5. decide, register, record
    metric, outcome, reason = _decide(job, evidence, incumbent)
    version = _register(registry, job, run_id, cand_dir, member, warm, evidence, str(data_dir),
                        meta.get("content_hash"))
    decision = {"job": job.name, "run_id": run_id, "job_file": job.source, "job_config": dataclasses.asdict(job),
                "alias": job.alias,
                "outcome": outcome, "reason": reason,
                "gate": {**dataclasses.asdict(job.gate), "metric": metric},
                "candidate": {"version": version, "run_dir": str(cand_dir), "member": member,
                              **evidence["candidate"]},
                "incumbent": None if incumbent is None else {"version": incumbent, **evidence["incumbent"]},
                "data": {"dataset": str(data_dir), "content_hash": meta.get("content_hash"),
                         "appended": appended, "partitions": len(meta.get("partitions") or []),
                         "new_since_incumbent": _new_partitions(meta, inc_info)},
                "holdout": evidence["holdout"], "warm_start": warm, "host": socket.gethostname(),
                "wall_s": round(time.time() - t0, 1)}
    decision["id"] = registry.record_decision(decision)
    # 6. promote
    if outcome == "promote":
        if os.environ.get(FAULT_ENV) == "before_promote":
            os.kill(os.getpid(), signal.SIGKILL)
        from .registry import AliasConflict
        try:
            registry.promote(job.alias, version, expected=incumbent,
                             reason=f"retrain {job.name}: decision {decision['id']}")
        except AliasConflict as e:
            registry.record_decision({**{k: v for k, v in decision.items() if k != "id"}, "outcome": "conflict",
                                      "reason": str(e), "decision": decision["id"]})
            raise
    say(format_decision(decision))
    return decision


def _new_partitions(meta: dict[str, Any], incumbent) -> list[str]:
    """The dataset's partitions (names) whose content the incumbent was not trained on (all without one)."""
    seen = {p.get("content_hash") for p in (incumbent.dataset.get("partitions") or [])} if incumbent else set()
    return [p["name"] for p in meta.get("partitions") or [] if p.get("content_hash") not in seen]


def _probe(registry, job: Job) -> None:
    """A registry the job cannot write is an error now, not after training: write the job's status file."""
    from .registry import RegistryError
    loc = registry.root / "jobs" / f"{job.name}.json"
    body = json.dumps({"job": job.name, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "host": socket.gethostname(), "pid": os.getpid(), "file": job.source}).encode()
    try:
        loc.parent.mkdir()
        loc.write_atomic(body)
    except (OSError, RayOfflineError) as e:
        if isinstance(e, RegistryError):
            raise
        raise RegistryError(f"job key 'registry': cannot write to {registry.uri} ({type(e).__name__}: {e}); "
                            f"the job records its versions and decisions there") from None


def _warm_source(registry, job: Job, incumbent: str | None) -> str | None:
    w = job.train.warm_start
    if w is False:
        return None
    if w is True:
        return incumbent
    try:
        return registry.resolve(w)
    except RayOfflineError as e:
        raise ConfigError(f"job key 'train.warm_start': {e}") from None


def _algo(job: Job, warm, incumbent) -> str | None:
    """The candidate's algorithm: train.algo, else that of the warm-start version (or the incumbent's);
    warm, incumbent: their VersionInfo or None."""
    from . import algorithms
    algo = job.train.algo
    if job.train.sweep is not None:
        return None  # the sweep names it
    if algo is None:
        ref = warm or incumbent
        if ref is None:
            raise _err("train.algo", "required for the first job (no version to take the algorithm from)")
        algo = ref.algo
    try:
        algorithms.get(algo)
    except RayOfflineError as e:
        raise _err("train.algo", str(e)) from None
    if warm is not None and warm.algo != algo:
        raise _err("train.warm_start", f"{warm.version} is a {warm.algo!r} model and the candidate trains "
                                       f"{algo!r}; warm-start from a version of the same algorithm, or set "
                                       f"warm_start: false")
    return algo


def _check_spaces(meta: dict[str, Any], inc_dir: Path | None, incumbent: str | None, job: Job, data_dir) -> None:
    if inc_dir is None:
        return
    from .learner.api import load_run
    from .spec import EnvSpec
    inc_meta = load_run(inc_dir)[1]
    ours, theirs = EnvSpec.from_metadata(meta), EnvSpec.from_metadata(inc_meta)
    if ours != theirs:
        raise DataError(f"{data_dir}: its observation/action spaces ({_spaces(meta)}) differ from those {incumbent} "
                        f"({job.alias}) was trained on ({_spaces(inc_meta)}); its policy could not be compared or "
                        f"replaced: point data.dataset at data of the same task, or start a new registry alias")


def _spaces(meta: dict[str, Any]) -> str:
    o, a = meta["observation_space"], meta["action_space"]
    act = f"Discrete({a['n']})" if a.get("type") == "Discrete" else f"Box{tuple(a['shape'])}"
    return f"obs {tuple(o['shape'])}, actions {act}"


def _run_config(job: Job, warm_dir: Path | None) -> dict[str, Any]:
    """The candidate's run config: train.config (a mapping or a YAML file), with the warm start's init_from."""
    config = job.train.config
    if isinstance(config, str):
        from .learner.config import load_config_file
        config = load_config_file(config)
    config = json.loads(json.dumps(config or {}))
    if warm_dir is not None:
        config["init_from"] = str(Path(warm_dir).resolve())
    return config


def _check_warm(job: Job, algo: str, meta: dict[str, Any], warm_dir: Path, warm: str) -> None:
    import torch

    from .learner.config import build_config
    from .learner.warm import initial_weights
    from .learner.worker import _build_algorithm
    config = _run_config(job, None)
    try:
        cfg = build_config(algo, config, None, steps=job.train.steps)
        initial_weights(_build_algorithm(cfg, meta, torch.device("cpu")), algo, warm_dir)
    except ConfigError as e:
        raise ConfigError(f"job key 'train.warm_start' ({warm}): {e}") from None


def _train(job: Job, algo: str | None, data: str, warm_dir: Path | None, work: Path,
           say: Callable[[str], None]) -> tuple[Path, int]:
    """(the candidate's run directory, its member): trained, resumed, or reused from an earlier attempt."""
    from .learner import checkpoint as ckpt
    from .learner.api import train
    if job.train.sweep is not None:
        return _sweep(job, data, warm_dir, work, say)
    out = work / "candidate"
    config = _run_config(job, warm_dir)
    done = _finished(out)
    if done is not None:
        say(f"retrain: the candidate in {out} is already trained (step {done}); reusing it")
    elif ckpt.list_checkpoints(out):
        say(f"retrain: resuming the candidate in {out}")
        train(None, None, out, steps=job.train.steps, resume=True)
    else:
        if out.exists():
            shutil.rmtree(out)  # an attempt killed before its first checkpoint
        out.parent.mkdir(parents=True, exist_ok=True)
        say(f"retrain: training the candidate ({algo}) in {out}" + (" from the incumbent" if warm_dir else ""))
        train(algo, data, out, steps=job.train.steps, config=config)
    return out, _best_member(out)


def _finished(run_dir: Path) -> int | None:
    """The step of a finished run (result.json written at its last step), else None."""
    try:
        res = json.loads((run_dir / "result.json").read_text())
        from .learner import checkpoint as ckpt
        step = int(ckpt.load(ckpt.latest(run_dir))["step"])
        return step if step >= int(res["steps"]) else None
    except (OSError, ValueError, KeyError, RayOfflineError):
        return None


def _best_member(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "result.json").read_text()).get("best_member", 0))
    except (OSError, ValueError):
        return 0


def _sweep(job: Job, data: str, warm_dir: Path | None, work: Path, say) -> tuple[Path, int]:
    from .sweep.run import tune
    out = work / "sweep"
    overrides = [f"data={data}"]
    if job.train.steps is not None:
        overrides.append(f"config.steps={job.train.steps}")
    if warm_dir is not None:
        overrides.append(f"config.init_from={Path(warm_dir).resolve()}")
    resume = (out / "sweep.yaml").exists()
    say(f"retrain: {'resuming' if resume else 'running'} the sweep {job.train.sweep} in {out}")
    res = tune(None if resume else job.train.sweep, out=out, overrides=overrides, resume=resume, quiet=True)
    best = res.get("best")
    if not best or not best.get("run_dir"):
        raise RayOfflineError(f"the sweep in {out} finished without a ranked trial; nothing to promote")
    run_dir = Path(best["run_dir"])
    return run_dir, _best_member(run_dir)


def _evaluate(job: Job, cand_dir: Path, member: int, inc_dir: Path | None, data: str,
              meta: dict[str, Any]) -> dict[str, Any]:
    """OPE of the candidate's member (and the incumbent) in one fit on the held-out episodes; online returns from
    the same start states where the dataset names an environment."""
    import torch

    from .evaluation.offpolicy import OPESettings, bootstrap_interval, estimate_policy
    from .evaluation.policies import LearnedPolicy, stack_policies
    from .learner.api import load_run
    from .learner.worker import _device
    e = job.evaluate
    dev = str(_device(e.device))  # auto: cuda when there is one
    cand, _, state = load_run(cand_dir, device=dev)
    gamma = float(cand.coef("discount")[member])
    parts = [LearnedPolicy(cand).select([member])]
    inc = None
    if inc_dir is not None:
        inc = load_run(inc_dir, device=dev)[0]
        parts.append(LearnedPolicy(inc))
    policy = stack_policies(parts)
    settings = OPESettings(estimators=tuple(e.estimators), fqe_steps=e.fqe_steps, fqe=dict(e.fqe),
                           level=job.gate.confidence, seed=e.seed, bootstrap=1000)
    res = estimate_policy(policy, cand.norm_actions, data, meta, gamma, settings, torch.device(dev))
    out: dict[str, Any] = {"holdout": res["holdout"], "candidate": {"step": int(state["step"]), "ope": {}},
                           "incumbent": {"ope": {}}}
    for name, rows in res["estimates"].items():
        keep = ("value", "low", "high", "ess", "warning")
        out["candidate"]["ope"][name] = {k: rows[0].get(k) for k in keep}
        if inc is not None:
            out["incumbent"]["ope"][name] = {k: rows[1].get(k) for k in keep}
    if e.online_episodes > 0 and meta.get("env_id"):
        from .evaluation.rollout import evaluate
        for who, alg, m in (("candidate", cand, member), ("incumbent", inc, 0)):
            if alg is None:
                continue
            ev = evaluate(alg, meta, e.online_episodes, seed=e.seed)  # the same start states for both
            value, low, high = bootstrap_interval(np.asarray(ev["returns"][m]), 1000, job.gate.confidence,
                                                  e.seed)
            out[who]["online"] = {"value": value, "low": low, "high": high, "episodes": e.online_episodes,
                                  "std": ev["return_std"][m], "normalized_score": ev["normalized_score"][m]}
    return out


def _decide(job: Job, evidence: dict[str, Any], incumbent: str | None) -> tuple[str, str, str]:
    """(gate metric, 'promote' | 'refuse', why)."""
    g = job.gate
    metric = g.metric
    if metric == "auto":
        metric = "online" if "online" in evidence["candidate"] else f"ope/{job.evaluate.estimators[0]}"

    def pick(side: dict[str, Any]) -> dict[str, Any]:
        return side["online"] if metric == "online" else side["ope"][metric.split("/", 1)[1]]
    if metric == "online" and "online" not in evidence["candidate"]:
        raise _err("gate.metric", "online: the dataset names no environment to evaluate in (metadata env_id); "
                                  "gate on ope/<estimator>")
    cand = pick(evidence["candidate"])
    level = f"{int(round(g.confidence * 100))}%"
    if incumbent is None:
        if g.first == "promote":
            return metric, "promote", (f"no version holds {job.alias} yet: the first candidate is promoted "
                                       f"(gate.first: promote); {metric} {cand['value']:.4g}")
        return metric, "refuse", f"no version holds {job.alias} yet and gate.first is refuse"
    inc = pick(evidence["incumbent"])
    bar = inc["value"] + g.margin
    low = cand["low"]
    compare = (f"{metric}: candidate {cand['value']:.4g} ({level} interval [{cand['low']:.4g}, {cand['high']:.4g}]) "
               f"vs {incumbent} {inc['value']:.4g} + margin {g.margin:g}")
    if low is not None and math.isfinite(low) and low > bar:
        return metric, "promote", f"{compare}: the lower end {low:.4g} is above {bar:.4g}"
    return metric, "refuse", f"{compare}: the lower end {low:.4g} is not above {bar:.4g}"


def _register(registry, job: Job, run_id: str, cand_dir: Path, member: int, warm: str | None,
              evidence: dict[str, Any], data: str, content_hash: str | None) -> str:
    """The candidate's version: the one this job registered for the same run and step (a re-run), else new."""
    step = evidence["candidate"]["step"]
    for v in registry.versions():
        if v.job.get("run_id") == run_id and v.source_run == str(cand_dir.resolve()) and v.step == step \
                and v.member == member:
            return v.version
    # the OPE in the shape `registry list/show` read from a run's ope.json; the job's online evaluation apart
    metrics = {"ope": {"estimates": evidence["candidate"]["ope"], "level": job.gate.confidence,
                       "gamma": evidence["holdout"]["gamma"], "data": data, "content_hash": content_hash,
                       "same_data": True, "holdout": evidence["holdout"]},
               "retrain": {k: v for k, v in evidence["candidate"].items() if k not in ("step", "ope")}}
    on = evidence["candidate"].get("online")
    if on is not None:  # the job's evaluation is the version's online metric (what `registry list` shows)
        metrics["online"] = {"return_mean": on["value"], "return_std": on["std"], "episodes": on["episodes"],
                             "normalized_score": on["normalized_score"], "low": on["low"], "high": on["high"],
                             "level": job.gate.confidence, "by": "retrain"}
    job_rec = {"name": job.name, "run_id": run_id, "file": job.source, "host": socket.gethostname(),
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return registry.register(cand_dir, member=member, metrics=metrics, parent=warm, job=job_rec).version


def format_decision(d: dict[str, Any]) -> str:
    """The job's short report."""
    c, i = d["candidate"], d["incumbent"]
    lines = [f"retrain {d['job']}: {d['outcome'].upper()} {c['version']} for {d['alias']}"
             + (f" (incumbent {i['version']})" if i else " (no incumbent)"),
             f"  data: {d['data']['dataset']} ({d['data']['partitions']} partitions, "
             f"{len(d['data']['appended'])} appended), held-out {d['holdout']['episodes']} episodes",
             f"  candidate: {c['run_dir']} member {c['member']} step {c['step']}"
             + (f", warm-started from {d['warm_start']}" if d.get("warm_start") else "")]
    names = list(c["ope"]) + (["online"] if "online" in c else [])
    for name in names:
        def cell(side):
            e = side.get("online") if name == "online" else side["ope"].get(name)
            return "-" if not e else f"{e['value']:.4g} [{e['low']:.4g}, {e['high']:.4g}]"
        label = name if name == "online" else f"ope/{name}"
        lines.append(f"  {label:<10} candidate {cell(c):<32} incumbent {cell(i) if i else '-'}")
    lines.append(f"  decision {d['id']}: {d['reason']}")
    return "\n".join(lines)
