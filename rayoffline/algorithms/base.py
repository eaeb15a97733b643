"""The Algorithm contract (see DESIGN.md): pure math, no Ray, no I/O, no optimizer.step().

An algorithm is built from (EnvSpec, configs, seeds): one config and one seed per member. Member-varying
coefficients (config fields declared with `member(...)`) become buffers of shape (K,) read with
`self.coef(name)`; every other field must agree across members.

`update(batch, step)` is a generator yielding `(group, loss, metrics)` in the paper's update order. The
learner runs backward on that group's parameters, all-reduces gradients and steps that group's optimizer
between yields, so a later loss sees the earlier groups' new weights. `loss` is the (K,) vector of the
members' own losses; the learner backpropagates its sum, so member k's gradient is exactly that of its own
loss, and logs each member's value. `metrics` maps names to detached (K,) tensors; no host transfers or prints
here, so the update stays graph-capturable.

Actions: the algorithms work in a normalized action space [-1, 1] (`prepare` maps dataset actions into it,
`act` maps policy actions back). Observations are standardized with the dataset mean/std when the config's
`normalize_obs` is set.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Sequence

import torch
from torch import nn

from ..batch import Batch
from ..config import is_member_field, member, require
from ..errors import ConfigError
from ..nn.members import STREAM_NOISE, init_generators
from ..nn.rng import MemberRNG
from ..spec import EnvSpec

Update = Iterator[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class AlgoConfig:
    """Fields shared by every algorithm config."""

    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the algorithm's MLPs (`rayoffline algos` names them per algorithm)."""
    discount: float = member(0.99)
    """Discount factor gamma."""
    normalize_obs: bool = True
    """Standardize observations with the dataset's mean and std (training and acting)."""

    def __post_init__(self) -> None:
        require(len(self.hidden) >= 1 and all(h > 0 for h in self.hidden), "hidden",
                f"need at least one positive width, got {list(self.hidden)}")
        require(0.0 <= self.discount < 1.0, "discount", f"must be in [0, 1), got {self.discount}")


class Algorithm(nn.Module):
    name: ClassVar[str]
    networks: ClassVar[str] = "networks"
    """The MLPs that `hidden` shapes, in words (for `rayoffline algos`)."""
    Config: ClassVar[type] = AlgoConfig
    action_types: ClassVar[tuple[str, ...]] = ("continuous",)
    """Which action spaces the algorithm supports: 'continuous', 'discrete' or both."""

    def __init__(self, spec: EnvSpec, configs: Sequence[Any] | Any, seeds: Sequence[int] | int = 0,
                 device: torch.device | str = "cpu", obs_mean: Sequence[float] | torch.Tensor | None = None,
                 obs_std: Sequence[float] | torch.Tensor | None = None) -> None:
        super().__init__()
        configs = list(configs) if isinstance(configs, (list, tuple)) else [configs]
        seeds = [int(seeds)] if isinstance(seeds, int) else [int(s) for s in seeds]
        if len(configs) == 1 and len(seeds) > 1:
            configs = configs * len(seeds)
        if len(configs) != len(seeds) or not configs:
            raise ConfigError(f"{len(configs)} member configs but {len(seeds)} seeds: give one seed per member")
        for c in configs:
            if not isinstance(c, self.Config):
                raise ConfigError(f"algorithm '{self.name}' takes {self.Config.__name__}, got {type(c).__name__}")
        kind = "discrete" if spec.discrete else "continuous"
        if kind not in self.action_types:
            space = f"Discrete({spec.action_dim})" if spec.discrete else f"Box({spec.action_dim},)"
            raise ConfigError(f"algorithm '{self.name}' needs {' or '.join(self.action_types)} actions, but the "
                              f"dataset's action space is {space}; see `rayoffline algos` for one that fits")
        _check_members_agree(configs)
        self.spec, self.configs, self.cfg, self.K = spec, configs, configs[0], len(configs)
        self.seeds = seeds
        self.device = torch.device(device)

        mean = torch.zeros(spec.obs_dim) if obs_mean is None else torch.as_tensor(obs_mean, dtype=torch.float32)
        std = torch.ones(spec.obs_dim) if obs_std is None else torch.as_tensor(obs_std, dtype=torch.float32)
        self.register_buffer("obs_mean", mean.reshape(spec.obs_dim).clone())
        self.register_buffer("obs_std", std.reshape(spec.obs_dim).clamp_min(1e-3).clone())
        if not spec.discrete:
            low = torch.tensor(spec.action_low, dtype=torch.float32)
            high = torch.tensor(spec.action_high, dtype=torch.float32)
            if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
                raise ConfigError(f"algorithm '{self.name}' needs a bounded action space, got low={spec.action_low}"
                                  f" high={spec.action_high}")
            self.register_buffer("act_low", low)
            self.register_buffer("act_high", high)
        for f in dataclasses.fields(self.Config):
            if is_member_field(f):
                self.register_buffer(f"coef_{f.name}",
                                     torch.tensor([float(getattr(c, f.name)) for c in configs]))
        self.build(init_generators(seeds))
        self.to(self.device)
        self.rng = MemberRNG(seeds, self.device, STREAM_NOISE)
        self._reduce_batch_stats = False  # replicate-mode data parallelism: batch statistics span all workers
        self.member_steps: list[int] | None = None
        """Each member's step during `update` (set by the learner; members of a pack may be at different steps,
        equal modulo `step_period`). For per-member thresholds; `update`'s `step` serves periodic decisions."""

    SHARED_STATE: ClassVar[frozenset[str]] = frozenset({"obs_mean", "obs_std", "act_low", "act_high"})
    """state_dict entries that all members share; every other entry is stacked member-major along dim 0."""

    @property
    def step_period(self) -> int:
        """`update` makes decisions on `step % step_period` (e.g. a delayed actor): members fused into one pass
        must agree on their step modulo this."""
        return 1

    # ----- to implement -------------------------------------------------------------------------------
    def build(self, gens: list[torch.Generator]) -> None:
        """Create the networks (on CPU) drawing initial weights from the per-member generators."""
        raise NotImplementedError

    def optim_groups(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        """group name -> (parameters, learning rate), in update order."""
        raise NotImplementedError

    def update(self, batch: Batch, step: int) -> Update:
        raise NotImplementedError

    def policy(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action for normalized obs (K, B, obs): (K, B, act) in [-1, 1] or (K, B) int64."""
        raise NotImplementedError

    def critic_values(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor | None:
        """Each of the algorithm's C critics' Q(s, a) for normalized obs (K, B, obs) and normalized actions
        (K, B, act) or (K, B) int64: (K, C, B), without gradient (twin critics: C = 2, the online critics, not
        the targets; discrete: the logged action's column). None for an algorithm without a critic (BC). Read by
        the training diagnostics (rayoffline/evaluation/diagnostics.py)."""
        return None

    # ----- data parallelism ---------------------------------------------------------------------------
    def branch_steps(self, step: int, member_steps: list[int]) -> tuple[int, tuple[int, ...] | None]:
        """The smallest (step, member_steps) for which `update` takes the same Python branches as at (step,
        member_steps): what a compiled step is specialized on (rayoffline/learner/compiled.py). The default
        decides on `step % step_period` only and reads no member steps."""
        return step % self.step_period, None

    def set_data_parallel(self, rank: int, world: int, shared: bool, backend: str | None = None) -> None:
        """Called by the learner on every data-parallel worker before training. shared=True (replicate
        mode): noise is the global stream sliced by rank and `batch_mean` averages over all workers, so the
        workers together compute the update of one worker with the global batch; shared=False (split mode):
        noise streams differ per rank and batch statistics stay local. backend: MemberRNG's (None: its default)."""
        self.rng = MemberRNG(self.seeds, self.device, STREAM_NOISE, rank=rank, world=world, shared=shared,
                             backend=backend)
        self._reduce_batch_stats = shared and world > 1

    def batch_mean(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """x.mean(dim) over the global batch: the local mean, averaged across replicate-mode workers (equal
        local batch sizes). For batch-level statistics that a loss uses as a constant, e.g. TD3+BC's lambda."""
        m = x.mean(dim)
        if self._reduce_batch_stats:
            m = m.contiguous()
            torch.distributed.all_reduce(m)
            m = m / torch.distributed.get_world_size()
        return m

    # ----- shared helpers -----------------------------------------------------------------------------
    def coef(self, name: str) -> torch.Tensor:
        """Per-member coefficient, shape (K,)."""
        return getattr(self, f"coef_{name}")

    def norm_obs(self, obs: torch.Tensor) -> torch.Tensor:
        if self.cfg.normalize_obs:
            return (obs - self.obs_mean) / self.obs_std
        return obs

    def norm_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """Dataset actions -> [-1, 1] (continuous), unchanged (discrete)."""
        if self.spec.discrete:
            return actions
        return (2.0 * (actions - self.act_low) / (self.act_high - self.act_low) - 1.0).clamp(-1.0, 1.0)

    def unnorm_actions(self, actions: torch.Tensor) -> torch.Tensor:
        if self.spec.discrete:
            return actions
        return self.act_low + (actions + 1.0) * 0.5 * (self.act_high - self.act_low)

    def prepare(self, batch: Batch) -> Batch:
        """Normalize observations and actions of a member batch (K, B, ...)."""
        return Batch(observations=self.norm_obs(batch.observations), actions=self.norm_actions(batch.actions),
                     rewards=batch.rewards, next_observations=self.norm_obs(batch.next_observations),
                     terminations=batch.terminations, truncations=batch.truncations)

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Raw observations (K, B, obs) or (B, obs) shared by all members -> actions in the env's units,
        (K, B, act) float or (K, B) int64."""
        if obs.dim() == 2:
            obs = obs.unsqueeze(0).expand(self.K, *obs.shape)
        return self.unnorm_actions(self.policy(self.norm_obs(obs.to(self.device, torch.float32))))

    def extra_state(self) -> dict[str, Any]:
        return {"noise_rng": self.rng.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["noise_rng"])


def _check_members_agree(configs: Sequence[Any]) -> None:
    first = configs[0]
    for f in dataclasses.fields(first):
        if is_member_field(f):
            continue
        for i, c in enumerate(configs[1:], 1):
            if getattr(c, f.name) != getattr(first, f.name):
                raise ConfigError(
                    f"config key '{f.name}' differs between members 0 and {i} ({getattr(first, f.name)!r} vs "
                    f"{getattr(c, f.name)!r}); only per-member coefficients may differ within one pass")
