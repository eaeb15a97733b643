"""`rayoffline tune` / `rayoffline.tune()`: a sweep file -> a Ray Tune experiment -> ranked results.

The driver validates the sweep (keys, distributions, metric, resources: all before any trial starts), starts or
joins Ray, creates the sweep's pack coordinator (sweep/trial.py) and runs a `Tuner` whose trials are one per
configuration. OUT holds:

    sweep.yaml          the sweep as run (what --resume continues)
    tune/               Ray Tune's experiment (Tuner.restore reads it; trial checkpoints live here)
    trials/<trial_id>/  each configuration's run directory (config.yaml, metrics.jsonl, tb/, checkpoints/,
                        result.json): `rayoffline eval` and `rayoffline.load_run` read it like any run
    packs/<pack>.json   what each pack trained: passes, member-updates per trial, membership over time
    results.csv, best.yaml, sweep.png, ray.log
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

EXPERIMENT = "tune"


def tune(sweep: str | Path | dict[str, Any] | None, out: str | Path | None = None,
         overrides: list[str] | None = None, resume: bool = False, address: str | None = None,
         verbose: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Run a hyperparameter sweep (a sweep YAML file or mapping; see tune_configs/ and the README).

    Args:
        sweep: the sweep file or mapping; may be None with resume=True (OUT/sweep.yaml is used).
        out: output directory (default runs/<sweep name>); must be new unless resume=True.
        overrides: `key=value` strings applied to the sweep (`config.steps=500`, `max_concurrency=2`).
        resume: continue the sweep in OUT after its driver was killed: finished trials are not run again,
            unfinished ones continue from their last checkpoints (Ray Tune's Tuner.restore).
        address: Ray cluster to join ('auto', 'ray://HOST:10001'); default $RAY_ADDRESS, else a local Ray.
        verbose: show Ray's and Tune's own output on the terminal (it always goes to OUT/ray.log).
        quiet: print nothing.

    Returns:
        {"out", "rows" (one per configuration, best first: trial, status, step, config, seeds, metric mean
        and std across seeds, run_dir), "best" (the first row), "results_csv", "best_yaml", "plot",
        "packs" (each pack's passes and member-updates), "member_updates", "wall_s"}.
    """
    from .space import load_sweep
    t_start = time.time()
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if resume:
        if out is None:
            raise ConfigError("--resume needs --out DIR: the sweep directory to continue")
        out = Path(out)
        saved = out / "sweep.yaml"
        if not saved.exists():
            raise ConfigError(f"--resume: {out} holds no sweep (no sweep.yaml); start it without --resume")
        spec = load_sweep(saved, overrides)
        if sweep is not None and load_sweep(sweep).__dict__ != load_sweep(saved).__dict__:
            say(f"note: {sweep} differs from the sweep saved in {saved}; resuming the saved one")
    else:
        if sweep is None:
            raise ConfigError("tune needs a sweep file (rayoffline tune SWEEP.yaml)")
        spec = load_sweep(sweep, overrides)
        out = Path(out) if out is not None else Path("runs") / spec.name
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            hint = " and holds a sweep: pass --resume to continue it" if (out / "sweep.yaml").exists() else ""
            raise ConfigError(f"--out {out}: exists{hint}; choose a new or empty directory")
    out = out.resolve()
    from ..learner.worker import open_dataset
    from .space import check_metric
    data = spec.data
    if not data.startswith(("builtin:", "minari:")) and "://" not in data:
        data = str(Path(data).resolve())
        spec = dataclasses.replace(spec, data=data)
    _, meta = open_dataset(spec.data)
    if spec.preset is not None:
        from ..learner import presets
        presets.check_action_space(spec.preset, meta, spec.data)
    check_metric(spec, meta)

    handler = _connect(spec, address, out, verbose)
    try:
        return _run(spec, out, resume, say, meta, t_start, verbose)
    finally:
        logging.getLogger("ray").removeHandler(handler)


def _connect(spec, address: str | None, out: Path, verbose: bool) -> logging.Handler:
    import ray
    from .._ray import ensure_ray, ray_log_in
    from .space import check_resources
    ensure_ray(address=address or None, log_to_driver=verbose)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    check_resources(spec, ray.cluster_resources(), nodes)  # before OUT is created: a refused sweep leaves nothing
    return ray_log_in(out, verbose)


def _pack_size(spec, total_configs: int) -> int | None:
    """Members per pack. `pack_size: N` as given; auto: on GPUs None (each pack measures what its device holds),
    on CPUs the concurrent members spread over as many packs as the cluster's CPUs hold at once (a pack is
    one process: more packs than that only share cores; fewer leave cores idle)."""
    if spec.pack_size != "auto":
        return int(spec.pack_size)
    if spec.resources["gpus"] > 0:
        return None
    slots = _slots(spec)
    concurrent = min(spec.max_concurrency or total_configs, total_configs)
    return max(len(spec.seeds), math.ceil(concurrent / slots) * len(spec.seeds))


def _run(spec, out: Path, resume: bool, say, meta: dict[str, Any], t_start: float,
         verbose: bool) -> dict[str, Any]:
    import ray
    from ray import tune as rt
    from ray.tune.search import ConcurrencyLimiter
    from ..learner import checkpoint as ckpt
    from .results import build_rows, write_outputs, format_table
    from .space import make_scheduler, make_search, param_space
    from .trial import RELAY_RESOURCES, Coordinator, fused_trial, solo_trial

    if not verbose:  # Tune's console output (a banner, the TensorBoard hint) goes to OUT/ray.log instead
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # eval/* come only at evaluation steps
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")  # the experiment state --resume restores from
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "100000")
    if not resume:
        ckpt.atomic_write_text(out / "sweep.yaml", yaml.safe_dump(
            {k: v for k, v in dataclasses.asdict(spec).items()}, sort_keys=False))
    sweep_dict = dataclasses.asdict(spec)
    space = param_space(spec)
    total = _count_configs(spec)
    namespace = ray.get_runtime_context().namespace
    # named after OUT: a resumed sweep's restored callback (pickled with the experiment) finds the new driver's
    coord_name = "rayoffline-sweep-" + hashlib.sha1(str(out).encode()).hexdigest()[:10]
    coordinator = None
    if spec.fuse:
        size = _pack_size(spec, total)
        coordinator = ray.remote(Coordinator).options(name=coord_name, num_cpus=0, max_concurrency=64).remote(
            sweep_dict, str(out), size, coord_name)
        plan, slots = _prewarm_plan(spec, size, total)
        if plan:
            coordinator.prewarm.remote(plan, slots)
        trainable = rt.with_resources(rt.with_parameters(fused_trial, ctx={
            "sweep": sweep_dict, "out": str(out), "coordinator": coord_name, "namespace": namespace}),
            RELAY_RESOURCES)
        how = (f"fused: configurations that differ only in per-member keys train in packs of up to "
               f"{size if size else 'what the device holds'} members "
               f"({spec.resources['cpus']:g} CPU{'s' if spec.resources['cpus'] != 1 else ''}"
               + (f", {spec.resources['gpus']:g} GPU" if spec.resources['gpus'] else "") + " per pack)")
    else:
        workers = int(spec.resources.get("workers", 0))
        res = (RELAY_RESOURCES if workers else
               {"cpu": spec.resources["cpus"], "gpu": spec.resources["gpus"]})
        trainable = rt.with_resources(rt.with_parameters(solo_trial, ctx={"sweep": sweep_dict, "out": str(out)}),
                                      res)
        how = ("one process per configuration" if not workers else
               f"each configuration a Ray Train run of {workers} workers")
    search = make_search(spec)
    if search is not None and spec.max_concurrency:
        search = ConcurrencyLimiter(search, max_concurrent=spec.max_concurrency)
    tune_config = rt.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=make_scheduler(spec),
                                search_alg=search, num_samples=spec.num_samples,
                                max_concurrent_trials=spec.max_concurrency or None, reuse_actors=False)
    callback = _Watch(coord_name if spec.fuse else None, say, spec)
    run_config = rt.RunConfig(
        name=EXPERIMENT, storage_path=str(out), verbose=0, callbacks=[callback],
        failure_config=rt.FailureConfig(max_failures=spec.max_failures),
        # PBT restores trials from other trials' checkpoints at any time: keep them all (they are one
        # configuration's members each); otherwise the newest two (resume, retries)
        checkpoint_config=rt.CheckpointConfig(num_to_keep=None if spec.scheduler["type"] == "pbt" else 2))
    say(f"rayoffline tune: {spec.algo} on {spec.data}, {total} configuration{'s' if total != 1 else ''} x "
        f"{len(spec.seeds)} seed{'s' if len(spec.seeds) != 1 else ''}, {spec.metric} ({spec.mode}), "
        f"{spec.scheduler['type']} scheduler, {spec.search['type']} search; {how} -> {out}")
    try:
        if resume:
            exp = out / EXPERIMENT
            if not rt.Tuner.can_restore(str(exp)):
                raise ConfigError(f"--resume: {exp} holds no Ray Tune experiment state to restore")
            tuner = rt.Tuner.restore(str(exp), trainable=trainable, resume_unfinished=True, resume_errored=True,
                                     param_space=space)
            say(f"resuming {exp}")
        else:
            tuner = rt.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)
        grid = tuner.fit()
    finally:
        if coordinator is not None:
            try:
                ray.get(coordinator.shutdown.remote(), timeout=120)
                ray.kill(coordinator)
            except Exception:  # noqa: BLE001 - the driver is leaving anyway (Ray may be gone)
                pass
    rows = build_rows(grid, spec, out)
    packs = _pack_stats(out)
    paths = write_outputs(rows, spec, out)
    result = {"out": str(out), "rows": rows, "best": rows[0] if rows else None, **paths, "packs": packs,
              "member_updates": sum(sum(p["member_updates"].values()) for p in packs),
              "wall_s": time.time() - t_start}
    say(format_table(rows, spec))
    say(_summary(result, spec))
    return result


def _prewarm_plan(spec, size: int | None, total: int) -> tuple[list[tuple[dict[str, Any], int]], int]:
    """Which packs a sweep will need, when that is known before its trials exist: every key that is not per
    member is a grid (or there is none), so the pack keys are the grid's combinations of those keys. Returns
    ([(those values, packs of that key), ...], packs the cluster can run at once); ([], 0) when unknown."""
    import itertools

    from .space import member_keys
    members = member_keys(spec.algo)
    shared = {k: d for k, d in spec.space.items() if k not in members}
    if any("grid" not in d for d in shared.values()) or spec.scheduler["type"] == "pbt":
        return [], 0
    combos = [dict(zip(shared, values)) for values in itertools.product(*(d["grid"] for d in shared.values()))]
    per_key = total // max(len(combos), 1)
    if spec.max_concurrency:
        per_key = min(per_key, spec.max_concurrency)
    need = 1 if size is None else max(1, math.ceil(per_key * len(spec.seeds) / size))
    return [(c, need) for c in combos], _slots(spec)


def _slots(spec) -> int:
    """How many packs the cluster runs at once: GPUs / GPUs per pack, else CPUs / CPUs per pack, where a
    one-node cluster on this machine counts its cores (ensure_ray gives a small machine more logical CPUs than
    cores, for Ray Data; packs beyond the cores would only share them)."""
    import ray
    res = spec.resources
    cluster = ray.cluster_resources()
    if res["gpus"] > 0:
        return max(1, int(cluster.get("GPU", 0) // res["gpus"]))
    cpus = cluster.get("CPU", 1)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == ray.util.get_node_ip_address():
        cpus = min(cpus, len(os.sched_getaffinity(0)))
    return max(1, int(cpus // res["cpus"]))


def _count_configs(spec) -> int:
    n = spec.num_samples
    for dist in spec.space.values():
        if "grid" in dist:
            n *= len(dist["grid"])
    return n


def _pack_stats(out: Path) -> list[dict[str, Any]]:
    stats = []
    for p in sorted((out / "packs").glob("*.json")):
        try:
            stats.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    return stats


def _summary(result: dict[str, Any], spec) -> str:
    rows = result["rows"]
    done = sum(r["status"] == "finished" for r in rows)
    stopped = sum(r["status"].startswith("stopped") for r in rows)
    failed = sum(r["status"] == "error" for r in rows)
    parts = [f"{len(rows)} configurations: {done} finished, {stopped} stopped early, {failed} failed"]
    if result["packs"]:
        parts.append(f"{len(result['packs'])} pack{'s' if len(result['packs']) != 1 else ''}, "
                     f"{result['member_updates']:,} member-updates in {result['wall_s']:.0f} s "
                     f"({result['member_updates'] / max(result['wall_s'], 1e-9):,.0f}/s overall)")
    parts.append(f"results: {result['results_csv']}; best: {result['best_yaml']} "
                 f"(rayoffline train --config {result['best_yaml']} --out runs/best)")
    return "\n".join(parts)


class _Watch:
    """Tune callback: tells the coordinator which trials ended (their members leave their packs at once) and
    prints a line per finished, stopped or failed configuration."""

    def __new__(cls, *args, **kwargs):
        from ray.tune import Callback

        class Watch(Callback):
            def __init__(self, coordinator: str | None, say, spec) -> None:
                # the coordinator by name, looked up when needed: Tune pickles its callbacks with the
                # experiment, and an actor handle does not outlive its driver
                self.coordinator, self.say, self.spec = coordinator, say, spec
                self.ended: set[str] = set()
                self.finished = 0

            def on_step_end(self, iteration, trials, **info) -> None:
                if self.coordinator is None:
                    return
                # trials not running now leave their packs; a paused (PBT) or retried trial that runs again
                # rejoins, and is dropped again when it next stops
                ended = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR", "PAUSED")}
                new = ended - self.ended
                if new:
                    import ray
                    try:
                        ray.get_actor(self.coordinator).drop.remote(sorted(new))
                    except ValueError:  # the sweep is closing: no coordinator any more
                        pass
                self.ended = ended

            def on_trial_complete(self, iteration, trials, trial, **info) -> None:
                self.finished += 1
                last = trial.last_result or {}
                value = last.get(self.spec.metric)
                steps = last.get("step")
                self.say(f"[{self.finished}/{len(trials)}] {trial.trial_id} {_short(trial.config)}: "
                         f"{self.spec.metric} {_fmt(value)} at step {steps}")

            def on_trial_error(self, iteration, trials, trial, **info) -> None:
                self.say(f"{trial.trial_id} {_short(trial.config)} failed (retries left: "
                         f"{max(0, self.spec.max_failures - trial.num_failures)}); see {trial.path}")

        return Watch(*args, **kwargs)


def _short(config: dict[str, Any]) -> str:
    return " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in config.items())


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
