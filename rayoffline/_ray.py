"""Ray at the edges: one place that starts or joins a Ray instance."""
from __future__ import annotations

import os


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster at RAY_ADDRESS if set, else start a local instance (no dashboard).

    A local instance gets at least 4 logical CPUs even on a 2-core machine: Ray Data tasks need free CPU
    slots next to the actors they feed, and converters are I/O bound.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        return
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:  # progress bars of Ray Data clutter a CLI's output; errors still surface as exceptions
        from ray.data import DataContext
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    except Exception:  # pragma: no cover - older/newer Ray without these knobs
        pass
