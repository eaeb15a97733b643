"""The one training loop.

Data lives on the device as one contiguous Batch of N transitions; every step each member draws its own B
indices on the device (`MemberRNG`, so member k's stream depends only on its seed) and the algorithm's
`update` generator yields `(group, loss, metrics)`. Between yields the learner runs backward on that group's
parameters only, averages gradients across data-parallel workers when torch.distributed is initialized, and
steps the group's optimizer. Metrics stay on the device and are summed there; the host fetches them once per
log interval (`Learner.pop_metrics`), so a step never waits on the device.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from ..algorithms.base import Algorithm
from ..batch import Batch
from ..errors import CheckpointError
from ..nn.members import STREAM_SAMPLE
from ..nn.rng import MemberRNG


def _adam(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    try:  # fused Adam exists for CPU and CUDA in recent torch
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # pragma: no cover - older torch / unsupported device
        return torch.optim.Adam(params, lr=lr, foreach=True)


class FlatGroup:
    """One optimizer group whose parameters are views into one flat buffer and whose gradients are views
    into another. Zeroing the gradients is one kernel and the data-parallel all-reduce one call; backward
    accumulates into the gradient views in place, because they are defined before it runs.

    Adam steps the buffer as K x P chunks (member k's rows of parameter p, contiguous because weights are
    stacked member-major), in one fused multi-tensor call. Each chunk has its own step count, so members that
    joined a pack at different steps keep their own bias correction, and a member's optimizer state is the
    slice of its P chunks (`rayoffline/learner/pack_state.py`)."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, members: int = 1) -> None:
        self.params = params
        with torch.no_grad():
            self.flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
        self.flat.grad = torch.zeros_like(self.flat)
        offset = 0
        spans = []
        for p in params:
            n = p.numel()
            if p.shape[0] % members:
                raise ValueError(f"parameter of shape {tuple(p.shape)} has no leading member dim of {members}")
            p.data = self.flat.data[offset: offset + n].view_as(p)
            p.grad = self.flat.grad[offset: offset + n].view_as(p)
            spans.append((offset, n // members))
            offset += n
        self.chunks = []  # member-major: chunk k * P + p is member k's part of parameter p
        self.spans = []  # (offset, numel) of each chunk in `flat`
        for k in range(members):
            for start, size in spans:
                a = start + k * size
                self.spans.append((a, size))
                chunk = self.flat.data[a: a + size]
                chunk.grad = self.flat.grad[a: a + size]
                self.chunks.append(chunk)
        self.optimizer = _adam(self.chunks, lr)
        self.members = members
        self._partition: tuple[tuple[int, ...], ...] = (tuple(range(members)),)
        self.lr = torch.full((members,), float(lr), device=self.flat.device)  # (K,) the compiled step's rates
        self.compiled: dict[str, Any] | None = None  # the compiled step's Adam state, when it owns the state

    # ----- the compiled step's Adam (rayoffline/learner/compiled.py) -----------------------------------
    def own_state(self) -> None:
        """Move the Adam state out of the torch optimizer into tensors the compiled step updates in place: per
        parameter its exp_avg and exp_avg_sq stacked like the parameter, and each member's step count (K,).
        `state_dict` and `load_state_dict` keep the torch optimizer's format either way."""
        if self.compiled is not None:
            return
        per = len(self.chunks) // self.members
        state = self.optimizer.state
        dev = self.flat.device
        m = [torch.zeros_like(p) for p in self.params]
        v = [torch.zeros_like(p) for p in self.params]
        t = torch.zeros(self.members, device=dev)
        for k in range(self.members):
            for j, p in enumerate(self.params):
                st = state.get(self.chunks[k * per + j])
                if st:
                    m[j].view(self.members, -1)[k].copy_(st["exp_avg"].reshape(-1))
                    v[j].view(self.members, -1)[k].copy_(st["exp_avg_sq"].reshape(-1))
                    t[k] = float(st["step"])
        self.optimizer.state.clear()
        group = self.optimizer.param_groups[0]
        self.compiled = {"exp_avg": m, "exp_avg_sq": v, "step": t, "betas": tuple(group["betas"]),
                         "eps": float(group["eps"])}

    def release_state(self) -> None:
        """Give the Adam state back to the torch optimizer (the eager step)."""
        if self.compiled is not None:
            saved = self.state_dict()
            self.compiled = None
            self.optimizer.load_state_dict(saved)

    def adam_(self, grads: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> None:
        """One Adam step of every member from `grads` (one per parameter), with member k's rate self.lr[k]:
        torch's Adam update (no weight decay), written as tensor ops so the compiled step fuses it."""
        c = self.compiled
        assert c is not None, "own_state() first"
        beta1, beta2 = c["betas"]
        k = self.members
        with torch.no_grad():
            t = c["step"]
            t.add_(1.0)
            step_size = (self.lr / (1.0 - beta1 ** t))[:, None]                  # (K, 1)
            inv_bc2 = torch.rsqrt(1.0 - beta2 ** t)[:, None]                     # (K, 1)
            for p, g, m, v in zip(self.params, grads, c["exp_avg"], c["exp_avg_sq"]):
                pk, gk, mk, vk = p.view(k, -1), g.reshape(k, -1), m.view(k, -1), v.view(k, -1)
                mk.lerp_(gk, 1.0 - beta1)
                vk.mul_(beta2).addcmul_(gk, gk, value=1.0 - beta2)
                pk.sub_(step_size * mk / (vk.sqrt() * inv_bc2 + c["eps"]))

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Load an optimizer state; one written before the chunks (a single tensor over the whole buffer, one
        step count) is cut into them. The state's tensors are copied (torch's optimizer would keep them, and
        training would then change the caller's state dict in place)."""
        saved = {"state": {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                           for i, st in saved["state"].items()}, "param_groups": saved["param_groups"]}
        if self.compiled is not None:  # load into the torch optimizer, then hand it to the compiled step again
            kept, self.compiled = self.compiled, None
            self.load_state_dict(saved)
            self.own_state()
            for key in ("exp_avg", "exp_avg_sq"):  # into the tensors a captured graph reads (same addresses)
                for old_t, new_t in zip(kept[key], self.compiled[key]):
                    old_t.copy_(new_t)
            kept["step"].copy_(self.compiled["step"])
            self.compiled = kept
            return
        if len(saved["param_groups"][0]["params"]) == 1 and len(self.chunks) > 1:
            whole = saved["state"].get(0, {})
            state = {i: {"step": whole["step"].clone(),
                         **{k: v[a: a + n].clone() for k, v in whole.items() if k != "step"}}
                     for i, (a, n) in enumerate(self.spans)} if whole else {}
            saved = {"state": state, "param_groups": [{**saved["param_groups"][0],
                                                       "params": list(range(len(self.chunks)))}]}
        if len(self.optimizer.param_groups) > 1:  # back to the one group a state dict describes
            self.optimizer.param_groups = self._one_group()
            self._partition = (tuple(range(self.members)),)
        self.optimizer.load_state_dict(saved)

    def _one_group(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups as one group holding every chunk in member order (the layout of a
        state dict), with the first group's settings."""
        return [{**self.optimizer.param_groups[0], "params": list(self.chunks)}]

    def set_lrs(self, lrs: list[float]) -> None:
        """Member k's chunks step with learning rate lrs[k]. Members with equal rates share one parameter group
        (one fused Adam call); the groups are regrouped only when the partition changes."""
        by: dict[float, list[int]] = {}
        for k, lr in enumerate(lrs):
            by.setdefault(lr, []).append(k)
        partition = tuple(tuple(ks) for ks in by.values())
        if partition != self._partition:
            per = len(self.chunks) // self.members
            template = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
            self.optimizer.param_groups = [
                {**template, "params": [c for k in ks for c in self.chunks[k * per:(k + 1) * per]]}
                for ks in partition]
            self._partition = partition
        for group, lr in zip(self.optimizer.param_groups, by):
            group["lr"] = lr
        self.lr.copy_(torch.tensor(lrs, dtype=self.lr.dtype), non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state with its chunks in one parameter group in member order, whatever the current
        grouping by learning rate (a checkpoint's layout does not depend on the schedule's position)."""
        if self.compiled is not None:
            return self._export()
        groups = self.optimizer.param_groups
        if len(groups) == 1:
            return self.optimizer.state_dict()
        self.optimizer.param_groups = self._one_group()
        try:
            return self.optimizer.state_dict()
        finally:
            self.optimizer.param_groups = groups

    def _export(self) -> dict[str, Any]:
        """The compiled step's Adam state in the torch optimizer's one-group format (chunk k * P + p)."""
        c = self.compiled
        assert c is not None
        per = len(self.params)
        state: dict[int, Any] = {}
        steps = c["step"].tolist()
        for k in range(self.members):
            if steps[k] == 0:
                continue  # never stepped: the torch optimizer would hold no state either
            for j, p in enumerate(self.params):
                shape = self.chunks[k * per + j].shape
                state[k * per + j] = {
                    "step": torch.tensor(float(steps[k])),
                    "exp_avg": c["exp_avg"][j].view(self.members, -1)[k].clone().view(shape),
                    "exp_avg_sq": c["exp_avg_sq"][j].view(self.members, -1)[k].clone().view(shape)}
        group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        return {"state": state, "param_groups": [{**group, "params": list(range(len(self.chunks)))}]}

    def step(self) -> None:
        self.optimizer.step()
        # the step wrote through `flat`; bump the views' version counters so that autograd still refuses a
        # graph that saved these weights before the step (as it would with ordinary parameters)
        for p in self.params:
            torch.autograd.graph.increment_version(p)


class Learner:
    """Steps `algorithm` on `data` (this worker's transitions, on the device).

    `batch_size` is the global batch per member. With torch.distributed initialized over `world` workers,
    each worker draws batch_size / world transitions and gradients are averaged across workers:
    - mode "replicate": every worker holds the whole dataset and draws its slice of the one global index
      (and noise) stream, so the workers compute exactly the update of one worker with the global batch;
    - mode "split": every worker holds its own share of the data and draws from streams of its own.
    """

    def __init__(self, algorithm: Algorithm, data: Batch | Any, batch_size: int, mode: str = "replicate",
                 schedules: dict[str, Callable[[int], float]] | None = None,
                 reward: tuple[float, float] = (1.0, 0.0), compile: bool = False, precision: str = "fp32") -> None:
        """data: a Batch of this worker's transitions on the device, or a WindowedData (out-of-core: its
        current window is the data, swapped for the next one as the steps use it up).
        schedules: optimizer group -> learning-rate factor of the member's step (`shaping.schedules`); groups
        not named keep their configured rate. reward: (scale, bias) applied to every sampled reward.
        compile: run the step as compiled graphs (`rayoffline/learner/compiled.py`; compiled at the first step);
        the random streams are then the counter-based ones on every device. precision: 'fp32', or 'bf16' (the
        algorithm's forward under bf16 autocast: matmuls in bfloat16; weights, gradients, Adam state fp32)."""
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.precision = precision
        if mode not in ("replicate", "split"):
            raise ValueError(f"mode must be 'replicate' or 'split', got {mode!r}")
        self.algorithm = algorithm
        self.source = None if isinstance(data, Batch) else data
        self.data = data if self.source is None else self.source.data
        self.n = int(self.data.rewards.shape[0])
        self._distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        self.rank = torch.distributed.get_rank() if self._distributed else 0
        self.world = torch.distributed.get_world_size() if self._distributed else 1
        self.mode = mode
        if batch_size % self.world:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {self.world} data-parallel workers")
        self.batch_size = batch_size // self.world  # this worker's share of the global batch
        shared = mode == "replicate"
        backend = "counter" if compile else None
        self.sampler = MemberRNG(algorithm.seeds, algorithm.device, STREAM_SAMPLE, rank=self.rank, world=self.world,
                                 shared=shared, backend=backend)
        algorithm.set_data_parallel(self.rank, self.world, shared, backend=backend)
        optim_groups = algorithm.optim_groups()
        self.groups: dict[str, FlatGroup] = {
            name: FlatGroup(list(params), lr, algorithm.K) for name, (params, lr) in optim_groups.items()}
        self.base_lr = {name: float(lr) for name, (_, lr) in optim_groups.items()}
        self.schedules = dict(schedules or {})
        unknown = set(self.schedules) - set(self.groups)
        if unknown:
            raise ValueError(f"schedules for unknown optimizer groups {sorted(unknown)}; groups: {list(self.groups)}")
        self.reward = (float(reward[0]), float(reward[1]))
        self.member_steps = [0] * algorithm.K  # updates each member has had (members of a pack may differ)
        self.optimizers = {name: g.optimizer for name, g in self.groups.items()}
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self.compile = compile
        self.compiled: Any = None  # the CompiledStep, built at the first step (after a checkpoint load)
        self.compile_fallback = False
        """compile: auto semantics: a step that fails to compile warns once and continues eagerly (else raises)."""

    def take_compile_seconds(self) -> float:
        """Seconds the steps since the last call spent compiling (to leave out of updates/s)."""
        c = self.compiled
        if c is None or not c.compile_s:
            return 0.0
        s, c.compile_s = c.compile_s, 0.0
        return s

    def sample(self) -> Batch:
        idx = self.sampler.randint(self.n, (self.batch_size,))  # (K, B) on the device
        batch = self.data.index(idx)
        if self.reward != (1.0, 0.0):
            scale, bias = self.reward
            batch = dataclasses.replace(batch, rewards=batch.rewards * scale + bias)
        return batch

    def set_learning_rates(self, scheduled_only: bool = False) -> None:
        """Every group's rate for each member's next update: its configured rate times its schedule's factor
        at the member's step. Groups without a schedule get their configured rate unless `scheduled_only` (after
        a checkpoint load, whose saved rate may be another run's, e.g. a PBT donor's)."""
        for name, g in self.groups.items():
            fn = self.schedules.get(name)
            if fn is not None:
                g.set_lrs([self.base_lr[name] * fn(t) for t in self.member_steps])
            elif not scheduled_only:
                g.set_lrs([self.base_lr[name]] * len(self.member_steps))

    def apply(self, group: str, loss: torch.Tensor) -> None:
        """Backward of `loss` (K,) into `group`'s parameters only, all-reduce, optimizer step."""
        g = self.groups[group]
        g.flat.grad.zero_()
        torch.autograd.backward(loss.sum(), inputs=g.params)
        if self._distributed:
            torch.distributed.all_reduce(g.flat.grad)
            g.flat.grad /= torch.distributed.get_world_size()
        g.step()

    def step(self, step: int | None = None) -> None:
        """One update of every member and group, in the algorithm's order. No host synchronization.

        Every member counts its own steps (`member_steps`); `step`, when given, is checked against them. The
        algorithm gets member 0's step number for its periodic decisions (e.g. TD3+BC's delayed actor), which
        a pack keeps equal for all members modulo the algorithm's `step_period`, and the per-member counts in
        `algorithm.member_steps` for per-member thresholds."""
        if self.schedules:  # rates for this update, from the steps each member had before it
            self.set_learning_rates(scheduled_only=True)
        self.member_steps = [s + 1 for s in self.member_steps]
        if step is not None and step != self.member_steps[0]:
            raise ValueError(f"learner is at step {self.member_steps[0]}, asked for step {step}")
        self.algorithm.member_steps = self.member_steps
        if self.compile and self._compiled_step():
            return self._after_step()
        batch = self.sample()
        for group, loss, metrics in self.updates(batch, self.member_steps[0]):
            self.apply(group, loss)
            self._accumulate(f"loss/{group}", loss.detach())
            for name, value in metrics.items():
                self._accumulate(f"train/{name}", value)
        self._after_step()

    def updates(self, batch: Batch, step: int):
        """The algorithm's update generator; with precision bf16 each stretch of it between yields (the
        forward passes and losses, not the learner's backward or optimizer step) runs under bf16 autocast."""
        gen = self.algorithm.update(batch, step)
        if self.precision == "fp32":
            yield from gen
            return
        while True:
            with torch.autocast(self.algorithm.device.type, dtype=torch.bfloat16):
                item = next(gen, None)
            if item is None:
                return
            yield item

    def _compiled_step(self) -> bool:
        """Run this step compiled; False when it fell back to the eager step (compile_fallback)."""
        from .compiled import CompileError, CompiledStep, warn_fallback
        try:
            if self.compiled is None:
                self.compiled = CompiledStep(self)
            out = self.compiled(self.member_steps)
        except CompileError as e:
            if not self.compile_fallback:
                raise
            warn_fallback(e)
            if self.compiled is not None:
                self.compiled.release()
            self.compile, self.compiled = False, None
            self.algorithm.member_steps = self.member_steps
            return False
        for key, value in out.items():
            self._accumulate(key, value)
        return True

    def _after_step(self) -> None:
        if self.source is not None and self.source.after_step():
            self.data = self.source.data
            self.n = int(self.data.rewards.shape[0])

    def _accumulate(self, key: str, value: torch.Tensor) -> None:
        # counted per key: a group that does not update every step (TD3+BC's delayed actor) is averaged over
        # the steps it ran
        if value.dtype != torch.float32:  # bf16 autocast: sum in float32
            value = value.float()
        if key in self._sums:
            self._sums[key] += value
            self._counts[key] += 1
        else:
            self._sums[key] = value.clone()
            self._counts[key] = 1

    def pop_metrics(self) -> dict[str, list[float]]:
        """Per-member means over the steps since the last call (one host transfer)."""
        if not self._sums:
            return {}
        keys = list(self._sums)
        values = torch.stack([self._sums[k].float() / self._counts[k] for k in keys])
        if self._distributed:  # every worker's local means -> the mean over workers (the global batch)
            torch.distributed.all_reduce(values)
            values /= self.world
        values = values.cpu().tolist()
        self._sums, self._counts = {}, {}
        return dict(zip(keys, values))

    # ----- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The learner's state. In split mode every worker's random streams differ, so this is a collective
        call: all workers must make it, and each worker's streams are stored (`rank_streams`)."""
        state = {
            "algorithm": self.algorithm.state_dict(),
            "algorithm_extra": self.algorithm.extra_state(),
            "optimizers": {k: g.state_dict() for k, g in self.groups.items()},
            "reward_transform": list(self.reward),
            "sampler_rng": self.sampler.get_state(),
            "data_parallel": {"mode": self.mode, "world": self.world},
            "members": self.algorithm.K,
            "member_steps": list(self.member_steps),
        }
        if self.mode == "split" and self.world > 1:
            mine = {"sampler_rng": state["sampler_rng"], "algorithm_extra": state["algorithm_extra"]}
            gathered: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(gathered, mine)
            state["rank_streams"] = gathered
        return state

    def load_state_dict(self, state: dict[str, Any], where: str = "checkpoint", step: int | None = None) -> None:
        """Restore `state` (Learner.state_dict()). `step`: the checkpoint's step, for checkpoints written before
        members counted their own steps."""
        try:
            steps = state.get("member_steps", [step] * self.algorithm.K if step is not None else None)
            if steps is None or len(steps) != self.algorithm.K:
                raise ValueError(f"the checkpoint counts steps for {len(steps or [])} members, this run has "
                                 f"{self.algorithm.K}")
            self.member_steps = [int(s) for s in steps]
            self._sums, self._counts = {}, {}  # metrics not yet fetched belong to the trajectory being replaced
            # per-member coefficients come from this run's configs, not the checkpoint: they are equal on a
            # resume, and differ where they should win (PBT continues a donor's weights with mutated values)
            coefs = {n: b.clone() for n, b in self.algorithm.named_buffers() if n.startswith("coef_")}
            self.algorithm.load_state_dict(state["algorithm"])
            for n, b in coefs.items():
                getattr(self.algorithm, n).copy_(b)
            self.algorithm.load_extra_state(state["algorithm_extra"])
            if set(state["optimizers"]) != set(self.optimizers):
                raise ValueError(f"optimizer groups {sorted(state['optimizers'])} != {sorted(self.optimizers)}")
            for k, g in self.groups.items():
                g.load_state_dict(state["optimizers"][k])
            self.set_learning_rates()
            if "reward_transform" in state:  # the units the run's value functions were trained in
                self.reward = (float(state["reward_transform"][0]), float(state["reward_transform"][1]))
            saved = state.get("data_parallel", {"mode": "replicate", "world": 1})
            if self.mode == "split" and self.world > 1 or saved["mode"] == "split" and saved["world"] > 1:
                if (saved["mode"], saved["world"]) != (self.mode, self.world):
                    raise CheckpointError(
                        f"{where}: a split-mode run continues only in split mode with the same number of workers "
                        f"(saved: {saved['mode']} x {saved['world']} workers, now: {self.mode} x {self.world}); its "
                        f"workers' sampling streams are stored per rank")
                if self.world > 1:
                    mine = state["rank_streams"][self.rank]
                    self.sampler.set_state(mine["sampler_rng"])
                    self.algorithm.load_extra_state(mine["algorithm_extra"])
                    return
            self.sampler.set_state(state["sampler_rng"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{where}: does not fit this run ({e}); it was written by a different algorithm, "
                                  f"member count or network shape") from None
