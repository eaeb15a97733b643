"""RunConfig: the learner's settings (everything that is not the algorithm's math)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import require


@dataclass(frozen=True)
class RunConfig:
    steps: int = 100_000
    """Number of gradient updates (per member)."""
    batch_size: int = 256
    """Transitions per member per update."""
    seed: int = 0
    """Run seed: default seed of every member; also seeds evaluation environments."""
    device: str = "auto"
    """'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'."""
    threads: int = 0
    """torch intra-op threads on CPU; 0 (auto): 1, or the CPUs Ray allots when the run is a Ray task or actor
    (more threads slowed runs 2-30x beside one busy process; see benchmarks/threads.py)."""
    log_every: int = 1000
    """Fetch metrics from the device, write TensorBoard/metrics.jsonl every this many steps."""
    eval_every: int = 0
    """Online evaluation every this many steps (0: only at the end)."""
    eval_episodes: int = 10
    """Episodes per member per evaluation (run in parallel in a vectorized env)."""
    checkpoint_every: int = 10_000
    """Checkpoint every this many steps (always at the end; 0: only at the end)."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep on disk."""
    progress: str = "auto"
    """Progress bar: 'auto' (only on a terminal), 'on' or 'off'."""

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        require(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        require(self.eval_episodes >= 0, "eval_episodes", f"must be >= 0, got {self.eval_episodes}")
        require(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        require(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")
        require(self.progress in ("auto", "on", "off"), "progress", f"'auto', 'on' or 'off', got {self.progress!r}")
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
                f"'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
