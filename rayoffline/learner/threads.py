"""How many CPU threads a run gives torch.

`threads: 0` (the default) means one thread, or the CPU allotment of the Ray task
or actor the run executes in. Measured by benchmarks/threads.py (README, "CPU threads"; 2-core machine,
td3_bc and iql, K=1 and K=16): a second intra-op thread gained 1.3-2x alone, and lost 1.6-4x as soon as one
other process kept a core busy, while one thread kept its speed: torch's OpenMP threads wait for each other
at every kernel of an update made of hundreds of small kernels, so one descheduled thread stalls them all.
The default is the one that never collapses; more threads are for a machine the run has to itself, asked
for explicitly (`threads: N`).
"""
from __future__ import annotations

import sys

import torch


def ray_cpu_allotment() -> int | None:
    """CPUs Ray assigned to the task or actor this code runs in; None outside Ray workers."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        ctx = ray.get_runtime_context()
        if ctx.worker.mode != ray._private.worker.WORKER_MODE:
            return None
        cpus = ctx.get_assigned_resources().get("CPU", 0.0)
    except Exception:  # pragma: no cover - a Ray without these internals: fall back to the default
        return None
    return max(1, int(cpus))


def auto_threads() -> int:
    allotted = ray_cpu_allotment()
    return allotted if allotted is not None else 1


def set_threads(threads: int, device: torch.device | None = None) -> int:
    """Apply RunConfig.threads (0: auto_threads()) to torch's intra-op pool; returns the count set."""
    n = threads if threads > 0 else auto_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
