"""Data-quality report of a converted dataset: counts, returns, episode ends, action coverage, observations.

One streaming pass over the Parquet files (record batch by record batch), so the report of a large
dataset needs memory for the per-transition episode ids, rewards and actions only, never for observations.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

_PCTS = (5, 25, 50, 75, 95)
_ACT_PCTS = (1, 50, 99)
COVERAGE_BINS = 20
"""A Box action dimension's range is cut into this many equal bins for the coverage figure."""
COVERAGE_MIN_SHARE = 1e-3
"""A bin counts as covered when it holds at least this share of the transitions (and at least one)."""
_MAX_OBS_ROWS = 32  # observation dimensions listed in the text report


@dataclass
class _Stats:
    episode_id: list[np.ndarray] = field(default_factory=list)
    step: list[np.ndarray] = field(default_factory=list)
    rewards: list[np.ndarray] = field(default_factory=list)
    terminations: list[np.ndarray] = field(default_factory=list)
    truncations: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    obs_min: np.ndarray | None = None
    obs_max: np.ndarray | None = None
    obs_sum: np.ndarray | None = None
    obs_sq: np.ndarray | None = None
    nonfinite: dict[str, int] = field(default_factory=dict)


def _flat(col, width: int) -> np.ndarray:
    import pyarrow as pa

    chunks = getattr(col, "chunks", [col])
    parts = []
    for ch in chunks:
        if pa.types.is_nested(ch.type):
            parts.append(ch.flatten().to_numpy(zero_copy_only=False).reshape(len(ch), width))
        else:
            parts.append(ch.to_numpy(zero_copy_only=False).reshape(len(ch), width))
    return np.concatenate(parts) if len(parts) != 1 else parts[0]


def _scan(root: Path | str, meta: dict[str, Any]) -> _Stats:
    from .metadata import dataset_file_rows
    from .storage import open_parquet

    obs_dim = int(np.prod(meta["observation_space"]["shape"]))
    discrete = meta["action_space"]["type"] == "Discrete"
    act_dim = 1 if discrete else int(np.prod(meta["action_space"]["shape"]))
    st = _Stats()
    cols = ["observations", "actions", "rewards", "terminations", "truncations", "episode_id", "step"]
    for f, _ in dataset_file_rows(root, meta):  # checked against the metadata: a missing shard is an error
        try:
            pf = open_parquet(f)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{f}: unreadable Parquet file ({e})") from e
        missing = [c for c in cols if c not in pf.schema_arrow.names]
        if missing:
            raise DataError(f"{f}: missing column(s) {', '.join(missing)}")
        for rb in pf.iter_batches(batch_size=1 << 16, columns=cols):
            obs = _flat(rb.column("observations"), obs_dim).astype(np.float64, copy=False)
            if st.obs_min is None:
                st.obs_min = np.full(obs_dim, np.inf)
                st.obs_max = np.full(obs_dim, -np.inf)
                st.obs_sum = np.zeros(obs_dim)
                st.obs_sq = np.zeros(obs_dim)
            st.obs_min = np.minimum(st.obs_min, obs.min(0))
            st.obs_max = np.maximum(st.obs_max, obs.max(0))
            st.obs_sum += obs.sum(0)
            st.obs_sq += np.square(obs).sum(0)
            act = rb.column("actions").to_numpy(zero_copy_only=False) if discrete else _flat(rb.column("actions"), act_dim)
            st.actions.append(np.asarray(act))
            for name in ("episode_id", "step", "rewards", "terminations", "truncations"):
                getattr(st, name).append(rb.column(name).to_numpy(zero_copy_only=False))
            bad = int((~np.isfinite(obs)).sum())
            if bad:
                st.nonfinite["observations"] = st.nonfinite.get("observations", 0) + bad
    return st


def _pct_row(x: np.ndarray, qs=_PCTS) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(x, q)) for q in qs}


def _fmt(x: float) -> str:
    if not np.isfinite(x):
        return f"{x}"
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"


def summarize(path: str | os.PathLike) -> dict[str, Any]:
    """The numbers behind the report (also useful to tests and notebooks)."""
    from .metadata import read_metadata as load_metadata
    from .storage import locate

    root = locate(path).public()
    meta = load_metadata(root)
    st = _scan(root, meta)
    if not st.rewards:
        raise DataError(f"{root}: the dataset holds no transitions")
    ep = np.concatenate(st.episode_id)
    steps = np.concatenate(st.step).astype(np.int64)
    rew = np.concatenate(st.rewards).astype(np.float64)
    term = np.concatenate(st.terminations).astype(bool)
    trunc = np.concatenate(st.truncations).astype(bool)
    act = np.concatenate(st.actions)
    n = len(rew)

    ids, inv = np.unique(ep, return_inverse=True)
    returns = np.bincount(inv, weights=rew, minlength=len(ids))
    lengths = np.bincount(inv, minlength=len(ids))
    ended_term = np.bincount(inv, weights=term, minlength=len(ids)) > 0
    ended_trunc = np.bincount(inv, weights=trunc & ~term, minlength=len(ids)) > 0
    # the last transition of every episode (highest step) should carry its termination or truncation
    last = np.zeros(len(ids), np.int64)
    np.maximum.at(last, inv, steps)
    out: dict[str, Any] = {
        "num_transitions": n, "num_episodes": int(len(ids)),
        "returns": returns, "episode_lengths": lengths,
        "return_stats": {"mean": float(returns.mean()), "std": float(returns.std()),
                         "min": float(returns.min()), "max": float(returns.max()), **_pct_row(returns)},
        "episode_length_stats": {"mean": float(lengths.mean()), "min": int(lengths.min()),
                                 "max": int(lengths.max())},
        "num_terminations": int(term.sum()), "num_truncations": int(trunc.sum()),
        "episodes_terminated": int(ended_term.sum()), "episodes_truncated": int(ended_trunc.sum()),
        "episodes_unfinished": int((~ended_term & ~ended_trunc).sum()),
        "num_term_and_trunc": int((term & trunc).sum()),
        "reward_stats": {"mean": float(rew.mean()), "std": float(rew.std()), "min": float(rew.min()),
                         "max": float(rew.max())},
        "obs_min": st.obs_min, "obs_max": st.obs_max, "obs_mean": st.obs_sum / n,
        "obs_std": np.sqrt(np.maximum(st.obs_sq / n - np.square(st.obs_sum / n), 0.0)),
        "nonfinite": st.nonfinite, "meta": meta, "rewards": rew.astype(np.float32),
    }
    space = meta["action_space"]
    if space["type"] == "Discrete":
        k = int(space["n"])
        counts = np.bincount(act.astype(np.int64), minlength=k)
        out["action_counts"] = counts
    else:
        low = np.asarray(space["low"], np.float64).reshape(-1)
        high = np.asarray(space["high"], np.float64).reshape(-1)
        dims = []
        hist = np.zeros((act.shape[1], COVERAGE_BINS), np.int64)
        edges = np.zeros((act.shape[1], COVERAGE_BINS + 1))
        for d in range(act.shape[1]):
            a = act[:, d].astype(np.float64)
            row = {"min": float(a.min()), "max": float(a.max()), **_pct_row(a, _ACT_PCTS),
                   "low": float(low[d]), "high": float(high[d]), "span": None, "covered": None}
            lo, hi = (low[d], high[d]) if np.isfinite(low[d]) and np.isfinite(high[d]) else (a.min(), a.max())
            if hi > lo:
                hist[d], edges[d] = np.histogram(np.clip(a, lo, hi), bins=COVERAGE_BINS, range=(lo, hi))
            else:  # one value: a bin of width 1 around it
                hist[d, COVERAGE_BINS // 2] = len(a)
                edges[d] = np.linspace(lo - 0.5, lo + 0.5, COVERAGE_BINS + 1)
            if np.isfinite(low[d]) and np.isfinite(high[d]) and high[d] > low[d]:
                row["span"] = float((a.max() - a.min()) / (high[d] - low[d]))
                row["covered"] = float((hist[d] >= max(1, COVERAGE_MIN_SHARE * n)).mean())
            row["outside"] = int(((a < low[d]) | (a > high[d])).sum())
            dims.append(row)
        out["action_dims"] = dims
        out["action_hist"] = hist
        out["action_edges"] = edges  # (act_dim, bins + 1) bin edges in action units
    return out


def _text(root: Path | str, s: dict[str, Any]) -> str:
    meta = s["meta"]
    lines = [f"dataset     {root}"]
    lines.append(f"source      {meta.get('source')}   env {meta.get('env_id')}   "
                 f"schema v{meta.get('schema_version')}")
    lines.append(f"transitions {s['num_transitions']}   episodes {s['num_episodes']}   "
                 f"length mean {s['episode_length_stats']['mean']:.1f} "
                 f"min {s['episode_length_stats']['min']} max {s['episode_length_stats']['max']}")
    r = s["return_stats"]
    lines.append("returns     " + "  ".join(f"{k} {_fmt(r[k])}" for k in
                                           ("mean", "std", "min", "p5", "p25", "p50", "p75", "p95", "max")))
    lo, hi = meta.get("ref_min_score"), meta.get("ref_max_score")
    if lo is not None and hi is not None and hi != lo:
        lines.append(f"normalized  mean {100 * (r['mean'] - lo) / (hi - lo):.1f}  "
                     f"(ref_min_score {_fmt(lo)}, ref_max_score {_fmt(hi)})")
    rs = s["reward_stats"]
    lines.append(f"rewards     mean {_fmt(rs['mean'])}  std {_fmt(rs['std'])}  "
                 f"min {_fmt(rs['min'])}  max {_fmt(rs['max'])}")
    lines.append(f"episode ends: {s['episodes_terminated']} terminated, {s['episodes_truncated']} truncated, "
                 f"{s['episodes_unfinished']} unfinished   (transitions: terminations {s['num_terminations']}, "
                 f"truncations {s['num_truncations']})")
    if s["num_term_and_trunc"]:
        lines.append(f"  note: {s['num_term_and_trunc']} transitions are both terminated and truncated "
                     f"(treated as terminated)")
    if "action_counts" in s:
        counts = s["action_counts"]
        n = counts.sum()
        lines.append(f"actions     Discrete({len(counts)})")
        for i, c in enumerate(counts):
            lines.append(f"  action {i:<3d} {c:>10d}  {100 * c / n:5.1f}%")
        unused = [i for i, c in enumerate(counts) if c == 0]
        if unused:
            lines.append(f"  never taken: {unused}")
    else:
        lines.append(f"actions     Box({len(s['action_dims'])})   covered = share of {COVERAGE_BINS} bins "
                     f"of [low, high] holding >= {COVERAGE_MIN_SHARE:.1%} of transitions")
        lines.append(f"  {'dim':>4} {'low':>9} {'high':>9} {'min':>9} {'p1':>9} {'p50':>9} {'p99':>9} "
                     f"{'max':>9} {'span':>6} {'covered':>7}")
        for d, a in enumerate(s["action_dims"]):
            span = "n/a" if a["span"] is None else f"{a['span']:.2f}"
            cov = "n/a" if a["covered"] is None else f"{a['covered']:.2f}"
            lines.append(f"  {d:>4d} {_fmt(a['low']):>9} {_fmt(a['high']):>9} {_fmt(a['min']):>9} "
                         f"{_fmt(a['p1']):>9} {_fmt(a['p50']):>9} {_fmt(a['p99']):>9} {_fmt(a['max']):>9} "
                         f"{span:>6} {cov:>7}")
            if a["outside"]:
                lines.append(f"       {a['outside']} actions outside [low, high]")
    parts = meta.get("partitions") or []
    with_logp = sum(1 for p in parts if p.get("action_logp"))
    if with_logp:
        lines.append("logged action probabilities (action_logp): " + (
            "every partition" if with_logp == len(parts) else
            f"{with_logp} of {len(parts)} partitions only (off-policy evaluation fits a behavior model)"))
    obs_dim = len(s["obs_min"])
    lines.append(f"observations Box({obs_dim})" + (f"  (first {_MAX_OBS_ROWS} dims)" if obs_dim > _MAX_OBS_ROWS
                                                   else ""))
    lines.append(f"  {'dim':>4} {'min':>10} {'max':>10} {'mean':>10} {'std':>10}")
    for d in range(min(obs_dim, _MAX_OBS_ROWS)):
        lines.append(f"  {d:>4d} {_fmt(s['obs_min'][d]):>10} {_fmt(s['obs_max'][d]):>10} "
                     f"{_fmt(s['obs_mean'][d]):>10} {_fmt(s['obs_std'][d]):>10}")
    const = [d for d in range(obs_dim) if s["obs_min"][d] == s["obs_max"][d]]
    if const:
        lines.append(f"  constant dims: {const}")
    if s["nonfinite"]:
        lines.append("  non-finite values: " + ", ".join(f"{k} {v}" for k, v in s["nonfinite"].items()))
    return "\n".join(lines)


_MAX_PLOT_DIMS = 32  # observation and action dimensions drawn


def _count_bins(x: np.ndarray, max_bins: int = 40) -> np.ndarray:
    """Histogram edges for integer-valued data (episode lengths): one bin per integer when the range is small,
    else at most `max_bins` bins on integer boundaries; a constant gets one bin centred on its value."""
    lo, hi = int(x.min()), int(x.max())
    step = max(1, int(np.ceil((hi - lo + 1) / max_bins)))
    return np.arange(lo, hi + step + 1, step) - 0.5


def figure(s: dict[str, Any], title: str):
    """The report's matplotlib Figure (no pyplot) from `summarize`'s numbers: returns, episode lengths and
    rewards on top; action coverage (in action units) and observation ranges below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(15, 8.5), constrained_layout=True)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 3)
    ax_r, ax_l, ax_w = (fig.add_subplot(grid[0, i]) for i in range(3))
    ax_a = fig.add_subplot(grid[1, :2] if "action_counts" not in s else grid[1, 0])
    ax_o = fig.add_subplot(grid[1, 2] if "action_counts" not in s else grid[1, 1:])

    returns = s["returns"]
    if returns.max() > returns.min():
        ax_r.hist(returns, bins=min(50, max(10, len(returns) // 4)), color="tab:blue", alpha=0.85)
    else:  # every episode has the same return: one bar, not a spread of empty bins
        ax_r.bar([returns[0]], [len(returns)], width=max(1.0, abs(returns[0]) * 0.02), color="tab:blue")
    for q, ls in ((50, "-"), (5, ":"), (95, ":")):
        ax_r.axvline(np.percentile(returns, q), color="k", ls=ls, lw=1)
    ax_r.set_title(f"returns of {len(returns)} episodes (median, p5, p95)")
    ax_r.set_xlabel("return")
    ax_r.set_ylabel("episodes")

    lengths = s["episode_lengths"]
    ax_l.hist(lengths, bins=_count_bins(lengths), color="tab:gray")
    if lengths.min() == lengths.max():  # a constant: show it with room around it, not a 1-step-wide axis
        v = int(lengths[0])
        pad = max(2, int(0.05 * v))
        ax_l.set_xlim(v - pad, v + pad)
        ax_l.set_title(f"lengths: all {len(lengths)} episodes have {v} steps")
    else:
        ax_l.set_title(f"lengths ({s['episodes_terminated']} term., {s['episodes_truncated']} trunc.)")
    ax_l.set_xlabel("steps")
    ax_l.set_ylabel("episodes")
    for ax in (ax_r, ax_l):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # episode counts are whole numbers
    ax_l.xaxis.set_major_locator(MaxNLocator(integer=True))

    rew = s["rewards"]
    if rew.max() > rew.min():
        ax_w.hist(rew, bins=50, color="tab:green", alpha=0.85)
        ax_w.set_title(f"rewards of {len(rew)} transitions (mean {_fmt(s['reward_stats']['mean'])})")
    else:
        ax_w.bar([float(rew[0])], [len(rew)], width=max(1.0, abs(float(rew[0])) * 0.02), color="tab:green")
        ax_w.set_title(f"rewards: all {len(rew)} transitions have {_fmt(float(rew[0]))}")
    ax_w.set_xlabel("reward")
    ax_w.set_ylabel("transitions")
    ax_w.yaxis.set_major_locator(MaxNLocator(integer=True))

    if "action_counts" in s:
        counts = s["action_counts"]
        ax_a.bar(np.arange(len(counts)), counts, color="tab:orange")
        ax_a.set_xticks(np.arange(len(counts)))
        ax_a.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax_a.set_title("action counts")
        ax_a.set_xlabel("action")
        ax_a.set_ylabel("transitions")
    else:
        hist = s["action_hist"].astype(np.float64)
        edges = s["action_edges"]
        share = hist / np.maximum(hist.sum(1, keepdims=True), 1)
        k = min(len(share), _MAX_PLOT_DIMS)
        vmax = max(float(share[:k].max()), 1e-12)
        mesh = None
        for d in range(k):  # one strip per dimension, each on its own bins, in action units
            mesh = ax_a.pcolormesh(edges[d], [d - 0.45, d + 0.45], share[d:d + 1], cmap="viridis", vmin=0,
                                   vmax=vmax)
            lo, hi = s["action_dims"][d]["low"], s["action_dims"][d]["high"]
            for b in (lo, hi):
                if np.isfinite(b):
                    ax_a.plot([b, b], [d - 0.5, d + 0.5], color="tab:red", lw=1.5)
        lo_x, hi_x = float(edges[:k].min()), float(edges[:k].max())
        ax_a.set_xlim(lo_x - 0.03 * (hi_x - lo_x), hi_x + 0.03 * (hi_x - lo_x))  # room to see the bounds
        ax_a.set_ylim(k - 0.5, -0.5)
        ax_a.set_yticks(np.arange(k))
        ax_a.set_ylabel("action dim")
        ax_a.set_xlabel("action value (red: bounds of the action space)")
        ax_a.set_title(f"action coverage: share of transitions per bin ({COVERAGE_BINS} bins per dim"
                       + (f", first {k} dims" if k < len(share) else "") + ")")
        fig.colorbar(mesh, ax=ax_a, label="share")

    d_obs = min(len(s["obs_min"]), _MAX_PLOT_DIMS)
    x = np.arange(d_obs)
    ax_o.vlines(x, s["obs_min"][:d_obs], s["obs_max"][:d_obs], color="tab:gray", lw=7, alpha=0.35)
    ax_o.errorbar(x, s["obs_mean"][:d_obs], yerr=s["obs_std"][:d_obs], fmt="o", color="tab:purple", ms=4,
                  capsize=4, lw=1.5)
    ax_o.set_xticks(x if d_obs <= 16 else x[::max(1, d_obs // 16)])
    ax_o.set_xlabel("observation dim" + (f" (first {d_obs})" if d_obs < len(s["obs_min"]) else ""))
    ax_o.set_ylabel("value")
    ax_o.set_title("observations: min..max (gray), mean \u00b1 std")
    ax_o.set_xlim(-0.7, d_obs - 0.3)
    fig.suptitle(title)
    return fig


def _plot(s: dict[str, Any], png: Path, title: str) -> None:
    fig = figure(s, title)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.parent / f".{png.name}.tmp-{os.getpid()}"
    try:  # written aside and renamed: a failure never leaves half a PNG where the user asked for one
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, png)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _png_path(dataset: str | os.PathLike, root: Path | str, out: str | os.PathLike | None) -> Path:
    """Where the figure goes: `out` if it names a .png file, else DIR/<dataset name>-inspect.png with DIR = `out`
    or the current working directory (never the dataset's own or the cache directory)."""
    from .storage import locate

    name = str(dataset)[len("builtin:"):] if str(dataset).startswith("builtin:") else locate(root).name
    if out is not None and Path(out).suffix.lower() == ".png":
        return Path(out).expanduser().absolute()
    return (Path(out).expanduser() if out is not None else Path.cwd()).absolute() / f"{name}-inspect.png"


def inspect(dataset: str | os.PathLike, out: str | os.PathLike | None = None,
            png: str | os.PathLike | None = None) -> dict[str, Any]:
    """Data-quality report of a converted dataset directory or `builtin:NAME`.

    out: where to write the figure: a .png path, or a directory that gets NAME-inspect.png (default: the
    current working directory). `png` is the older name of `out`.

    Returns {"text": the printed report, "png": absolute path of the figure written, "summary": the numbers
    behind them (see `summarize`)}. Panels: episode returns, episode lengths, per-transition rewards, action
    coverage (Box: share of transitions per bin in action units, with the space's bounds; Discrete: counts),
    and per-dimension observation ranges (min..max, mean +- std).
    """
    from .builtin import resolve

    if out is not None and png is not None:
        raise DataError(f"inspect: give the figure's place once (out={out!r} or png={png!r}, not both)")
    root = resolve(dataset)
    s = summarize(root)
    text = _text(root, s)
    out_png = _png_path(dataset, root, out if out is not None else png)
    from .storage import locate

    _plot(s, out_png, f"{s['meta'].get('source') or locate(root).name}: {s['num_transitions']} transitions")
    return {"text": text, "png": str(out_png), "summary": s}
