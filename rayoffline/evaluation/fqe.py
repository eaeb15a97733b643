"""FQE: Fitted Q Evaluation, K target policies evaluated side by side, trained by the project's one Learner.

Le, Voloshin & Yue, "Batch Policy Learning under Constraints", ICML 2019 (https://arxiv.org/abs/1903.08738);
the deep, gradient-step form of Paine et al., "Hyperparameter Selection for Offline Reinforcement Learning", 2020
(https://arxiv.org/abs/2007.09055), and Voloshin et al., "Empirical Study of Off-Policy Policy Evaluation for
Reinforcement Learning", NeurIPS Datasets and Benchmarks 2021 (https://arxiv.org/abs/1911.06854).

Member k estimates Q^{pi_k} of member k of a TargetPolicy (rayoffline/evaluation/policies.py), set with
`fqe.set_target(policy)` before training. With Q the online network, Q' its target copy and c the reward scale,
per member (means over the member's batch, actions in the normalized space):
    V'(s') = E_{a' ~ pi_k(s')} Q'(s', a')       discrete: sum_a' pi_k(a'|s') Q'(s', a')  (pi.probs, exact)
                                                continuous, deterministic pi: Q'(s', pi.act(s'))
                                                continuous, stochastic pi: mean over `n_action_samples` draws
    y      = c * r + gamma * (1 - term) * V'(s')          (only terminations stop bootstrapping, not truncations)
    L_Q    = E[(Q(s, a) - y)^2]  (or Huber with threshold 1, `loss: huber`)
    every `target_period` steps: Q' <- (1 - tau) Q' + tau Q
One optimizer group, `q`. The networks: continuous Q(s, a) an MLP on concat(s, a) -> 1; discrete Q(s, .) an MLP
-> A values; observations standardized with the dataset's mean and std. The estimates in the dataset's reward
units are Q / c: `fqe.q(obs, actions)`, `fqe.value(obs)` = E_{a ~ pi} Q(s, a) / c, both (K, B).

`fit_fqe(policy, data, meta, steps)` builds FQE for the dataset (its observation statistics, its spaces), trains
it with `rayoffline.learner.loop.Learner` (the one training loop) and returns it.

Defaults and sources:
- MSE loss, Adam, a target network and 2 x 256 ReLU layers: Paine et al. 2020 and Voloshin et al. 2021 (both a
  TD regression on the target policy's next action); d3rlpy's `FQE` (lr 1e-4, hard target copy every 100 steps,
  the `d3rlpy.ope` implementation of Le et al.) was the reference for lr and the target schedule.
- Target network: Le et al.'s FQE fits each iteration's regression, then copies (a hard update); here the default
  is the Polyak form (tau 0.005 every step, `target_period` 1), the project's critics' schedule, which smooths the
  same iteration; `tau: 1.0, target_period: 100` gives d3rlpy's hard copy.
- lr 1e-4 (d3rlpy; Paine et al. tune it per domain).
- Reward scale c: FQE regresses on returns, of magnitude up to r_max / (1 - gamma) in the dataset's units
  (pendulum: -16..0 per step, values in the -100s at gamma 0.99), and Adam's steps have a fixed size in weight
  space, so the reward units set how fast and how precisely the network gets there. `fit_fqe` picks
  c = 1 / rms(r) over the dataset's rewards (unit-rms rewards, values O(1 / (1 - gamma)) as with DQN's clipped
  rewards) and divides the outputs by c: every estimate is in the dataset's own reward units. Measured on the
  tests' problems: c = (1 - gamma) / rms(r) (values O(1)) gave noisier estimates of small values (Adam's fixed step
  leaves an absolute error floor in the regression's units). A config's `reward_scale` overrides it.
- The discount is the config's `discount` (default 0.99, a member field): the estimates are discounted returns
  with it, and the importance-sampling estimators must use the same gamma to be comparable.

**Deviations**
- Polyak target by default instead of Le et al.'s hard copies per iteration (above; configurable).
- Continuous target actions (act or samples) are clipped to [-1, 1], the range the data's actions were mapped
  into, as an environment would clip them.
- Rewards are scaled by c for training (above); outputs are unscaled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from ..algorithms.base import AlgoConfig, Algorithm, Update
from ..batch import Batch
from ..config import require
from ..errors import ConfigError, DataError
from ..nn.functional import frozen_copy, soft_update
from ..nn.members import MemberMLP
from ..nn.policies import DiscreteQ
from ..spec import EnvSpec

LOSSES = ("mse", "huber")


@dataclass(frozen=True)
class FQEConfig(AlgoConfig):
    lr: float = 1e-4
    """Adam learning rate of the Q-network (d3rlpy's FQE: 1e-4)."""
    tau: float = 0.005
    """Polyak rate of the target network update (1.0: a hard copy)."""
    target_period: int = 1
    """Update the target network every this many steps (with tau 1.0 and 100: d3rlpy's hard copy every 100)."""
    n_action_samples: int = 10
    """Draws of a' ~ pi(s') per transition for stochastic continuous target policies (deterministic ones use
    pi.act, discrete ones the exact expectation over pi.probs)."""
    loss: str = "mse"
    """TD regression loss: 'mse' (Le et al., Paine et al.) or 'huber' (threshold 1, in scaled reward units)."""
    reward_scale: float | None = None
    """Rewards are multiplied by this for training and the estimates divided by it (any value gives the same
    estimates in the dataset's units; it sets the regression's scale). None: fit_fqe picks 1 / rms(r) of the
    dataset's rewards (an FQE built directly uses 1)."""
    reward_min: float | None = None
    """With reward_max: the smallest and largest reward of the data (fit_fqe fills both in). Every return then lies
    in [min(0, reward_min), max(0, reward_max)] / (1 - gamma), and the bootstrapped value V'(s') is clipped to that range: a
    target policy far from the data's support otherwise lets Q extrapolate without bound (measured: a negated
    CartPole policy's estimate grew to 1e6 where returns are at most 100)."""
    reward_max: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.lr > 0.0, "lr", f"must be positive, got {self.lr}")
        require(0.0 < self.tau <= 1.0, "tau", f"must be in (0, 1], got {self.tau}")
        require(self.target_period >= 1, "target_period", f"must be >= 1, got {self.target_period}")
        require(self.n_action_samples >= 1, "n_action_samples", f"must be >= 1, got {self.n_action_samples}")
        require(self.loss in LOSSES, "loss", f"must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        require(self.reward_scale is None or (math.isfinite(self.reward_scale) and self.reward_scale > 0.0),
                "reward_scale", f"must be positive (or unset), got {self.reward_scale}")


class ContinuousQ(nn.Module):
    """Q(s, a): (K, B, obs), (K, B, act) -> (K, B)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], gens: Sequence[torch.Generator]) -> None:
        super().__init__()
        self.net = MemberMLP(obs_dim + act_dim, hidden, 1, gens)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, actions], dim=-1)).squeeze(-1)


class FQE(Algorithm):
    name = "fqe"
    networks = "Q-network"
    Config = FQEConfig
    action_types = ("continuous", "discrete")
    SHARED_STATE: ClassVar[frozenset[str]] = Algorithm.SHARED_STATE | {"reward_scale"}

    def build(self, gens: list[torch.Generator]) -> None:
        spec, cfg = self.spec, self.cfg
        if spec.discrete:
            self.q_net: nn.Module = DiscreteQ(spec.obs_dim, spec.action_dim, cfg.hidden, gens)
        else:
            self.q_net = ContinuousQ(spec.obs_dim, spec.action_dim, cfg.hidden, gens)
        self.q_target = frozen_copy(self.q_net)
        scale = 1.0 if cfg.reward_scale is None else float(cfg.reward_scale)
        self.register_buffer("reward_scale", torch.tensor(scale))
        self._target: Any = None  # the TargetPolicy (not a submodule: its weights are not FQE's)

    @property
    def step_period(self) -> int:
        return self.cfg.target_period

    # ----- the target policy --------------------------------------------------------------------------
    def set_target(self, policy: Any) -> None:
        """The K policies to evaluate: member k of FQE evaluates member k of `policy`."""
        kind = "discrete" if self.spec.discrete else "continuous"
        pkind = "discrete" if policy.discrete else "continuous"
        if pkind != kind:
            raise ConfigError(f"FQE: the target policy has {pkind} actions but the dataset's action space is "
                              f"{kind}; evaluate a policy trained on this dataset's environment")
        if int(policy.action_dim) != self.spec.action_dim:
            what = "actions" if self.spec.discrete else "action dimensions"
            raise ConfigError(f"FQE: the target policy has {policy.action_dim} {what}, the dataset "
                              f"{self.spec.action_dim}")
        if int(policy.K) != self.K:
            raise ConfigError(f"FQE has {self.K} members but the target policy has {policy.K}: member k evaluates "
                              f"policy member k, so build FQE with one seed per policy member (or select members "
                              f"with policy.select([...]))")
        if torch.device(policy.device) != self.device:
            raise ConfigError(f"FQE is on {self.device} but the target policy on {policy.device}; put both on one "
                              f"device")
        self._target = policy

    @property
    def target(self) -> Any:
        if self._target is None:
            raise ConfigError("FQE: no target policy; call fqe.set_target(policy) before training or evaluating")
        return self._target

    # ----- the algorithm ------------------------------------------------------------------------------
    def optim_groups(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        return {"q": (list(self.q_net.parameters()), self.cfg.lr)}

    def _q(self, net: nn.Module, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q of given actions, normalized obs (K, B, obs): (K, B) in scaled units."""
        if self.spec.discrete:
            return net(obs).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        return net(obs, actions)

    def _expected(self, net: nn.Module, obs_raw: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """E_{a ~ pi_k(s)} Q(s, a): raw and normalized obs (K, B, obs) -> (K, B) in scaled units."""
        pi = self.target
        if self.spec.discrete:
            p = pi.probs(obs_raw).to(obs.dtype)                                   # (K, B, A)
            return (p * net(obs)).sum(-1)
        if getattr(pi, "deterministic", False):
            return net(obs, pi.act(obs_raw).clamp(-1.0, 1.0))
        k, b, _ = obs.shape
        n = self.cfg.n_action_samples
        a = pi.sample(obs_raw, n).clamp(-1.0, 1.0)                                # (n, K, B, act)
        a = a.transpose(0, 1).reshape(k, n * b, -1)                               # (K, n*B, act): draw i, row j
        q = net(obs.repeat(1, n, 1), a)                                           # (K, n*B)
        return q.view(k, n, b).mean(1)

    def update(self, batch: Batch, step: int) -> Update:
        b = self.prepare(batch)
        gamma = self.coef("discount")[:, None]                                    # (K, 1)
        with torch.no_grad():
            next_v = self._expected(self.q_target, batch.next_observations, b.next_observations)  # (K, B)
            if self.cfg.reward_min is not None and self.cfg.reward_max is not None:
                horizon = 1.0 / (1.0 - gamma)                                     # (K, 1)
                c = self.reward_scale
                # an episode may end (value 0) at any step, so 0 is inside the range whatever the rewards' sign
                next_v = torch.minimum(torch.maximum(next_v, c * min(0.0, self.cfg.reward_min) * horizon),
                                       c * max(0.0, self.cfg.reward_max) * horizon)
            y = self.reward_scale * b.rewards + gamma * (1.0 - b.terminations) * next_v           # (K, B)
        q = self._q(self.q_net, b.observations, b.actions)                        # (K, B)
        if self.cfg.loss == "huber":
            loss = nn.functional.huber_loss(q, y, reduction="none", delta=1.0).mean(-1)  # (K,)
        else:
            loss = (q - y).square().mean(-1)                                      # (K,)
        unscale = 1.0 / self.reward_scale
        yield "q", loss, {"q_mean": q.detach().mean(-1) * unscale, "target_mean": y.mean(-1) * unscale}
        if step % self.cfg.target_period == 0:
            soft_update(self.q_target, self.q_net, self.cfg.tau)

    def policy(self, obs: torch.Tensor) -> torch.Tensor:
        raise ConfigError("FQE evaluates a policy; it has none of its own to act with")

    # ----- estimates in the dataset's reward units ----------------------------------------------------
    def _members_obs(self, obs: torch.Tensor) -> torch.Tensor:
        obs = torch.as_tensor(obs).to(self.device, torch.float32)
        if obs.dim() == 2:
            obs = obs.unsqueeze(0).expand(self.K, *obs.shape)
        return obs

    @torch.no_grad()
    def q(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q^{pi_k}(s, a) of raw observations (K, B, obs) or (B, obs) and normalized actions ((K, B, act) float or
        (K, B) int64, or without the K dim): (K, B), in the dataset's reward units."""
        obs = self._members_obs(obs)
        actions = torch.as_tensor(actions).to(self.device)
        if actions.dim() == (1 if self.spec.discrete else 2):
            actions = actions.unsqueeze(0).expand(self.K, *actions.shape)
        if not self.spec.discrete:
            actions = actions.float()
        return self._q(self.q_net, self.norm_obs(obs), actions) / self.reward_scale

    @torch.no_grad()
    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """V^{pi_k}(s) = E_{a ~ pi_k(s)} Q^{pi_k}(s, a) of raw observations (K, B, obs) or (B, obs): (K, B), in the
        dataset's reward units."""
        obs = self._members_obs(obs)
        return self._expected(self.q_net, obs, self.norm_obs(obs)) / self.reward_scale


ALGORITHM = FQE


def auto_reward_scale(rewards: torch.Tensor) -> float:
    """1 / rms(r): unit-rms rewards (module docstring); 1 for all-zero rewards."""
    rms = float(rewards.double().square().mean().sqrt()) if rewards.numel() else 0.0
    if not math.isfinite(rms):
        raise DataError("FQE: the dataset's rewards are not finite; clean the dataset before evaluating on it")
    return 1.0 / rms if rms > 0.0 else 1.0


def fit_fqe(policy: Any, data: Batch, meta: dict[str, Any], steps: int, batch_size: int = 256,
            seeds: Sequence[int] | None = None, config: FQEConfig | Sequence[FQEConfig] | None = None,
            device: torch.device | str | None = None, log_every: int = 1000,
            on_log: Callable[[int, dict[str, list[float]]], None] | None = None) -> FQE:
    """Train FQE for `policy` (a TargetPolicy of K members) on `data` (a Batch of the dataset's transitions) for
    `steps` learner steps of `batch_size` transitions per member, and return it.

    meta: the dataset's metadata (spaces, `obs_mean`, `obs_std`). seeds: one per member (default 0..K-1; member k
    then equals an FQE of K=1 with seed k). config: one FQEConfig for all members or one per member (default
    FQEConfig()); a `reward_scale` of None becomes 1 / rms(r). on_log(step, metrics) every `log_every`
    steps and at the last, with the learner's per-member means since the previous call."""
    from ..learner.loop import Learner

    if steps < 1 or batch_size < 1:
        raise ConfigError(f"fit_fqe: steps and batch_size must be positive, got {steps} and {batch_size}")
    spec = EnvSpec.from_metadata(meta)
    k = int(policy.K)
    seeds = list(range(k)) if seeds is None else [int(s) for s in seeds]
    configs = [FQEConfig()] if config is None else (list(config) if isinstance(config, (list, tuple)) else [config])
    if len(configs) == 1:
        configs = configs * len(seeds)
    device = torch.device(device) if device is not None else torch.device(policy.device)
    data = data.to(device)
    if int(data.rewards.shape[0]) == 0:
        raise DataError("fit_fqe: the dataset has no transitions")
    if any(c.reward_scale is None for c in configs):
        scale = auto_reward_scale(data.rewards)
        configs = [c if c.reward_scale is not None else replace(c, reward_scale=scale) for c in configs]
    if any(c.reward_min is None or c.reward_max is None for c in configs):
        lo, hi = float(data.rewards.min()), float(data.rewards.max())
        configs = [c if c.reward_min is not None and c.reward_max is not None
                   else replace(c, reward_min=lo, reward_max=hi) for c in configs]
    fqe = FQE(spec, configs, seeds, device=device, obs_mean=meta.get("obs_mean"), obs_std=meta.get("obs_std"))
    fqe.set_target(policy)
    learner = Learner(fqe, data, batch_size)
    for step in range(1, steps + 1):
        learner.step(step)
        if on_log is not None and (step % log_every == 0 or step == steps):
            on_log(step, learner.pop_metrics())
    return fqe
