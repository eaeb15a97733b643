"""A finished sweep's results: one row per configuration, ranked; results.csv, best.yaml and sweep.png."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import yaml

STD_PREFIX = "seed_std/"


def _trial_id(result) -> str | None:
    tid = (result.metrics or {}).get("trial_id")
    return str(tid) if tid else None


def build_rows(grid, spec, out: Path) -> list[dict[str, Any]]:
    """One row per Tune trial (configuration), ranked by the sweep's metric (its latest reported value: the
    configuration's mean over its seeds): finished configurations first, then ones a scheduler stopped early,
    then failed ones and ones that never reported the metric."""
    rows = []
    for result in grid:
        steps = int((result.config or {}).get("steps", spec.config.get("steps", 100_000)))
        tid = _trial_id(result)
        value = std = at = None
        df = result.metrics_dataframe
        if df is not None and spec.metric in df.columns:
            seen = df[df[spec.metric].notna()]
            if len(seen):
                last = seen.iloc[-1]
                value = float(last[spec.metric])
                col = STD_PREFIX + spec.metric
                std = float(last[col]) if col in seen.columns and last[col] == last[col] else None
                at = int(last["step"]) if "step" in seen.columns else None
        last_step = (result.metrics or {}).get("step")
        if result.error is not None:
            status = "error"
        elif last_step is not None and int(last_step) >= steps:
            status = "finished"
        else:
            status = f"stopped at step {last_step}" if last_step is not None else "not started"
        rows.append({"trial": tid, "status": status, "step": last_step, "config": dict(result.config or {}),
                     "seeds": list(spec.seeds), "metric": spec.metric, "mean": value, "std": std, "metric_step": at,
                     "run_dir": str(out / "trials" / tid) if tid else None,
                     "error": str(result.error).splitlines()[0] if result.error is not None else None})
    sign = -1.0 if spec.mode == "max" else 1.0
    # configurations trained to the end rank above ones a scheduler stopped early (whose metric is from an
    # earlier step), and those above failed ones
    rows.sort(key=lambda r: (r["status"] == "error", r["mean"] is None, r["status"] != "finished",
                             sign * r["mean"] if r["mean"] is not None else 0.0))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def best_config(spec, row: dict[str, Any]) -> dict[str, Any]:
    """The best configuration as a run config file: `rayoffline train --config best.yaml --out DIR` trains
    it again (algorithm, dataset, every setting and its seeds as members)."""
    from ..learner.config import build_config, config_to_yaml
    from .space import pack_fields
    raw, _ = pack_fields(spec, row["config"])
    raw = json.loads(json.dumps(raw))
    raw["members"] = [{"seed": s} for s in spec.seeds]
    raw.pop("progress", None)
    cfg = build_config(spec.algo, raw)
    out = config_to_yaml(cfg, spec.data)
    out["progress"] = "auto"
    return out


def write_outputs(rows: list[dict[str, Any]], spec, out: Path) -> dict[str, Any]:
    from ..learner import checkpoint as ckpt
    keys = list(spec.space)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "trial", "status", "step", *keys, "seeds", f"{spec.metric} mean", f"{spec.metric} std",
                "run_dir"])
    for r in rows:
        w.writerow([r["rank"], r["trial"], r["status"], r["step"], *[_cell(r["config"].get(k)) for k in keys],
                    " ".join(str(s) for s in r["seeds"]), _cell(r["mean"]), _cell(r["std"]), r["run_dir"]])
    csv_path = out / "results.csv"
    ckpt.atomic_write_text(csv_path, buf.getvalue())
    paths: dict[str, Any] = {"results_csv": str(csv_path), "best_yaml": None, "plot": None}
    ranked = [r for r in rows if r["mean"] is not None and r["status"] != "error"]
    if ranked:
        best = out / "best.yaml"
        header = (f"# best configuration of sweep '{spec.name}' ({ranked[0]['trial']}): {spec.metric} "
                  f"{_cell(ranked[0]['mean'])} +- {_cell(ranked[0]['std'])} over seeds {spec.seeds}\n"
                  f"# rayoffline train --config {best} --out runs/best\n")
        ckpt.atomic_write_text(best, header + yaml.safe_dump(best_config(spec, ranked[0]), sort_keys=False))
        paths["best_yaml"] = str(best)
    if ranked and keys:
        paths["plot"] = str(plot(ranked, spec, out / "sweep.png"))
    return paths


def plot(rows: list[dict[str, Any]], spec, path: Path) -> Path:
    """The metric (mean over seeds, bars: std across seeds) against each swept key."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..learner import checkpoint as ckpt

    keys = list(spec.space)
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        kind = next(iter(spec.space[key]))
        xs = [r["config"].get(key) for r in rows]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if numeric:
            pos = xs
        else:
            labels = sorted({json.dumps(x) for x in xs})
            pos = [labels.index(json.dumps(x)) for x in xs]
            ax.set_xticks(range(len(labels)), [x.strip('"') for x in labels], rotation=30, fontsize=8)
        ax.errorbar(pos, [r["mean"] for r in rows], yerr=[r["std"] or 0.0 for r in rows], fmt="o", ms=4,
                    alpha=0.8, capsize=2)
        ax.scatter([pos[0]], [rows[0]["mean"]], s=90, facecolors="none", edgecolors="red", label="best")
        if numeric and kind in ("loguniform", "qloguniform") or (
                numeric and min(xs) > 0 and max(xs) / max(min(xs), 1e-12) >= 100):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(spec.metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{spec.name}: {spec.algo}, {len(rows)} configurations x {len(spec.seeds)} seeds "
                 f"(bars: std across seeds)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    ckpt.write_atomic(path, "wb", lambda f: f.write(buf.getvalue()))
    return path


def format_table(rows: list[dict[str, Any]], spec, limit: int = 20) -> str:
    keys = list(spec.space)
    head = ["rank", "trial", *[k.split(".")[-1] for k in keys], f"{spec.metric} (mean +- std over "
            f"{len(spec.seeds)} seed{'s' if len(spec.seeds) != 1 else ''})", "status"]
    body = []
    for r in rows[:limit]:
        score = "-" if r["mean"] is None else (f"{r['mean']:.4g}" + (f" +- {r['std']:.3g}" if r["std"] is not None
                                                                   else ""))
        body.append([str(r["rank"]) + (" *" if r["rank"] == 1 and r["mean"] is not None else ""), str(r["trial"]),
                     *[_cell(r["config"].get(k)) for k in keys], score, r["status"]])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(head, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in body]
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more in results.csv")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return json.dumps(list(v))
    return str(v)
