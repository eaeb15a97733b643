"""Training on Ray Train: N data-parallel workers run the one worker function (worker.run_training).

The driver (`train_on_ray`) starts or joins Ray, checks that the cluster can place the workers at all (an
error within seconds instead of a hang), decides replicate or split for data_mode auto, and runs a
`TorchTrainer` whose per-worker function is `_worker_entry`: gloo on CPUs, NCCL on GPUs (Ray Train's
TorchConfig picks the backend from use_gpu). Rank 0 writes the run directory as an in-process run would;
every checkpoint it writes (today's atomic step_*.pt) is also reported to Ray Train, which keeps copies
under RUN_DIR/ray_train/ and hands the newest back to the workers it restarts after a failure
(`max_failures`). The driver shows progress by following RUN_DIR/metrics.jsonl, so Ray's worker logs stay
out of the terminal.

The run directory must be reachable by rank 0 and the driver under the same path (one machine, or shared
storage such as NFS on a cluster).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RayOfflineError
from .config import RunConfig
from .logger import Progress
from .worker import (RunSpec, WorkerContext, dataset_bytes, memory_budget, open_dataset, printer,
                     remove_new_run, run_training)

RAY_TRAIN_DIR = "ray_train"


def choose_data_mode(run: RunConfig, meta: dict[str, Any], gpu_memory: float | None = None,
                     where: Any = ".") -> tuple[str, str]:
    """(mode, reason) for run.data_mode; auto compares the dataset's size with the per-worker budget."""
    if run.data_mode != "auto":
        return run.data_mode, f"data_mode {run.data_mode} (configured)"
    need = dataset_bytes(meta, where)
    budget, where = memory_budget(run, run.num_workers if run.gpus_per_worker == 0 else 1, gpu_memory)
    if need <= budget:
        return "replicate", (f"data_mode auto -> replicate: the dataset ({need / 2**20:.0f} MiB) fits {where} "
                             f"({budget / 2**20:.0f} MiB)")
    return "split", (f"data_mode auto -> split: the dataset ({need / 2**20:.0f} MiB) exceeds {where} "
                     f"({budget / 2**20:.0f} MiB); each worker loads its share of the shards")


def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's own minute of retries, when nothing listens at HOST:PORT."""
    import socket
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(f"--address {address}: nothing answers at {host}:{port} ({e.strerror or e}); start a "
                          f"cluster with `ray start --head`, or leave --address and $RAY_ADDRESS unset for a "
                          f"local Ray") from None


def connect(run: RunConfig, verbose: bool = False) -> None:
    """Join run.address (or $RAY_ADDRESS), else start a local Ray sized for the run's workers, with Ray's
    logs in its session directory rather than on the terminal (rayoffline._ray)."""
    import ray
    if run.address and run.address != "auto":
        _check_reachable(run.address)
    if ray.is_initialized():  # the caller's own Ray (Python API, tests): use it
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    from .._ray import ensure_ray
    cpus = max(os.cpu_count() or 1, int(run.num_workers * run.cpus_per_worker + 0.999) + 2)
    gpus = None
    if run.gpus_per_worker > 0:
        import torch
        gpus = torch.cuda.device_count()
    address = run.address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "auto" and address != run.address:
        _check_reachable(address)  # from $RAY_ADDRESS
    import warnings
    try:
        with warnings.catch_warnings():  # Ray Client warns about a timeout before raising it: say it once, below
            warnings.simplefilter("ignore", UserWarning)
            ensure_ray(num_cpus=cpus, address=address, num_gpus=gpus, log_to_driver=verbose)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        if address is None:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--address {address}: cannot connect to a Ray cluster there ({first}); start one with "
                          f"`ray start --head`, or leave --address and $RAY_ADDRESS unset for a local Ray") from None


def check_placement(run: RunConfig) -> None:
    """Refuse a worker group the cluster can never place (Ray Train would wait for it forever)."""
    import ray
    total = ray.cluster_resources()
    need = {"CPU": run.num_workers * run.cpus_per_worker, "GPU": run.num_workers * run.gpus_per_worker}
    for res, amount in need.items():
        if amount > total.get(res, 0.0) + 1e-9:
            raise ConfigError(
                f"num_workers {run.num_workers} x {res.lower()}s_per_worker "
                f"{run.cpus_per_worker if res == 'CPU' else run.gpus_per_worker:g} needs {amount:g} {res}, but the "
                f"Ray cluster has {total.get(res, 0.0):g}; use fewer workers or a larger cluster")
    if run.gpus_per_worker > 0:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        per_node = max((n["Resources"].get("GPU", 0.0) for n in nodes), default=0.0)
        if run.gpus_per_worker > per_node:
            raise ConfigError(f"gpus_per_worker {run.gpus_per_worker:g}: no node has that many GPUs "
                              f"(largest: {per_node:g})")


def _worker_entry(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: one rank of the run."""
    import ray
    import ray.train
    import torch
    spec: RunSpec = config["spec"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if torch.cuda.is_available() and spec.cfg["run"].gpus_per_worker > 0:
        import dataclasses
        run = spec.cfg["run"]
        device = ray.train.torch.get_device()
        spec.cfg = {**spec.cfg, "run": dataclasses.replace(run, device=str(device))}
    restored = ray.train.get_checkpoint()
    checkpoint = None
    holder = None
    if restored is not None:  # a restart after a failure: continue from the last reported checkpoint
        holder = tempfile.mkdtemp(prefix="rayoffline-restore-")
        with restored.as_directory() as d:
            files = sorted(Path(d).glob("step_*.pt"))
            if files:
                checkpoint = str(shutil.copy2(files[-1], holder))

    def report(step: int, metrics: dict[str, Any], path: Path | None) -> None:
        flat = {"step": step, **{k: (v[0] if isinstance(v, list) and len(v) == 1 else v)
                                 for k, v in metrics.items() if k != "step"}}
        flat = {k: v for k, v in flat.items() if not isinstance(v, list)}
        if path is None:
            ray.train.report(flat)
            return
        with tempfile.TemporaryDirectory(prefix="rayoffline-ckpt-") as d:
            try:
                os.link(path, Path(d) / path.name)  # no copy on the same filesystem
            except OSError:
                shutil.copy2(path, Path(d) / path.name)
            ray.train.report(flat, checkpoint=ray.train.Checkpoint.from_directory(d))

    node = ray.get_runtime_context().get_node_id()
    try:
        run_training(spec, WorkerContext(rank=rank, world=world, checkpoint=checkpoint, report=report, node=node))
    except RayOfflineError as e:  # e.g. a dataset path this node cannot read: say where it happened
        raise on_worker(e, rank, ray.util.get_node_ip_address(), node) from None
    finally:
        if holder is not None:
            shutil.rmtree(holder, ignore_errors=True)


def on_worker(error: RayOfflineError, rank: int, ip: str, node_id: str) -> RayOfflineError:
    """The same error, saying which worker and node raised it (a path the driver reads may be missing on a
    worker's node: the run directory and datasets must be on storage every node sees)."""
    return type(error)(f"{error} (on Ray Train worker rank {rank}, node {ip}, id {node_id[:12]})")


class _Follower:
    """Shows progress on the driver from the rows rank 0 appends to metrics.jsonl."""

    def __init__(self, run_dir: Path, members: int, total: int, start: int, progress: str) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.view = Progress(members, total, start, progress)
        self.last = start
        self.offset = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _poll(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        lines = chunk.split("\n")
        complete, rest = lines[:-1], lines[-1]
        self.offset += len(chunk) - len(rest)
        for line in complete:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            step = int(row.get("step", 0))
            if step < self.last:  # a restart truncated the file: follow it from the checkpoint's step
                self.last = step
            if "perf/updates_per_s" in row:
                self.view.advance(step - self.last)
                self.last = step
                self.view.show(row)

    def _loop(self) -> None:
        while not self.stop.wait(1.0):
            self._poll()

    def __enter__(self) -> "_Follower":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        self._poll()
        self.view.close()


def _user_error(exc: BaseException) -> RayOfflineError | None:
    """The RayOfflineError a worker raised, found inside Ray Train's failure wrappers."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RayOfflineError):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__, getattr(e, "controller_failure", None)]
        todo += list((getattr(e, "worker_failures", None) or {}).values())
        if hasattr(e, "as_instanceof_cause"):
            try:
                todo.append(e.as_instanceof_cause())
            except Exception:  # pragma: no cover
                pass
    return None


def train_on_ray(spec: RunSpec, start: int, verbose: bool = False) -> dict[str, Any]:
    """Run spec on run.num_workers Ray Train workers; returns rank 0's result. Ray's driver-side logs go to
    RUN_DIR/ray.log (and with verbose=True to the terminal too, with the workers' output)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run: RunConfig = spec.cfg["run"]
    run_dir = Path(spec.run_dir).absolute()
    spec.run_dir = str(run_dir)  # the workers' working directory is not the driver's: a relative --out is lost there
    if run.gpus_per_worker == 0 and run.device.startswith("cuda"):
        raise ConfigError("config key 'device': cuda needs gpus_per_worker > 0 for Ray Train workers")
    data_dir, meta = open_dataset(spec.data)
    if run.eval_episodes:  # rank 0 evaluates at the end: fail before starting anything if it cannot
        from ..evaluation.rollout import make_env
        make_env(meta.get("env_id"), meta.get("env_spec"))
    connect(run, verbose)
    check_placement(run)
    gpu = None
    if run.gpus_per_worker > 0:
        import torch
        gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    mode, why = choose_data_mode(run, meta, gpu, data_dir)
    spec.data_mode = mode
    spec.in_process = False
    if mode == "split":
        from ..data.load import dataset_file_rows
        files = dataset_file_rows(data_dir, meta)
        if len(files) < run.num_workers:
            raise ConfigError(f"data_mode split: the dataset has {len(files)} shard files for {run.num_workers} "
                              f"workers; convert it again with `rayoffline data convert ... --shards "
                              f"{4 * run.num_workers}` (at least one file per worker, 4 per worker recommended)")
    say = printer(run.progress)
    say(f"{spec.cfg['algo_name']}: {len(spec.cfg['members'])} member(s), {run.steps} steps of global batch "
        f"{run.batch_size} on {run.num_workers} Ray Train workers ({run.cpus_per_worker:g} CPU"
        + (f", {run.gpus_per_worker:g} GPU" if run.gpus_per_worker else "") + " each); " + why + f" -> {run_dir}")
    created = not run_dir.exists()
    from .._ray import ray_log_in
    log_handler = ray_log_in(run_dir, verbose)  # creates run_dir
    resources = {"CPU": run.cpus_per_worker, **({"GPU": run.gpus_per_worker} if run.gpus_per_worker else {})}
    trainer = TorchTrainer(
        _worker_entry, train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=run.num_workers, use_gpu=run.gpus_per_worker > 0,
                                     resources_per_worker=resources, placement_strategy=run.placement.upper()),
        run_config=RayRunConfig(storage_path=str(run_dir), name=RAY_TRAIN_DIR,
                                failure_config=FailureConfig(max_failures=run.max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints)))
    try:
        with _Follower(run_dir, len(spec.cfg["members"]), run.steps, start, run.progress):
            trainer.fit()
    except BaseException as e:
        if not spec.resume and spec.checkpoint is None and not any((run_dir / "checkpoints").glob("step_*.pt")):
            remove_new_run(run_dir, created)
        user = _user_error(e)
        if user is not None:
            raise type(user)(str(user)) from None
        raise
    finally:
        logging.getLogger("ray").removeHandler(log_handler)
        log_handler.close()
    return json.loads((run_dir / "result.json").read_text())
