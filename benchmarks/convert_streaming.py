"""Streaming conversion at scale: transitions/s and the driver's peak memory for Hopper-shaped Parquet.

Setting (issue 7, "data at cluster scale"): N transitions (default 20M) of a Hopper-shaped source (observations
11-dim, actions 3-dim in [-1, 1], next observations, rewards, flags, episode ids; episodes of 1,000 steps
ending by truncation; random values) written by this script as several Parquet files (default 1M rows each)
under a temporary directory, deleted afterwards. `df -h` of that directory is checked first: the source and the
converted copy need ~2 x 118 bytes a transition.

Each measurement runs in a fresh process: Ray is started and a small conversion through Ray warms its worker
processes (not timed), the peak resident memory is reset (/proc/self/clear_refs), then
`rayoffline.data.convert(source, out)` is timed. Reported: transitions/s, the driver's peak RSS during the
conversion (VmHWM after the reset) and over its whole life (ru_maxrss, Ray start-up included). Repeats are
fresh processes; medians are reported.

`--baseline REF` also measures the converter of git revision REF (e.g. the in-memory one, 7f39cd0) in the same
run, on the first `--baseline-rows` transitions' files (it holds the whole source in the driver), together with
the current converter on the same files, so the two are compared on equal terms.

    python benchmarks/convert_streaming.py [--rows 20000000] [--file-rows 1000000] [--repeats 2]
        [--baseline 7f39cd0 --baseline-rows 2000000] [--dir /tmp] [--readme]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OBS, ACT, STEPS = 11, 3, 1000
BYTES_PER_ROW = 4 * (2 * OBS + ACT + 1) + 2 + 8 + 4  # as numpy columns (bools 1 byte): 118
START, END = "<!-- data-bench:start -->", "<!-- data-bench:end -->"

_MEASURE = r"""
import json, os, resource, sys, time
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
src, out, warm_src = sys.argv[1], sys.argv[2], sys.argv[3]
from rayoffline import data
from rayoffline._ray import ensure_ray
ensure_ray()
# warm-up: Ray's worker processes start on the first tasks; a small conversion forced through Ray starts them
os.environ["RAYOFFLINE_LOCAL_WRITE_MAX_BYTES"] = "0"
data.convert(warm_src, out + "-warm")
os.environ.pop("RAYOFFLINE_LOCAL_WRITE_MAX_BYTES")
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the current RSS
before = status("VmRSS")
t = time.perf_counter()
meta = data.convert(src, out)
wall = time.perf_counter() - t
print(json.dumps({"rows": meta["num_transitions"], "wall_s": wall, "peak_rss": status("VmHWM"),
                  "rss_before": before, "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "files": len(meta["partitions"][0]["files"])}))
"""


def machine() -> str:
    from data_throughput import machine as m  # noqa: PLC0415 - the same description as the data-bench table
    return m()


def write_source(where: Path, rows: int, file_rows: int) -> list[Path]:
    """Hopper-shaped Parquet files of `file_rows` rows each (the last one shorter), episodes of STEPS steps."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    def fsl(a):
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])

    where.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = []
    for i, start in enumerate(range(0, rows, file_rows)):
        n = min(file_rows, rows - start)
        row = np.arange(start, start + n)
        obs = rng.standard_normal((n + 1, OBS), dtype=np.float32)
        trunc = (row % STEPS) == STEPS - 1
        table = pa.table({
            "observations": fsl(obs[:-1]), "actions": fsl(rng.uniform(-1, 1, (n, ACT)).astype(np.float32)),
            "rewards": rng.standard_normal(n, dtype=np.float32), "next_observations": fsl(obs[1:]),
            "terminations": np.zeros(n, bool), "truncations": trunc, "episode_id": row // STEPS,
            "step": (row % STEPS).astype(np.int32)})
        path = where / f"part-{i:05d}.parquet"
        pq.write_table(table, path)
        files.append(path)
    return files


def measure(src: Path, out: Path, warm: Path, pythonpath: str | None = None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(out), str(warm)], capture_output=True,
                       text=True, env=env, cwd=pythonpath or str(ROOT))
    if r.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{r.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}-warm", ignore_errors=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    rates = [r["rows"] / r["wall_s"] for r in runs]
    return {"rows": runs[0]["rows"], "files": runs[0]["files"], "runs": len(runs),
            "per_s": statistics.median(rates), "min_per_s": min(rates), "max_per_s": max(rates),
            "wall_s": statistics.median(r["wall_s"] for r in runs),
            "peak_rss": max(r["peak_rss"] for r in runs), "ru_maxrss": max(r["ru_maxrss"] for r in runs)}


def write_readme(block: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    old, tail = rest.split(END, 1)
    old = old.strip("\n").split("\n\nStreaming conversion", 1)[0]
    readme.write_text(f"{head}{START}\n{old}\n\n{block}\n{END}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=20_000_000, help="transitions of the source (default 20M)")
    ap.add_argument("--file-rows", type=int, default=1_000_000, help="rows per source Parquet file")
    ap.add_argument("--repeats", type=int, default=2, help="timed conversions (fresh processes)")
    ap.add_argument("--baseline", default=None, metavar="REF", help="also measure the converter of git REF")
    ap.add_argument("--baseline-rows", type=int, default=2_000_000, help="source size for the baseline comparison")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the source and output go (deleted after)")
    ap.add_argument("--readme", action="store_true", help="append the figures to README.md's data-bench block")
    args = ap.parse_args()

    need = 2 * args.rows * BYTES_PER_ROW * 1.1
    free = shutil.disk_usage(args.dir).free
    print(f"disk: {free / 2**30:.1f} GiB free in {args.dir}, ~{need / 2**30:.1f} GiB needed", flush=True)
    if free < need:
        sys.exit(f"not enough disk in {args.dir}: pass --rows {int(free / 2.2 / BYTES_PER_ROW):,} or another --dir")
    who = machine()
    load_avg = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="rayoffline-convert-bench-", dir=args.dir))
    baseline_dir = None
    try:
        t = time.perf_counter()
        files = write_source(tmp / "src", args.rows, args.file_rows)
        print(f"wrote {args.rows:,} transitions as {len(files)} Parquet files in {time.perf_counter() - t:.0f} s "
              f"({sum(f.stat().st_size for f in files) / 2**30:.2f} GiB)", flush=True)
        warm = write_source(tmp / "warm", 2 * STEPS, STEPS)[0].parent
        runs = []
        for i in range(args.repeats):
            runs.append(measure(tmp / "src", tmp / f"out{i}", warm))
            print(f"  run {i + 1}: {runs[-1]['rows'] / runs[-1]['wall_s']:,.0f} transitions/s, driver peak "
                  f"{runs[-1]['peak_rss'] / 2**30:.2f} GiB", flush=True)
        full = summarize(runs)
        base = None
        if args.baseline:
            n_files = max(1, args.baseline_rows // args.file_rows)
            small = tmp / "small"
            small.mkdir()
            for f in files[:n_files]:
                os.link(f, small / f.name)
            baseline_dir = Path(tempfile.mkdtemp(prefix="rayoffline-baseline-"))
            subprocess.run(f"git -C {ROOT} archive {args.baseline} rayoffline | tar -x -C {baseline_dir}", shell=True,
                           check=True)
            new_runs, old_runs = [], []
            for i in range(args.repeats):  # alternated, so that a busy spell slows both alike
                new_runs.append(measure(small, tmp / f"snew{i}", warm))
                old_runs.append(measure(small, tmp / f"sold{i}", warm, pythonpath=str(baseline_dir)))
            base = (summarize(new_runs), summarize(old_runs))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if baseline_dir is not None:
            shutil.rmtree(baseline_dir, ignore_errors=True)

    def row(label: str, s: dict) -> tuple[str, str]:
        spread = f", {s['min_per_s'] / 1e3:,.0f}k-{s['max_per_s'] / 1e3:,.0f}k" if s["runs"] > 1 else ""
        return (label, f"{s['per_s'] / 1e3:,.0f}k transitions/s ({s['wall_s']:.1f} s{spread}, {s['files']} files); driver "
                       f"peak RSS {s['peak_rss'] / 2**30:.2f} GiB during the conversion, "
                       f"{s['ru_maxrss'] / 2**30:.2f} GiB over the process")
    rows = [row(f"streaming convert, {full['rows']:,} transitions from {len(files)} Parquet files, target: driver "
                f"<= 2 GiB, >= 74k transitions/s", full)]
    if base is not None:
        rows.append(row(f"same run, {base[0]['rows']:,} transitions: streaming converter", base[0]))
        rows.append(row(f"same run, {base[1]['rows']:,} transitions: converter of {args.baseline} (in memory)",
                        base[1]))
    end_avg = os.getloadavg()
    print(f"\nmachine: {who} (load average {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f} at start, "
          f"{end_avg[0]:.2f} {end_avg[1]:.2f} {end_avg[2]:.2f} at the end)")
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    block = "\n".join([
        f"Streaming conversion, `python benchmarks/convert_streaming.py` on {who} (load average "
        f"{load_avg[0]:.2f} at start, {end_avg[0]:.2f} at the end; Hopper-shaped Parquet; median (min-max) of "
        f"{args.repeats} fresh processes, each after a warm-up conversion through Ray):",
        "",
        "| step | result |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
    ])
    if args.readme:
        write_readme(block)
        print(f"\nwrote the figures to {ROOT / 'README.md'}")


if __name__ == "__main__":
    main()
