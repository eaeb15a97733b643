"""The compiled learner step (run key `compile`).

`Learner.step` in eager mode is a Python loop around small kernels: per group the algorithm's forward, a
backward through autograd's engine, torch's fused Adam, and the metric sums. The compiled step traces all of it
into ONE graph per branch of the algorithm (TorchDynamo, `fullgraph=True`) and hands it to Inductor:

    sample (counter-based RNG, gather) -> for each group the algorithm yields: forward, torch.autograd.grad,
    Adam (`FlatGroup.adam_`, tensor ops over the stacked parameters) -> target updates -> metrics

so the elementwise work around the matmuls fuses into a few loops (CPU: C++/OpenMP; GPU: Triton) and, on CUDA,
the whole step is replayed as one CUDA graph (`mode="reduce-overhead"`), which removes the launch cost that
dominates a small-network update on a GPU. Gradients come from `torch.autograd.grad` traced into the graph
(Dynamo's `trace_autograd_ops`), Adam's state lives in tensors stacked like the parameters (the torch
optimizer's format is still what checkpoints hold: `FlatGroup.state_dict`), and the random streams are the
counter-based ones (`nn/rng.py`), whose state is a device tensor the graph advances in place.

The algorithm's Python decisions (TD3+BC's delayed actor, CQL's BC warm-up per member) are the only thing a
graph is specialized on: `Algorithm.branch_steps(step, member_steps)` maps a step to the smallest step numbers
that take the same branches, so a run compiles each branch once (two graphs for TD3+BC, at most K + 1 for a
CQL pack whose members cross the warm-up at different steps).

Not compiled (the eager step runs instead): data-parallel workers (the gradient all-reduce sits between
backward and the optimizer step); see `resolve` for what `auto` chooses. Compiled but not CUDA-graphed:
out-of-core runs (each data window is new tensors, which a captured graph cannot read in place). Set
RAYOFFLINE_CUDA_GRAPHS=0 to compile without CUDA graphs (for comparison).
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
import types
import warnings
from typing import Any

import torch

AUTO_MIN_STEPS = 20_000
"""`compile: auto` compiles runs with at least this many steps left: compiling an update takes 20-150 s (cached
on disk for the next run of the same shapes), which a shorter run would not win back. On CPUs only K=1 runs: on
the 2-core Xeon the compiled step ran 1.03-1.51x the eager one at K=1 but 0.94-1.34x at K=16, slower for three
algorithms (README, benchmarks/throughput.py --compile)."""

BACKEND = os.environ.get("RAYOFFLINE_COMPILE_BACKEND", "inductor")
"""torch.compile's backend. 'inductor' (generated kernels) is the point; the tests also use 'aot_eager' (the same
traced graph, forward and backward, run by eager kernels: Dynamo's and AOTAutograd's part without minutes of
code generation)."""


class CompileError(RuntimeError):
    """`compile: on` and the step cannot be compiled on this machine."""


def resolve(setting: str, device: torch.device, steps_left: int, world: int, members: int = 1) -> tuple[bool, str]:
    """(compile?, why) for run key `compile` = setting ('auto', 'on', 'off'), for a run of `members` members per
    pass (a sweep pack passes 2: several)."""
    if setting == "off":
        return False, "compile: off"
    if world > 1:
        if setting == "on":
            from .config import compile_refused
            raise CompileError(compile_refused(world))
        return False, f"compile: auto -> off ({world} data-parallel workers run the eager step)"
    if setting == "on":
        return True, "compile: on"
    if device.type != "cuda" and members > 1:
        return False, ("compile: auto -> off for K > 1 on CPUs (measured 0.94-1.34x the eager step per algorithm "
                       "at K=16; set compile: on to compile anyway)")
    if steps_left < AUTO_MIN_STEPS:
        return False, (f"compile: auto -> off for this short run ({steps_left} steps < {AUTO_MIN_STEPS}; compiling "
                       f"takes about a minute; set compile: on to compile anyway)")
    return True, f"compile: auto -> on ({steps_left} steps, {device.type})"


class CompiledStep:
    """One learner step as compiled graphs (module docstring). Call it as `Learner.step` would run the eager
    loop; it returns the step's metrics {key: (K,) tensor} for the learner to accumulate."""

    def __init__(self, learner: Any, cuda_graphs: bool | None = None) -> None:
        self.learner = learner
        device = learner.algorithm.device
        if cuda_graphs is None:  # not over out-of-core windows: each window's tensors would be a new graph
            cuda_graphs = device.type == "cuda" and learner.source is None \
                and os.environ.get("RAYOFFLINE_CUDA_GRAPHS", "1") != "0"
        self.cuda_graphs = cuda_graphs
        for name, rng in (("sampler", learner.sampler), ("noise", learner.algorithm.rng)):
            if rng.backend != "counter":
                raise CompileError(f"the {name} random streams are torch.Generator states (a checkpoint written "
                                   f"by the eager step on a {device.type}); a compiled step needs the counter-based "
                                   f"streams: resume this run with compile: off")
        for g in learner.groups.values():
            g.own_state()
        if cuda_graphs:  # buffers the graph mutates in place keep their addresses across replays
            mark = torch._dynamo.mark_static_address
            for rng in (learner.sampler, learner.algorithm.rng):
                for t in (rng.counter, rng.k0, rng.k1):
                    mark(t)
            for g in learner.groups.values():
                mark(g.lr)
                for t in (*g.compiled["exp_avg"], *g.compiled["exp_avg_sq"], g.compiled["step"]):
                    mark(t)
            for f in dataclasses.fields(learner.data):  # the dataset: read in place, never copied per replay
                mark(getattr(learner.data, f.name))
        # a code object of its own: Dynamo caches graphs per code object, so every learner (a sweep pack
        # rebuilds its learner whenever members join or leave) would otherwise add entries to one shared cache
        # until its recompile limit; this way a learner's graphs go with it
        body = types.FunctionType(CompiledStep._body.__code__.replace(), CompiledStep._body.__globals__, "_body")
        if BACKEND != "inductor":
            self._fn = torch.compile(types.MethodType(body, self), fullgraph=True, dynamic=False, backend=BACKEND)
        else:
            self._fn = torch.compile(types.MethodType(body, self), fullgraph=True, dynamic=False,
                                     mode="reduce-overhead" if cuda_graphs else None)
        self._seen: set[Any] = set()
        self.compile_s = 0.0
        """Seconds spent in calls that compiled a new graph (their update included)."""

    def _body(self, step: int, member_steps: list[int] | None) -> dict[str, torch.Tensor]:
        learner = self.learner
        algorithm = learner.algorithm
        algorithm.member_steps = member_steps
        batch = learner.sample()
        out: dict[str, torch.Tensor] = {}
        for group, loss, metrics in learner.updates(batch, step):
            g = learner.groups[group]
            grads = torch.autograd.grad(loss.sum(), g.params)
            g.adam_(grads)
            out[f"loss/{group}"] = loss.detach()
            for name, value in metrics.items():
                out[f"train/{name}"] = value
        return out

    def __call__(self, member_steps: list[int]) -> dict[str, torch.Tensor]:
        algorithm = self.learner.algorithm
        key = algorithm.branch_steps(member_steps[0], list(member_steps))
        new = key not in self._seen
        t0 = time.perf_counter()
        with torch._dynamo.config.patch(trace_autograd_ops=True,
                                        recompile_limit=max(64, torch._dynamo.config.recompile_limit)):
            try:
                if self.cuda_graphs:  # a new iteration: the previous replay's outputs were consumed (cloned)
                    torch.compiler.cudagraph_mark_step_begin()
                out = self._fn(key[0], list(key[1]) if key[1] is not None else None)
            except Exception as e:  # noqa: BLE001 - every compiler failure becomes one clear error
                if not new:
                    raise
                raise CompileError(describe_failure(e)) from e
        if new:
            self._seen.add(key)
            if algorithm.device.type == "cuda":
                torch.cuda.synchronize()
            self.compile_s += time.perf_counter() - t0
        algorithm.member_steps = list(member_steps)
        return {k: v.clone() for k, v in out.items()} if self.cuda_graphs else out

    def release(self) -> None:
        """Back to the eager step: the torch optimizers own the Adam state again."""
        for g in self.learner.groups.values():
            g.release_state()


def describe_failure(e: BaseException) -> str:
    """One paragraph for a compiler failure: what failed (an operator or construct in our code, with its file and
    line, or the C++/Triton compiler), and what to do."""
    text = str(e)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    if re.search(r"(?i)(InvalidCxxCompiler|CppCompileError|C\+\+ compiler|triton)", text[:2000]):
        head = "torch.compile's code generation failed (the C++/Triton compiler)"
    else:
        where = re.findall(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.*)', text.split("from user code:")[-1])
        at = ""
        if where:
            path, line, fn, code = where[-1]
            at = f" at {os.path.basename(path)}:{line} in {fn}: `{code.strip()}`"
        op = re.search(r"(aten[.:]+\w+(?:\.\w+)?|Tensor\.\w+)", text)
        head = f"torch.compile could not compile {op.group(1) if op else 'the step'}{at}"
    return f"{head} ({first[:300]}). Set compile: off to train with the eager step (`--set compile=off`)."


def warn_fallback(e: CompileError) -> None:
    warnings.warn(f"compile: auto -> eager step after a compile failure: {e}", RuntimeWarning, stacklevel=2)
