"""A pack: one process holding a dataset on its device and training the members of many Tune trials in one pass.

Each Tune trial is one configuration with S seeds (S members). Configurations that share every non-per-member
setting (shapes, optimizers, batch size, steps) share a pack key; a pack trains up to `pack_size` of them as
one K-member learner (`Learner`, the one training loop) and hands every trial its own metrics, TensorBoard
run, checkpoints and result in its own run directory, which `rayoffline eval` and `load_run` read like any
run's.

Protocol (the trial side is `rayoffline/sweep/trial.py`):
- `join(trial, spec)`: the trial's members enter at the next interval boundary, fresh or from a checkpoint
  (a resumed, restarted or PBT-exploited trial: its members continue at their own step);
- `next(trial, after_step)`: blocks until the trial's next interval is done and returns its metrics (and its
  checkpoint, as bytes, when one was written). Calling it is also the trial's acknowledgement: the pack starts
  an interval only when every member's trial has taken the previous result, so a configuration that a
  scheduler stops costs nothing after its last report;
- `retain(trials)`: the trials Tune still runs; the others leave at the next boundary (a stopped, paused or
  failed trial). `leave(trial)` does the same for one.
Membership changes only between intervals: the learner is rebuilt from the kept members' state slices and the
newcomers' states (`learner/pack_state.py`), so every member trains exactly as it would alone.

At a trial's eval points the pack computes what its solo run would: online evaluation (`eval/*`), diagnostics
(`diag/*`) and off-policy estimates (`ope/*`, run key `ope`). The due trials' evaluations and off-policy estimates
are batched: one algorithm of their members, so one vectorized rollout, and one FQE fit for every trial that shares
the estimators, FQE steps, discount and run seed, each trial's FQE members seeded as in its solo run.

`Pack` is plain Python (a thread trains; the methods are thread-safe) and is tested without Ray;
`PackActor` runs it as a threaded Ray actor holding the pack's CPUs/GPU.
"""
from __future__ import annotations

import io
import json
import math
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

ACK_TIMEOUT_S = 600.0
"""A member whose trial neither takes its result nor leaves within this long is dropped (its trial died
without Tune noticing yet); its trial, if alive, rejoins from its checkpoint."""


@dataclass
class _Member:
    trial: str
    cfg: dict[str, Any]            # build_config's result: algo_name, run, members, seeds
    run_dir: Path
    state: dict[str, Any] | None   # the members' learner state when joining from a checkpoint
    step: int = 0
    logger: Any = None
    last_eval: dict[str, Any] | None = None
    started: float = 0.0
    member_updates: int = 0
    trained: int = 0
    train_s: float = 0.0
    diag: Any = None               # the trial's training diagnostics (run key `diagnostics`), or None

    @property
    def size(self) -> int:
        return len(self.cfg["seeds"])


class Pack:
    """Trains the members of joined trials in one pass on `device`; see the module docstring."""

    def __init__(self, name: str, algo: str, data: str, device: str = "auto", threads: int = 0,
                 stats_dir: str | None = None, ack_timeout_s: float = ACK_TIMEOUT_S, gather_s: float = 0.3) -> None:
        """gather_s: after a join, wait this long for more before rebuilding the pass (trials start in quick
        succession). Longer is not better: a member that joins later trains in the same pass from its own step 0,
        so waiting for trials that are still starting would only idle the device."""
        from ..learner.threads import set_threads
        from ..learner.worker import _device, open_dataset
        from .. import data as data_mod

        self.name, self.algo = name, algo
        self.device = _device(device)
        self.threads = set_threads(threads, self.device)
        self.data_path, self.meta = open_dataset(data)
        self.data_arg = data
        self.data = data_mod.load(self.data_path, device=self.device)
        self.ack_timeout_s, self.gather_s = ack_timeout_s, gather_s
        self.last_join = 0.0
        self.stats_path = Path(stats_dir) / f"{name}.json" if stats_dir else None
        self.members: list[_Member] = []      # in pass order
        self.joining: list[_Member] = []
        self.leaving: set[str] = set()
        self.outbox: dict[str, list[dict[str, Any]]] = {}  # trial -> results it has not taken yet
        self.waiting: set[str] = set()       # trials that took every result and wait for the next
        self.posted: dict[str, float] = {}   # trial -> when its last result was posted
        self.learner = None
        self.diag_cache: dict[Any, Any] = {}  # episode rows (and behavior models) shared by the trials' diagnostics
        self.lock = threading.Condition()
        self.closed = False
        self.passes = 0
        self.member_updates: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []   # (time, members) at every membership change
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name=f"pack-{name}", daemon=True)
        self.thread.start()

    def _compiles(self, cfg: dict[str, Any]) -> bool:
        """Run key `compile` for this pack's learners, decided on the trials' configured steps (members share
        them, as every run key), so a member's random streams are of one kind from its first step on."""
        from ..learner.compiled import resolve
        run = cfg["run"]
        return resolve(run.compile, self.device, run.steps, 1, members=2)[0]  # a pack: several members

    # ----- called by trials ---------------------------------------------------------------------------
    def join(self, trial: str, config: dict[str, Any], run_dir: str, state: bytes | None = None) -> int:
        """Add a trial's members (config: its run config mapping, `members:` giving its seeds; or build_config's
        result). Returns the step they start at."""
        from ..learner.config import build_config
        from ..learner.worker import _build_algorithm, make_learner
        cfg = config if "algo_name" in config else build_config(self.algo, config)
        if cfg["run"].ope:  # as a solo run: fail now, not at the first eval point
            from ..evaluation.offpolicy import check_run_ope
            check_run_ope(cfg["run"].ope, self.meta, self.data_path)
        # the trial's members as a learner of their own: a fresh one's initial state is exactly a solo run's,
        # and a checkpoint that does not fit fails this trial here, not the pack
        own = make_learner(_build_algorithm(cfg, self.meta, self.device), self.data, cfg, self.meta, self.data_arg,
                           compile=self._compiles(cfg))
        start = 0
        if state is not None:
            payload = torch.load(io.BytesIO(state), map_location="cpu", weights_only=True)
            own.load_state_dict(payload["learner"], where=f"trial {trial}'s checkpoint", step=int(payload["step"]))
            start = int(payload["step"])
        from ..learner.worker import make_diagnostics
        diag = make_diagnostics(cfg["run"], self.data_path, self.meta, own.algorithm, own, lambda _: None,
                                cache=self.diag_cache)
        m = _Member(trial=trial, cfg=cfg, run_dir=Path(run_dir), state=own.state_dict(), step=start,
                    started=time.time(), diag=diag)
        if start >= cfg["run"].steps:  # restored at its last step (PBT exploits at the end too): nothing to train
            with self.lock:
                self.outbox[trial] = [{"step": start, "metrics": {}, "done": True, "checkpoint": state,
                                       "error": None}]
                self.lock.notify_all()
            return start
        with self.lock:
            if self.error:
                raise RuntimeError(f"pack {self.name} failed: {self.error}")
            self.joining = [j for j in self.joining if j.trial != trial] + [m]
            self.last_join = time.time()
            if any(x.trial == trial for x in self.members):  # a restarted trial: its old members leave first
                self.leaving.add(trial)
            self.outbox[trial] = []
            self.waiting.discard(trial)
            self.lock.notify_all()
        return start

    def next(self, trial: str, after_step: int, timeout: float | None = None) -> dict[str, Any]:
        """The trial's first result after `after_step` (blocks): {'step', 'metrics', 'done', 'checkpoint' (bytes
        or None), 'error' (str or None)}. Waiting here tells the pack the trial wants its next interval."""
        deadline = None if timeout is None else time.time() + timeout
        with self.lock:
            while True:
                box = self.outbox.get(trial)
                if box is None:
                    why = (f"pack {self.name} failed: {self.error}" if self.error else
                           f"trial {trial} is not in pack {self.name} (it left, or was dropped after "
                           f"{self.ack_timeout_s:.0f} s without taking its results)")
                    return {"step": after_step, "metrics": {}, "done": True, "checkpoint": None, "error": why}
                box[:] = [r for r in box if r["step"] > after_step or r["error"] or r["done"]]
                if box:
                    r = box.pop(0)
                    if r["done"]:
                        del self.outbox[trial]
                    return r
                if self.error:
                    del self.outbox[trial]
                    continue
                if trial not in self.waiting:
                    self.waiting.add(trial)
                    self.lock.notify_all()
                if deadline is not None and time.time() > deadline:
                    raise TimeoutError(f"trial {trial}: no result within {timeout} s")
                self.lock.wait(1.0)

    def leave(self, trial: str) -> None:
        self.drop([trial])

    def drop(self, trials: list[str]) -> None:
        """These trials ended (stopped, paused, failed): their members leave at the next boundary."""
        gone = set(trials)
        with self.lock:
            self.joining = [j for j in self.joining if j.trial not in gone]
            for m in self.members:
                if m.trial in gone:
                    self.leaving.add(m.trial)
            for t in gone:
                self.outbox.pop(t, None)
                self.waiting.discard(t)
            self.lock.notify_all()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return self._stats()

    def size(self) -> int:
        with self.lock:
            return sum(m.size for m in self.members + self.joining if m.trial not in self.leaving)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        self.thread.join(timeout=60)

    def ping(self) -> str:
        return self.name

    def capacity(self, config: dict[str, Any], headroom: float = 0.8) -> int | None:
        """How many members of `config` (a trial's run config mapping) this pack's GPU holds besides what it
        holds now: the device memory that one more member takes, measured as the growth of peak memory from a
        2- to a 4-member pass, into `headroom` of the free memory. None on CPUs (no device limit)."""
        if self.device.type != "cuda":
            return None
        from ..learner.config import build_config
        from ..learner.worker import _build_algorithm, make_learner
        cfg = build_config(self.algo, {**config, "members": [{}]})
        peaks = []
        for k in (2, 4):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            many = {**cfg, "members": cfg["members"] * k, "seeds": list(range(k))}
            learner = make_learner(_build_algorithm(many, self.meta, self.device), self.data, many, self.meta,
                                   self.data_arg)
            for _ in range(3):
                learner.step()
            learner.pop_metrics()
            torch.cuda.synchronize(self.device)
            peaks.append(torch.cuda.max_memory_allocated(self.device) - base)
            del learner
        torch.cuda.empty_cache()
        per_member = max((peaks[1] - peaks[0]) / 2, 1.0)
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(1, int(headroom * free / per_member))

    # ----- the training thread ------------------------------------------------------------------------
    def _find(self, trial: str) -> _Member | None:
        for m in self.members + self.joining:
            if m.trial == trial:
                return m
        return None

    def _run(self) -> None:
        try:
            while True:
                with self.lock:
                    while not self.closed:
                        self._drop_stale()
                        ready = all(m.trial in self.waiting or m.trial in self.leaving for m in self.members)
                        settling = bool(self.joining) and time.time() - self.last_join < self.gather_s
                        if ready and not settling and (self.joining or self.leaving or self.members):
                            break
                        self.lock.wait(0.05 if settling else 0.5)
                    if self.closed:
                        break
                    joining, leaving = self.joining, set(self.leaving)
                    self.joining, self.leaving = [], set()
                if joining or leaving:
                    self._rebuild(joining, leaving)
                if self.members:
                    self._interval()
        except BaseException as e:  # noqa: BLE001 - every waiting trial must hear about it
            with self.lock:
                self.error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
                self.lock.notify_all()
        finally:
            for m in self.members:
                if m.logger is not None:
                    m.logger.close()

    def _drop_stale(self) -> None:
        now = time.time()
        for m in self.members:
            if m.trial not in self.waiting and now - self.posted.get(m.trial, now) > self.ack_timeout_s:
                self.leaving.add(m.trial)
                self.outbox.pop(m.trial, None)

    def _rebuild(self, joining: list[_Member], leaving: set[str]) -> None:
        from ..learner import pack_state
        from ..learner.worker import _build_algorithm, make_learner

        kept_idx, kept = [], []
        offset = 0
        for m in self.members:
            if m.trial in leaving:
                if m.logger is not None:
                    m.logger.close()
                    m.logger = None
            else:
                kept_idx.extend(range(offset, offset + m.size))
                kept.append(m)
            offset += m.size
        states = []
        if kept:
            states.append(pack_state.select(self.learner.state_dict(), kept_idx))
        for m in joining:
            states.append(m.state)
            m.state = None
        self.members = kept + joining
        self.learner = None
        if self.members:
            cfg = _pack_cfg([m.cfg for m in self.members])
            learner = make_learner(_build_algorithm(cfg, self.meta, self.device), self.data, cfg, self.meta,
                                   self.data_arg, compile=self._compiles(cfg))
            period = learner.algorithm.step_period
            phases = {m.step % period for m in self.members}
            if len(phases) > 1:
                raise ValueError(f"members at steps {[m.step for m in self.members]} disagree modulo the "
                                 f"algorithm's step period {period}; joins must happen at log_every boundaries")
            learner.load_state_dict(pack_state.concat(states) if len(states) > 1 else states[0])
            self.learner = learner
        for m in joining:
            self._open_run(m)
        with self.lock:
            self.history.append({"time": time.time(), "members": sum(m.size for m in self.members),
                                 "trials": [m.trial for m in self.members]})
        self._write_stats()

    def _open_run(self, m: _Member) -> None:
        from ..learner import checkpoint as ckpt
        from ..learner.config import config_to_yaml
        from ..learner.logger import RunLogger
        run = m.cfg["run"]
        m.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(m.run_dir / "config.yaml", yaml.safe_dump(
            config_to_yaml(m.cfg, self.data_arg, self.meta.get("content_hash")), sort_keys=False))
        m.logger = RunLogger(m.run_dir, m.size, run.steps, m.step, "off")

    def _interval(self) -> None:
        from ..learner import checkpoint as ckpt
        from ..learner import pack_state
        run = self.members[0].cfg["run"]
        n = min(run.log_every - self.members[0].step % run.log_every,
                min(m.cfg["run"].steps - m.step for m in self.members))
        t0 = time.perf_counter()
        for _ in range(n):
            self.learner.step()
        metrics = self.learner.pop_metrics()  # the interval's one host sync
        elapsed = time.perf_counter() - t0
        rate = n / max(elapsed, 1e-9)
        k_pack = self.learner.algorithm.K
        self.passes += n
        state = None
        due_ope, offset = [], 0
        for m in self.members:  # their off-policy estimates go into the interval's row, as a solo run logs them
            if m.cfg["run"].ope and _at_eval(m.cfg["run"], m.step + n):
                due_ope.append((m, list(range(offset, offset + m.size))))
            offset += m.size
        ope: dict[str, dict[str, list[float]]] = {}
        if due_ope:
            state = self.learner.state_dict()
            ope = self._offpolicy(due_ope, state)
        offset = 0
        due_eval: list[tuple[_Member, list[int]]] = []
        out: dict[str, dict[str, Any]] = {}
        for m in self.members:
            idx = list(range(offset, offset + m.size))
            offset += m.size
            m.step += n
            m.member_updates += n * m.size
            m.trained += n
            m.train_s += elapsed
            self.member_updates[m.trial] = m.member_updates
            r = m.cfg["run"]
            row = {key: [v[i] for i in idx] for key, v in metrics.items()}
            row["perf/updates_per_s"] = rate
            row["perf/member_updates_per_s"] = rate * m.size
            row["perf/pack_members"] = k_pack
            at_eval = _at_eval(r, m.step)
            if m.diag is not None and at_eval:  # in the interval's row, as a solo run logs them
                if state is None:
                    state = self.learner.state_dict()
                row.update(self._diagnose(m, pack_state.select(state, idx)["algorithm"]))
            row.update(ope.get(m.trial, {}))
            m.logger.advance(n)
            m.logger.log(m.step, row)
            finite = all(math.isfinite(x) for key, v in row.items() if key.startswith("loss/") for x in v)
            res = {"step": m.step, "metrics": row, "done": m.step >= r.steps, "checkpoint": None, "error": None}
            if not finite:
                res.update(done=True, error=f"trial {m.trial}: a loss is not finite at step {m.step} "
                                            f"({ {k: v for k, v in row.items() if k.startswith('loss/')} })")
            elif m.step >= r.steps or (r.checkpoint_every and m.step % r.checkpoint_every == 0):
                if state is None:
                    state = self.learner.state_dict()
                payload = self._payload(m, pack_state.to_cpu(pack_state.select(state, idx)))
                path = ckpt.save(m.run_dir, m.step, payload, keep=r.keep_checkpoints)
                res["checkpoint"] = path.read_bytes()
            if res["error"] is None and r.eval_episodes > 0 and at_eval:
                due_eval.append((m, idx))
            out[m.trial] = res
        if due_eval:
            self._evaluate(due_eval, out)
        self._write_stats()  # before the results go out: a trial that got its result finds its count there
        with self.lock:
            for m in self.members:
                res = out[m.trial]
                if m.trial in self.outbox:
                    self.outbox[m.trial].append(res)
                self.waiting.discard(m.trial)
                self.posted[m.trial] = time.time()
                if res["done"]:
                    self.leaving.add(m.trial)
                    if res["error"] is None:
                        self._finish(m)
            self.lock.notify_all()

    def _evaluate(self, due: list[tuple[_Member, list[int]]], out: dict[str, dict[str, Any]]) -> None:
        from ..learner import pack_state
        from ..learner.worker import _build_algorithm, evaluate_members
        idx = [i for _, ix in due for i in ix]
        cfg = _pack_cfg([m.cfg for m, _ in due])
        algorithm = _build_algorithm(cfg, self.meta, self.device)
        algorithm.load_state_dict(pack_state.select(self.learner.state_dict(), idx)["algorithm"])
        run = cfg["run"]
        ev = evaluate_members(algorithm, self.meta, run.eval_episodes, run.seed)
        offset = 0
        for m, ix in due:
            sl = slice(offset, offset + len(ix))
            offset += len(ix)
            m.last_eval = {key: ev[key][sl] for key in ("return_mean", "return_std", "normalized_score")}
            row = {"eval/return_mean": m.last_eval["return_mean"], "eval/return_std": m.last_eval["return_std"]}
            if m.last_eval["normalized_score"][0] is not None:
                row["eval/normalized_score"] = m.last_eval["normalized_score"]
            m.logger.log(m.step, row)
            out[m.trial]["metrics"].update(row)

    def _offpolicy(self, due: list[tuple[_Member, list[int]]], state: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """trial -> {`ope/<estimator>`: per-member values} for the due trials (run key `ope`), equal to their solo
        runs': one `run_metrics` per group of trials that share the estimators, FQE steps, discount and run seed,
        on one algorithm of the group's members, so FQE fits all of them in one member-batched pass, each trial's
        members with its solo run's seeds (run seed + k for its member k). `mb` rolls out per trial: its rollout
        noise is drawn for all evaluated members at once, so a shared rollout would depend on the group."""
        from ..evaluation.offpolicy import run_metrics
        from ..learner import pack_state
        from ..learner.worker import _build_algorithm
        groups: dict[tuple[Any, ...], list[tuple[_Member, list[int]]]] = {}
        for m, idx in due:
            r = m.cfg["run"]
            key = (tuple(r.ope), r.ope_steps, float(m.cfg["members"][0].discount), r.seed)
            groups.setdefault(key, []).append((m, idx))
        out: dict[str, dict[str, Any]] = {m.trial: {} for m, _ in due}
        for (names, steps, _, seed), group in groups.items():
            shared = [x for x in names if x != "mb"]
            parts = ([(shared, group)] if shared else []) + ([(["mb"], [t]) for t in group] if "mb" in names else [])
            for part_names, part in parts:
                algorithm = _build_algorithm(_pack_cfg([m.cfg for m, _ in part]), self.meta, self.device)
                algorithm.load_state_dict(pack_state.select(state, [i for _, ix in part for i in ix])["algorithm"])
                values = run_metrics(algorithm, self.data_path, self.meta, part_names, steps, seed,
                                     fqe_seeds=[seed + i for m, _ in part for i in range(m.size)])
                offset = 0
                for m, ix in part:
                    out[m.trial].update({key: v[offset:offset + len(ix)] for key, v in values.items()})
                    offset += len(ix)
        return out

    def _diagnose(self, m: _Member, algorithm_state: dict[str, Any]) -> dict[str, list[float]]:
        """The trial's diagnostics pass on its members' current weights (a copy: the pack's streams stay)."""
        from ..learner.worker import _build_algorithm
        algorithm = _build_algorithm(m.cfg, self.meta, self.device)
        algorithm.load_state_dict(algorithm_state)
        return m.diag.run(algorithm, m.step)

    def _payload(self, m: _Member, learner_state: dict[str, Any]) -> dict[str, Any]:
        from ..config import to_dict
        return {"algo": m.cfg["algo_name"], "learner": learner_state,
                "member_configs": [to_dict(c) for c in m.cfg["members"]], "seeds": list(m.cfg["seeds"]),
                "run_config": to_dict(m.cfg["run"]), "data": self.data_arg, "metadata": self.meta}

    def _finish(self, m: _Member) -> None:
        from ..learner import checkpoint as ckpt
        from ..learner.worker import make_result
        wall = time.time() - m.started
        rate = m.trained / m.train_s if m.train_s > 0 else None  # passes/s while this trial was in the pack
        result = make_result(m.cfg, self.meta, m.last_eval, m.cfg["run"], rate, wall)
        result["pack"] = self.name
        result["pack_members"] = self.learner.algorithm.K  # members in the pass this trial finished in
        if m.diag is not None:
            result["diagnostics"] = m.diag.summary()
        ckpt.atomic_write_json(m.run_dir / "result.json", result)

    def _stats(self) -> dict[str, Any]:
        return {"pack": self.name, "device": str(self.device), "threads": self.threads, "passes": self.passes,
                "member_updates": dict(self.member_updates), "history": self.history[-1000:],
                "members_now": sum(m.size for m in self.members)}

    def _write_stats(self) -> None:
        if self.stats_path is None:
            return
        from ..learner import checkpoint as ckpt
        with self.lock:
            text = json.dumps(self._stats(), indent=1) + "\n"
        self.stats_path.parent.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(self.stats_path, text)


def _at_eval(run: Any, step: int) -> bool:
    """Whether `step` is one of the run's eval points (every eval_every steps and the last), as in a solo run."""
    return step >= run.steps or bool(run.eval_every and step % run.eval_every == 0)


def _pack_cfg(cfgs: list[dict[str, Any]]) -> dict[str, Any]:
    """One learner config holding the members of `cfgs` in order (their non-member settings agree)."""
    return {"algo_name": cfgs[0]["algo_name"], "run": cfgs[0]["run"],
            "members": [c for cfg in cfgs for c in cfg["members"]], "seeds": [s for cfg in cfgs for s in cfg["seeds"]]}
