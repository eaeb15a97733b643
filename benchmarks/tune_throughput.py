"""Fused vs unfused sweeps: a 16-configuration IQL sweep and a 16-configuration CQL sweep, each run once with
`fuse: true` (configurations packed into K-member learners) and once with `fuse: false` (one process per
configuration); wall-clock time and configuration-updates/s of the whole `rayoffline tune` command.

Setting. builtin:pendulum-medium (embedded, no download); a 4x4 grid over per-member coefficients (IQL:
expectile x beta; CQL: cql_alpha x cql_temp: `rayoffline algos` marks them "(per member)", so all 16 share one
pack key), 1 seed, FIFO scheduler, random (= grid) search, 2x256 networks (Hopper-like; also CQL's, whose
default is 3x256), batch 256, `--steps` updates per configuration (the same for both algorithms and both
modes), log_every = steps / 3, no intermediate checkpoint, evaluation only at the end with 3 episodes.

Modes (resources per the sweep file's `resources:`):
- fused: `fuse: true`, `resources: {cpus: 1}` per pack, `pack_size: auto` (`--pack-size N` overrides it). On a
  CPU-only local Ray, auto spreads the 16 configurations over as many packs as the machine has cores (not
  the max(4, cores) logical CPUs the local Ray gets), so on a 2-core machine 2 packs of 8 members. How many packs a run
  made and how many ran at once come from OUT/packs/*.json.
- unfused: `fuse: false`, `resources: {cpus: 1}` per trial and `max_concurrency` = the number of cores. Each
  trial is a single-threaded process; more of them at once than cores only time-slice the cores (and Ray would
  allow max(4, cores) at once on this machine), so the fair baseline keeps one trial per core.

Each measurement is a fresh `python -m rayoffline tune SWEEP --out DIR --set ...` process, timed from launch
to exit, so Ray's start-up and shutdown count the same way in both modes. Repeated `--repeats` times
(median reported), fused first on even repeats and unfused first on odd ones.

Figures:
- configuration-updates = sum over configurations of the steps each trained x its seeds (OUT/results.csv);
  config-updates/s = that / the process's wall-clock time (start-up, data loading, evaluation included).
- steady state, to separate start-up amortization from per-update speed: member-updates/s of one training
  process (a pack: passes/s x members in the pass; an unfused trial: its updates/s) from the trials'
  metrics.jsonl, every log interval but each trial's first (warm-up, pack rebuilds), median; with the number
  of such processes that ran at once (from each trial's result.json: its wall_s up to the file's time).

    python benchmarks/tune_throughput.py [--steps 120] [--repeats 2] [--algos iql,cql] [--readme] [--json F]
    python benchmarks/tune_throughput.py --gpu [--json OUT.json]      # on a CUDA machine
    python benchmarks/tune_throughput.py [--gpu] --dry-run            # print and validate the sweeps only

--gpu: the same two sweeps on CUDA (fused: one pack per sweep holding the GPU, `resources: {cpus: 1, gpus: 1}`;
unfused: `resources: {cpus: 1, gpus: 0.0625}` so that the 16 trials share the GPU, max_concurrency 16), plus a
64-configuration fused CQL sweep (cql_alpha x cql_temp, 8x8) on Hopper-shaped random data (obs 11, action 3,
100k transitions, built as benchmarks/scaling.py builds it; no environment, so no evaluation: the sweep's
metric is loss/critic) reporting pack member-updates/s against the 10,000 target (issue 8, H100/H200).
Targets (issue 8): fused >= 2x unfused config-updates/s on the CPU, >= 10x on a GPU. Timings are never
asserted in tests.

--readme writes the table between <!-- tune:start --> and <!-- tune:end --> in README.md when those markers
exist, else into benchmarks/results/tune_throughput.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MD_FALLBACK = ROOT / "benchmarks" / "results" / "tune_throughput.md"
MARKER = "tune"
N_CONFIGS = 16
CPU_STEPS, GPU_STEPS, BIG_STEPS = 120, 1000, 600
GRIDS = {  # per-member coefficients: all 16 configurations share one pack key
    "iql": {"algo.expectile": [0.6, 0.7, 0.8, 0.9], "algo.beta": [1.0, 3.0, 6.0, 10.0]},
    "cql": {"algo.cql_alpha": [0.5, 2.0, 5.0, 10.0], "algo.cql_temp": [0.5, 1.0, 2.0, 5.0]},
}
BIG_GRID = {"algo.cql_alpha": [0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0],
            "algo.cql_temp": [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0]}
BIG_TARGET = 10_000.0


# ----- the sweeps ------------------------------------------------------------------------------------------
def log_every(steps: int) -> int:
    return max(1, steps // 3)


def sweep_for(algo: str, steps: int, device: str, data: str = "builtin:pendulum-medium",
              grid: dict[str, list[float]] | None = None, eval_episodes: int = 3) -> dict[str, Any]:
    """The sweep mapping both modes share (the mode's keys come as --set overrides, see mode_sets)."""
    sweep = {
        "algo": algo, "data": data,
        "config": {"steps": steps, "log_every": log_every(steps), "eval_every": 0, "eval_episodes": eval_episodes,
                   "checkpoint_every": 0, "batch_size": 256, "device": device, "algo": {"hidden": [256, 256]}},
        "space": {k: {"grid": v} for k, v in (grid or GRIDS[algo]).items()},
        "seeds": 1, "scheduler": {"type": "fifo"}, "search": {"type": "random"},
        "resources": {"cpus": 1, "gpus": 0}, "name": f"bench-{algo}",
    }
    if not eval_episodes:
        sweep.update(metric="loss/critic", mode="min")
    return sweep


def mode_sets(fused: bool, gpu: bool, cores: int, pack_size: str) -> list[str]:
    if fused:
        return ["fuse=true", "resources.cpus=1", f"resources.gpus={1 if gpu else 0}", f"pack_size={pack_size}",
                "max_concurrency=0"]
    concurrency = N_CONFIGS if gpu else cores
    return ["fuse=false", "resources.cpus=1", f"resources.gpus={1 / N_CONFIGS if gpu else 0}",
            f"max_concurrency={concurrency}"]


def validate(path: Path, sets: list[str], meta: dict[str, Any] | None) -> int:
    """load_sweep (+ check_metric when the dataset is at hand); returns the number of configurations."""
    from rayoffline.sweep.space import check_metric, load_sweep
    spec = load_sweep(path, sets)
    if meta is not None:
        check_metric(spec, meta)
    n = spec.num_samples
    for dist in spec.space.values():
        n *= len(dist.get("grid", [None]))
    return n


# ----- one measurement -------------------------------------------------------------------------------------
def run_tune(sweep_path: Path, out: Path, sets: list[str], timeout: float) -> float:
    """Runs `rayoffline tune` in a fresh process (its own session, so a timeout takes Ray's processes with it);
    returns its wall-clock seconds. Output goes to OUT.log."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # a local, short-lived Ray instance per measurement (as the tests run theirs); a user's own setting wins
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = [sys.executable, "-m", "rayoffline", "tune", str(sweep_path), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"rayoffline tune ran past {timeout:.0f} s; log: {log}") from None
        finally:  # also on SIGTERM (the caller's own timeout): Ray's processes (raylet, GCS, workers) share the
            try:  # driver's session, and none may outlive it
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        wall = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"rayoffline tune exited {rc}; log {log}:\n{tail}")
    return wall


def _intervals(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if "perf/updates_per_s" in r]


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


def collect(out: Path, fused: bool, wall: float, concurrency: int) -> dict[str, Any]:
    """Figures of one finished `rayoffline tune` directory."""
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    statuses = [r["status"] for r in rows]
    config_updates = sum(int(r["step"] or 0) * len(r["seeds"].split()) for r in rows)
    rates: list[float] = []
    spans: dict[str, tuple[float, float]] = {}  # training process (pack or trial) -> (first start, last end)
    for r in rows:
        run_dir = Path(r["run_dir"])
        intervals = _intervals(run_dir / "metrics.jsonl")
        # every interval but the trial's first (warm-up, pack rebuilds); a 1-interval run keeps its only one
        for row in intervals[1:] or intervals:
            rates.append(row["perf/updates_per_s"] * row.get("perf/pack_members", 1))
        result_path = run_dir / "result.json"
        if result_path.exists():  # written when the trial finished; wall_s: since it joined its pack / started
            result = json.loads(result_path.read_text())
            end = result_path.stat().st_mtime
            who = result.get("pack") or run_dir.name
            a, b = spans.get(who, (end - result["wall_s"], end))
            spans[who] = (min(a, end - result["wall_s"]), max(b, end))
    res: dict[str, Any] = {"wall_s": wall, "configs": len(rows), "finished": statuses.count("finished"),
                           "config_updates": config_updates, "config_updates_per_s": config_updates / wall,
                           "process_member_updates_per_s": statistics.median(rates) if rates else None,
                           "concurrent": _max_overlap(list(spans.values())) or concurrency}
    if fused:
        packs = [json.loads(p.read_text()) for p in sorted((out / "packs").glob("*.json"))]
        res.update(packs=len(packs),
                   pack_members=[max((h["members"] for h in p["history"]), default=0) for p in packs],
                   pack_passes=[p["passes"] for p in packs],
                   member_updates=sum(sum(p["member_updates"].values()) for p in packs))
    else:
        res.update(packs=None)
    return res


def measure(algo: str, sweep_path: Path, workdir: Path, fused: bool, sets: list[str], concurrency: int,
            timeout: float, tag: str) -> dict[str, Any]:
    out = workdir / f"{algo}-{'fused' if fused else 'unfused'}-{tag}"
    load0 = os.getloadavg()[0]
    wall = run_tune(sweep_path, out, sets, timeout)
    res = collect(out, fused, wall, concurrency)
    res.update(load_start=load0, load_end=os.getloadavg()[0], out=str(out))
    shown = json.dumps({k: v for k, v in res.items() if k != "out"})
    print(f"{algo} {'fused' if fused else 'unfused'} [{tag}]: {shown}", flush=True)
    return res


# ----- the table -------------------------------------------------------------------------------------------
def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(algo: str, device: str, steps: int, fused: list[dict], unfused: list[dict]) -> dict[str, Any]:
    row = {"device": device, "algo": algo, "configs": fused[0]["configs"], "steps": steps}
    for name, runs in (("fused", fused), ("unfused", unfused)):
        for key in ("wall_s", "config_updates_per_s", "process_member_updates_per_s"):
            row[f"{name}_{key}"] = median_of(runs, key)
        row[f"{name}_concurrent"] = max(r["concurrent"] for r in runs)
        row[f"{name}_runs"] = runs
    row["packs"] = sorted({r["packs"] for r in fused})
    row["ratio"] = row["fused_config_updates_per_s"] / row["unfused_config_updates_per_s"]
    return row


def render(rows: list[dict[str, Any]], header: str, big: dict[str, Any] | None) -> str:
    lines = [header, "",
             "| device | algo | configurations | steps | fused wall s | unfused wall s | fused config-updates/s "
             "| unfused config-updates/s | fused/unfused | packs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['algo']} | {r['configs']} | {r['steps']:,} | {r['fused_wall_s']:.1f} "
                     f"| {r['unfused_wall_s']:.1f} | {r['fused_config_updates_per_s']:,.1f} "
                     f"| {r['unfused_config_updates_per_s']:,.1f} | {r['ratio']:.2f} "
                     f"| {'/'.join(str(p) for p in r['packs'])} |")
    lines += ["", "Steady state (log intervals after each trial's first; median): member-updates/s of one training "
              "process and how many ran at once.", "",
              "| device | algo | fused: per pack | packs at once | unfused: per trial | trials at once "
              "| fused x at once / unfused x at once |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        f, u = r["fused_process_member_updates_per_s"], r["unfused_process_member_updates_per_s"]
        agg = (f * r["fused_concurrent"]) / (u * r["unfused_concurrent"]) if f and u else None
        lines.append(f"| {r['device']} | {r['algo']} | {_num(f)} | {r['fused_concurrent']} | {_num(u)} "
                     f"| {r['unfused_concurrent']} | {f'{agg:.2f}' if agg else '-'} |")
    if big is not None:
        lines += ["", f"64 fused CQL configurations on Hopper-shaped data (obs 11, action 3, 2x256, batch 256, "
                      f"{big['steps']:,} steps, {big['packs']} pack(s)): {_num(big['process_member_updates_per_s'])} "
                      f"member-updates/s per pack in the steady state (target >= {BIG_TARGET:,.0f}); "
                      f"{big['config_updates_per_s']:,.0f} config-updates/s over the whole command "
                      f"({big['wall_s']:.1f} s)."]
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def write_table(table: str) -> str:
    from benchmarks._readme import README, write_block
    if f"<!-- {MARKER}:start -->" in README.read_text() and f"<!-- {MARKER}:end -->" in README.read_text():
        write_block(MARKER, table)
        return str(README)
    MD_FALLBACK.parent.mkdir(parents=True, exist_ok=True)
    MD_FALLBACK.write_text("# Fused vs unfused sweeps\n\n`python benchmarks/tune_throughput.py --readme` "
                           "(README.md has no `<!-- tune:start -->` markers yet).\n\n" + table + "\n")
    return str(MD_FALLBACK)


# ----- main ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algos", default="iql,cql")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"updates per configuration (default {CPU_STEPS} on CPU, {GPU_STEPS} with --gpu)")
    ap.add_argument("--repeats", type=int, default=None, help="default 2 (CPU), 1 (--gpu)")
    ap.add_argument("--pack-size", default="auto", help="fused sweeps' pack_size (default auto)")
    ap.add_argument("--gpu", action="store_true", help="on CUDA, plus the 64-configuration CQL sweep")
    ap.add_argument("--big-steps", type=int, default=BIG_STEPS, help="steps of the 64-configuration CQL sweep")
    ap.add_argument("--no-big", action="store_true", help="--gpu without the 64-configuration sweep")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one `rayoffline tune` may run")
    ap.add_argument("--dry-run", action="store_true", help="print and validate the sweeps (no Ray, no training)")
    ap.add_argument("--readme", action="store_true", help="write the table (README.md markers, else "
                                                          "benchmarks/results/tune_throughput.md)")
    ap.add_argument("--json", default=None, help="also write every figure as JSON here")
    ap.add_argument("--keep", default=None, help="keep the sweep directories under this directory")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: clean up the running sweep's processes
    steps = args.steps or (GPU_STEPS if args.gpu else CPU_STEPS)
    repeats = args.repeats or (1 if args.gpu else 2)
    cores = os.cpu_count() or 1
    device = "cuda" if args.gpu else "cpu"
    algos = [a for a in args.algos.split(",") if a]
    unknown = sorted(set(algos) - set(GRIDS))
    if unknown:
        ap.error(f"--algos: {', '.join(unknown)}; this benchmark sweeps {', '.join(GRIDS)}")

    from benchmarks.throughput import machine
    if args.gpu and not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            ap.error("--gpu: torch sees no CUDA device (use --dry-run to check the sweeps on a CPU machine)")

    keep = Path(args.keep).resolve() if args.keep else None
    tmp = tempfile.TemporaryDirectory(prefix="tune-throughput-") if keep is None else None
    work = keep if keep is not None else Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        _main(args, algos, steps, repeats, cores, device, work, machine())
    finally:
        if tmp is not None:
            tmp.cleanup()


def _main(args, algos: list[str], steps: int, repeats: int, cores: int, device: str, work: Path,
          machine_line: str) -> None:
    from rayoffline.learner.worker import open_dataset
    pendulum_meta = open_dataset("builtin:pendulum-medium")[1]
    sweeps: list[tuple[str, Path, int]] = []
    for algo in algos:
        path = work / f"sweep_{algo}.yaml"
        path.write_text(yaml.safe_dump(sweep_for(algo, steps, device), sort_keys=False, default_flow_style=None))
        sweeps.append((algo, path, steps))
    big_path = None
    if args.gpu and not args.no_big:
        from benchmarks.scaling import make_dataset
        (work / "hopper-data").mkdir(exist_ok=True)
        ds = make_dataset(work / "hopper-data")
        big_path = work / "sweep_cql64_hopper.yaml"
        big = sweep_for("cql", args.big_steps, device, data=str(ds), grid=BIG_GRID, eval_episodes=0)
        big["name"] = "bench-cql64"
        big_path.write_text(yaml.safe_dump(big, sort_keys=False, default_flow_style=None))
    pack_size = args.pack_size
    for algo, path, _ in sweeps:
        for fused in (True, False):
            sets = mode_sets(fused, args.gpu, cores, pack_size)
            n = validate(path, sets, pendulum_meta)
            assert n == N_CONFIGS, (algo, n)
            if args.dry_run:
                print(f"# {algo} {'fused' if fused else 'unfused'}: {n} configurations; rayoffline tune {path} "
                      + " ".join(f"--set {s}" for s in sets))
        if args.dry_run:
            print(path.read_text())
    if big_path is not None:
        sets = mode_sets(True, True, cores, pack_size)
        n = validate(big_path, sets, open_dataset(str(ds))[1])
        assert n == 4 * N_CONFIGS, n
        if args.dry_run:
            print(f"# cql64 fused: {n} configurations; rayoffline tune {big_path} "
                  + " ".join(f"--set {s}" for s in sets))
            print(big_path.read_text())
    if args.dry_run:
        return

    load_start = os.getloadavg()
    t_start = time.time()
    concurrency = N_CONFIGS if args.gpu else cores
    runs: dict[str, dict[bool, list[dict[str, Any]]]] = {algo: {True: [], False: []} for algo, _, _ in sweeps}
    errors: list[str] = []
    big_res = None

    def save_partial() -> None:  # after every measurement: a run cut short by a timeout keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps({"partial": True, "machine": machine_line, "steps": steps,
                                                   "runs": {a: {"fused": r[True], "unfused": r[False]}
                                                            for a, r in runs.items()},
                                                   "cql64": big_res, "errors": errors}, indent=2, default=str) + "\n")

    def attempt(algo: str, path: Path, fused: bool, sets: list[str], conc: int, tag: str) -> dict | None:
        try:
            return measure(algo, path, work, fused, sets, conc, args.timeout, tag)
        except RuntimeError as e:
            errors.append(f"{algo} {'fused' if fused else 'unfused'} [{tag}]: {e}")
            print(errors[-1], flush=True)
            return None
        finally:
            save_partial()

    if big_path is not None:  # first on the GPU: the headline figure
        big_res = attempt("cql64", big_path, True, mode_sets(True, True, cores, pack_size), 1, "0")
        if big_res is not None:
            big_res["steps"] = args.big_steps
    for algo, path, _ in sweeps:
        for i in range(repeats):
            for fused in ((True, False) if i % 2 == 0 else (False, True)):
                res = attempt(algo, path, fused, mode_sets(fused, args.gpu, cores, pack_size), concurrency, str(i))
                if res is not None:
                    runs[algo][fused].append(res)
    rows = [summarize(algo, device, steps, runs[algo][True], runs[algo][False]) for algo, _, _ in sweeps
            if runs[algo][True] and runs[algo][False]]
    load_end = os.getloadavg()

    import torch
    gpu = f"; GPU {torch.cuda.get_device_name(0)}" if args.gpu and torch.cuda.is_available() else ""
    header = (f"Machine: {machine_line}{gpu}; load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at the "
              f"end ({(time.time() - t_start) / 60:.1f} min). Each figure: median of {repeats} fresh "
              f"`rayoffline tune` processes (fused and unfused alternating), builtin:pendulum-medium, 2x256 "
              f"networks, batch 256, 1 seed, FIFO, evaluation at the end (3 episodes); fused: `pack_size: "
              f"{pack_size}`, 1 {'GPU' if args.gpu else 'CPU'} per pack; unfused: one "
              + ("process per configuration, 1/16 GPU each" if args.gpu else
                 "single-threaded process per configuration") +
              f", {N_CONFIGS if args.gpu else cores} at once.")
    table = render(rows, header, big_res)
    if errors:
        table += "\n\nFailed measurements (not in the medians): " + "; ".join(e.splitlines()[0] for e in errors)
    print(table)
    if args.readme and rows:
        print(f"table written to {write_table(table)}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine_line + gpu, "load_start": load_start, "load_end": load_end, "steps": steps,
            "repeats": repeats, "pack_size": pack_size, "rows": rows, "cql64": big_res, "errors": errors,
            "table": table}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
