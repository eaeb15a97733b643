"""Algorithm registry: name -> Algorithm class (its `Config` is the class attribute)."""
from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import AlgoConfig, Algorithm

# name -> module path; each module defines exactly one Algorithm subclass named in ALGORITHM.
_MODULES = {
    "bc": "bc",
    "td3_bc": "td3_bc",
    "iql": "iql",
    "cql": "cql",
    "bcq": "bcq",
    "discrete_cql": "discrete_cql",
    "discrete_bcq": "discrete_bcq",
}


def names() -> list[str]:
    return list(_MODULES)


def get(name: str) -> type[Algorithm]:
    if name not in _MODULES:
        raise ConfigError(f"unknown algorithm '{name}'; known: {', '.join(_MODULES)}")
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return module.ALGORITHM


__all__ = ["AlgoConfig", "Algorithm", "get", "names"]
