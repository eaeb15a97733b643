"""Off-policy evaluation: the importance-sampling family, with bootstrap intervals over episodes.

The value estimated is a target policy pi_e's expected discounted return from the logged episodes' start states,
V(pi_e) = E[sum_t gamma^t r_t], from N episodes logged by a behavior policy pi_b. Per episode i and step t,
rho_{i,t} = pi_e(a_t | s_t) / pi_b(a_t | s_t) and w_{i,t} = prod_{t' <= t} rho_{i,t'} (w_i = w_{i,T_i - 1}):

    IS      (1/N) sum_i w_i G_i                      G_i = sum_t gamma^t r_{i,t}; unbiased, high variance
    WIS     sum_i w_i G_i / sum_i w_i                 self-normalized: biased (O(1/N)), consistent, far steadier
    PDIS    (1/N) sum_i sum_t gamma^t w_{i,t} r_{i,t}   per-decision: a reward is weighted only by what came before
    PDWIS   sum_t gamma^t sum_i w_{i,t} r_{i,t} / sum_i w_{i,t}   per-decision, self-normalized per step
    DR      (1/N) sum_i D_{i,0},  D_{i,t} = v(s_t) + rho_{i,t} (r_t + gamma D_{i,t+1} - q(s_t, a_t))
            with a model q(s, a) of pi_e's action values and v(s) = E_{a ~ pi_e} q(s, a) (Jiang & Li 2016):
            unbiased for any model, and the better the model the smaller the variance.

Episodes end where their data ends: past its end an episode sits in an absorbing state with reward 0 and ratio
1, so episodes of different lengths mix (its weight stays in PDWIS's per-step normalizer: normalizing over the
episodes still running would drop the chance of still running and overstate later rewards).

Each estimate comes with a percentile bootstrap interval over episodes (resampled with replacement, `bootstrap`
times, seeded) and the effective sample size of the episode weights, ESS = (sum_i w_i)^2 / sum_i w_i^2 (N when
pi_e = pi_b; a handful when a few episodes carry all the weight). An estimate whose ESS is below `min_ess`
carries a warning.

Pure numpy on the logged numbers (rewards and both policies' probabilities of the logged actions, and for DR the
model's q and v); where those numbers come from (logged probabilities, a fitted behavior model, FQE) is the
caller's. Sources: Precup, Sutton & Singh 2000 (IS, PDIS, WIS); Jiang & Li 2016 (DR); Kish's effective sample
size.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

ESTIMATORS = ("is", "wis", "pdis", "pdwis", "dr")


@dataclass(frozen=True)
class Episodes:
    """N logged episodes padded to T steps: (N, T) arrays; `mask` marks the steps that exist."""

    rewards: np.ndarray
    target_prob: np.ndarray
    """pi_e(a_t | s_t) of the logged action (for a deterministic target: 1 where it picks the logged action)."""
    behavior_prob: np.ndarray
    """pi_b(a_t | s_t) of the logged action (logged, or from a fitted behavior model)."""
    mask: np.ndarray
    q: np.ndarray | None = None
    """DR's model: q(s_t, a_t) under pi_e."""
    v: np.ndarray | None = None
    """DR's model: v(s_t) = E_{a ~ pi_e} q(s_t, a)."""

    @staticmethod
    def from_lists(rewards: Sequence[Sequence[float]], target_prob: Sequence[Sequence[float]],
                   behavior_prob: Sequence[Sequence[float]], q: Sequence[Sequence[float]] | None = None,
                   v: Sequence[Sequence[float]] | None = None) -> "Episodes":
        """From one sequence per episode (ragged)."""
        n, t = len(rewards), max((len(r) for r in rewards), default=0)

        def pad(rows, fill=0.0):
            out = np.full((n, t), fill, dtype=np.float64)
            for i, row in enumerate(rows):
                out[i, :len(row)] = np.asarray(row, dtype=np.float64)
            return out
        mask = np.zeros((n, t), dtype=bool)
        for i, r in enumerate(rewards):
            mask[i, :len(r)] = True
        return Episodes(pad(rewards), pad(target_prob, 1.0), pad(behavior_prob, 1.0), mask,
                        pad(q) if q is not None else None, pad(v) if v is not None else None)

    def take(self, idx: np.ndarray) -> "Episodes":
        """Episodes `idx` (a bootstrap resample)."""
        sub = {k: (None if v is None else v[idx]) for k, v in vars(self).items()}
        return Episodes(**sub)

    def check(self) -> None:
        if self.rewards.shape[0] == 0:
            raise ValueError("no episodes to evaluate on")
        b = self.behavior_prob[self.mask]
        if np.any(~np.isfinite(b)) or np.any(b <= 0):
            raise ValueError("behavior probabilities must be positive where actions were logged (a logged action "
                             "the behavior policy could not take: check the behavior model or the logged "
                             "probabilities)")
        e = self.target_prob[self.mask]
        if np.any(~np.isfinite(e)) or np.any(e < 0):
            raise ValueError("target probabilities must be finite and >= 0")


@dataclass(frozen=True)
class Estimate:
    estimator: str
    value: float
    low: float
    """Bootstrap interval's lower end (level `level`)."""
    high: float
    level: float
    episodes: int
    ess: float | None = None
    """Effective sample size of the episode weights (IS family)."""
    warning: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _ratios(ep: Episodes, scaled: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(rho (N, T), cumulative w (N, T)); steps past an episode's end have rho = 1 (w carries over).

    The products are taken in log space. scaled=True divides each step's column of w by its largest entry: the
    self-normalized estimators (WIS, PDWIS) and the ESS do not change, and long episodes of densities (a product
    of hundreds of ratios of 10 or 0.1) stay finite."""
    with np.errstate(divide="ignore"):
        log_rho = np.where(ep.mask, np.log(ep.target_prob) - np.log(ep.behavior_prob), 0.0)
    log_w = np.cumsum(log_rho, axis=1)
    if scaled and log_w.size:
        top = log_w.max(0, keepdims=True)
        log_w = log_w - np.where(np.isfinite(top), top, 0.0)
    return np.exp(log_rho), np.exp(log_w)


def _discounts(ep: Episodes, gamma: float) -> np.ndarray:
    return gamma ** np.arange(ep.rewards.shape[1], dtype=np.float64)


def _final_weights(ep: Episodes, scaled: bool = False) -> np.ndarray:
    _, w = _ratios(ep, scaled)
    return w[:, -1] if w.shape[1] else np.ones(w.shape[0])


def importance_sampling(ep: Episodes, gamma: float) -> float:
    g = (ep.rewards * ep.mask * _discounts(ep, gamma)).sum(1)
    return float(np.mean(_final_weights(ep) * g))


def weighted_is(ep: Episodes, gamma: float) -> float:
    g = (ep.rewards * ep.mask * _discounts(ep, gamma)).sum(1)
    w = _final_weights(ep, scaled=True)
    total = w.sum()
    return float((w * g).sum() / total) if total > 0 else float("nan")


def per_decision_is(ep: Episodes, gamma: float) -> float:
    _, w = _ratios(ep)
    return float(np.mean((w * ep.rewards * ep.mask * _discounts(ep, gamma)).sum(1)))


def per_decision_wis(ep: Episodes, gamma: float) -> float:
    _, w = _ratios(ep, scaled=True)
    norm = w.sum(0)  # (T,) over all episodes: one that ended sits in an absorbing state (reward 0, ratio 1)
    per_step = np.divide((w * ep.mask * ep.rewards).sum(0), norm, out=np.zeros_like(norm), where=norm > 0)
    return float((per_step * _discounts(ep, gamma)).sum())


def doubly_robust(ep: Episodes, gamma: float) -> float:
    if ep.q is None or ep.v is None:
        raise ValueError("doubly robust needs a model of the target policy's values (q and v), e.g. from FQE")
    rho, _ = _ratios(ep)
    n, t = ep.rewards.shape
    d = np.zeros(n)
    for s in range(t - 1, -1, -1):  # D_t = v + rho (r + gamma D_{t+1} - q), 0 past the end
        here = ep.v[:, s] + rho[:, s] * (ep.rewards[:, s] + gamma * d - ep.q[:, s])
        d = np.where(ep.mask[:, s], here, 0.0)
    return float(d.mean())


_FUNCS: dict[str, Callable[[Episodes, float], float]] = {
    "is": importance_sampling, "wis": weighted_is, "pdis": per_decision_is, "pdwis": per_decision_wis,
    "dr": doubly_robust}


def effective_sample_size(ep: Episodes) -> float:
    w = _final_weights(ep, scaled=True)
    s2 = float((w ** 2).sum())
    return float(w.sum()) ** 2 / s2 if s2 > 0 else 0.0


def percentile_interval(draws: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` interval of bootstrap draws (non-finite draws left out; NaNs when none is left)."""
    draws = draws[np.isfinite(draws)]
    alpha = (1.0 - level) / 2
    if not draws.size:
        return float("nan"), float("nan")
    return float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha))


def estimate(name: str, ep: Episodes, gamma: float, bootstrap: int = 1000, level: float = 0.95, seed: int = 0,
             min_ess: float = 10.0) -> Estimate:
    """Estimator `name` (one of ESTIMATORS) with its bootstrap interval over episodes, and for the IS family the
    effective sample size and a warning when it is below `min_ess`."""
    if name not in _FUNCS:
        raise ValueError(f"unknown estimator {name!r}; estimators: {', '.join(ESTIMATORS)}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    ep.check()
    fn = _FUNCS[name]
    value = fn(ep, gamma)
    n = ep.rewards.shape[0]
    rng = np.random.default_rng(seed)
    draws = np.array([fn(ep.take(rng.integers(0, n, n)), gamma) for _ in range(bootstrap)])
    low, high = percentile_interval(draws, level)
    ess = effective_sample_size(ep)
    warning = None
    if ess < min_ess:
        warning = (f"effective sample size {ess:.1f} of {n} episodes (< {min_ess:g}): the target policy rarely takes "
                   f"the logged actions, so a few episodes carry the estimate; do not trust it")
    return Estimate(name, value, low, high, level, n, ess, warning)
