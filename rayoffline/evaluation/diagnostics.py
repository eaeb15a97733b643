"""Training diagnostics: how a run's critics and policy look on whole logged episodes, and flags for runs that
have gone wrong.

At every online-evaluation point (run key `eval_every`, and the last step; also when `eval_episodes` is 0) the
learner scores its K members on a fixed set of episodes: the dataset's held-out episodes when it has a split
(`rayoffline data split`), else up to `diagnostics_episodes` training episodes chosen by the run seed. The rows
are loaded once per run. Q is learned on the learner's transformed rewards r' = scale * r + bias (run key
`reward_scale`), so every return below is a return of r'. Per member k, with discount gamma_k, the rows' logged
(s, a, r', s', term), the member's deterministic policy pi (`Algorithm.policy`) and its C critics Q_c
(`Algorithm.critic_values`; Q = min_c Q_c, as the TD targets use):

    G(s_t)                 = sum_{i >= t} gamma^(i - t) r'_i          discounted return-to-go to the episode's end
    diag/q_data            = mean_rows Q(s, a)
    diag/mc_return         = mean_mc G(s)                              mc: rows whose return covers the horizon
    diag/overestimation    = (mean_mc Q(s, a) - mean_mc G(s)) / (std_mc G + 1e-6)
    diag/td_error          = mean_rows |Q(s, a) - (r' + gamma (1 - term) Q(s', pi(s')))|
    diag/action_distance   = mean_rows ||pi(s) - a||_2 in the normalized action space [-1, 1]^d
                             (discrete: the fraction of rows whose greedy action differs from the logged one)
    diag/q_spread          = std_rows Q(s, a) / std_rows G(s)          (1: Q varies across states as returns do)
    diag/critic_disagreement = mean_rows |Q_1 - Q_2|                   (twin critics only)
    diag/member_disagreement = mean_rows std_k Q_k(s, a)               (K > 1 only; one value, logged per member)
    diag/behavior_nll      = mean_rows -log beta(pi(s)|s) - mean_rows -log beta(a|s)   (`diagnostics: full`)

`overestimation` is in units of the spread of the returns, so it compares across reward scales and tasks: 0 is
an unbiased critic, +1 a critic one standard deviation of the returns too optimistic. The `mc` rows: a truncated
episode's return-to-go stops where the data stops while Q bootstraps past it, so the comparison keeps the rows
whose unobserved discount mass gamma^(rows left) is at most 0.2 (every row of an episode that terminated); when
fewer than 10 rows (or 1%) qualify (long horizons), the quarter of the rows with the most horizon left.
beta is a behavior model fitted on the training data (rayoffline/evaluation/behavior.py; `diagnostics: full`
fits one per run, `default_steps` updates, before the first pass).

Flags (each `{"flag", "member", "step", "last_step", "message"}`, reported once per (flag, member) at the first
diagnostic pass where it holds; `last_step` is the last pass where it held):
- `q_overestimation`: mean_rows Q(s, a) > U + 1.0 * std_rows G, with U = max(G_max, r'_max / (1 - gamma)): the
  largest return-to-go of any row, or the discounted value of the data's largest reward forever, whichever is
  larger, so that no policy's true Q exceeds U when the data's rewards bound the task's (Pendulum: U ~ 0). A
  healthy critic averages below U (it values the logged actions, not the best ones); a full standard deviation
  of the returns above it is divergence. Measured (tests/evaluation/test_diagnostics.py; README): IQL on
  builtin:pendulum-medium stays far below; CQL with cql_alpha 0 (off-policy SAC-style Q-learning) on the narrow
  builtin:pendulum-expert diverges past the bound within 1000 updates for 2 of 3 seeds.
- `negative_q`: at least 90% of the rows' returns are positive but at least 99% of the Q(s, a) are negative,
  and mean Q < -0.1 * mean G (so a network near its initial output near 0 is not flagged).
- `collapsed_q`: std_rows Q < 0.05 std_rows G (Q nearly constant across states while the returns vary), and
  |mean Q| > 0.1 * rms G (Q has moved to the returns' scale: an untrained network is nearly constant too).
- `out_of_support`: the policy's actions are far from the data: action distance > 3 x the reference distance
  and > 0.5 sqrt(d), an RMS of a quarter of the action range per dimension (discrete: mismatch > 3 x the
  reference and > 0.5). The floor keeps an untrained policy (actions near 0) from tripping it on narrow data:
  builtin:pendulum-expert's actions are at mean |a| 0.20, its reference 0.097. The reference is what the logged
  actions of nearby states show: for each row (up to 2048, evenly spaced), the logged action of the row with the
  nearest normalized observation in another episode, its distance to the row's action (discrete: whether it
  differs); with a single episode it is undefined and the flag is not judged. With a behavior model
  (`diagnostics: full`) also: behavior_nll > 2 nats per action dimension (pi(s) on average e^2 = 7.4 times less
  likely under beta than the logged action, per dimension) with the action distance above the same floor; the
  floor matters there too: on narrow data beta is sharp (TD3+BC after 500 updates on builtin:pendulum-expert, at
  action distance 0.19 from the data, reads 9 nats).

Sources: comparing Q(s, a) with Monte-Carlo returns is the overestimation measure of Fujimoto, van Hoof & Meger,
"Addressing Function Approximation Error in Actor-Critic Methods" (TD3, ICML 2018) and of Chen et al.'s REDQ
(ICLR 2021, normalized by the return's magnitude there); Kumar et al., "A Workflow for Offline Model-Free Robotic
Reinforcement Learning" (CoRL 2021) flag overfitting and underfitting of offline critics from the trend of the
dataset Q values and TD error; policy-to-data distance as a support measure follows Fujimoto et al.'s BCQ
(ICML 2019). The thresholds are this project's, set on the measurements above.

**Deviations**
- The reference workflow tracks trends over training; these flags judge each pass on its own (a flag reports
  the first pass where it holds), so a single diverged pass is enough.
- REDQ normalizes the bias by |mean MC return|; here by the returns' standard deviation, which stays defined
  when the mean return is near 0 (e.g. Pendulum near upright).
- Policies are deterministic (`Algorithm.policy`): the Gaussian policies' means, BCQ's fixed-latent choice.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from ..data.holdout import EpisodeRows, discounted_to_go, held_out_ids, load_episodes

MODES = ("off", "basic", "full")
TAIL_MAX = 0.2
"""mc rows: unobserved discount mass gamma^(rows left) at most this."""
OVER_STDS = 1.0
"""q_overestimation: mean Q above the largest possible return by more than this many std of the returns-to-go."""
NEG_RETURNS, NEG_Q, NEG_SCALE = 0.9, 0.99, 0.1
COLLAPSE_RATIO, COLLAPSE_SCALE = 0.05, 0.1
SUPPORT_RATIO, SUPPORT_FLOOR, SUPPORT_FLOOR_DISCRETE = 3.0, 0.5, 0.5
BEHAVIOR_NATS = 2.0
"""out_of_support with a behavior model: excess NLL per action dimension."""
REFERENCE_ROWS = 2048
CHUNK = 8192


def load_rows(path: Any, meta: dict[str, Any], max_episodes: int, seed: int = 0,
              device: torch.device | str = "cpu") -> tuple[EpisodeRows, str]:
    """(the episodes the diagnostics score, 'holdout' or 'train sample'): the held-out episodes when the dataset
    has a split (at most `max_episodes`, chosen by `seed`), else up to `max_episodes` training episodes."""
    part = "holdout" if held_out_ids(meta) is not None else "train"
    rows = load_episodes(path, part=part, device=device, max_episodes=max_episodes, seed=seed)
    return rows, "holdout" if part == "holdout" else "train sample"


def support_reference(obs: torch.Tensor, actions: torch.Tensor, episode_id: np.ndarray, discrete: bool) -> float:
    """out_of_support's reference: for up to REFERENCE_ROWS evenly spaced rows, the distance between the row's
    logged action and the logged action of the row with the nearest (normalized) observation in another episode
    (discrete: whether they differ), averaged; nan with fewer than two episodes. obs (N, obs), actions (N, act)
    normalized or (N,) int64, on one device."""
    if len(np.unique(episode_id)) < 2:
        return math.nan
    n = int(obs.shape[0])
    ep = torch.as_tensor(episode_id, device=obs.device)
    query = torch.linspace(0, n - 1, min(n, REFERENCE_ROWS), device=obs.device).round().long()
    dists = []
    for q in query.split(512):
        d = torch.cdist(obs[q], obs)                                             # (q, N)
        d = d.masked_fill(ep[q][:, None] == ep[None, :], math.inf)
        nearest = d.argmin(1)
        if discrete:
            dists.append((actions[nearest] != actions[q]).float())
        else:
            dists.append((actions[nearest] - actions[q]).norm(dim=-1))
    return float(torch.cat(dists).mean())


def support_floor(discrete: bool, action_dim: int) -> float:
    """out_of_support's floor on the action distance (module docstring)."""
    return SUPPORT_FLOOR_DISCRETE if discrete else SUPPORT_FLOOR * math.sqrt(action_dim)


def off_support(distance: float, reference: float, discrete: bool, action_dim: int) -> bool:
    """out_of_support's test on a mean action distance (module docstring)."""
    return (math.isfinite(reference) and distance > SUPPORT_RATIO * reference
            and distance > support_floor(discrete, action_dim))


class Diagnostics:
    """The diagnostics of one run (K members) on fixed episode rows; `measure` computes a pass, `check` turns it
    into flags (each once per (flag, member)), `summary` is what result.json records."""

    def __init__(self, algorithm, rows: EpisodeRows, source: str, reward: tuple[float, float] = (1.0, 0.0),
                 behavior: Any = None, warn: Callable[[str], None] | None = None) -> None:
        self.K = algorithm.K
        self.discrete = algorithm.spec.discrete
        self.action_dim = 1 if self.discrete else algorithm.spec.action_dim
        self.source, self.behavior, self.warn = source, behavior, warn
        self.reward = (float(reward[0]), float(reward[1]))
        dev = algorithm.device
        b = rows.batch
        self.n = int(b.rewards.shape[0])
        self.obs = b.observations.to(dev, torch.float32)                         # (N, obs) raw
        self.next_obs = b.next_observations.to(dev, torch.float32)
        self.actions = b.actions.to(dev) if self.discrete else algorithm.norm_actions(b.actions.to(dev).float())
        scale, bias = self.reward
        r = b.rewards.detach().cpu().double().numpy() * scale + bias            # (N,) transformed rewards
        self.rewards = torch.as_tensor(r, dtype=torch.float32, device=dev)
        self.terms = b.terminations.to(dev, torch.float32)
        gammas = [float(g) for g in algorithm.coef("discount").tolist()]
        self.gamma = torch.tensor(gammas, dtype=torch.float32, device=dev)     # (K,)
        ends = rows.starts + rows.lengths - 1
        terminated = b.terminations.detach().cpu().numpy()[ends] > 0.5          # (E,)
        left = (np.repeat(ends, rows.lengths) - np.arange(self.n) + 1).astype(np.float64)  # rows left, incl. this
        done = np.repeat(terminated, rows.lengths)
        cache: dict[float, tuple[np.ndarray, np.ndarray]] = {}
        g_rows, masks = [], []
        for g in gammas:
            if g not in cache:
                to_go = discounted_to_go(r, rows.starts, rows.lengths, g)
                tail = np.where(done, 0.0, g ** left)
                mask = tail <= TAIL_MAX
                if mask.sum() < max(10, 0.01 * self.n):
                    mask = tail <= np.quantile(tail, 0.25)
                cache[g] = (to_go, mask)
            g_rows.append(cache[g][0])
            masks.append(cache[g][1])
        self.returns = np.stack(g_rows)                                          # (K, N) float64
        r_max = float(r.max())
        self.upper = [max(float(self.returns[j].max()), r_max / (1.0 - gammas[j])) for j in range(self.K)]
        self.mc = np.stack(masks)                                                # (K, N) bool
        self.reference = self._reference(algorithm, rows)
        self.flags: list[dict[str, Any]] = []
        self._seen: dict[tuple[str, int], dict[str, Any]] = {}
        self.last: dict[str, list[float]] = {}
        self.last_step: int | None = None

    # ----- the data-only reference of out_of_support ----------------------------------------------------
    def _reference(self, algorithm, rows: EpisodeRows) -> float:
        """Mean distance between a row's logged action and that of the nearest state in another episode."""
        return support_reference(algorithm.norm_obs(self.obs), self.actions, rows.episode_id, self.discrete)

    # ----- one pass -----------------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self, algorithm) -> dict[str, list[float]]:
        """One pass of the diagnostics for the algorithm's current weights: name -> per-member list. Leaves
        the algorithm's random streams (and torch's global one) as it found them."""
        saved = algorithm.rng.get_state()
        devices = [algorithm.device] if algorithm.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                return self._measure(algorithm)
        finally:
            algorithm.rng.set_state(saved)

    def _expand(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(0).expand(self.K, *x.shape)

    def _measure(self, algorithm) -> dict[str, list[float]]:
        k = self.K
        qs, q_next, dist, beh = [], [], [], []
        has_critic = True
        for i in range(0, self.n, CHUNK):
            sl = slice(i, i + CHUNK)
            obs = algorithm.norm_obs(self._expand(self.obs[sl]))                 # (K, b, obs)
            act = self._expand(self.actions[sl])                                 # (K, b, act) or (K, b)
            pi = algorithm.policy(obs)
            if self.discrete:
                dist.append((pi != act).float())                                # (K, b)
            else:
                dist.append((pi - act).norm(dim=-1))                             # (K, b)
            if self.behavior is not None:
                raw = self._expand(self.obs[sl])
                beh.append(self.behavior.log_prob(raw, act) - self.behavior.log_prob(raw, pi))  # (K, b)
            q = algorithm.critic_values(obs, act)
            if q is None:
                has_critic = False
                continue
            qs.append(q.float())                                                 # (K, C, b)
            nxt = algorithm.norm_obs(self._expand(self.next_obs[sl]))
            q_next.append(algorithm.critic_values(nxt, algorithm.policy(nxt)).float().amin(1))  # (K, b)
        out: dict[str, list[float]] = {}
        d = torch.cat(dist, dim=1)
        out["diag/action_distance"] = d.mean(1).tolist()
        if beh:
            out["diag/behavior_nll"] = torch.cat(beh, dim=1).double().mean(1).tolist()
        if has_critic:
            q_all = torch.cat(qs, dim=2)                                         # (K, C, N)
            q = q_all.amin(1)                                                    # (K, N)
            target = self.rewards + self.gamma[:, None] * (1.0 - self.terms) * torch.cat(q_next, dim=1)
            qn = q.double().cpu().numpy()                                        # (K, N)
            g = self.returns
            mc = self.mc
            q_mc = np.array([qn[j][mc[j]].mean() for j in range(k)])
            g_mc = np.array([g[j][mc[j]].mean() for j in range(k)])
            g_std = np.array([g[j][mc[j]].std() for j in range(k)])
            out["diag/q_data"] = qn.mean(1).tolist()
            out["diag/mc_return"] = g_mc.tolist()
            out["diag/overestimation"] = ((q_mc - g_mc) / (g_std + 1e-6)).tolist()
            out["diag/td_error"] = (q - target).abs().double().mean(1).tolist()
            out["diag/q_spread"] = (qn.std(1) / (g.std(1) + 1e-12)).tolist()
            if q_all.shape[1] == 2:
                out["diag/critic_disagreement"] = (q_all[:, 0] - q_all[:, 1]).abs().double().mean(1).tolist()
            if k > 1:
                out["diag/member_disagreement"] = [float(q.double().std(0, unbiased=False).mean())] * k
            self._q = qn
        else:
            self._q = None
        return out

    # ----- flags --------------------------------------------------------------------------------------
    def check(self, metrics: dict[str, list[float]], step: int) -> list[dict[str, Any]]:
        """The flags that hold for the pass `metrics` (from `measure` just before) at `step`; new ones (not yet
        reported for that member) are returned, passed to `warn` and kept for `summary`."""
        held: list[tuple[str, int, str]] = []
        q = self._q
        for j in range(self.K):
            g = self.returns[j]
            if q is not None:
                qj = q[j]
                top = self.upper[j]
                if qj.mean() > top + OVER_STDS * g.std():
                    held.append(("q_overestimation", j,
                                 f"mean Q(s, a) {qj.mean():.4g} on the {self.source} rows is above the largest "
                                 f"possible return {top:.4g} by more than {OVER_STDS:g} std of the returns-to-go "
                                 f"({g.std():.4g}): the critic is diverging (extrapolation error)"))
                if ((g > 0).mean() >= NEG_RETURNS and (qj < 0).mean() >= NEG_Q
                        and qj.mean() < -NEG_SCALE * g.mean()):
                    held.append(("negative_q", j,
                                 f"{100 * (qj < 0).mean():.0f}% of Q(s, a) are negative (mean {qj.mean():.4g}) "
                                 f"while {100 * (g > 0).mean():.0f}% of the returns-to-go are positive (mean "
                                 f"{g.mean():.4g}): check reward_scale (bias) and the penalty weight"))
                g_std, rms = float(g.std()), float(np.sqrt(np.mean(g ** 2)))
                if g_std > 0 and qj.std() < COLLAPSE_RATIO * g_std and abs(qj.mean()) > COLLAPSE_SCALE * rms:
                    held.append(("collapsed_q", j,
                                 f"Q(s, a) is nearly constant across states (std {qj.std():.4g}, mean "
                                 f"{qj.mean():.4g}) while the returns-to-go vary (std {g_std:.4g})"))
            ref = self.reference
            dist = metrics["diag/action_distance"][j]
            floor = support_floor(self.discrete, self.action_dim)
            if off_support(dist, ref, self.discrete, self.action_dim):
                what = "the greedy action differs from the logged one on" if self.discrete else \
                    "the policy's action is at mean distance"
                held.append(("out_of_support", j,
                             f"{what} {dist:.3g}{' of the rows' if self.discrete else ''} against {ref:.3g} "
                             f"between logged actions of nearby states in other episodes: the policy acts "
                             f"outside the data's support"))
            nll = metrics.get("diag/behavior_nll")
            if nll is not None and nll[j] > BEHAVIOR_NATS * self.action_dim and dist > floor:
                held.append(("out_of_support", j,
                             f"the policy's actions are {nll[j]:.3g} nats less likely under the fitted behavior "
                             f"model than the logged actions (threshold {BEHAVIOR_NATS * self.action_dim:g})"))
        new = []
        for name, j, message in held:
            key = (name, j)
            if key in self._seen:
                self._seen[key]["last_step"] = step
                continue
            entry = {"flag": name, "member": j, "step": step, "last_step": step, "message": message}
            self._seen[key] = entry
            self.flags.append(entry)
            new.append(entry)
            if self.warn is not None:
                who = f"member {j}: " if self.K > 1 else ""
                self.warn(f"rayoffline: warning: step {step}: {who}{name}: {message}")
        self.last, self.last_step = metrics, step
        return new

    def run(self, algorithm, step: int) -> dict[str, list[float]]:
        """measure + check: the pass's metrics (what the logger writes)."""
        metrics = self.measure(algorithm)
        self.check(metrics, step)
        return metrics

    def summary(self) -> dict[str, Any]:
        """result.json's `diagnostics` entry: where the rows came from, the flags, the bound q_overestimation
        compares mean Q with (per member), the out_of_support reference and the last pass's metrics."""
        return {"rows": self.source, "num_rows": self.n, "step": self.last_step, "flags": list(self.flags),
                "q_bound": [self.upper[j] + OVER_STDS * float(self.returns[j].std()) for j in range(self.K)],
                "reference_action_distance": None if math.isnan(self.reference) else self.reference,
                "last": dict(self.last)}
