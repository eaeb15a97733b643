"""Where one update's time goes: a per-phase profile of `Learner.step` for K=1 and K=16.

Eager step, phases by torch.profiler ranges around the learner's own calls (this script wraps them; the
library carries no profiling hooks): sampling (`Learner.sample`), forward (the algorithm's `update` generator
between yields: losses and target updates), backward (`torch.autograd.backward`), optimizer (the fused Adam
step). For each phase: its wall time and the part of it spent inside torch operators (self CPU time of aten
ops); what is left, per step, is Python and dispatch overhead. The compiled step (`--compile`) is one graph, so
its rows are by kernel kind instead: extern matmuls (aten bmm/baddbmm), Inductor's generated kernels, and the
rest (guards, the graph's Python wrapper, dispatch).

    python benchmarks/profile_step.py [--algos iql,cql] [--ks 1,16] [--compile] [--readme]

Same setting as benchmarks/throughput.py: Hopper-shaped random data, batch 256, 2x256 MLPs, one CPU thread
(and the GPU when present: CUDA kernel time from the profiler's device events).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import machine, make_learner, sync  # noqa: E402

PHASES = ("sample", "forward", "backward", "optimizer")


def _instrument(learner) -> None:
    """Wrap the eager step's pieces in profiler ranges (instance attributes: nothing global changes)."""
    sample, apply, update = learner.sample, learner.apply, learner.algorithm.update

    def timed_sample():
        with record_function("phase:sample"):
            return sample()

    def timed_update(batch, step):
        gen = update(batch, step)
        while True:
            with record_function("phase:forward"):
                item = next(gen, None)
            if item is None:
                return
            yield item

    def timed_apply(group, loss):
        g = learner.groups[group]
        with record_function("phase:backward"):
            g.flat.grad.zero_()
            torch.autograd.backward(loss.sum(), inputs=g.params)
        with record_function("phase:optimizer"):
            g.step()

    learner.sample, learner.apply, learner.algorithm.update = timed_sample, timed_apply, timed_update
    del apply


def _profiled(learner, device: torch.device, steps: int):
    """The profiler's events of `steps` steps after 10 of warm-up, inside one 'phase:step' range."""
    for s in range(1, 11):
        learner.step(s)
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        with record_function("phase:step"):
            for s in range(11, 11 + steps):
                learner.step(s)
            sync(device)
    return prof.events()


def profile_eager(name: str, k: int, device: torch.device, steps: int) -> dict[str, float]:
    learner = make_learner(name, k, device)
    _instrument(learner)
    events = _profiled(learner, device, steps)
    wall = defaultdict(float)
    ranges = {}
    for e in events:
        if e.name.startswith("phase:"):
            wall[e.name[6:]] += e.cpu_time_total
            ranges.setdefault(e.name[6:], []).append((e.time_range.start, e.time_range.end))
    ops = defaultdict(float)
    for e in events:
        if e.name.startswith("phase:") or not e.name.startswith("aten::") or e.cpu_parent is not None \
                and e.cpu_parent.name.startswith("aten::"):
            continue  # top-level aten ops only (their children are inside their time)
        for ph in PHASES:
            if any(a <= e.time_range.start and e.time_range.end <= b for a, b in ranges.get(ph, ())):
                ops[ph] += e.cpu_time_total
                break
    out = {"step_ms": wall["step"] / steps / 1e3}
    for ph in PHASES:
        out[f"{ph}_ms"] = wall[ph] / steps / 1e3
        out[f"{ph}_ops_ms"] = ops[ph] / steps / 1e3
    out["other_ms"] = out["step_ms"] - sum(out[f"{ph}_ms"] for ph in PHASES)
    return out


def profile_compiled(name: str, k: int, device: torch.device, steps: int) -> dict[str, float]:
    import torch._inductor.config as ic
    ic.cpp.enable_kernel_profile = True  # Inductor's C++ kernels appear as profiler events
    learner = make_learner(name, k, device, compile=True)
    mm = gen = step = 0.0
    for e in _profiled(learner, device, steps):
        if e.name == "phase:step":
            step += e.cpu_time_total
        elif e.name in ("aten::bmm", "aten::baddbmm", "aten::mm", "aten::addmm"):
            mm += e.self_cpu_time_total
        elif e.name.startswith(("graph_", "cpp_fused", "triton_")):
            gen += e.self_cpu_time_total
    out = {"step_ms": step / steps / 1e3, "matmul_ms": mm / steps / 1e3, "generated_ms": gen / steps / 1e3}
    out["other_ms"] = out["step_ms"] - out["matmul_ms"] - out["generated_ms"]
    return out


def render(rows: list[dict]) -> str:
    lines = [f"Machine: {machine()}; one thread. ms per update (K members in one pass); in parentheses the part "
             "spent inside torch operators. 'other' is the rest of the step: Python, the learner's loop, metric sums.",
             "", "| step | algo | K | total | sampling | forward | backward | optimizer | other |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["mode"] == "eager":
            cells = [f"{r[f'{ph}_ms']:.2f} ({r[f'{ph}_ops_ms']:.2f})" for ph in PHASES]
            python = r["step_ms"] - sum(r[f"{ph}_ops_ms"] for ph in PHASES)
            lines.append(f"| eager | {r['algo']} | {r['k']} | {r['step_ms']:.2f} | " + " | ".join(cells)
                         + f" | {r['other_ms']:.2f} (Python and dispatch in all phases: {python:.2f}) |")
        else:
            lines.append(f"| compiled | {r['algo']} | {r['k']} | {r['step_ms']:.2f} | matmuls (aten): "
                         f"{r['matmul_ms']:.2f} | Inductor kernels: {r['generated_ms']:.2f} | - | - | "
                         f"{r['other_ms']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algos", default="iql,cql")
    ap.add_argument("--ks", default="1,16")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name in args.algos.split(","):
        for k in (int(x) for x in args.ks.split(",")):
            steps = max(5, args.steps // (k if name == "cql" else max(1, k // 4)))
            rows.append({"mode": "eager", "algo": name, "k": k, **profile_eager(name, k, device, steps)})
            print(rows[-1], flush=True)
            if args.compile:
                rows.append({"mode": "compiled", "algo": name, "k": k, **profile_compiled(name, k, device, steps)})
                print(rows[-1], flush=True)
    table = render(rows)
    print(table)
    if args.readme:
        from benchmarks._readme import write_block
        write_block("profile", table)


if __name__ == "__main__":
    main()
