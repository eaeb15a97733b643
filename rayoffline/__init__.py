"""rayoffline: offline reinforcement learning at cluster scale on Ray.

    import rayoffline
    result = rayoffline.train("iql", "builtin:pendulum-medium", "runs/iql", steps=20000)
    rayoffline.evaluate_run("runs/iql", episodes=20)
    sweep = rayoffline.tune("tune_configs/sweep_iql_quick.yaml", out="runs/sweep")

The functions load on first use, so `import rayoffline` (and the CLI's start) stays fast.
"""
import importlib as _importlib

__version__ = "0.1.0"

_LAZY = {
    "train": "rayoffline.learner.api",
    "evaluate_run": "rayoffline.learner.api",
    "load_run": "rayoffline.learner.api",
    "convert": "rayoffline.data",
    "append": "rayoffline.data",
    "load": "rayoffline.data",
    "tune": "rayoffline.sweep.run",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'rayoffline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) - {"_importlib", "_LAZY"} | set(_LAZY))
