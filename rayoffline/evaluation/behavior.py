"""Fitted behavior models: the logging policy pi_b(a | s) estimated from the dataset, for importance-sampling OPE.

Maximum likelihood on the dataset's (s, a) pairs, per member k (expectations are means over the member's batch,
observations standardized with the dataset mean/std, actions in the algorithms' normalized space):

    discrete     pi_b(. | s) = softmax(l(s))                        L = E[ -log softmax(l(s))_a ]
    continuous   pi_b(a | s) = sum_c w_c(s) prod_j N(a_j; mu_cj(s), sigma_cj(s)^2)
                 w(s) = softmax(z(s)) over C components (C = 1: one diagonal Gaussian, no weights)
                 L = E[ -log pi_b(a | s) ]   (log-sum-exp over the components)
    log sigma = soft_clamp(h(s), log_std_min, log_std_max):  x -> max - softplus(max - x) -> min + softplus(. - min)

One MLP per member outputs l(s) (n logits), or (mu, h, z) for C components (z only when C > 1). One optimizer
group, `behavior`.
Members are K independent fits (one seed each; the learner also draws each member's batches from its own
stream), so their spread shows how much the fit itself varies.

The Gaussian (mixture) lives on the normalized actions as they are, untransformed: no tanh squashing. Dataset
actions are often exactly +-1 (a controller's output clipped to the action bounds), and a squashed density puts
zero density (log-density -inf after atanh of +-1) on what the data does most, while an untransformed Gaussian
gives them a finite density. The price: the density leaks mass outside [-1, 1], and a point mass at a bound is
modeled by a narrow component whose height `log_std_min` caps (per dimension at most -log_std_min - log(2 pi)/2
nats). Samples are clipped to [-1, 1], as the logging process clipped them; `log_prob` stays the density.

`FittedBehavior` wraps a fitted model as a target policy (the interface of rayoffline/evaluation/policies.py):
`act` is the mean of the most likely component (continuous, clipped to [-1, 1]) or the argmax, `sample`
draws from the mixture or the softmax, `log_prob` is the density in the normalized action space (continuous) or
the log-probability, `probs` the softmax (discrete).

Sources: mixture density networks (Bishop 1994); importance sampling with an estimated behavior policy (Hanna,
Niekum & Stone, ICML 2019). The soft clamp of the log-std is that of PETS (Chua et al. 2018), here with fixed
bounds. Written from these descriptions; no reference implementation's code.

Default steps: `default_steps(n)`, 100 passes over the data at batch 256, clamped to [5k, 50k] updates (20k
transitions: 7.8k; 1M: 50k, ~13 passes). Measured on builtin:pendulum-medium (16k transitions to fit, 4k held
out; 5 components, 2 x 256): held-out NLL 0.271 after 1k updates, 0.217 (2.5k), 0.208 (5k), 0.181 (10k), 0.184
(20k, training NLL 0.134: overfitting); one Gaussian: 0.936 (1k) to 0.921 (10k).

**Deviations**
- The log-std bounds are fixed config values, not learned (PETS learns them with a penalty).
- No weight decay or early stopping on a held-out split: the learner's Adam has none, and the cosine decay of the
  learning rate to 0 over `steps` (`fit_behavior`'s default schedule) smooths the final weights instead. Use
  `held_out_nll` on data the fit did not see to choose steps or components.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..algorithms.base import AlgoConfig, Algorithm, Update
from ..batch import Batch
from ..config import require
from ..errors import ConfigError, DataError
from ..nn.members import MemberMLP
from ..spec import EnvSpec
from .policies import TargetPolicy

LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class BehaviorConfig(AlgoConfig):
    components: int = 5
    """Gaussian mixture components (continuous actions): 1 is a single diagonal Gaussian."""
    lr: float = 1e-3
    """Adam learning rate."""
    log_std_min: float = -5.0
    """Lower (soft) bound of each component's log-std in the normalized action space: caps the density a
    component can put on a point mass (e.g. actions clipped to a bound)."""
    log_std_max: float = 1.0
    """Upper (soft) bound of each component's log-std in the normalized action space."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.components >= 1, "components", f"must be >= 1, got {self.components}")
        require(self.lr > 0.0, "lr", f"must be positive, got {self.lr}")
        require(self.log_std_min < self.log_std_max, "log_std_min",
                f"must be below log_std_max ({self.log_std_min} >= {self.log_std_max})")


def soft_clamp(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """A smooth clamp into (low, high) that keeps gradients everywhere (PETS' log-variance bounds)."""
    x = high - nn.functional.softplus(high - x)
    return low + nn.functional.softplus(x - low)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian log-density summed over the last dim."""
    z = (x - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - 0.5 * LOG_2PI).sum(-1)


class BehaviorModel(Algorithm):
    name = "behavior"
    networks = "behavior-policy network"
    Config = BehaviorConfig
    action_types = ("continuous", "discrete")

    def build(self, gens: list[torch.Generator]) -> None:
        spec, cfg = self.spec, self.cfg
        c, a = cfg.components, spec.action_dim
        out = a if spec.discrete else (2 * c * a + (c if c > 1 else 0))
        self.net = MemberMLP(spec.obs_dim, cfg.hidden, out, gens)

    def optim_groups(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        return {"behavior": (list(self.net.parameters()), self.cfg.lr)}

    # ----- the distribution (normalized observations) -------------------------------------------------
    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        """Discrete: (K, B, obs) -> (K, B, n) logits."""
        return self.net(obs)

    def mixture(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Continuous: (K, B, obs) -> log weights (K, B, C), means (K, B, C, act), log-stds (K, B, C, act)."""
        c, a = self.cfg.components, self.spec.action_dim
        out = self.net(obs)
        k, b = out.shape[:2]
        mean = out[..., : c * a].reshape(k, b, c, a)
        log_std = soft_clamp(out[..., c * a: 2 * c * a].reshape(k, b, c, a), self.cfg.log_std_min,
                             self.cfg.log_std_max)
        if c > 1:
            log_w = torch.log_softmax(out[..., 2 * c * a:], dim=-1)
        else:
            log_w = out.new_zeros(k, b, 1)
        return log_w, mean, log_std

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi_b(a | s) for normalized obs (K, B, obs) and normalized actions (K, B, act) | (K, B): (K, B)."""
        if self.spec.discrete:
            logp = torch.log_softmax(self.logits(obs), dim=-1)
            return logp.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        log_w, mean, log_std = self.mixture(obs)
        comp = gaussian_log_prob(actions.unsqueeze(-2), mean, log_std)      # (K, B, C)
        return torch.logsumexp(log_w + comp, dim=-1)

    def update(self, batch: Batch, step: int) -> Update:
        b = self.prepare(batch)
        nll = -self.log_prob(b.observations, b.actions)                     # (K, B)
        loss = nll.mean(1)                                                  # (K,)
        metrics = {"nll": loss.detach()}
        if self.spec.discrete:
            with torch.no_grad():
                metrics["accuracy"] = (self.logits(b.observations).argmax(-1) == b.actions).float().mean(1)
        yield "behavior", loss, metrics

    def policy(self, obs: torch.Tensor) -> torch.Tensor:
        """The mode-like action: argmax (discrete), or the mean of the most likely component in [-1, 1]."""
        if self.spec.discrete:
            return self.logits(obs).argmax(-1)
        log_w, mean, _ = self.mixture(obs)
        best = log_w.argmax(-1)                                             # (K, B)
        idx = best[..., None, None].expand(*best.shape, 1, mean.shape[-1])
        return mean.gather(-2, idx).squeeze(-2).clamp(-1.0, 1.0)


class FittedBehavior(TargetPolicy):
    """A fitted BehaviorModel as a target policy (K members; raw observations in, normalized actions out; draws
    from the policies' own member streams, `rayoffline/evaluation/policies.py`). `metrics`: the training metrics of
    the fit's last steps (per-member lists)."""

    deterministic = False

    def __init__(self, model: BehaviorModel, metrics: dict[str, list[float]] | None = None) -> None:
        self.model = model.eval()
        self.K, self.discrete, self.action_dim = model.K, model.spec.discrete, model.spec.action_dim
        self.device, self.seeds = model.device, list(model.seeds)
        self.metrics = metrics or {}

    def _obs(self, obs: torch.Tensor) -> torch.Tensor:
        return self.model.norm_obs(self.members_obs(obs))

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return self.model.policy(self._obs(obs))

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, n: int) -> torch.Tensor:
        if self.discrete:
            return super().sample(obs, n)                                   # from probs()
        log_w, mean, log_std = self.model.mixture(self._obs(obs))           # (K, B, C), (K, B, C, act)
        k, b, c = log_w.shape
        rng = self._rng()
        u = rng.rand((n, b))                                                # (K, n, B)
        cdf = log_w.exp().cumsum(-1)                                        # (K, B, C)
        comp = (u.unsqueeze(-1) >= cdf.unsqueeze(1)).sum(-1).clamp_max(c - 1)  # (K, n, B)
        idx = comp[..., None, None].expand(k, n, b, 1, self.action_dim)
        mu = mean.unsqueeze(1).expand(k, n, b, c, self.action_dim).gather(-2, idx).squeeze(-2)  # (K, n, B, act)
        ls = log_std.unsqueeze(1).expand(k, n, b, c, self.action_dim).gather(-2, idx).squeeze(-2)
        eps = rng.randn((n, b, self.action_dim))                            # (K, n, B, act)
        return (mu + eps * ls.exp()).clamp(-1.0, 1.0).transpose(0, 1).contiguous()

    @torch.no_grad()
    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.model.log_prob(self._obs(obs), self.members_actions(actions))

    @torch.no_grad()
    def probs(self, obs: torch.Tensor) -> torch.Tensor:
        if not self.discrete:
            return super().probs(obs)
        return torch.softmax(self.model.logits(self._obs(obs)), dim=-1)


# ----- fitting ---------------------------------------------------------------------------------------------

def default_steps(num_transitions: int, batch_size: int = 256) -> int:
    """Updates for a behavior fit: 100 passes over the data, clamped to [5k, 50k] (module docstring)."""
    return int(min(50_000, max(5_000, 100 * num_transitions // batch_size)))


def spec_and_stats(data: Batch, meta: dict[str, Any] | EnvSpec) -> tuple[EnvSpec, Any, Any]:
    """(EnvSpec, obs_mean, obs_std): from dataset metadata (its statistics when it has them) or an EnvSpec with
    statistics computed from `data`."""
    spec = meta if isinstance(meta, EnvSpec) else EnvSpec.from_metadata(meta)
    stats = {} if isinstance(meta, EnvSpec) else meta
    if data.observations.dim() != 2 or data.observations.shape[1] != spec.obs_dim:
        raise DataError(f"observations of shape {tuple(data.observations.shape)} do not match the metadata's "
                        f"observation size {spec.obs_dim}: pass the Batch loaded from the same dataset")
    obs = data.observations.float()
    mean = stats.get("obs_mean") if stats.get("obs_mean") is not None else obs.mean(0)
    std = stats.get("obs_std") if stats.get("obs_std") is not None else obs.std(0)
    return spec, mean, std


def train(algorithm: Algorithm, data: Batch, steps: int, batch_size: int,
          schedule: str = "cosine") -> dict[str, list[float]]:
    """Run the learner (the project's one training loop) for `steps` updates of every member; `schedule`
    'cosine' decays every group's learning rate to 0 over the run, 'constant' keeps it. Returns the metrics of
    the last (at most 100) steps."""
    from ..learner.loop import Learner

    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if schedule not in ("cosine", "constant"):
        raise ConfigError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    fns = {}
    if schedule == "cosine":
        fns = {g: (lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps)))
               for g in algorithm.optim_groups()}
    learner = Learner(algorithm, data.to(algorithm.device), batch_size, schedules=fns)
    learner.set_learning_rates()
    tail = max(1, steps - 100)
    for t in range(1, steps + 1):
        if t == tail:
            learner.pop_metrics()
        learner.step(t)
    return learner.pop_metrics()


def fit_behavior(data: Batch, meta: dict[str, Any] | EnvSpec, steps: int, batch_size: int = 256,
                 seeds: Sequence[int] = (0,), config: BehaviorConfig | None = None,
                 device: torch.device | str | None = None, schedule: str = "cosine") -> FittedBehavior:
    """Fit pi_b on `data` (a Batch of N transitions, dataset units) with one member per seed; `meta` is the
    dataset's metadata (or an EnvSpec: observation statistics then come from `data`). See `default_steps`."""
    spec, mean, std = spec_and_stats(data, meta)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = BehaviorModel(spec, config or BehaviorConfig(), list(seeds), device=device, obs_mean=mean, obs_std=std)
    metrics = train(model, data, steps, batch_size, schedule)
    return FittedBehavior(model, metrics=metrics)


@torch.no_grad()
def held_out_nll(behavior: FittedBehavior | BehaviorModel, data: Batch, chunk: int = 65_536) -> torch.Tensor:
    """Mean negative log-likelihood per member, (K,) on the CPU, of `data`'s (s, a) (dataset units; actions
    normalized as in training, so continuous NLLs are in nats of the normalized space)."""
    model = behavior.model if isinstance(behavior, FittedBehavior) else behavior
    total = torch.zeros(model.K, dtype=torch.float64)
    n = int(data.rewards.shape[0])
    if n == 0:
        raise DataError("held_out_nll: no transitions to score")
    for i in range(0, n, chunk):
        obs = data.observations[i:i + chunk].to(model.device, torch.float32)
        act = data.actions[i:i + chunk].to(model.device)
        obs = model.norm_obs(obs.unsqueeze(0).expand(model.K, *obs.shape))
        act = act.unsqueeze(0).expand(model.K, *act.shape)
        act = act if model.spec.discrete else model.norm_actions(act.float())
        total += -model.log_prob(obs, act).double().sum(1).cpu()
    return total / n
