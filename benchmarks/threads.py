"""Which default for `threads`? Updates/s at each torch thread count, alone and beside busy processes.

The learner's CPU default must hold up on a machine that is doing something else too (a second run, a
compile, a browser). Intra-op threads in torch's OpenMP pool wait for each other at every kernel; when one of
them is descheduled by another process, every kernel of the update waits for it. This benchmark measures the
real `Learner.step` (Hopper-shaped data, batch 256, 2x256 MLPs as in throughput.py) for K=1 and K=16 members
at 1..cores threads, first alone, then beside `--busy` processes that each spin one core, and reports medians
of repeats with the ratio to one thread from the same run.

    python benchmarks/threads.py [--algos td3_bc,iql] [--ks 1,16] [--busy 1] [--repeats 5] [--readme]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPIN = "while True: pass"


def child(algo: str, k: int, threads: int, seconds: float, repeats: int) -> None:
    """Runs in a fresh process (so the OpenMP pool has exactly `threads` threads); prints JSON rates."""
    import torch
    torch.set_num_threads(threads)
    from benchmarks.throughput import make_learner
    learner = make_learner(algo, k, torch.device("cpu"))
    step = 0
    t = time.perf_counter()
    while time.perf_counter() - t < seconds / 4 or step < 3:  # warm-up
        step += 1
        learner.step(step)
    learner.pop_metrics()
    rates = []
    for _ in range(repeats):
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < seconds or n < 2:
            step += 1
            n += 1
            learner.step(step)
        learner.pop_metrics()
        rates.append(n / (time.perf_counter() - t))
    print(json.dumps(rates))


def measure(algo: str, k: int, threads: int, busy: int, seconds: float, repeats: int) -> float:
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
    try:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        res = subprocess.run([sys.executable, __file__, "--child", algo, str(k), str(threads), str(seconds),
                              str(repeats)], capture_output=True, text=True, env=env, timeout=1800, check=True)
        return statistics.median(json.loads(res.stdout.strip().splitlines()[-1]))
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        a = sys.argv[2:]
        child(a[0], int(a[1]), int(a[2]), float(a[3]), int(a[4]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--algos", default="td3_bc,iql")
    ap.add_argument("--ks", default="1,16")
    ap.add_argument("--busy", type=int, default=1, help="spinning processes in the loaded measurement")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of one timed repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args()
    from benchmarks.throughput import machine
    cores = os.cpu_count() or 1
    counts = sorted({1, 2, cores} & set(range(1, cores + 1)))
    load0 = os.getloadavg()[0]
    rows = []
    for algo in args.algos.split(","):
        for k in (int(x) for x in args.ks.split(",")):
            for busy in (0, args.busy):
                row = {"algo": algo, "K": k, "busy": busy}
                for t in counts:
                    row[t] = measure(algo, k, t, busy, args.seconds, args.repeats)
                rows.append(row)
                print(row, flush=True)
    head = (f"Machine: {machine()}; load average {load0:.2f} at start. `Learner.step`, batch 256, 2x256 MLPs; "
            f"median of {args.repeats} repeats of {args.seconds:.0f} s after a warm-up, each setting in a fresh "
            f"process; 'busy' = processes spinning one core each beside the run.")
    lines = [head, "", "| algo | K | busy | " + " | ".join(f"{t} thread{'s' if t > 1 else ''} (updates/s)"
                                                         for t in counts)
             + " | " + " | ".join(f"{t} / 1" for t in counts if t > 1) + " |",
             "|---|---|---|" + "---|" * (2 * len(counts) - 1)]
    for r in rows:
        lines.append(f"| {r['algo']} | {r['K']} | {r['busy']} | " + " | ".join(f"{r[t]:.1f}" for t in counts)
                     + " | " + " | ".join(f"{r[t] / r[1]:.2f}" for t in counts if t > 1) + " |")
    table = "\n".join(lines)
    print(table)
    if args.readme:
        from benchmarks._readme import write_block
        write_block("threads", table)


if __name__ == "__main__":
    main()
