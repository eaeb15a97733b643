"""What runs inside Ray for a sweep: the trial functions Tune calls, the pack actors and their coordinator.

- `fused_trial`: a lightweight Tune trial (a small CPU share, no torch work of its own) for one configuration.
  It asks the sweep's `Coordinator` for a pack of its key, joins it (from its Tune checkpoint when Tune restores,
  retries or PBT-exploits it) and relays: every interval's metrics to `tune.report`, with the checkpoint the
  pack wrote when one is due. Schedulers, search algorithms, results and `Tuner.restore` see ordinary trials.
- `solo_trial`: one configuration in its own process (`fuse: false`), the one worker function with a per-interval
  report hook; with `resources.workers > 0` a Ray Train run of its own.
- `Coordinator`: one actor per sweep, created by the driver (so the packs it creates share the driver's fate and a
  killed driver leaves nothing running). It assigns trials to packs (the fullest pack of the key with room,
  else a new one), drops trials Tune no longer runs from their packs, and replaces a pack whose actor died.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray

RELAY_RESOURCES = {"cpu": 0, "memory": 2**20}
"""What a trial that only relays asks Tune for (a fused trial; a Ray Train trial, whose workers ask for their own):
no CPU, so that relays never keep a pack or a worker from being placed; Tune needs a non-empty request, hence
a token 1 MiB of memory."""


def summarize(row: dict[str, Any]) -> dict[str, Any]:
    """A run's metrics row (per-member lists for K > 1) -> what the trial reports to Tune: the mean over the
    configuration's seeds under the metric's own name, and the spread across seeds as `seed_std/<name>`."""
    out: dict[str, Any] = {}
    for key, v in row.items():
        if isinstance(v, (list, tuple)):
            vals = [float(x) for x in v if x is not None]
            if not vals:
                continue
            mean = sum(vals) / len(vals)
            out[key] = mean
            out[f"seed_std/{key}"] = math.sqrt(sum((x - mean) ** 2 for x in vals) / len(vals))
        elif v is not None:
            out[key] = v
    return out


def trial_config(sweep: dict[str, Any], config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(the run config mapping of one trial's configuration: the sweep's fixed config, the trial's values and
    its seeds as members; its pack key). Plain data: build_config turns it into a run's config."""
    from .space import Sweep, pack_fields
    spec = Sweep(**sweep)
    raw, key = pack_fields(spec, config)
    raw = json.loads(json.dumps(raw))
    raw["members"] = [{"seed": s} for s in spec.seeds]
    raw["progress"] = "off"
    return raw, key


def _trial_dir(ctx: dict[str, Any]) -> Path:
    from ray import tune
    return Path(ctx["out"]) / "trials" / tune.get_context().get_trial_id()


def _checkpoint_bytes() -> bytes | None:
    from ray import tune
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return (Path(d) / "member.pt").read_bytes()


def _report(metrics: dict[str, Any], checkpoint: bytes | Path | None) -> None:
    from ray import tune
    if checkpoint is None:
        tune.report(metrics)
        return
    tmp = tempfile.mkdtemp(prefix="rayoffline-ckpt-")
    try:
        dest = Path(tmp) / "member.pt"
        if isinstance(checkpoint, bytes):
            dest.write_bytes(checkpoint)
        else:
            shutil.copyfile(checkpoint, dest)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class TrialFailed(RuntimeError):
    """A trial's members failed in their pack (a non-finite loss, a pack that died): Tune retries the trial
    from its last checkpoint up to max_failures times; its pack-mates go on."""


def fused_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Relays between Tune and the trial's pack; imports neither torch nor the learner (a sweep runs hundreds of
    these processes: the coordinator builds the config, the pack trains)."""
    from ray import tune
    trial = tune.get_context().get_trial_id()
    coordinator = ray.get_actor(ctx["coordinator"], namespace=ctx["namespace"])
    state = _checkpoint_bytes()
    for attempt in range(3):  # a pack that died a moment ago may still be assigned: forget it, ask again
        pack, raw, name = ray.get(coordinator.assign.remote(trial, config))
        try:
            step = ray.get(pack.join.remote(trial, raw, str(_trial_dir(ctx)), state))
            break
        except ray.exceptions.RayActorError:
            ray.get(coordinator.forget.remote(name))
    else:
        raise TrialFailed(f"trial {trial}: every pack it was assigned to had died")
    while True:
        try:
            r = ray.get(pack.next.remote(trial, step))
        except ray.exceptions.RayActorError:
            coordinator.forget.remote(name)
            raise TrialFailed(f"trial {trial}: its pack {name} died at step {step}; Tune retries the trial from "
                              f"its last checkpoint (max_failures)") from None
        if r["error"]:
            raise TrialFailed(r["error"])
        if r["done"] and not r["metrics"]:  # restored at its last step: its results are reported already
            return
        step = r["step"]
        _report({"step": step, **summarize(r["metrics"])}, r["checkpoint"])
        if r["done"]:
            return


def solo_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One configuration in this process (fuse: false), or as a Ray Train run (resources.workers > 0)."""
    from ..learner.worker import RunSpec, WorkerContext, run_training
    from ..learner.config import build_config
    raw, _ = trial_config(ctx["sweep"], config)
    cfg = build_config(ctx["sweep"]["algo"], raw)
    run_dir = _trial_dir(ctx)
    state = _checkpoint_bytes()
    tmp = None
    checkpoint = None
    if state is not None:
        tmp = tempfile.mkdtemp(prefix="rayoffline-resume-")
        checkpoint = str(Path(tmp) / "member.pt")
        Path(checkpoint).write_bytes(state)
    workers = int(ctx["sweep"]["resources"].get("workers", 0))
    try:
        if workers > 0:
            _distributed_trial(ctx, cfg, run_dir, checkpoint is not None)
            return

        def on_log(step: int, row: dict[str, Any], path: Path | None) -> None:
            _report({"step": step, **summarize(row)}, path)

        spec = RunSpec(cfg=cfg, data=ctx["sweep"]["data"], run_dir=str(run_dir), resume=checkpoint is not None,
                       checkpoint=checkpoint, in_process=False)
        run_training(spec, WorkerContext(on_log=on_log))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _distributed_trial(ctx: dict[str, Any], cfg: dict[str, Any], run_dir: Path, resume: bool) -> None:
    """A trial that is a Ray Train run: train() runs in a thread; this one reports each metrics.jsonl row
    rank 0 appends, and the final checkpoint."""
    from ..config import to_dict
    from ..learner import api, checkpoint as ckpt
    sweep = ctx["sweep"]
    raw = {**to_dict(cfg["run"]), "algo": to_dict(cfg["members"][0]), "members": [{"seed": s} for s in cfg["seeds"]],
           "num_workers": int(sweep["resources"]["workers"]), "cpus_per_worker": float(sweep["resources"]["cpus"]),
           "gpus_per_worker": float(sweep["resources"]["gpus"])}
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            if resume and (run_dir / "config.yaml").exists():
                box["result"] = api.train(None, None, run_dir, resume=True)
            else:
                box["result"] = api.train(cfg["algo_name"], sweep["data"], run_dir, config=raw)
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread
            box["error"] = e

    th = threading.Thread(target=work, daemon=True)
    th.start()
    seen = 0
    path = run_dir / "metrics.jsonl"
    while True:
        alive = th.is_alive()
        rows = []
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            complete = lines if not alive else lines[:-1]  # the last line may be half-written
            rows = [json.loads(x) for x in complete[seen:] if x.strip()]
            seen += len(rows)
        for row in rows[:-1] if not alive else rows:
            _report(summarize(row), None)
        if not alive:
            if "error" in box:
                raise box["error"]
            last = rows[-1] if rows else {"step": cfg["run"].steps}
            _report(summarize(last), ckpt.latest(run_dir))
            return
        time.sleep(1.0)


# ----- the pack actors and their coordinator ---------------------------------------------------------------
class Coordinator:
    """Assigns trials to packs; one per sweep (see the module docstring). A threaded actor: `assign` may wait for
    a new pack to measure its device, and `drop` (which frees a device by closing an empty pack) must get
    through meanwhile; the shared state is guarded by one lock that no call holds while it waits on Ray."""

    def __init__(self, sweep: dict[str, Any], out: str, pack_size: int | None, prefix: str) -> None:
        self.sweep, self.out = sweep, out
        self.pack_size = pack_size          # members per pack; None: as many as a pack's device holds
        self.prefix = prefix                # pack actors are named PREFIX-packNNN-KEY (in the driver's namespace)
        self.packs: dict[str, dict[str, Any]] = {}   # name -> {"key", "actor", "members": {trial: size}, "ping"}
        self.capacity: dict[str, int] = {}             # pack key -> members a pack holds (pack_size auto)
        self.count = 0
        self.lock = threading.RLock()

    def assign(self, trial: str, config: dict[str, Any]) -> tuple[Any, dict[str, Any], str]:
        """(the pack actor that trains this trial's configuration, its run config mapping, the pack's name)."""
        raw, key = trial_config(self.sweep, config)
        size = len(raw["members"])
        limit = self._limit(key, raw)
        with self.lock:
            for p in self.packs.values():
                p["members"].pop(trial, None)
            self._prune_dead()
            mine = [p for p in self.packs.values() if p["key"] == key
                    and sum(p["members"].values()) + size <= max(limit, size)]
            pack = max(mine, key=lambda p: sum(p["members"].values())) if mine else self._new_pack(key)
            pack["members"][trial] = size
            name = next(n for n, p in self.packs.items() if p is pack)
            return pack["actor"], raw, name

    def forget(self, name: str) -> None:
        """A trial found pack `name` dead: assign no one to it again."""
        with self.lock:
            self.packs.pop(name, None)

    def prewarm(self, plan: list[tuple[dict[str, Any], int]], slots: int) -> int:
        """Start packs before their trials exist, so that loading torch and the data overlaps Tune's start-up.
        plan: (the non-member values of a pack key, how many packs it will fill); at most `slots` packs in all
        (what the cluster can run at once). Returns how many packs were started."""
        started = 0
        with self.lock:
            for config, n in plan:
                _, key = trial_config(self.sweep, config)
                have = sum(p["key"] == key for p in self.packs.values())
                while have < n and len(self.packs) < slots:
                    self._new_pack(key)
                    have += 1
                    started += 1
        return started

    def drop(self, trials: list[str]) -> None:
        """Trials Tune no longer runs leave their packs; a pack left empty is closed, so that its CPUs or GPU
        go to a pack of another key (packs of different shapes share a device one after the other)."""
        gone, empty = set(trials), []
        with self.lock:
            for name, p in list(self.packs.items()):
                mine = [t for t in p["members"] if t in gone]
                if mine:
                    for t in mine:
                        p["members"].pop(t)
                    p["actor"].drop.remote(mine)
                    if not p["members"] and not p.get("measuring"):
                        empty.append(self.packs.pop(name))
        for p in empty:
            _close(p)

    def packs_info(self) -> list[dict[str, Any]]:
        with self.lock:
            return [{"name": n, "key": p["key"], "members": dict(p["members"])} for n, p in self.packs.items()]

    def shutdown(self) -> None:
        with self.lock:
            packs, self.packs = list(self.packs.values()), {}
        for p in packs:
            _close(p)

    def _limit(self, key: str, raw: dict[str, Any]) -> int:
        """Members per pack of `key`: pack_size when set; else what a pack's device holds (asked once per key,
        of its first pack: on a GPU it measures; on CPUs there is no device limit)."""
        if self.pack_size is not None:
            return self.pack_size
        with self.lock:
            if key in self.capacity:
                return self.capacity[key]
            mine = [p for p in self.packs.values() if p["key"] == key]
            pack = mine[0] if mine else self._new_pack(key)
            pack["measuring"] = True
        try:  # outside the lock: the pack may wait for its device, which a drop elsewhere frees
            cap = ray.get(pack["actor"].capacity.remote(raw))
        finally:
            pack["measuring"] = False
        with self.lock:
            self.capacity.setdefault(key, cap if cap is not None else 1 << 30)
            return self.capacity[key]

    def _prune_dead(self) -> None:
        """Forget packs whose actor died (their trials fail, and Tune retries them into a new pack). Each pack has
        one ping in flight; a ping that came back as an error means the actor is gone. Never waits: a pack still
        waiting for its CPUs or GPU has not answered yet and counts as alive."""
        refs = {name: p["ping"] for name, p in self.packs.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=0) if refs else ([], [])
        for name, ref in refs.items():
            if ref in ready:
                try:
                    ray.get(ref)
                    self.packs[name]["ping"] = self.packs[name]["actor"].ping.remote()
                except Exception:  # noqa: BLE001 - RayActorError and kin: the actor is gone
                    del self.packs[name]

    def _new_pack(self, key: str) -> dict[str, Any]:
        from .pack import Pack
        res = self.sweep["resources"]
        name = f"pack{self.count:03d}-{key[:8]}"
        self.count += 1
        actor = ray.remote(Pack).options(
            num_cpus=float(res["cpus"]), num_gpus=float(res["gpus"]), max_concurrency=1000,
            name=f"{self.prefix}-{name}", max_restarts=0).remote(
                name, self.sweep["algo"], self.sweep["data"], device="cuda" if res["gpus"] > 0 else "cpu",
                threads=0, stats_dir=str(Path(self.out) / "packs"))
        self.packs[name] = {"key": key, "actor": actor, "members": {}, "ping": actor.ping.remote()}
        return self.packs[name]


def _close(pack: dict[str, Any]) -> None:
    try:
        ray.get(pack["actor"].close.remote(), timeout=30)  # its loggers flushed, its stats file complete
    except Exception:  # noqa: BLE001 - closing what may already be dead
        pass
    try:
        ray.kill(pack["actor"])
    except Exception:  # noqa: BLE001
        pass
