"""rayoffline: offline reinforcement learning at cluster scale on Ray."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def train(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Train an algorithm; see rayoffline.learner.api.train."""
    from .learner.api import train as _train
    return _train(*args, **kwargs)


__all__ = ["train", "__version__"]
