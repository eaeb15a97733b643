"""Off-policy evaluation of trained runs on their dataset's held-out episodes: `rayoffline ope RUN_DIR`.

What is estimated, for each member k of a run (a deterministic policy mu_k): its expected discounted return over
the held-out episodes' horizon, from their start states, with the run's discount gamma: episodes end where the
logged ones end (at a termination, or at the truncation after T steps), so every estimator targets one number:

  fqe    FQE (fqe.py) trained on every transition of the dataset (training and held-out: FQE fits the target
         policy's Q, not the policy, and more data helps it), then per held-out episode
         V(s_0) - gamma^T V(s_T) (the tail past a truncated episode's last step, which FQE's infinite-horizon
         value includes, is taken off with the episode's own final state: exact for the behavior policy's
         episodes, an approximation for others); interval: bootstrap over episodes (the FQE fit's own variance
         is not in it).
  is, pdis   need the behavior policy's logged action probabilities (plain IS is unbiased only with the true
         pi_b): a dataset with the `action_logp` column (data/schema.py) in every partition; on any other these
         refuse with a message naming what applies.
  wis, pdwis  importance sampling, self-normalized (a misfit scale cancels), with the logged probabilities when the
         dataset has them, else a fitted behavior model (behavior.py; trained on the training episodes, so the
         held-out ones are new to it). ope.json's models.behavior.source says which: "logged" or "fitted".
  dr     doubly robust with that behavior policy and FQE as the model (q, v per step, tail-corrected as fqe).
  mb     model-based (model_based.py): an ensemble of dynamics and reward models trained on every transition,
         rolled out from the held-out start states for each episode's horizon; its interval is the range over the
         ensemble's models and its disagreement (std over models) is reported.

Logged log-densities of continuous actions are densities of the dataset's actions in their own units; the target
policies' are in the normalized space [-1, 1] (policies.py), so the logged ones are moved there with the Jacobian of
the map: log pi_b(a_norm) = log pi_b(a) + sum_j log((high_j - low_j) / 2), from the dataset's action space.

Continuous deterministic policies have no density: for the importance weights each mu_k(s) is smoothed into
N(mu_k(s), noise^2) per dimension of the normalized action space (`noise`, default 0.1; policies.LearnedPolicy);
discrete greedy policies into epsilon-greedy (`epsilon`, default 0: weights are 1/pi_b on agreement, else 0).

Fitted behavior and dynamics models depend on the dataset only: they are cached per process by (dataset content
hash, split, settings), so a run evaluated at every interval, or several runs of a sweep, fit them once.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .ope import ESTIMATORS as IS_FAMILY, Episodes, estimate, percentile_interval

ESTIMATORS = ("fqe",) + IS_FAMILY + ("mb",)
DEFAULT_ESTIMATORS = ("fqe", "wis", "pdwis", "dr", "mb")
NEEDS_LOGGED = ("is", "pdis")
RUN_ESTIMATORS = ("fqe", "is", "wis", "pdis", "pdwis", "dr", "mb")
"""What a run config may request at its eval points (run key `ope`; is and pdis on data with logged
probabilities only: check_run_ope)."""


@dataclass
class OPESettings:
    estimators: tuple[str, ...] = DEFAULT_ESTIMATORS
    fqe_steps: int = 20_000
    behavior_steps: int | None = None
    """None: behavior.default_steps for the data's size."""
    dynamics_steps: int = 10_000
    ensemble: int = 5
    batch_size: int = 256
    bootstrap: int = 200
    level: float = 0.95
    min_ess: float = 10.0
    noise: float = 0.1
    epsilon: float = 0.0
    gamma: float | None = None
    """None: the run's discount."""
    seed: int = 0
    fqe_seeds: tuple[int, ...] | None = None
    """FQE's seed per member (None: seed + k for member k)."""
    fqe: dict[str, Any] = field(default_factory=dict)
    """FQEConfig keys (hidden, lr, tau, target_period, ...) over its defaults."""


def parse_estimators(value: str | Sequence[str] | None, key: str = "--estimators") -> tuple[str, ...]:
    if value is None:
        return DEFAULT_ESTIMATORS
    names = [s.strip().lower() for s in (value.split(",") if isinstance(value, str) else value)]
    names = [n for n in names if n]
    if names == ["all"]:
        return ESTIMATORS
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown or not names:
        raise ConfigError(f"{key}: unknown estimator {unknown[0]!r} " if unknown else f"{key}: no estimator given "
                          + f"(estimators: {', '.join(ESTIMATORS)}, or all)")
    return tuple(dict.fromkeys(names))


def parse_members(value: str | Sequence[int] | None, k: int, key: str = "--members") -> list[int]:
    if value is None or value == "all":
        return list(range(k))
    try:
        picked = [int(x) for x in (value.split(",") if isinstance(value, str) else value)]
    except ValueError:
        raise ConfigError(f"{key}: expected 'all' or member indices like 0,2, got {value!r}") from None
    bad = [m for m in picked if not 0 <= m < k]
    if bad or not picked:
        raise ConfigError(f"{key}: member {bad[0] if bad else value!r} does not exist; the run has {k} member(s) "
                          f"(0..{k - 1})")
    return list(dict.fromkeys(picked))


_CACHE: dict[tuple, Any] = {}


def _cached(key: tuple, make: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        if len(_CACHE) > 8:
            _CACHE.clear()
        _CACHE[key] = make()
    return _CACHE[key]


def bootstrap_interval(values: np.ndarray, bootstrap: int, level: float, seed: int) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap over entries (episodes) of their mean."""
    n = len(values)
    rng = np.random.default_rng(seed)
    draws = values[rng.integers(0, n, (bootstrap, n))].mean(1) if bootstrap > 0 else np.array([values.mean()])
    return (float(values.mean()), *percentile_interval(draws, level))


def _chunks(n: int, size: int = 32_768):
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


@torch.no_grad()
def _rows(fn: Callable[[slice], torch.Tensor], n: int) -> np.ndarray:
    """(K, n) float64 of fn over row chunks."""
    return torch.cat([fn(sl).double().cpu() for sl in _chunks(n)], dim=1).numpy()


def _normalized_density_shift(meta: dict[str, Any], data_dir: Any) -> float:
    """What to add to a logged log-density of a dataset action to get the density of that action in the policies'
    normalized space [-1, 1]: sum_j log((high_j - low_j) / 2) (module docstring); 0 for discrete actions."""
    space = meta["action_space"]
    if space.get("type") == "Discrete":
        return 0.0
    width = np.asarray(space["high"], np.float64) - np.asarray(space["low"], np.float64)
    if not (np.isfinite(width).all() and (width > 0).all()):
        raise DataError(f"{data_dir}: its action space {space} is unbounded, so logged action densities cannot be "
                        f"mapped into the normalized action space; give the dataset finite action bounds")
    return float(np.log(width / 2.0).sum())


def estimate_policy(policy, norm_actions: Callable[[torch.Tensor], torch.Tensor], data_dir: str, meta: dict[str, Any],
                    gamma: float, settings: OPESettings, device: torch.device,
                    say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Every estimator of `settings` for the K members of `policy` (a TargetPolicy) on `data_dir`'s held-out
    episodes. norm_actions maps the dataset's actions into the policy's normalized space. Returns
    {"holdout": {...}, "estimates": {name: [per member {value, low, high, ess, warning}]}, "models": {...}}."""
    from ..data import load
    from ..data.holdout import held_out_ids, load_episodes, no_split_message
    from ..data.metadata import has_action_logp

    names = settings.estimators
    logged = [n for n in names if n in NEEDS_LOGGED]
    if logged and not has_action_logp(meta):
        raise ConfigError(f"estimator {logged[0]!r} (plain importance sampling) needs the behavior policy's logged "
                          f"action probabilities, and {data_dir} has none; wis, pdwis and dr apply with a behavior "
                          f"model fitted to the data (--estimators wis,pdwis,dr). To use logged probabilities, "
                          f"convert data whose every partition has them: an `action_logp` column (RLlib recordings "
                          f"carry one), or map one with --map action_logp=COLUMN (log-probabilities) or --map "
                          f"action_prob=COLUMN (probabilities)")
    if held_out_ids(meta) is None:
        raise DataError(no_split_message(data_dir))
    content = meta.get("content_hash")
    split_key = tuple(held_out_ids(meta).tolist())
    ep = _cached(("holdout", content, split_key, str(device)),  # a run's eval points reuse it
                 lambda: load_episodes(data_dir, "holdout", device=device))
    b = ep.batch
    n, k = len(ep.step), policy.K
    last = ep.starts + ep.lengths - 1
    truncated_tail = (b.terminations[torch.as_tensor(last)].cpu().numpy() == 0)   # (E,) episodes cut by a time limit
    horizon = ep.lengths.astype(np.float64)
    tail_discount = np.where(truncated_tail, gamma ** horizon, 0.0)                  # gamma^T for truncated episodes
    g0 = ep.returns_to_go(gamma)[ep.starts]
    mc, mc_low, mc_high = bootstrap_interval(g0, settings.bootstrap, settings.level, settings.seed)
    out: dict[str, Any] = {"holdout": {"episodes": int(ep.num_episodes), "transitions": n, "mc_return": mc,
                                       "mc_low": mc_low, "mc_high": mc_high, "gamma": gamma},
                           "estimates": {}, "models": {}}
    acts = norm_actions(b.actions.to(device))
    out["support"] = _support(policy, b, acts, ep.episode_id, meta)

    fqe = None
    if any(x in names for x in ("fqe", "dr")):
        from .fqe import FQEConfig, fit_fqe
        say(f"ope: fitting FQE for {k} policies, {settings.fqe_steps} steps")
        full = load(data_dir, part="all", device=device)
        fqe = fit_fqe(policy, full, meta, settings.fqe_steps, batch_size=settings.batch_size,
                      seeds=_fqe_seeds(settings, k),
                      config=FQEConfig(**{**settings.fqe, "discount": gamma}), device=device)
        del full
        v_all = _rows(lambda sl: fqe.value(b.observations[sl]), n)                   # (K, n)
        end_obs = b.next_observations[torch.as_tensor(last)]                          # (E, obs)
        v_end = _rows(lambda sl: fqe.value(end_obs[sl]), len(last))                    # (K, E)
        tail = tail_discount[None, :] * v_end                                          # (K, E)
        if "fqe" in names:
            per_ep = v_all[:, ep.starts] - tail                                        # (K, E)
            out["estimates"]["fqe"] = []
            for i in range(k):
                value, low, high = bootstrap_interval(per_ep[i], settings.bootstrap, settings.level, settings.seed)
                out["estimates"]["fqe"].append({"value": value, "low": low, "high": high, "ess": None,
                                                "warning": None})

    is_names = [x for x in names if x in IS_FAMILY]
    if is_names and ep.action_logp is not None:  # the logged behavior policy: nothing to fit
        logp_b = ep.action_logp.astype(np.float64) + _normalized_density_shift(meta, data_dir)    # (n,)
        out["models"]["behavior"] = {"source": "logged"}
    elif is_names:
        from .behavior import default_steps, fit_behavior, held_out_nll
        held = meta.get("holdout") or {}
        rows = int(meta["num_transitions"]) - int(held.get("num_transitions", 0))  # the training part's size
        steps = settings.behavior_steps or default_steps(rows, settings.batch_size)

        def fit():  # the training part is read only when no fitted model is cached
            say(f"ope: fitting the behavior model, {steps} steps")
            train = load(data_dir, part="train", device=device)
            return fit_behavior(train, meta, steps, batch_size=settings.batch_size, seeds=(settings.seed,),
                                device=device)
        behavior = _cached(("behavior", content, split_key, steps, settings.batch_size, settings.seed, str(device)),
                           fit)
        out["models"]["behavior"] = {"source": "fitted", "steps": steps,
                                     "held_out_nll": float(held_out_nll(behavior, b)[0])}
        logp_b = _rows(lambda sl: behavior.log_prob(b.observations[sl], acts[sl]), n)[0]       # (n,)
    if is_names:
        logp_e = _rows(lambda sl: policy.log_prob(b.observations[sl], acts[sl]), n)            # (K, n)
        rewards = b.rewards.double().cpu().numpy()
        q_rows = v_rows = None
        if "dr" in is_names and fqe is not None:
            q_rows = _rows(lambda sl: fqe.q(b.observations[sl], acts[sl]), n)                  # (K, n)
            # the tail correction at step t: gamma^(T - t) v(s_T) for truncated episodes
            to_end = (np.repeat(ep.lengths, ep.lengths) - ep.step).astype(np.float64)
            ep_of_row = np.repeat(np.arange(ep.num_episodes), ep.lengths)
            trunc_row = truncated_tail[ep_of_row]
            corr = np.where(trunc_row[None, :], gamma ** to_end[None, :] * v_end[:, ep_of_row], 0.0)
            q_rows, v_rows = q_rows - corr, v_all - corr
        for name in is_names:
            out["estimates"][name] = []
        for i in range(k):
            episodes = Episodes(rewards=ep.padded(rewards), target_prob=ep.padded(np.exp(logp_e[i]), 1.0),
                                behavior_prob=ep.padded(np.exp(logp_b), 1.0), mask=ep.mask(),
                                q=ep.padded(q_rows[i]) if q_rows is not None else None,
                                v=ep.padded(v_rows[i]) if v_rows is not None else None)
            for name in is_names:
                e = estimate(name, episodes, gamma, bootstrap=settings.bootstrap, level=settings.level,
                             seed=settings.seed, min_ess=settings.min_ess)
                out["estimates"][name].append({"value": e.value, "low": e.low, "high": e.high, "ess": e.ess,
                                               "warning": e.warning})

    if "mb" in names:
        from .model_based import fit_dynamics, model_based_estimate
        steps = settings.dynamics_steps

        def fit_dyn():
            say(f"ope: fitting {settings.ensemble} dynamics models, {steps} steps")
            full = load(data_dir, part="all", device=device)
            return fit_dynamics(full, meta, steps, batch_size=settings.batch_size, members=settings.ensemble,
                                device=device, seed=settings.seed)
        ens = _cached(("dynamics", content, steps, settings.ensemble, settings.batch_size, settings.seed,
                       str(device)), fit_dyn)
        starts = b.observations[torch.as_tensor(ep.starts)]
        # one rollout batch per distinct horizon (usually one: every episode truncated at the time limit)
        values = np.zeros((k, ep.num_episodes))
        per_model = []
        disagreement = np.zeros(k)
        for h in np.unique(ep.lengths):
            sel = np.flatnonzero(ep.lengths == h)
            r = model_based_estimate(ens, policy, starts[torch.as_tensor(sel)], int(h), gamma, seed=settings.seed,
                                     actions="act")
            values[:, sel] = np.asarray(r["value"])[:, None]
            per_model.append((len(sel), np.asarray(r["per_model"])))
            disagreement += len(sel) * np.asarray(r["value_std"])
        weights = np.array([c for c, _ in per_model], dtype=np.float64)
        pm = sum(c * m for c, m in per_model) / weights.sum()                                   # (K, Ke)
        disagreement /= weights.sum()
        out["estimates"]["mb"] = []
        for i in range(k):
            out["estimates"]["mb"].append({"value": float(pm[i].mean()), "low": float(pm[i].min()),
                                           "high": float(pm[i].max()), "ess": None, "disagreement":
                                           float(disagreement[i]), "warning": None})
        out["models"]["dynamics"] = {"steps": steps, "members": settings.ensemble}
    for i, sup in enumerate(out["support"]):
        if not sup["off_support"]:
            continue
        note = (f"the policy acts outside the data's support (its actions at mean distance "
                f"{sup['action_distance']:.3g} from the logged ones, against {sup['reference']:.3g} between logged "
                f"actions of nearby states): {{}} extrapolates there and is not to be trusted")
        for name in ("fqe", "dr", "mb"):
            if name in out["estimates"]:
                e = out["estimates"][name][i]
                e["warning"] = "; ".join(w for w in (e["warning"], note.format(name.upper())) if w)
    return out


@torch.no_grad()
def _support(policy, b, acts: torch.Tensor, episode_id: np.ndarray, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Per member: how far the policy's actions on the held-out states lie from the logged ones, against the
    data's own spread (diagnostics.py's out_of_support test): {action_distance, reference, off_support}.
    Deterministic policies are scored on their action, others on one sampled action per row."""
    from .diagnostics import off_support, support_reference
    obs = b.observations.to(acts.device, torch.float32)                           # (n, obs)
    if meta.get("obs_mean") is not None and meta.get("obs_std") is not None:
        mean = torch.as_tensor(meta["obs_mean"], dtype=torch.float32, device=obs.device)
        std = torch.as_tensor(meta["obs_std"], dtype=torch.float32, device=obs.device).clamp_min(1e-6)
        normed = (obs - mean) / std
    else:
        normed = obs
    reference = support_reference(normed, acts, episode_id, policy.discrete)

    def distance(sl: slice) -> torch.Tensor:
        det = getattr(policy, "deterministic", False)
        pa = policy.act(obs[sl]) if det else policy.sample(obs[sl], 1)[0]         # (K, b, act) | (K, b)
        if policy.discrete:
            return (pa != acts[sl].unsqueeze(0)).float()
        return (pa - acts[sl].unsqueeze(0)).norm(dim=-1)                          # (K, b)
    dist = _rows(distance, int(obs.shape[0])).mean(1)                             # (K,)
    dim = 1 if policy.discrete else policy.action_dim
    return [{"action_distance": float(d), "reference": None if math.isnan(reference) else reference,
             "off_support": bool(off_support(float(d), reference, policy.discrete, dim))} for d in dist]


def _fqe_seeds(settings: OPESettings, k: int) -> list[int]:
    """FQE's seed for each of the K members evaluated: settings.fqe_seeds, else seed + k for member k."""
    if settings.fqe_seeds is None:
        return [settings.seed + i for i in range(k)]
    if len(settings.fqe_seeds) != k:
        raise ConfigError(f"OPE setting fqe_seeds: {len(settings.fqe_seeds)} seeds for {k} policies; give one per "
                          f"member evaluated")
    return [int(s) for s in settings.fqe_seeds]


def check_run_ope(names: Sequence[str], meta: dict[str, Any], data_dir: Any, key: str = "run key 'ope'") -> None:
    """What a run (or a pack's trial, a retraining job) asking for `names` at its eval points needs from its data,
    checked before training: a held-out split, and logged probabilities for is/pdis."""
    from ..data.holdout import held_out_ids, no_split_message
    from ..data.metadata import has_action_logp
    if held_out_ids(meta) is None:
        raise DataError(f"{key}: {no_split_message(data_dir)}")
    logged = [n for n in names if n in NEEDS_LOGGED]
    if logged and not has_action_logp(meta):
        raise ConfigError(f"{key}: {logged[0]!r} (plain importance sampling) needs the behavior policy's logged "
                          f"action probabilities, and {data_dir} has none (no action_logp column in every "
                          f"partition); use wis, pdwis or dr, which fit a behavior model")


def run_metrics(algorithm, data_dir: Any, meta: dict[str, Any], names: Sequence[str], fqe_steps: int,
                seed: int = 0, fqe_seeds: Sequence[int] | None = None) -> dict[str, list[float]]:
    """`ope/<estimator>`: per-member values for a training run's eval point (run key `ope`); the algorithm's
    random streams are left as they were. fqe_seeds: FQE's seed per member (default seed + k for member k; a sweep
    pack evaluating several trials at once passes each trial's own, so each gets its solo run's values)."""
    from .policies import LearnedPolicy
    gamma = float(algorithm.coef("discount")[0])
    cfg = OPESettings(estimators=tuple(names), fqe_steps=fqe_steps, seed=seed, bootstrap=0,
                      fqe_seeds=None if fqe_seeds is None else tuple(int(s) for s in fqe_seeds))
    saved = algorithm.rng.get_state()
    try:
        res = estimate_policy(LearnedPolicy(algorithm), algorithm.norm_actions, str(data_dir), meta, gamma, cfg,
                              algorithm.device)
    finally:
        algorithm.rng.set_state(saved)
    return {f"ope/{name}": [r["value"] for r in rows] for name, rows in res["estimates"].items()}


def _run_gamma(state: dict[str, Any], members: list[int]) -> float:
    gammas = {float(state["member_configs"][m].get("discount", 0.99)) for m in members}
    if len(gammas) > 1:
        raise ConfigError(f"the selected members train with different discounts ({sorted(gammas)}); evaluate them "
                          f"separately (--members) or give one --gamma")
    return gammas.pop()


def run_ope(run_dir: str | Path, estimators: str | Sequence[str] | None = None, members: str | Sequence[int] |
            None = None, data: str | None = None, device: str = "cpu", write: bool = True,
            progress: bool = False, **settings: Any) -> dict[str, Any]:
    """Off-policy estimates of the members of `run_dir`'s latest checkpoint on the held-out episodes of its
    dataset (or of `data`, e.g. a newer version); writes RUN_DIR/ope.json. settings: OPESettings fields."""
    from ..learner.api import load_run
    from ..learner.checkpoint import atomic_write_json
    from ..learner.checkpoint import latest
    from ..learner.worker import open_dataset

    names = parse_estimators(estimators)
    unknown = [key for key in settings if key not in OPESettings.__dataclass_fields__]
    if unknown:
        raise ConfigError(f"unknown OPE setting {unknown[0]!r}; settings: "
                          f"{', '.join(OPESettings.__dataclass_fields__)}")
    cfg = OPESettings(estimators=names, **settings)
    run_dir = Path(run_dir)
    dev = torch.device(device)
    algorithm, meta_ckpt, state = load_run(run_dir, device=str(dev))
    picked = parse_members(members, algorithm.K)
    gamma = float(cfg.gamma) if cfg.gamma is not None else _run_gamma(state, picked)
    data_spec = data or state["data"]
    try:
        data_dir, meta = open_dataset(data_spec)
    except DataError as e:
        raise DataError(f"{e} (the dataset {run_dir} was trained on; pass --data to evaluate on another)") from None
    from ..spec import EnvSpec
    if EnvSpec.from_metadata(meta) != EnvSpec.from_metadata(meta_ckpt):
        raise DataError(f"{data_dir}: its observation/action spaces differ from those {run_dir} was trained on")
    from .policies import LearnedPolicy
    policy = LearnedPolicy(algorithm, noise=cfg.noise, epsilon=cfg.epsilon).select(picked)

    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)
    result = estimate_policy(policy, algorithm.norm_actions, str(data_dir), meta, gamma, cfg, dev, say)
    online = _online(run_dir, picked)
    for name, rows in result["estimates"].items():
        for j, row in enumerate(rows):
            row["member"] = picked[j]
    out = {"run_dir": str(run_dir), "checkpoint": str(latest(run_dir).relative_to(run_dir)), "step": int(state["step"]),
           "algo": state["algo"], "data": str(data_dir), "content_hash": meta.get("content_hash"), "gamma": gamma,
           "level": cfg.level, "members": picked, "online": online, **result,
           "settings": {k: v for k, v in asdict(cfg).items() }}
    if write:
        atomic_write_json(run_dir / "ope.json", out)
    return out


def _online(run_dir: Path, members: list[int]) -> list[float | None]:
    import json
    try:
        res = json.loads((run_dir / "result.json").read_text())
        return [res["members"][m].get("eval_return_mean") for m in members]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return [None] * len(members)


def format_table(out: dict[str, Any]) -> str:
    """The estimates as a text table: one row per member, one column per estimator (value [low, high])."""
    names = list(out["estimates"])
    h = out["holdout"]
    lines = [f"off-policy estimates at step {out['step']} on {h['episodes']} held-out episodes "
             f"({h['transitions']} transitions), gamma {out['gamma']:g}, {int(out['level'] * 100)}% intervals",
             f"held-out episodes' own discounted return (behavior policy): {h['mc_return']:.4g} "
             f"[{h['mc_low']:.4g}, {h['mc_high']:.4g}]"]
    head = ["member"] + [n for n in names] + (["online"] if any(v is not None for v in out["online"]) else [])
    rows = []
    warnings = []
    for j, m in enumerate(out["members"]):
        row = [str(m)]
        for n in names:
            e = out["estimates"][n][j]
            row.append(f"{e['value']:.4g} [{e['low']:.4g}, {e['high']:.4g}]")
            if e.get("warning"):
                warnings.append(f"member {m} {n}: {e['warning']}")
        if len(head) > len(row):
            v = out["online"][j]
            row.append("-" if v is None else f"{v:.4g}")
        rows.append(row)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    for r in [head] + rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for w in warnings:
        lines.append(f"warning: {w}")
    if "mb" in out["estimates"]:
        d = [e.get("disagreement") for e in out["estimates"]["mb"]]
        lines.append("mb: ensemble disagreement (std of the models' values) " +
                     ", ".join(f"{x:.3g}" for x in d if x is not None and math.isfinite(x)))
    return "\n".join(lines)

