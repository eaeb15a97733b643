"""Data layer throughput: conversion of a 1M-transition Hopper-shaped Minari dataset, and learner loading.

Setting (the issue's): a Minari dataset of 1,000 episodes x 1,000 steps (observations 11-dim, actions 3-dim
in [-1, 1], episodes ending by truncation), random values, written under a temporary directory with
`minari.create_dataset_from_buffers` (not timed). Then, in the same run:

- convert: `rayoffline.data.convert(path, out)` into 8 Parquet shards through Ray tasks (streaming), Ray already
  started (its start-up is not conversion); target <= 60 s on 2 cores;
- load: `rayoffline.data.load(out)` (every shard, one worker) into tensors, in transitions/s; target >= 1M/s;
  also rank 0 of 2 (half the shards) and `iter_chunks` with a 64 MiB memory budget.
Loads are timed after one warm-up, repeated, medians reported (the page cache is warm: "from local disk"
after the first read, as for a learner that re-reads its shard).

    python benchmarks/data_throughput.py [--episodes 1000] [--repeats 5] [--no-readme]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only, short-lived instance

import numpy as np  # noqa: E402

OBS, ACT, STEPS = 11, 3, 1000
START, END = "<!-- data-bench:start -->", "<!-- data-bench:end -->"


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores{mem}"


def build_minari(root: Path, episodes: int) -> Path:
    """The Hopper-shaped Minari dataset `bench/hopper-shaped-v0` under MINARI_DATASETS_PATH=root."""
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    rng = np.random.default_rng(0)
    buffers = []
    for i in range(episodes):
        trunc = np.zeros(STEPS, bool)
        trunc[-1] = True
        buffers.append(EpisodeBuffer(
            id=i, observations=rng.standard_normal((STEPS + 1, OBS)).astype(np.float32),
            actions=rng.uniform(-1, 1, (STEPS, ACT)).astype(np.float32),
            rewards=rng.standard_normal(STEPS), terminations=np.zeros(STEPS, bool), truncations=trunc))
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        minari.create_dataset_from_buffers(
            "bench/hopper-shaped-v0", buffers,
            observation_space=gym.spaces.Box(-np.inf, np.inf, (OBS,), np.float32),
            action_space=gym.spaces.Box(-1.0, 1.0, (ACT,), np.float32), author="rayoffline benchmark",
            algorithm_name="random", data_format="hdf5")
    return root / "bench" / "hopper-shaped-v0"


def timed(fn, repeats: int, warmup: int = 1) -> tuple[float, object]:
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        del out
        out = None
    return statistics.median(times), out


def write_readme(block: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text() if readme.exists() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = f"{head}{START}\n{block}\n{END}{tail}"
    else:
        text = text.rstrip("\n") + f"\n\n{START}\n{block}\n{END}\n"
    readme.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=1000, help="episodes of 1000 steps (1000 = 1M transitions)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats of each load")
    ap.add_argument("--no-readme", action="store_true", help="print only; leave README.md alone")
    args = ap.parse_args()

    import torch

    from rayoffline import data
    from rayoffline._ray import ensure_ray

    torch.set_num_threads(os.cpu_count() or 1)
    who = machine()
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    tmp = Path(tempfile.mkdtemp(prefix="rayoffline-data-bench-"))
    try:
        t = time.perf_counter()
        src = build_minari(tmp / "minari", args.episodes)
        t_build = time.perf_counter() - t
        n = args.episodes * STEPS
        print(f"built {n} transitions as a Minari dataset in {t_build:.1f} s ({src})", flush=True)

        ensure_ray()
        t = time.perf_counter()
        out = tmp / "converted"
        meta = data.convert(str(src), str(out))
        t_convert = time.perf_counter() - t
        assert meta["num_transitions"] == n, meta["num_transitions"]
        files = sorted(out.glob("part-*/*.parquet"))
        size = sum(f.stat().st_size for f in files)
        print(f"converted in {t_convert:.1f} s: {len(files)} files, {size / 2**20:.0f} MiB", flush=True)

        t_load, _ = timed(lambda: data.load(out), args.repeats)
        t_half, _ = timed(lambda: data.load(out, rank=0, world_size=2), args.repeats)
        half_rows = len(data.load(out, rank=0, world_size=2))

        def stream() -> int:
            return sum(len(c) for c in data.iter_chunks(out, memory_budget_bytes=64 << 20))
        t_stream, _ = timed(stream, max(1, args.repeats // 2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = [
        ("Minari dataset build (setup, not timed against a target)", f"{t_build:.1f} s"),
        (f"convert {n:,} transitions -> {len(files)} Parquet shards ({size / 2**20:.0f} MiB), target <= 60 s",
         f"{t_convert:.1f} s ({n / t_convert / 1e3:,.0f}k transitions/s)"),
        ("load, 1 worker, all shards, target >= 1,000,000 transitions/s",
         f"{n / t_load:,.0f} transitions/s ({t_load:.2f} s)"),
        ("load, rank 0 of 2 (half the shards)", f"{half_rows / t_half:,.0f} transitions/s ({t_half:.2f} s)"),
        ("iter_chunks, 1 worker, 64 MiB memory budget", f"{n / t_stream:,.0f} transitions/s ({t_stream:.2f} s)"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"\nmachine: {who} (load average {load_avg:.2f} at start)")
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    block = "\n".join([
        f"Data layer, `python benchmarks/data_throughput.py` on {who} (load average {load_avg:.2f} at start; "
        f"Hopper-shaped rows: obs 11, action 3; loads: median of {args.repeats} after a warm-up):",
        "",
        "| step | result |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
    ])
    if not args.no_readme:
        write_readme(block)
        print(f"\nwrote the figures to {ROOT / 'README.md'}")


if __name__ == "__main__":
    main()
