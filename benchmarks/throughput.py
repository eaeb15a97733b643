"""Updates/s of every algorithm at K=1 and K=16 members, next to the FLOP floor of each update.

Setting (the issue's): Hopper-shaped random data (obs 11, action 3; discrete algorithms get 6 actions),
batch 256, 2x256 MLPs, CPU with one thread (and the GPU when one is present). The loop is the real learner
(`Learner.step`: device-side sampling, backward per group, fused Adam), timed with warm-up and repeats;
medians reported.

FLOP floor: the matmul FLOPs of one update (forward + backward, counted by torch's FlopCounterMode) divided
by this machine's measured GEMM rate at the same shapes (a 256x256 @ 256x256 batched matmul, measured in the
same run). `floor %` = achieved matmul FLOP/s / GEMM rate: 100% means the update costs no more than its
matmuls at full speed. d3rlpy's rates come from ../shared/bench/peer_speed.sh, run in the same invocation
(--peer), and the ratio columns divide ours by theirs.

    python benchmarks/throughput.py [--peer] [--compile] [--repeats 5] [--readme]

--compile also times the compiled step (`compile: on`, rayoffline/learner/compiled.py) in the same run, its
compile time apart (the warm-up's), and writes a second table.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayoffline import algorithms  # noqa: E402
from rayoffline.batch import Batch  # noqa: E402
from rayoffline.learner.loop import Learner  # noqa: E402
from rayoffline.spec import EnvSpec  # noqa: E402

OBS, ACT, N_DISCRETE, BATCH, N = 11, 3, 6, 256, 100_000
PEER_NAMES = {"bc": "bc", "td3_bc": "td3bc", "iql": "iql", "cql": "cql"}


def dataset(spec: EnvSpec, device: torch.device) -> Batch:
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(N, OBS, generator=g)
    act = (torch.randint(N_DISCRETE, (N,), generator=g) if spec.discrete
           else torch.rand(N, ACT, generator=g) * 2 - 1)
    term = torch.zeros(N)
    trunc = torch.zeros(N)
    trunc[999::1000] = 1
    return Batch(obs, act, torch.randn(N, generator=g), torch.randn(N, OBS, generator=g), term, trunc).to(device)


def spec_for(name: str) -> EnvSpec:
    if name == "fqe":
        return EnvSpec(OBS, ACT, False, (-1.0,) * ACT, (1.0,) * ACT)
    cls = algorithms.get(name)
    if "continuous" in cls.action_types:
        return EnvSpec(OBS, ACT, False, (-1.0,) * ACT, (1.0,) * ACT)
    return EnvSpec(OBS, N_DISCRETE, True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_learner(name: str, k: int, device: torch.device, compile: bool = False) -> Learner:
    if name == "fqe":  # OPE's FQE (rayoffline/evaluation/fqe.py) evaluating K TD3+BC actors, one per member
        from rayoffline.evaluation.fqe import FQE, FQEConfig
        from rayoffline.evaluation.policies import LearnedPolicy
        spec = spec_for(name)
        target = algorithms.get("td3_bc")(spec, [algorithms.get("td3_bc").Config(hidden=(256, 256))] * k,
                                           list(range(k)), device=device)
        fqe = FQE(spec, [FQEConfig(hidden=(256, 256), reward_scale=1.0)] * k, list(range(k)), device=device)
        fqe.set_target(LearnedPolicy(target))
        return Learner(fqe, dataset(spec, device), BATCH, compile=compile)
    cls = algorithms.get(name)
    spec = spec_for(name)
    alg = cls(spec, [cls.Config(hidden=(256, 256))] * k, list(range(k)), device=device)  # the issue: 2x256 MLPs
    return Learner(alg, dataset(spec, device), BATCH, compile=compile)


def flops_per_update(name: str, k: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    learner = make_learner(name, k, torch.device("cpu"))
    learner.step(1)
    counter = FlopCounterMode(display=False)
    with counter:
        learner.step(2)  # step 2 (policy_freq=2 algorithms update their actor on even steps)
        learner.step(3)
    return counter.get_total_flops() / 2


def rate(name: str, k: int, device: torch.device, steps: int, repeats: int,
         compile: bool = False) -> tuple[float, float]:
    """(median updates/s, seconds the warm-up spent compiling)."""
    learner = make_learner(name, k, device, compile)
    step = 0
    for _ in range(max(3, steps // 5)):  # warm-up
        step += 1
        learner.step(step)
    learner.pop_metrics()
    sync(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            step += 1
            learner.step(step)
        learner.pop_metrics()
        sync(device)
        out.append(steps / (time.perf_counter() - t))
    return statistics.median(out), learner.take_compile_seconds()


def gemm_rate(device: torch.device, repeats: int) -> float:
    x = torch.randn(16, BATCH, 256, device=device)
    w = torch.randn(16, 256, 256, device=device)
    for _ in range(5):
        torch.bmm(x, w)
    sync(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(50):
            torch.bmm(x, w)
        sync(device)
        out.append(50 * 16 * 2 * BATCH * 256 * 256 / (time.perf_counter() - t))
    return statistics.median(out)


def peer_rates(steps: int) -> dict[str, float]:
    script = ROOT.parent / "shared" / "bench" / "peer_speed.sh"
    if not script.exists():
        return {}
    res = subprocess.run(["bash", str(script), str(steps)], capture_output=True, text=True, timeout=3600)
    rates = {}
    for line in res.stdout.splitlines():
        m = re.match(r"d3rlpy (\w+): ([\d.]+) updates/s", line)
        if m:
            rates[m.group(1)] = float(m.group(2))
    return rates


def machine() -> str:
    from _readme import cpu_name  # benchmarks/ is the script's directory
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algos", default=",".join(algorithms.names() + ["fqe"]),
                    help="algorithms to time; fqe is OPE's Fitted Q Evaluation of K TD3+BC actors")
    ap.add_argument("--ks", default="1,16")
    ap.add_argument("--steps", type=int, default=0, help="timed updates per repeat (0: sized per algorithm)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peer", action="store_true", help="run d3rlpy's peer_speed.sh in the same run")
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    ap.add_argument("--compile", action="store_true", help="also time the compiled step (compile: on)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--devices", default="cpu,cuda", help="of these, the ones present (cuda: when available)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    devices = [torch.device(d) for d in args.devices.split(",") if d == "cpu" or torch.cuda.is_available()]
    names = args.algos.split(",")
    ks = [int(k) for k in args.ks.split(",")]
    peer = peer_rates(300) if args.peer else {}
    rows = []
    for device in devices:
        gemm = gemm_rate(device, args.repeats)
        for name in names:
            row = {"device": device.type, "algo": name, "gemm": gemm}
            for k in ks:
                fl = flops_per_update(name, k)
                steps = args.steps or max(5, int(3e10 / max(fl, 1.0)) if device.type == "cpu" else 200)
                r, _ = rate(name, k, device, steps, args.repeats)
                row[k] = r
                row[f"floor{k}"] = r * fl / gemm
                row[f"flops{k}"] = fl
                if args.compile:
                    rc, row[f"compile_s{k}"] = rate(name, k, device, steps, args.repeats, compile=True)
                    row[f"c{k}"] = rc
                    row[f"cfloor{k}"] = rc * fl / gemm
            if device.type == "cpu" and PEER_NAMES.get(name) in peer:
                row["peer"] = peer[PEER_NAMES[name]]
            rows.append(row)
            print(row, flush=True)
    table = render(rows, ks, peer)
    compiled = render_compiled(rows, ks) if args.compile else ""
    print(table + ("\n\n" + compiled if compiled else ""))
    if args.json:
        import json
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1, default=str))
    if args.readme:
        from benchmarks._readme import write_block
        write_block("throughput", table)
        if compiled:
            write_block("throughput-compiled", compiled)


def render(rows, ks, peer) -> str:
    k1, kn = ks[0], ks[-1]
    lines = [f"Machine: {machine()}; one thread on CPU. Median of repeats; d3rlpy 2.8 measured in the same run"
             + ("" if peer else " (not run)") + ".", "",
             f"| device | algo | MFLOP/update | K={k1} updates/s | K={k1} floor % | d3rlpy updates/s | x d3rlpy "
             f"| K={kn} member-updates/s | K={kn} floor % | K={kn} / {kn} separate K={k1} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r.get("peer")
        lines.append(
            f"| {r['device']} | {r['algo']} | {r[f'flops{k1}'] / 1e6:.0f} | {r[k1]:.1f} | {100 * r[f'floor{k1}']:.0f} "
            f"| {p if p else '-'} | {f'{r[k1] / p:.2f}' if p else '-'} | {r[kn] * kn:.1f} "
            f"| {100 * r[f'floor{kn}']:.0f} | {r[kn] * kn / r[k1]:.2f} |")
    return "\n".join(lines)


def render_compiled(rows, ks) -> str:
    k1, kn = ks[0], ks[-1]
    lines = ["Compiled step (`compile: on`) beside the eager one, same run; compile time is the warm-up's, not in "
             "updates/s.", "",
             f"| device | algo | K={k1} eager | K={k1} compiled | x | K={k1} compiled floor % | compile s "
             f"| K={kn} eager member-upd/s | K={kn} compiled | x | K={kn} compiled floor % | compile s "
             f"| K={kn} compiled / {kn} separate K={k1} compiled |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if f"c{k1}" not in r:
            continue
        lines.append(
            f"| {r['device']} | {r['algo']} | {r[k1]:.1f} | {r[f'c{k1}']:.1f} | {r[f'c{k1}'] / r[k1]:.2f} "
            f"| {100 * r[f'cfloor{k1}']:.0f} | {r[f'compile_s{k1}']:.0f} | {r[kn] * kn:.1f} | {r[f'c{kn}'] * kn:.1f} "
            f"| {r[f'c{kn}'] / r[kn]:.2f} | {100 * r[f'cfloor{kn}']:.0f} | {r[f'compile_s{kn}']:.0f} "
            f"| {r[f'c{kn}'] * kn / r[f'c{k1}']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
