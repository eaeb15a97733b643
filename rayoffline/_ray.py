"""Ray at the edges: one place that starts or joins a Ray instance, and keeps Ray's own chatter off the terminal.

What a user sees of Ray is what they can act on: errors (as exceptions, which the CLI prints as one line).
Ray's warnings and logs go to files in the Ray session directory (`<session>/logs/rayoffline-driver.log` for
the `ray` Python logger, `<session>/logs/ray-data/ray-data.log` for Ray Data, the usual files for the raylet,
GCS and workers), the session directory being /tmp/ray/session_latest for a local instance.
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

DRIVER_LOG = "rayoffline-driver.log"


def ensure_ray(num_cpus: int | None = None, address: str | None = None, num_gpus: int | None = None,
               log_to_driver: bool = False) -> None:
    """Join the cluster at RAY_ADDRESS if set, else start a local instance of our own (no dashboard); either way
    Ray's logs go to files, not the terminal (module docstring).

    A local instance gets at least 4 logical CPUs even on a 2-core machine: Ray Data tasks need free CPU
    slots next to the actors they feed, and converters are I/O bound.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:  # `address`: a training run's --address (auto, ray://HOST:10001); else $RAY_ADDRESS
        _logs_to_file(lambda: ray.init(address=address, log_to_driver=log_to_driver, configure_logging=False))
        _configure_data_context()
        return
    # Token authentication: Ray 2.60 enables it for every new local instance (creating ~/.ray/auth_token if
    # missing) and announces that on stderr ("Token authentication is enabled for this Ray cluster. Set
    # RAY_AUTH_MODE=disabled to opt out"). We keep Ray's default rather than disable auth: this instance lives
    # as long as this process and nobody else needs to connect to it, but it listens on the machine's address,
    # not only loopback, so without auth anyone on the network could run code in it during a conversion. The
    # notice is Ray's logging like any other and goes to the driver log with the rest (_logs_to_file); a
    # user's own RAY_AUTH_MODE is respected. (Setting RAY_AUTH_MODE=token here instead would also silence it,
    # but Ray reads the mode when it is imported: set later, the GCS demands a token Ray never created.)
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    # address="local": a new instance of our own even when another one runs on this machine (ray.init() would
    # join the last one `ray start` or a test cluster left behind, and refuse num_cpus)
    _logs_to_file(lambda: ray.init(address="local", num_cpus=cpus, num_gpus=num_gpus, include_dashboard=False,
                                   log_to_driver=log_to_driver, configure_logging=False))
    _configure_data_context()


def ray_log_in(run_dir: Path, verbose: bool) -> logging.Handler:
    """Ray's driver-side log records (the `ray` logger: Train and Tune controller messages, warnings) into
    DIR/ray.log (a run's or a sweep's directory, created); with verbose also on stderr. Returns the file
    handler, for the caller to remove when it is done."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "ray.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    lg = logging.getLogger("ray")
    lg.addHandler(handler)
    if lg.level == logging.NOTSET or lg.level > logging.INFO:
        lg.setLevel(logging.INFO)
    lg.info("Ray session logs (controllers, workers, raylet): %s", _session_logs())
    if verbose and not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                           for h in lg.handlers):
        lg.addHandler(logging.StreamHandler())
    return handler


def _session_logs() -> Path:
    """`<session>/logs` of the Ray instance this process is connected to (a temp directory if Ray hides it)."""
    try:
        import ray._private.worker as worker  # Ray Data finds its log directory the same way

        return Path(worker._global_node.get_session_dir_path()) / "logs"
    except Exception:  # noqa: BLE001 - a private attribute: fall back rather than fail a conversion
        return Path(tempfile.gettempdir())


def _logs_to_file(start) -> None:
    """Run `start()` (ray.init(configure_logging=False)) with the `ray` logger's records held back, then send
    them and everything after to DRIVER_LOG in the session directory instead of the terminal. If start() fails,
    what Ray logged is shown after all: it may explain the failure.

    ray.init(configure_logging=False) clears the `ray` logger's handlers first thing, and that logger does not
    propagate, so its records would reach Python's last-resort stderr handler: while it starts, the records
    propagate to a holding handler on the root logger (which ray.init leaves alone) that keeps only Ray's."""
    from logging.handlers import MemoryHandler

    lg, root = logging.getLogger("ray"), logging.getLogger()
    held = MemoryHandler(capacity=1 << 16, flushLevel=logging.CRITICAL + 1)
    held.addFilter(lambda r: r.name == "ray" or r.name.startswith("ray."))
    root.addHandler(held)
    lg.propagate = True
    try:
        start()
    except BaseException:
        root.removeHandler(held)
        for record in held.buffer:
            if record.levelno >= logging.WARNING:
                logging.lastResort.handle(record)
        raise
    finally:
        root.removeHandler(held)
        lg.propagate = False
    logs = _session_logs()
    logs.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(logs / DRIVER_LOG)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    lg.handlers.clear()
    lg.addHandler(to_file)
    held.setTarget(to_file)
    held.flush()


def data_context():
    """Ray Data's current DataContext.

    Ray 2.60's DataContext() constructor assigns its own deprecated fields (use_push_based_shuffle, use_polars,
    use_arrow_tensor_v2) and so warns about them once, on the first get_current() in a process; nothing we set
    is deprecated (enable_progress_bars, print_on_execution_start are current API), so those three warnings
    are Ray's and are suppressed here.
    """
    from ray.data import DataContext

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.data\.context")
        return DataContext.get_current()


def _configure_data_context() -> None:
    ctx = data_context()
    ctx.enable_progress_bars = False  # a CLI conversion prints one line; errors still surface as exceptions
    ctx.print_on_execution_start = False
