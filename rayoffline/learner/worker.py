"""The one worker function: build the algorithm, load its data, loop, report, checkpoint.

`run_training(spec)` is what every way of training calls: the in-process run of `rayoffline train` and
`rayoffline.train()` today, a Ray Train worker and a Ray Tune trial next. Its input is a `RunSpec`, plain
picklable data assembled by `rayoffline.learner.api.train` (config merging, resume checks); it validates
everything it can before it writes anything into the run directory, and a fresh run that fails before its
first update leaves the directory as it found it.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from .. import algorithms
from ..batch import Batch
from ..config import to_dict
from ..errors import ConfigError
from ..spec import EnvSpec
from . import checkpoint as ckpt
from .config import RunConfig, config_to_yaml
from .logger import RunLogger
from .loop import Learner
from .threads import set_threads


@dataclass
class RunSpec:
    """Everything a worker needs to train one run (K members), as plain data."""

    cfg: dict[str, Any]
    """build_config's result: algo_name, run (RunConfig), members (algorithm configs), seeds."""
    data: str
    """Dataset: a converted dataset directory (absolute) or builtin:NAME."""
    run_dir: str
    resume: bool = False
    checkpoint: str | None = None
    """Checkpoint to continue from (resume), or None to start at step 0."""
    data_changes: list[dict[str, Any]] = field(default_factory=list)
    """Recorded resumes on changed data (config.yaml's data_changes); the last one may be this resume's."""
    data_changed_now: bool = False
    data_mode: str = "replicate"
    """'replicate' or 'split' (resolved from RunConfig.data_mode by the driver)."""
    in_process: bool = True
    """True for the in-process run; False under Ray Train (the driver shows progress and cleans up)."""
    submitted: float = 0.0
    """time.time() when train() was called: result.json's time_to_first_update_s counts from it."""


def dataset_bytes(meta: dict[str, Any], where: Any = ".") -> int:
    """Bytes the dataset at `where` takes as loaded tensors (float32 observations twice, actions, reward, flags)."""
    from ..data.load import row_bytes
    return int(meta.get("num_transitions", 0)) * row_bytes(meta, where)


def memory_budget(run: RunConfig, workers: int, gpu_memory: float | None = None) -> tuple[float, str]:
    """(bytes, how it was chosen): the memory one worker may give its data. memory_budget_gb when set; else
    half a GPU's memory for GPU workers, half this machine's RAM shared by `workers` for CPU ones."""
    if run.memory_budget_gb > 0:
        return run.memory_budget_gb * 2**30, f"memory_budget_gb {run.memory_budget_gb:g}"
    if gpu_memory:
        return gpu_memory / 2, "half a GPU's memory"
    ram = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return ram / 2 / max(workers, 1), "half this machine's RAM" + (" per worker" if workers > 1 else "")


def open_dataset(data: str) -> tuple[Path | str, dict[str, Any]]:
    """(the dataset's directory: a local Path, or a filesystem URI such as s3://bucket/ds, its metadata)."""
    from .. import data as data_mod
    path = data_mod.resolve(data)
    return path, data_mod.read_metadata(path)


def make_learner(algorithm, data: Any, cfg: dict[str, Any], meta: dict[str, Any], data_name: str,
                 mode: str = "replicate", compile: bool = False) -> Learner:
    """The learner of a run: its batch size, learning-rate schedules and reward transform (validated against
    the algorithm's optimizer groups and the dataset's returns, naming the config key). compile: the resolved
    run key `compile` (`compiled.resolve`); with 'auto' a failed compile falls back to the eager step."""
    from .shaping import reward_transform, schedules
    run: RunConfig = cfg["run"]
    groups = list(algorithm.optim_groups())
    learner = Learner(algorithm, data, run.batch_size, mode=mode,
                      schedules=schedules(run, cfg["algo_name"], groups),
                      reward=reward_transform(run.reward_scale, meta, data_name), compile=compile,
                      precision=run.precision)
    learner.compile_fallback = run.compile == "auto"
    return learner


def compile_choice(run: RunConfig, device: torch.device, steps_left: int, world: int, members: int = 1,
                   state: dict[str, Any] | None = None) -> tuple[bool, str]:
    """Whether this run's steps are compiled, and why (run key `compile`; a ConfigError for 'on' where it
    cannot be)."""
    from ..nn.rng import is_counter_state
    from .compiled import CompileError, resolve
    try:
        use, why = resolve(run.compile, device, steps_left, world, members)
    except CompileError as e:
        raise ConfigError(f"config key 'compile': {e}") from None
    streams = (state or {}).get("learner", {}).get("sampler_rng") or []
    if use and streams and not is_counter_state(streams):  # torch.Generator states from an eager CPU run
        if run.compile == "on":
            raise ConfigError("config key 'compile': on, but the checkpoint's random streams are torch.Generator "
                              "states (written by the eager step on a CPU), which a compiled step cannot continue "
                              "exactly; resume with compile: off")
        return False, "compile: auto -> off (the checkpoint's random streams are torch.Generator states)"
    return use, why


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device': {name!r} requested but CUDA is not available on this machine")
    return dev


def _build_algorithm(cfg: dict[str, Any], meta: dict[str, Any], device: torch.device):
    cls = algorithms.get(cfg["algo_name"])
    spec = EnvSpec.from_metadata(meta)
    return cls(spec, cfg["members"], cfg["seeds"], device=device, obs_mean=meta.get("obs_mean"),
               obs_std=meta.get("obs_std"))


@dataclass
class WorkerContext:
    """Where run_training executes: rank `rank` of `world` data-parallel workers (torch.distributed already
    initialized when world > 1). `checkpoint` overrides the spec's (a Ray Train restart continues from the
    last reported checkpoint); `report(step, metrics, checkpoint_file)` is called on every rank at every
    checkpoint (Ray Train's report)."""

    rank: int = 0
    world: int = 1
    checkpoint: str | None = None
    report: Callable[[int, dict[str, Any], Path | None], None] | None = None
    node: str | None = None
    """The Ray node this worker runs on (recorded in result.json's worker_nodes)."""
    on_log: Callable[[int, dict[str, Any], Path | None], None] | None = None
    """Called on rank 0 after every step that logged metrics or an evaluation: (step, that step's metrics,
    the checkpoint written at that step or None). A Tune trial reports through it."""


class _Silent:
    """The logger of ranks other than 0: they write nothing."""
    steps_done = 0

    def advance(self, n: int = 1) -> None:
        self.steps_done += n

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def run_training(spec: RunSpec, ctx: WorkerContext | None = None) -> dict[str, Any] | None:
    """Train spec's run to its configured steps. Rank 0 writes the run directory and returns the result (also
    RUN_DIR/result.json); other ranks return None."""
    ctx = ctx or WorkerContext()
    cfg, run_dir = spec.cfg, Path(spec.run_dir)
    run: RunConfig = cfg["run"]
    lead = ctx.rank == 0
    device = _device(run.device)
    threads = set_threads(run.threads, device)
    data_dir, meta = open_dataset(spec.data)
    algorithm = _build_algorithm(cfg, meta, device)  # validates the action space before anything is written
    if run.init_from and (ctx.checkpoint or spec.checkpoint) is None:  # a warm start (a resumed run has its own)
        from .warm import warm_start
        warm_start(algorithm, cfg["algo_name"], run.init_from)
    if run.eval_episodes and lead:  # fail now, not after training, when the environment cannot be recovered
        from ..evaluation.rollout import make_env
        make_env(meta.get("env_id"), meta.get("env_spec"))

    from .. import data as data_mod
    split = spec.data_mode == "split" and ctx.world > 1
    rank, world = (ctx.rank, ctx.world) if split else (0, 1)
    share = dataset_bytes(meta, data_dir) / world
    gpu = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    budget, why = memory_budget(run, ctx.world if device.type == "cpu" else 1, gpu)
    if share > budget:  # out-of-core: a window of the share in memory, refilled in the background
        from ..data.window import WindowedData
        data: Any = WindowedData(data_dir, rank, world, int(budget), run.batch_size // ctx.world, device=device)
        say_later = (f"out-of-core: this worker's share ({share / 2**20:.0f} MiB) exceeds {why} "
                     f"({budget / 2**20:.0f} MiB); training on windows of {data.window_rows} transitions, "
                     f"{data.steps_per_window} steps each, the next read in the background")
    else:
        data = data_mod.load(data_dir, rank=rank, world_size=world, device=device)
        say_later = None
    start = 0
    checkpoint = ctx.checkpoint or spec.checkpoint
    state = ckpt.load(checkpoint) if checkpoint is not None else None
    if state is not None:
        start = int(state["step"])
    use_compile, compile_why = compile_choice(run, device, run.steps - start, ctx.world, algorithm.K, state)
    learner = make_learner(algorithm, data, cfg, meta, spec.data, mode=spec.data_mode, compile=use_compile)
    configured = learner.reward
    if state is not None:
        learner.load_state_dict(state["learner"], where=checkpoint, step=start)
    say = printer(run.progress if lead and spec.in_process else "off")
    if spec.resume:
        last = spec.data_changes[-1] if spec.data_changed_now else None
        say(f"resuming {run_dir} at step {start} of {run.steps}"
            + (f" from {Path(checkpoint).name}" if checkpoint else " (no checkpoint yet: from the start)")
            + (f"; dataset changed (content hash {last['from_hash'][:12]} -> {last['to_hash'][:12]}), recorded in "
               f"config.yaml" if last is not None else ""))
    say(f"{cfg['algo_name']}: {algorithm.K} member{'s' if algorithm.K > 1 else ''}, {run.steps} steps of batch "
        f"{run.batch_size} on {_training_rows(meta)}, {device.type}"
        + (f" ({threads} thread{'s' if threads > 1 else ''})" if device.type == "cpu" else "") + f" -> {run_dir}")

    if say_later:
        say(say_later)
    if (use_compile or run.compile != "off" and device.type == "cuda" and algorithm.K == 1) and start < run.steps:
        say(compile_why + (": the first step compiles the update (about a minute; cached on disk for the next run "
                           "of these shapes)" if use_compile else ""))
    if learner.reward != (1.0, 0.0):
        scale, bias = learner.reward
        say(f"rewards r -> {scale:.6g} * r" + (f" {'+' if bias >= 0 else '-'} {abs(bias):g}" if bias else "")
            + f" (reward_scale: {_describe(run.reward_scale)})"
            + (f", kept from the checkpoint: this run's setting on this dataset would give {configured[0]:.6g} * r + "
               f"{configured[1]:g}" if learner.reward != configured else ""))
    if run.ope and lead:  # fail now, not at the first eval point
        from ..evaluation.offpolicy import check_run_ope
        check_run_ope(run.ope, meta, data_dir)
    diagnostics = make_diagnostics(run, data_dir, meta, algorithm, learner, say) if lead else None
    created = not run_dir.exists()
    fresh = spec.in_process and not spec.resume and checkpoint is None
    finished_steps = 0
    logger: Any = None
    try:
        if lead:
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(
                config_to_yaml(cfg, spec.data, meta.get("content_hash"), spec.data_changes), sort_keys=False))
            logger = RunLogger(run_dir, algorithm.K, run.steps, start, run.progress if spec.in_process else "off")
            if diagnostics is not None:
                diagnostics.warn = _warner(say, logger)
        else:
            logger = _Silent()
        result = _drive(run_dir, cfg, run, spec.data, meta, algorithm, learner, logger, start, ctx, spec.submitted,
                        diagnostics=diagnostics)
        finished_steps = run.steps - start
    except BaseException:
        if logger is not None:
            finished_steps = logger.steps_done
            logger.close()
            logger = None
        if fresh and finished_steps == 0:  # nothing trained: leave nothing that blocks running it again
            remove_new_run(run_dir, created)
        raise
    finally:
        if logger is not None:
            logger.close()
    return result


def _training_rows(meta: dict[str, Any]) -> str:
    h = meta.get("holdout") or {}
    n = meta.get("num_transitions")
    if not h or not isinstance(n, int):
        return f"{n} transitions"
    return f"{n - int(h['num_transitions'])} transitions ({h['num_episodes']} episodes held out for evaluation)"


def _describe(value: Any) -> str:
    return value if isinstance(value, str) else ", ".join(f"{k} {v}" for k, v in value.items())


def _drive(run_dir: Path, cfg: dict[str, Any], run: RunConfig, data: str, meta: dict[str, Any], algorithm,
           learner: Learner, logger: Any, start: int, ctx: WorkerContext,
           spec_submitted: float = 0.0, diagnostics: Any = None) -> dict[str, Any] | None:
    def payload() -> dict[str, Any]:
        return {"algo": cfg["algo_name"], "learner": learner.state_dict(),  # collective in split mode
                "member_configs": [to_dict(c) for c in cfg["members"]], "seeds": list(cfg["seeds"]),
                "run_config": to_dict(run), "data": data, "metadata": meta}

    lead = ctx.rank == 0
    k = algorithm.K
    last_eval: dict[str, Any] | None = None
    last_metrics: dict[str, Any] = {}
    t_start = time.perf_counter()
    train_time, train_steps = 0.0, 0
    t0, s0 = time.perf_counter(), start
    first_update_s = None
    compile_s = 0.0
    ope_dir = None  # off-policy estimates at the eval points (run key `ope`), on the lead rank
    if lead and run.ope:
        from ..evaluation.offpolicy import run_metrics
        ope_dir = open_dataset(data)[0]
    for step in range(start + 1, run.steps + 1):
        logged: dict[str, Any] = {}
        written: Path | None = None
        learner.step(step)
        compiling = learner.take_compile_seconds()
        if compiling:  # a step that compiled a graph: its time is compile time, not training time
            compile_s += compiling
            t0 += compiling
        logger.advance()
        if first_update_s is None and spec_submitted:
            first_update_s = time.time() - spec_submitted
        diag: dict[str, Any] = {}
        at_eval = step == run.steps or bool(run.eval_every and step % run.eval_every == 0)
        if diagnostics is not None and at_eval:
            td = time.perf_counter()
            diag = diagnostics.run(algorithm, step)  # lead only; left out of updates/s like evaluation
            t0 += time.perf_counter() - td
        if ope_dir is not None and at_eval:
            td = time.perf_counter()
            diag = {**diag, **run_metrics(algorithm, ope_dir, meta, run.ope, run.ope_steps, run.seed)}
            t0 += time.perf_counter() - td
        if step % run.log_every == 0 or step == run.steps:
            metrics = learner.pop_metrics()  # the one host sync of the interval (an all-reduce across workers)
            now = time.perf_counter()
            train_time += now - t0
            train_steps += step - s0
            rate = (step - s0) / max(now - t0, 1e-9)
            metrics["perf/updates_per_s"] = rate
            metrics["perf/member_updates_per_s"] = rate * k
            if compile_s:
                metrics["perf/compile_s"] = compile_s
            metrics.update(diag)  # one metrics.jsonl row per step with the interval's losses
            diag = {}
            logger.log(step, metrics)
            logged.update(metrics)
            last_metrics = {"step": step, **metrics}
            t0, s0 = time.perf_counter(), step
        if step == run.steps or (run.checkpoint_every and step % run.checkpoint_every == 0):
            tc = time.perf_counter()
            state = payload()
            path = ckpt.save(run_dir, step, state, keep=run.keep_checkpoints) if lead else None
            written = path
            if ctx.report is not None:
                ctx.report(step, last_metrics, path)
            t0 += time.perf_counter() - tc
        if lead and run.eval_episodes > 0 and at_eval:
            te = time.perf_counter()
            last_eval = _evaluate_aside(algorithm, meta, run.eval_episodes, run.seed)
            row = {"eval/return_mean": last_eval["return_mean"], "eval/return_std": last_eval["return_std"],
                   **({"eval/normalized_score": last_eval["normalized_score"]}
                      if last_eval["normalized_score"][0] is not None else {})}
            logger.log(step, row)
            logged.update(row)
            t0 += time.perf_counter() - te
        if diag:  # a diagnostics step between log intervals: a row of its own
            logger.log(step, diag)
            logged.update(diag)
        if lead and ctx.on_log is not None and logged:
            tc = time.perf_counter()
            ctx.on_log(step, logged, written)
            t0 += time.perf_counter() - tc
    nodes = [ctx.node]
    if ctx.world > 1:
        nodes = [None] * ctx.world
        torch.distributed.all_gather_object(nodes, ctx.node)
    if not lead:
        return None
    if start >= run.steps:  # resumed a finished run: nothing trained, evaluate what is there
        last_eval = _evaluate_aside(algorithm, meta, run.eval_episodes, run.seed) if run.eval_episodes else None
        if diagnostics is not None:
            diagnostics.run(algorithm, start)
    result = make_result(cfg, meta, last_eval, run, train_steps / train_time if train_time > 0 else None,
                     time.perf_counter() - t_start)
    result["num_workers"] = ctx.world
    result["compiled"] = bool(learner.compile)
    result["compile_s"] = compile_s  # first-step compile time, left out of updates_per_s
    result["reward_transform"] = {"scale": learner.reward[0], "bias": learner.reward[1]}
    result["time_to_first_update_s"] = first_update_s  # from the train() call (start-up: Ray, data, networks)
    result["first_update_at"] = spec_submitted + first_update_s if first_update_s is not None else None
    if diagnostics is not None:
        result["diagnostics"] = diagnostics.summary()
    if ctx.node is not None:
        result["worker_nodes"] = nodes  # by rank
    ckpt.atomic_write_json(run_dir / "result.json", result)
    return result


def _evaluate_aside(algorithm, meta: dict[str, Any], episodes: int, seed: int) -> dict[str, Any]:
    """Evaluate without touching the training noise stream (an algorithm that samples when it acts, e.g.
    BCQ, would otherwise advance it: evaluating would change the training run, and on rank 0 only)."""
    saved = algorithm.rng.get_state()
    try:
        return evaluate_members(algorithm, meta, episodes, seed)
    finally:
        algorithm.rng.set_state(saved)


def make_diagnostics(run: RunConfig, data_dir: Any, meta: dict[str, Any], algorithm, learner: Learner,
                     say: Callable[[str], None], cache: dict[Any, Any] | None = None):
    """The run's training diagnostics (rayoffline/evaluation/diagnostics.py; run key `diagnostics`), their episode
    rows loaded once, or None (off, or skipped with a line saying why). cache: episode rows and behavior models
    to share between runs on the same data (a sweep pack's trials)."""
    if run.diagnostics == "off":
        return None
    from ..data.holdout import held_out_ids
    from ..evaluation import diagnostics as diag
    if held_out_ids(meta) is None and not isinstance(learner.data, Batch):
        say("diagnostics: skipped (the dataset has no held-out split and is trained out-of-core, so sampling "
            "training episodes would read all of it); make a split with `rayoffline data split DIR --holdout 0.05`")
        return None
    cache = {} if cache is None else cache
    key = ("rows", run.diagnostics_episodes, run.seed)
    if key not in cache:
        cache[key] = diag.load_rows(data_dir, meta, run.diagnostics_episodes, run.seed, algorithm.device)
    rows, source = cache[key]
    behavior = None
    if run.diagnostics == "full":
        if not isinstance(learner.data, Batch):
            say("diagnostics: full -> basic (the behavior model is fitted on in-memory training data; this run "
                "trains out-of-core)")
        else:
            from ..evaluation.behavior import default_steps, fit_behavior
            steps = default_steps(int(learner.data.rewards.shape[0]))
            if ("behavior", run.seed) not in cache:
                say(f"diagnostics: fitting a behavior model ({steps} updates) for diag/behavior_nll")
                with torch.random.fork_rng(devices=[algorithm.device] if algorithm.device.type == "cuda" else []):
                    cache["behavior", run.seed] = fit_behavior(learner.data, meta, steps, seeds=(run.seed,),
                                                               device=algorithm.device)
            behavior = cache["behavior", run.seed]
    return diag.Diagnostics(algorithm, rows, source, learner.reward, behavior=behavior, warn=say)


def _warner(say: Callable[[str], None], logger: Any) -> Callable[[str], None]:
    """A warning line through the run's printer, above the progress bar when there is one."""
    def warn(msg: str) -> None:
        bar = getattr(getattr(logger, "progress", None), "bar", None)
        if bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            say(msg)
    return warn


def remove_new_run(run_dir: Path, created: bool) -> None:
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


def printer(progress: str):
    """Status lines on stderr unless progress is 'off' (a terminal shows the progress bar besides)."""
    def say(msg: str) -> None:
        if progress != "off":
            print(msg, file=sys.stderr, flush=True)
    return say


def evaluate_members(algorithm, meta: dict[str, Any], episodes: int, seed: int) -> dict[str, Any]:
    from ..evaluation.rollout import evaluate
    return evaluate(algorithm, meta, episodes, seed=seed)


def make_result(cfg: dict[str, Any], meta: dict[str, Any], ev: dict[str, Any] | None, run: RunConfig,
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
