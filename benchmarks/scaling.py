"""Ray Train scaling on this machine: global transitions/s for 1 and 2 CPU workers, and time from command
to first update (in-process vs 1 and 2 Ray Train workers).

Each setting runs the real CLI (`python -m rayoffline train`) in a fresh process on Hopper-shaped random
data (obs 11, action 3; 100k transitions, converted once), fixed per-worker batch 256 (global batch
256 x workers), 2x256 networks, one torch thread per worker, replicate mode. Rates come from the run's own
metrics.jsonl (perf/updates_per_s, the warm-up interval dropped, median of the rest) times the global
batch; time to first update is measured from just before the command is launched to the moment the first
update finished (result.json's first_update_at). Repeated `--repeats` times; medians reported.

    python benchmarks/scaling.py [--algos td3_bc,iql] [--steps 1500] [--repeats 3] [--readme]
    python benchmarks/scaling.py --gpu [--algos cql,iql] [--json OUT.json]   # on a GPU machine

--gpu compares one Ray Train GPU worker with the in-process run on the same GPU (updates/s; target: the
worker's overhead <= 5%).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_dataset(root: Path) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayoffline import data
    n, rng = 100_000, np.random.default_rng(0)
    cols = {f"obs_{i}": rng.standard_normal(n).astype("float32") for i in range(11)}
    cols.update({f"act_{i}": rng.uniform(-1, 1, n).astype("float32") for i in range(3)})
    cols.update(r=rng.standard_normal(n).astype("float32"), term=np.zeros(n, bool),
                trunc=(np.arange(n) % 1000 == 999), ep=np.arange(n) // 1000)
    src = root / "src.parquet"
    pq.write_table(pa.table(cols), src)
    out = root / "hopper-shaped"
    data.convert(str(src), out, shards=8, mapping={"observations": "obs_*", "actions": "act_*", "rewards": "r",
                                                   "terminations": "term", "truncations": "trunc",
                                                   "episode_id": "ep"})
    return out


def run_once(algo: str, ds: Path, workers: int, steps: int, out: Path, gpu: bool = False) -> dict:
    args = [sys.executable, "-m", "rayoffline", "train", "--algo", algo, "--data", str(ds), "--out", str(out),
            "--steps", str(steps), "--set", f"batch_size={256 * max(workers, 1)}", "--set", "eval_episodes=0",
            "--set", "log_every=100", "--set", "checkpoint_every=0", "--set", "threads=1",
            "--set", "algo.hidden=[256,256]", "--set", "progress=off",
            "--set", f"device={'cuda' if gpu else 'cpu'}"]
    if workers:
        args += ["--num-workers", str(workers), "--data-mode", "replicate"]
        if gpu:
            args += ["--gpus-per-worker", "1", "--set", "device=cuda"]
    launched = time.time()
    subprocess.run(args, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = json.loads((out / "result.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/updates_per_s"] for r in rows if "perf/updates_per_s" in r][1:]  # drop the warm-up interval
    return {"transitions_per_s": statistics.median(rates) * 256 * max(workers, 1),
            "first_update_s": result["first_update_at"] - launched}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algos", default=None, help="default: td3_bc,iql (CPU), cql,iql (--gpu)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--readme", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="in-process vs one Ray Train worker on the same GPU")
    ap.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    args.algos = args.algos or ("cql,iql" if args.gpu else "td3_bc,iql")
    if args.gpu:
        return gpu_main(args)
    from benchmarks.throughput import machine
    load0 = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ds = make_dataset(Path(tmp))
        for algo in args.algos.split(","):
            row = {"algo": algo}
            for workers in (0, 1, 2):
                runs = [run_once(algo, ds, workers, args.steps, Path(tmp) / f"{algo}-{workers}-{i}")
                        for i in range(args.repeats)]
                row[workers] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                print(algo, workers, row[workers], flush=True)
            rows.append(row)
    lines = [f"Machine: {machine()}; load average {load0:.2f} at start. Per-worker batch 256, 2x256 networks, "
             f"1 thread per worker, replicate mode, {args.steps} steps; median of {args.repeats} runs, each a "
             f"fresh `rayoffline train` process.", "",
             "| algo | in-process transitions/s | 1 worker | 2 workers | 2 / 1 workers | first update: in-process "
             "| 1 worker | 2 workers |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['algo']} | {r[0]['transitions_per_s']:,.0f} | {r[1]['transitions_per_s']:,.0f} | "
                     f"{r[2]['transitions_per_s']:,.0f} | {r[2]['transitions_per_s'] / r[1]['transitions_per_s']:.2f} "
                     f"| {r[0]['first_update_s']:.1f} s | {r[1]['first_update_s']:.1f} s | "
                     f"{r[2]['first_update_s']:.1f} s |")
    table = "\n".join(lines)
    print(table)
    if args.readme:
        from benchmarks._readme import write_block
        write_block("scaling", table)


def gpu_main(args) -> None:
    import torch
    from benchmarks.throughput import machine
    gpu_name = torch.cuda.get_device_name(0)
    out = {"machine": machine(), "gpu": gpu_name, "steps": args.steps, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        ds = make_dataset(Path(tmp))
        for algo in args.algos.split(","):
            row = {"algo": algo}
            for workers in (0, 1):
                runs = [run_once(algo, ds, workers, args.steps, Path(tmp) / f"{algo}-{workers}-{i}", gpu=True)
                        for i in range(args.repeats)]
                row["in_process" if workers == 0 else "ray_train_1_gpu"] = {
                    "updates_per_s": statistics.median(r["transitions_per_s"] / 256 for r in runs),
                    "first_update_s": statistics.median(r["first_update_s"] for r in runs)}
            row["overhead_pct"] = 100 * (1 - row["ray_train_1_gpu"]["updates_per_s"]
                                         / row["in_process"]["updates_per_s"])
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
