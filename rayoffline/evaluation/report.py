"""`rayoffline report DIR`: one self-contained HTML page about a training run or a sweep.

The page is a single file: inline CSS, every figure a PNG embedded as a `data:image/png;base64` URI, no script,
no external file, so it opens offline, attaches to an issue and survives the run directory being moved. It is
written atomically (a temporary file beside the target, then a rename): a reader never sees half a page.

What it reads (each section appears when its data exists, else a line says it is not available and how to get it):

    run directory (written by learner/worker.py and learner/logger.py)
        config.yaml     algorithm, dataset (`data`, content hash `data_hash`), members and their settings
        result.json     steps, members' evaluation, behavior_return_mean, updates/s, wall time, and `diagnostics`
                        ({"flags": [{flag, member, step, message}], "last": {"diag/x": [per member]}})
        metrics.jsonl   one row per logged step: {"step", "loss/*", "train/*", "diag/*", "eval/*", "perf/*"}, each a
                        per-member list (K > 1) or a scalar (K = 1)
        ope.json        written by `rayoffline ope`: estimates with intervals per estimator and member
        checkpoints/    step_*.pt
    the run's dataset   the figure and text of `rayoffline data inspect` (data/inspect.py), recomputed
    sweep directory (written by sweep/run.py and sweep/results.py)
        sweep.yaml      name, algo, data, space (the swept keys), seeds, metric, mode
        results.csv     ranked configurations: rank, trial, status, step, one column per key, seeds, metric mean
                        and std over seeds, run_dir
        trials/ID/      each configuration's run directory (its metric over steps comes from its metrics.jsonl)

Figures are drawn with matplotlib's object API (Figure + Agg canvas, no pyplot): no global state, no display.

**Deviations** (from what a plotting dashboard such as TensorBoard shows): curves are drawn from metrics.jsonl
(the exact logged values), not from the TensorBoard events; a sweep whose driver has not written results.csv yet
is ranked from the trials' own metrics.jsonl (last logged value, mean over the trial's seeds), without seed std.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RayOfflineError

_MAX_LEGEND = 10
"""Members drawn with a legend entry each; more members are drawn without labels."""
_MAX_TABLE_ROWS = 200
"""Sweep ranking rows listed on the page (results.csv holds them all)."""
_DPI = 80

_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;
color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em} th,td{border:1px solid #ccc;padding:3px 8px;
text-align:left;vertical-align:top} th{background:#f0f0f0} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{background:#eef7ee;font-weight:600}
img{max-width:100%;height:auto;border:1px solid #eee;margin:.4em 0}
.na{color:#666;font-style:italic} .sub{color:#555}
.flags{border:2px solid #c00;background:#fff0f0;padding:8px 14px;margin:.8em 0;border-radius:4px}
.flags h3{color:#c00;margin:.2em 0} .ok{border:1px solid #4a4;background:#f3fbf3;padding:6px 12px;border-radius:4px}
.warn{color:#a60} pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:.85em}
"""


# ----------------------------------------------------------------------------------------------------- entry points

def report(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the HTML report of the run or sweep directory `path` to `out` (default PATH/report.html) and return
    the written file's absolute path. A directory that is neither a run nor a sweep is a RayOfflineError and
    nothing is written."""
    root = Path(path).expanduser()
    page = render(root)
    target = Path(out).expanduser() if out is not None else root / "report.html"
    target = target.absolute()
    if target.is_dir():
        raise RayOfflineError(f"--out {target}: is a directory; give a file name such as {target / 'report.html'}")
    target.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(target, page)
    return target


def kind(path: str | os.PathLike) -> str:
    """'sweep' (DIR/sweep.yaml) or 'run' (DIR/config.yaml, result.json or metrics.jsonl); anything else raises."""
    root = Path(path).expanduser()
    if not root.exists():
        raise RayOfflineError(f"report: {root} does not exist; expected a run directory (made by `rayoffline "
                              f"train --out DIR`) or a sweep directory (made by `rayoffline tune`)")
    if not root.is_dir():
        raise RayOfflineError(f"report: {root} is a file; expected a run directory (holding config.yaml, "
                              f"metrics.jsonl, result.json) or a sweep directory (holding sweep.yaml)")
    if (root / "sweep.yaml").is_file():
        return "sweep"
    if any((root / f).is_file() for f in ("config.yaml", "result.json", "metrics.jsonl")):
        return "run"
    raise RayOfflineError(f"report: {root} is neither a run directory (expected config.yaml, metrics.jsonl or "
                          f"result.json, written by `rayoffline train`) nor a sweep directory (expected sweep.yaml, "
                          f"written by `rayoffline tune`)")


def render(path: str | os.PathLike) -> str:
    """The report page of a run or sweep directory, as one HTML string."""
    root = Path(path).expanduser()
    if kind(root) == "sweep":
        return _sweep_page(root)
    return _run_page(root)


# ---------------------------------------------------------------------------------------------------- run pages

def _run_page(root: Path) -> str:
    cfg, cfg_err = _read_yaml(root / "config.yaml")
    result, res_err = _read_json(root / "result.json")
    rows = _read_jsonl(root / "metrics.jsonl")
    ope, ope_err = _read_json(root / "ope.json")
    algo = (result or {}).get("algo") or (cfg or {}).get("algo_name") or "unknown algorithm"
    data = (cfg or {}).get("data") or (result or {}).get("dataset") or "unknown dataset"
    title = f"{algo} on {data}: {root.name}"
    parts = [_header(root, cfg, result, rows, algo, data, cfg_err, res_err)]
    parts.append(_members_section(cfg, result))
    parts.append(_curves_section(rows))
    parts.append(_eval_section(rows, result, root))
    parts.append(_diag_section(rows, result))
    parts.append(_ope_section(ope, ope_err, root))
    parts.append(_dataset_section(cfg, result))
    parts.append(_files_section(root))
    return _page(f"rayoffline report: {title}", parts)


def _header(root: Path, cfg: dict | None, result: dict | None, rows: list[dict], algo: str, data: str,
            cfg_err: str | None, res_err: str | None) -> str:
    cfg, res = cfg or {}, result or {}
    k = _members_count(cfg, res, rows)
    last_step = max((int(r.get("step", 0)) for r in rows), default=None)
    steps = res.get("steps") or cfg.get("steps")
    items: list[tuple[str, str]] = [("algorithm", algo)]
    source = res.get("dataset")
    dataset = data + (f" (source {source})" if source and source != data else "")
    if cfg.get("data_hash"):
        dataset += f", content hash {str(cfg['data_hash'])[:12]}"
    items.append(("dataset", dataset))
    if steps is not None:
        done = "" if last_step is None or last_step >= int(steps) else f" (logged up to step {last_step})"
        items.append(("steps", f"{int(steps):,}{done}"))
    elif last_step is not None:
        items.append(("steps", f"logged up to {last_step:,}"))
    if k:
        items.append(("members", str(k)))
    ups = res.get("updates_per_s")
    if ups is None:  # an unfinished run: the last logged interval's rate
        ups = next((r["perf/updates_per_s"] for r in reversed(rows) if "perf/updates_per_s" in r), None)
    if ups is not None:
        items.append(("updates/s", f"{ups:,.1f}" + (f" passes/s = {ups * k:,.1f} member-updates/s" if k and k > 1
                                                    else "")))
    if res.get("wall_s") is not None:
        items.append(("wall time", _duration(float(res["wall_s"]))
                      + (f" (first update {res['time_to_first_update_s']:.1f} s after start)"
                         if res.get("time_to_first_update_s") else "")))
    if res.get("eval_return_mean") is not None:
        items.append(("best member", f"{res.get('best_member', 0)}: return {_num(res['eval_return_mean'])}"
                      + (f" +- {_num(res['eval_return_std'])}" if res.get("eval_return_std") is not None else "")
                      + (f", normalized {_num(res['normalized_score'])}" if res.get("normalized_score") is not None
                         else "") + f" over {res.get('eval_episodes')} episodes"))
    if res.get("num_workers", 1) and res.get("num_workers", 1) > 1:
        items.append(("workers", str(res["num_workers"])))
    notes = []
    if result is None:
        notes.append(_note(f"result.json {res_err}: the run has not finished (or was stopped); the page shows what "
                         f"metrics.jsonl holds so far. Finish it with `rayoffline train --resume --out {root}`."))
    if cfg is None:
        notes.append(_note(f"config.yaml {cfg_err}."))
    body = "<table>" + "".join(f"<tr><th>{_e(a)}</th><td>{_e(b)}</td></tr>" for a, b in items) + "</table>"
    return (f"<h1>{_e(algo)} on {_e(data)}</h1><p class=sub>run directory <code>{_e(str(root.absolute()))}</code>, "
            f"report made {_e(time.strftime('%Y-%m-%d %H:%M'))}</p>" + body + "".join(notes))


def _members_count(cfg: dict, res: dict, rows: list[dict]) -> int:
    if res.get("members"):
        return len(res["members"])
    if cfg.get("members"):
        return len(cfg["members"])
    for r in rows:
        for name, v in r.items():
            if name != "step" and not name.startswith("perf/"):
                return len(v) if isinstance(v, list) else 1
    return 0


def _members_section(cfg: dict | None, result: dict | None) -> str:
    members = (result or {}).get("members")
    if not members or (len(members) < 2 and members[0].get("eval_return_mean") is None):
        return ""
    # the settings that differ between members (all others are the run's)
    keys = sorted({key for m in members for key in (m.get("algo") or {})})
    differ = [key for key in keys if len({json.dumps((m.get("algo") or {}).get(key)) for m in members}) > 1]
    best = (result or {}).get("best_member")
    head = ["member", "seed", *differ, "eval return (mean +- std)", "normalized"]
    body = []
    for i, m in enumerate(members):
        ret = "-" if m.get("eval_return_mean") is None else (
            f"{_num(m['eval_return_mean'])} +- {_num(m.get('eval_return_std'))}")
        body.append((i == best and len(members) > 1,
                     [str(i), str(m.get("seed")), *[_cell((m.get("algo") or {}).get(key)) for key in differ], ret,
                      _num(m.get("normalized_score"))]))
    return "<h2>Members</h2>" + _table(head, body)


# metrics.jsonl -> series

def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _names(rows: list[dict], prefix: str) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        for name in r:
            if name.startswith(prefix):
                seen[name] = None
    return list(seen)


def series(rows: list[dict[str, Any]], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps (T,), values (T, K)) of metric `name` over the rows that hold it; a scalar (K = 1 runs) is one
    column, a missing or None value is NaN. Later rows win where a step repeats (a resumed run)."""
    by_step: dict[int, list[float]] = {}
    for r in rows:
        if name not in r:
            continue
        v = r[name]
        vals = v if isinstance(v, list) else [v]
        by_step[int(r["step"])] = [float(x) if isinstance(x, (int, float)) else math.nan for x in vals]
    if not by_step:
        return np.zeros(0), np.zeros((0, 0))
    steps = np.array(sorted(by_step))
    k = max(len(v) for v in by_step.values())
    out = np.full((len(steps), k), np.nan)
    for i, s in enumerate(steps):
        out[i, :len(by_step[s])] = by_step[s]
    return steps, out


def _curves_section(rows: list[dict]) -> str:
    names = _names(rows, "loss/") + _names(rows, "train/")
    if not names:
        return "<h2>Learning curves</h2>" + _na(
            "no loss/* or train/* metrics in metrics.jsonl (the run logged nothing yet: metrics are written every "
            "log_every steps; train with a smaller --set log_every=N to see curves of a short run)")
    return ("<h2>Learning curves</h2><p class=sub>loss/* and train/* per member over the update steps "
            "(metrics.jsonl)</p>" + _img(_grid_figure(rows, names), "learning curves"))


def _grid_figure(rows: list[dict], names: list[str], cols: int = 3):
    fig = _figure(0, 0)
    n_rows = math.ceil(len(names) / cols)
    fig.set_size_inches(4.6 * min(cols, len(names)), 3.0 * n_rows)
    legend = False
    for i, name in enumerate(names):
        ax = fig.add_subplot(n_rows, min(cols, len(names)), i + 1)
        steps, vals = series(rows, name)
        _members_lines(ax, steps, vals)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if not legend and 1 < vals.shape[1] <= _MAX_LEGEND:
            ax.legend(fontsize=7)
            legend = True
    return fig


def _members_lines(ax, steps: np.ndarray, vals: np.ndarray) -> None:
    k = vals.shape[1]
    for m in range(k):
        label = f"member {m}" if k <= _MAX_LEGEND else None
        ax.plot(steps, vals[:, m], marker="o" if len(steps) < 12 else None, ms=3, lw=1.3, label=label,
                alpha=0.9 if k <= _MAX_LEGEND else 0.5)


def _eval_section(rows: list[dict], result: dict | None, root: Path) -> str:
    steps, vals = series(rows, "eval/return_mean")
    if not len(steps):
        return "<h2>Evaluation</h2>" + _na(
            f"no eval/return_mean in metrics.jsonl: the run evaluated no episodes (eval_episodes 0, or its dataset "
            f"names no environment); `rayoffline eval {root} --episodes N` evaluates the latest checkpoint")
    _, std = series(rows, "eval/return_std")
    behavior = (result or {}).get("behavior_return_mean")
    fig = _figure(9.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    _members_lines(ax, steps, vals)
    if std.shape == vals.shape and vals.shape[1] <= _MAX_LEGEND:
        for m in range(vals.shape[1]):
            ax.fill_between(steps, vals[:, m] - std[:, m], vals[:, m] + std[:, m], alpha=0.12)
    if behavior is not None:
        ax.axhline(float(behavior), color="k", ls="--", lw=1.2, label=f"behavior (dataset mean) {_num(behavior)}")
    ax.set_xlabel("step")
    ax.set_ylabel("episode return")
    ax.set_title("eval/return_mean per member (bands: +- std over episodes)")
    ax.grid(alpha=0.3)
    if vals.shape[1] <= _MAX_LEGEND or behavior is not None:
        ax.legend(fontsize=8)
    note = "" if behavior is not None else _na("behavior return not available (result.json has no "
                                               "behavior_return_mean: the run has not finished)")
    return "<h2>Evaluation</h2>" + _img(fig, "evaluation return") + note


def _diag_section(rows: list[dict], result: dict | None) -> str:
    diag = (result or {}).get("diagnostics") or {}
    flags = diag.get("flags") or []
    last = diag.get("last") or {}
    names = _names(rows, "diag/")
    if not names and not diag:
        return "<h2>Diagnostics</h2>" + _na(
            "no diag/* metrics in metrics.jsonl and no diagnostics in result.json: the run was trained with run key "
            "diagnostics: off, or by a rayoffline without training diagnostics; train it (again) with "
            "`--set diagnostics=basic`, they come with each evaluation point (eval_every and the last step)")
    out = ["<h2>Diagnostics</h2>"]
    if flags:
        items = "".join(
            f"<li><b>{_e(f.get('flag'))}</b> (member {_e(f.get('member'))}, step {_e(f.get('step'))}"
            + (f" to {_e(f['last_step'])}" if f.get("last_step") not in (None, f.get("step")) else "")
            + f"): {_e(f.get('message'))}</li>" for f in flags)
        out.append(f"<div class=flags><h3>{len(flags)} diagnostic flag{'s' if len(flags) != 1 else ''}</h3>"
                   f"<ul>{items}</ul></div>")
    elif diag:
        out.append("<div class=ok>no diagnostic flags raised</div>")
    if diag.get("num_rows") is not None:
        out.append(f"<p class=sub>scored on {_e(diag['num_rows'])} rows ({_e(diag.get('rows'))})"
                   + (f" at step {_e(diag['step'])}" if diag.get("step") is not None else "") + "</p>")
    if last:
        k = max((len(v) if isinstance(v, list) else 1) for v in last.values())
        body = [(False, [name, *[_num(x) for x in (v if isinstance(v, list) else [v])]]) for name, v in last.items()]
        out.append("<p class=sub>last values</p>" + _table(["metric", *[f"member {m}" for m in range(k)]], body))
    if names:
        out.append("<p class=sub>diag/* per member over steps</p>" + _img(_grid_figure(rows, names), "diagnostics"))
    return "".join(out)


def _ope_section(ope: dict | None, err: str | None, root: Path) -> str:
    head = "<h2>Off-policy evaluation</h2>"
    if ope is None:
        if err == "is missing":
            return head + _na(f"no ope.json in this run: `rayoffline ope {root}` estimates the policy's value "
                              f"from held-out logged episodes")
        return head + _na(f"ope.json {err}; write it again with `rayoffline ope {root}`")
    est = ope.get("estimates") or {}
    members = list(ope.get("members") or sorted({int(e["member"]) for v in est.values() for e in v}))
    online = ope.get("online") or []
    online_of = {m: online[i] for i, m in enumerate(members) if i < len(online) and online[i] is not None}
    hold = ope.get("holdout") or {}
    level = ope.get("level", 0.95)
    info = (f"checkpoint <code>{_e(ope.get('checkpoint'))}</code> (step {_e(ope.get('step'))}), gamma "
            f"{_e(ope.get('gamma'))}, {100 * float(level):g}% intervals; held-out {_e(hold.get('episodes'))} episodes "
            f"({_e(hold.get('transitions'))} transitions), their Monte-Carlo return {_num(hold.get('mc_return'))}")
    body = []
    for name, entries in est.items():
        for e in entries:
            m = e.get("member")
            body.append((False, [name, str(m), _num(e.get("value")), f"[{_num(e.get('low'))}, {_num(e.get('high'))}]",
                                 _num(e.get("ess")), _num(online_of.get(m)),
                                 f"<span class=warn>{_e(e.get('warning'))}</span>" if e.get("warning") else ""]))
    table = _table(["estimator", "member", "estimate", f"{100 * float(level):g}% interval", "ESS", "online return",
                    "warning"], body, raw_last=True)
    if not est:
        return head + f"<p class=sub>{info}</p>" + _na("ope.json holds no estimates")
    return head + f"<p class=sub>{info}</p>" + table + _img(_ope_figure(est, members, online_of, hold), "OPE")


def _ope_figure(est: dict[str, list[dict]], members: list[int], online_of: dict[int, float], hold: dict):
    names = list(est)
    cols = min(3, len(names))
    n_rows = math.ceil(len(names) / cols)
    fig = _figure(4.4 * cols, 3.3 * n_rows)
    axes = []
    for i, name in enumerate(names):
        ax = fig.add_subplot(n_rows, cols, i + 1, sharey=axes[0] if axes else None)
        axes.append(ax)
        for e in est[name]:
            x = members.index(e["member"]) if e.get("member") in members else e.get("member", 0)
            v, lo, hi = (_float(e.get(key)) for key in ("value", "low", "high"))
            if not math.isnan(lo) and not math.isnan(hi):
                ax.errorbar([x], [v], yerr=[[max(v - lo, 0.0)], [max(hi - v, 0.0)]], fmt="o", color="tab:blue",
                            capsize=4, ms=5, label="estimate, interval" if x == 0 else None)
            else:
                ax.plot([x], [v], "o", color="tab:blue")
        if hold.get("mc_return") is not None:
            ax.axhline(float(hold["mc_return"]), color="k", ls="--", lw=1, label="held-out MC return")
        if online_of:  # its own axis: an episode's undiscounted return, the estimates are discounted values
            ax2 = ax.twinx()
            xs = [members.index(m) + 0.15 for m in online_of]
            ax2.plot(xs, list(online_of.values()), "x", color="tab:red", ms=8, mew=2)
            ax2.set_ylabel("online return", color="tab:red", fontsize=8)
            ax2.tick_params(axis="y", colors="tab:red", labelsize=8)
            ax.plot([], [], "x", color="tab:red", ms=8, mew=2, label="online return (right axis)")
        ax.set_xticks(range(len(members)), [str(m) for m in members])
        ax.set_xlim(-0.6, len(members) - 0.4)
        ax.set_xlabel("member")
        ax.set_ylabel("estimated value", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def _dataset_section(cfg: dict | None, result: dict | None) -> str:
    head = "<h2>Dataset</h2>"
    data = (cfg or {}).get("data")
    if not data:
        return head + _na("the run's dataset is not recorded (no config.yaml with a `data` key)")
    where, why = _dataset_location(str(data))
    if where is None:
        return head + _na(why)
    from ..data.inspect import _text, figure, summarize
    try:
        s = summarize(where)
    except RayOfflineError as e:
        return head + _na(f"the run's dataset {data} could not be read: {e}")
    except OSError as e:
        return head + _na(f"the run's dataset {data} could not be read ({type(e).__name__}: {e})")
    notes = []
    now, then = s["meta"].get("content_hash"), (cfg or {}).get("data_hash")
    if now and then and now != then:
        notes.append(f"<p class=warn>the dataset changed since this run trained on it (content hash {_e(then[:12])}"
                     f" then, {_e(now[:12])} now): the figures show today's data</p>")
    fig = figure(s, f"{s['meta'].get('source') or data}: {s['num_transitions']} transitions")
    return (head + f"<p class=sub><code>{_e(str(where))}</code> (as `rayoffline data inspect` shows it)</p>"
            + "".join(notes) + _img(fig, "dataset") + f"<pre>{_e(_text(where, s))}</pre>")


def _dataset_location(data: str) -> tuple[Path | str | None, str]:
    """(the converted dataset directory of config.yaml's `data`, "") or (None, why it is not available). A builtin
    dataset that is not in this machine's cache is not built here (the report only reads)."""
    if data.startswith("builtin:"):
        from ..data import builtin
        from ..data.metadata import has_metadata
        try:
            path = builtin.converted_path(data[len("builtin:"):])
        except RayOfflineError as e:
            return None, f"dataset {data}: {e}"
        if not has_metadata(path):
            return None, (f"dataset {data} is not in this machine's cache ({path}); `rayoffline data inspect "
                          f"{data}` builds it, then make the report again")
        return path, ""
    if "://" in data:
        return data, ""
    p = Path(data)
    if not p.exists():
        return None, (f"the run's dataset {data} is gone (it was moved or deleted); the figures of "
                      f"`rayoffline data inspect` need the converted dataset directory")
    return p, ""


def _files_section(root: Path) -> str:
    ckpts = sorted((root / "checkpoints").glob("step_*.pt")) if (root / "checkpoints").is_dir() else []
    items = []
    if ckpts:
        items.append("checkpoints: " + ", ".join(f"<code>{_e(p.name)}</code> ({p.stat().st_size / 2**20:.1f} MiB)"
                                                 for p in ckpts))
    else:
        items.append("checkpoints: none")
    if (root / "tb").is_dir():
        items.append(f"TensorBoard: <code>tensorboard --logdir {_e(str(root.absolute() / 'tb'))}</code>")
    for name in ("eval.json", "ray.log"):
        if (root / name).is_file():
            items.append(f"<code>{name}</code>")
    return "<h2>Files</h2><ul>" + "".join(f"<li>{x}</li>" for x in items) + "</ul>"


# -------------------------------------------------------------------------------------------------- sweep pages

def _sweep_page(root: Path) -> str:
    spec, err = _read_yaml(root / "sweep.yaml")
    if spec is None:
        raise RayOfflineError(f"report: {root / 'sweep.yaml'} {err}; it is written by `rayoffline tune` when a "
                              f"sweep starts")
    metric, mode = spec.get("metric", "?"), spec.get("mode", "max")
    keys = list(spec.get("space") or {})
    seeds = spec.get("seeds") or []
    rows, source = sweep_rows(root, spec)
    name = spec.get("name") or root.name
    parts = [f"<h1>Sweep {_e(name)}: {_e(spec.get('algo'))} on {_e(spec.get('data'))}</h1>"
             f"<p class=sub>sweep directory <code>{_e(str(root.absolute()))}</code>, report made "
             f"{_e(time.strftime('%Y-%m-%d %H:%M'))}</p>"]
    items = [("algorithm", spec.get("algo")), ("dataset", spec.get("data")),
             ("metric", f"{metric} ({mode}; mean over {len(seeds)} seed{'s' if len(seeds) != 1 else ''} {seeds})"),
             ("configurations", f"{len(rows)} ({sum(r['status'] == 'finished' for r in rows)} finished)"),
             ("swept", ", ".join(keys) or "nothing"),
             ("scheduler", (spec.get("scheduler") or {}).get("type")),
             ("search", (spec.get("search") or {}).get("type"))]
    parts.append("<table>" + "".join(f"<tr><th>{_e(a)}</th><td>{_e(b)}</td></tr>" for a, b in items) + "</table>")
    if source != "results.csv":
        parts.append(_na(f"results.csv not found: the sweep's driver has not finished (it writes results.csv at "
                         f"the end; `rayoffline tune --resume --out {root}` continues a stopped sweep). The ranking "
                         f"below is from the trials' metrics.jsonl so far."))
    parts.append(_ranking_section(rows, keys, metric))
    ranked = [r for r in rows if r["mean"] is not None and r["status"] != "error"]
    parts.append(_best_section(root, ranked, keys, metric))
    parts.append(_scatter_section(ranked, keys, metric, spec))
    parts.append(_sweep_curves_section(root, rows, metric))
    return _page(f"rayoffline report: sweep {name} ({spec.get('algo')} on {spec.get('data')})", parts)


def sweep_rows(root: Path, spec: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """(one dict per configuration, best first: rank, trial, status, step, config {key: value}, mean, std,
    run_dir; where they came from: 'results.csv' or 'trials')."""
    keys = list(spec.get("space") or {})
    path = root / "results.csv"
    if path.is_file():
        rows = []
        with open(path, newline="", encoding="utf-8") as f:
            for rec in csv.DictReader(f):
                mean_col = next((c for c in rec if c.endswith(" mean")), None)
                std_col = next((c for c in rec if c.endswith(" std")), None)
                rows.append({"rank": _parse(rec.get("rank")), "trial": rec.get("trial"), "status": rec.get("status"),
                             "step": _parse(rec.get("step")), "config": {k: _parse(rec.get(k)) for k in keys},
                             "mean": _float_or_none(rec.get(mean_col)), "std": _float_or_none(rec.get(std_col)),
                             "run_dir": rec.get("run_dir") or None})
        return rows, "results.csv"
    return _rows_from_trials(root, spec, keys), "trials"


def _rows_from_trials(root: Path, spec: dict[str, Any], keys: list[str]) -> list[dict[str, Any]]:
    metric, sign = spec.get("metric"), (-1.0 if spec.get("mode", "max") == "max" else 1.0)
    steps_total = int((spec.get("config") or {}).get("steps", 100_000))
    rows = []
    trials = root / "trials"
    for d in sorted(trials.iterdir()) if trials.is_dir() else []:
        if not d.is_dir():
            continue
        cfg, _ = _read_yaml(d / "config.yaml")
        mrows = _read_jsonl(d / "metrics.jsonl")
        steps, vals = series(mrows, metric)
        mean = float(np.nanmean(vals[-1])) if len(steps) and not np.all(np.isnan(vals[-1])) else None
        last = max((int(r["step"]) for r in mrows), default=None)
        status = "finished" if last is not None and last >= steps_total else (
            f"at step {last}" if last is not None else "not started")
        rows.append({"trial": d.name, "status": status, "step": last,
                     "config": {k: _config_value(cfg or {}, k) for k in keys}, "mean": mean, "std": None,
                     "run_dir": str(d)})
    rows.sort(key=lambda r: (r["mean"] is None, r["status"] != "finished", sign * r["mean"] if r["mean"] is not None
                             else 0.0))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def _config_value(cfg: dict[str, Any], key: str) -> Any:
    """A swept key ('batch_size', 'algo.expectile') in a trial's config.yaml (a per-member setting: its first
    member's)."""
    parts = key.split(".")
    if parts[0] == "algo" and len(parts) == 2:
        members = cfg.get("members") or []
        if members and isinstance(members[0], dict) and parts[1] in members[0]:
            return members[0][parts[1]]
    node: Any = cfg
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def _ranking_section(rows: list[dict], keys: list[str], metric: str) -> str:
    if not rows:
        return "<h2>Ranking</h2>" + _na("no configuration has reported yet (trials/ is empty)")
    head = ["rank", "trial", *keys, f"{metric} mean", "std", "status", "step"]
    body = []
    for r in rows[:_MAX_TABLE_ROWS]:
        body.append((r["rank"] == 1 and r["mean"] is not None,
                     [str(r["rank"]), str(r["trial"]), *[_cell(r["config"].get(k)) for k in keys], _cell(r["mean"]),
                      _cell(r["std"]), str(r["status"]), _cell(r["step"])]))
    more = (f"<p class=sub>... {len(rows) - _MAX_TABLE_ROWS} more configurations in results.csv</p>"
            if len(rows) > _MAX_TABLE_ROWS else "")
    return ("<h2>Ranking</h2><p class=sub>configurations by the sweep's metric, best first (finished ones above "
            "those a scheduler stopped early)</p>" + _table(head, body) + more)


def _best_section(root: Path, ranked: list[dict], keys: list[str], metric: str) -> str:
    head = "<h2>Best configuration</h2>"
    if not ranked:
        return head + _na(f"no configuration reported {metric} yet")
    b = ranked[0]
    settings = ", ".join(f"{k} = {_cell(b['config'].get(k))}" for k in keys)
    out = [f"<p><b>{_e(b['trial'])}</b>: {_e(settings)}; {_e(metric)} {_cell(b['mean'])}"
           + (f" +- {_cell(b['std'])}" if b["std"] is not None else "") + f" ({_e(b['status'])})</p>"]
    run_dir = Path(b["run_dir"]) if b.get("run_dir") else None
    if run_dir is not None and not run_dir.is_dir() and (root / "trials" / str(b["trial"])).is_dir():
        run_dir = root / "trials" / str(b["trial"])  # the sweep directory was moved
    if run_dir is not None and run_dir.is_dir():
        sub = run_dir / "report.html"
        link = (f" (<a href=\"{_e(sub.absolute().as_uri())}\">its report</a>)" if sub.is_file() else "")
        out.append(f"<p>run directory <a href=\"{_e(run_dir.absolute().as_uri())}\"><code>{_e(str(run_dir))}</code>"
                   f"</a>{link}; its own page: <code>rayoffline report {_e(str(run_dir))}</code></p>")
        res, _ = _read_json(run_dir / "result.json")
        if res and res.get("members"):
            rets = [m.get("eval_return_mean") for m in res["members"]]
            out.append(f"<p class=sub>its members' (seeds') final eval returns: "
                       f"{_e(', '.join(_num(x) for x in rets))}; {_num(res.get('updates_per_s'))} updates/s</p>")
    best_yaml = root / "best.yaml"
    if best_yaml.is_file():
        out.append(f"<p>train it again: <code>rayoffline train --config {_e(str(best_yaml))} --out runs/best</code>"
                   f"</p><details><summary>best.yaml</summary><pre>"
                   f"{_e(best_yaml.read_text(encoding='utf-8', errors='replace'))}</pre></details>")
    return head + "".join(out)


def _scatter_section(ranked: list[dict], keys: list[str], metric: str, spec: dict) -> str:
    head = "<h2>Metric against each swept parameter</h2>"
    if not keys:
        return head + _na("the sweep swept no parameter (its space is empty)")
    if not ranked:
        return head + _na(f"no configuration reported {metric} yet")
    cols = min(3, len(keys))
    n_rows = math.ceil(len(keys) / cols)
    fig = _figure(4.5 * cols, 3.5 * n_rows)
    space = spec.get("space") or {}
    for i, key in enumerate(keys):
        ax = fig.add_subplot(n_rows, cols, i + 1)
        xs = [r["config"].get(key) for r in ranked]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if numeric:
            pos = [float(x) for x in xs]
        else:
            labels = sorted({json.dumps(x) for x in xs})
            pos = [labels.index(json.dumps(x)) for x in xs]
            ax.set_xticks(range(len(labels)), [x.strip('"') for x in labels], rotation=30, fontsize=8)
        ys = [r["mean"] for r in ranked]
        ax.errorbar(pos, ys, yerr=[r["std"] or 0.0 for r in ranked], fmt="o", ms=5, alpha=0.8, capsize=2,
                    label="configuration")
        ax.scatter([pos[0]], [ys[0]], s=120, facecolors="none", edgecolors="red", lw=2, label="best")
        dist = next(iter(space.get(key) or {"": None}))
        if numeric and (dist in ("loguniform", "qloguniform")
                        or min(pos) > 0 and max(pos) / max(min(pos), 1e-12) >= 100):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric, fontsize=8)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    return (head + "<p class=sub>each configuration's metric (mean over seeds; bars: std across seeds), the best "
            "circled</p>" + _img(fig, "metric against parameters"))


def _sweep_curves_section(root: Path, rows: list[dict], metric: str) -> str:
    head = f"<h2>{_e(metric)} over steps</h2>"
    fig = _figure(9.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for r in rows:
        d = Path(r["run_dir"]) if r.get("run_dir") else None
        if d is None or not d.is_dir():
            d = root / "trials" / str(r["trial"])
        steps, vals = series(_read_jsonl(d / "metrics.jsonl"), metric)
        if not len(steps):
            continue
        best = r["rank"] == 1 and r["mean"] is not None
        ax.plot(steps, np.nanmean(vals, axis=1), marker="o" if len(steps) < 12 else None, ms=3,
                lw=2.5 if best else 1.0, alpha=1.0 if best else 0.45, color="tab:red" if best else None,
                label=f"best: {r['trial']}" if best else None, zorder=3 if best else 2)
        drawn += 1
    if not drawn:
        return head + _na(f"no trial logged {metric} in its metrics.jsonl")
    ax.set_xlabel("step")
    ax.set_ylabel(metric + " (mean over seeds)")
    ax.set_title(f"{drawn} configurations")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return head + _img(fig, f"{metric} over steps")


# -------------------------------------------------------------------------------------------------------- helpers

def _page(title: str, parts: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(p for p in parts if p)
            + "\n<p class=sub>made by <code>rayoffline report</code>; one file, figures embedded</p>\n</body></html>\n")


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(max(w, 1.0), max(h, 1.0)), layout="tight")
    FigureCanvasAgg(fig)
    return fig


def png_data_uri(fig) -> str:
    """A matplotlib Figure as a data:image/png;base64 URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(fig, alt: str) -> str:
    return f"<img alt=\"{_e(alt)}\" src=\"{png_data_uri(fig)}\">"


def _table(head: list[str], body: list[tuple[bool, list[str]]], raw_last: bool = False) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for best, cells in body:
        tds = []
        for i, c in enumerate(cells):
            raw = raw_last and i == len(cells) - 1
            cls = " class=num" if _numeric_text(c) else ""
            tds.append(f"<td{cls}>{c if raw else _e(c)}</td>")
        out.append(f"<tr{' class=best' if best else ''}>" + "".join(tds) + "</tr>")
    return "".join(out) + "</table>"


def _numeric_text(s: str) -> bool:
    if "_" in s:  # float() reads '58726_00003' (a trial id) as a number
        return False
    try:
        float(s.replace(",", ""))
        return True
    except ValueError:
        return False


def _na(msg: str) -> str:
    return f"<p class=na>not available: {_e(msg)}</p>"


def _note(msg: str) -> str:
    return f"<p class=na>{_e(msg)}</p>"


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _float(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _float_or_none(x: str | None) -> float | None:
    try:
        return float(x) if x not in (None, "") else None
    except ValueError:
        return None


def _parse(x: str | None) -> Any:
    """A results.csv cell back to its value ('0.6' -> 0.6, '[16, 16]' -> [16, 16], '' -> None)."""
    if x is None or x == "":
        return None
    import yaml
    try:
        return yaml.safe_load(x)
    except yaml.YAMLError:
        return x


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return str(v)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def _read_json(path: Path) -> tuple[Any, str | None]:
    """(the parsed file, None) or (None, why not: 'is missing' / 'is unreadable (...)')."""
    if not path.is_file():
        return None, "is missing"
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return (obj, None) if isinstance(obj, dict) else (None, "is not a JSON object")


def _read_yaml(path: Path) -> tuple[Any, str | None]:
    import yaml
    if not path.is_file():
        return None, "is missing"
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as e:
        return None, f"is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return (obj, None) if isinstance(obj, dict) else (None, "is not a YAML mapping")


def _atomic_write(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file beside it and a rename: readers see the old or the new page."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the page from the rest of a team
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
