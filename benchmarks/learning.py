"""Learning benchmark: rayoffline vs d3rlpy 2.8.1 on MuJoCo datasets made by benchmarks/behavior.py.

Protocol
- Data: Hopper-v5 / HalfCheetah-v5 / Walker2d-v5 at `medium` and `expert` quality, made by
  benchmarks/behavior.py: a stable-baselines3 SAC run per env; expert = its final checkpoint, medium = its first
  checkpoint whose stochastic-action evaluation return reaches 1/3 of the expert return (D4RL's definition;
  before an expert run exists, of D4RL's reference expert score). 200k transitions of whole episodes collected
  with the SAC policy's sampled (stochastic) actions. Both libraries train on exactly these transitions:
  rayoffline on the converted Parquet dataset, d3rlpy on an MDPDataset read from the same Minari file.
- Algorithms: iql, td3_bc, cql, bc. Seeds 0, 1, 2 (`--seeds N`: 0..N-1); rayoffline trains the seeds as the
  K = N members of one pass, d3rlpy one run per seed.
- Budget: `--steps` gradient updates per seed, batch 256, the same for both libraries; `--algo-steps cql=M`
  gives one algorithm another budget (again the same for both). The budget a table was made with is printed
  in its header.
- Evaluation: after the last update, 10 episodes per seed with the deterministic (mean) action; both libraries
  use the same 10 reset seeds (1_000_003 + i, rayoffline's evaluation seeds for run seed 0).
- Score: normalized score 100 * (R - ref_min) / (ref_max - ref_min) with the dataset's Minari ref scores
  (ref_min: uniform random actions over 100 episodes; ref_max: our expert's return, or D4RL's reference
  expert score while none was trained: see CACHE/datasets/<dataset>.json). A cell is the mean and the std over
  seeds of each seed's 10-episode mean. "behavior" is the dataset's mean episode return, normalized.
- rayoffline settings: each algorithm's defaults (CORL's reference settings; CQL 3 x 256 layers), plus
  `OURS_RUN_SETTINGS` below (IQL: rewards scaled by 1000 / return range, cosine actor learning rate).
- d3rlpy settings (`d3rlpy_config`): its reproduction scripts (reproductions/offline/*.py) where one exists:
    IQL     ReturnBasedRewardScaler(multiplier=1000), cosine-annealed actor lr (T_max = the budget),
            expectile 0.7, weight_temp 3, max_weight 100, 2 x 256 layers, no observation scaler
    TD3+BC  alpha 2.5, smoothing 0.2/0.5, actor every 2 updates, StandardObservationScaler, 2 x 256
    CQL     actor lr 1e-4, critic 3e-4, temp 1e-4, alpha lr 3e-4, initial alpha e, alpha_threshold 10,
            10 action samples, conservative_weight 10 on medium data and 5 otherwise (the script's rule);
            3 x 256 layers instead of the script's 2 x 256, to match rayoffline's CQL
    BC      no reproduction script: d3rlpy's defaults (deterministic policy, lr 1e-3, 2 x 256) but batch 256
            (d3rlpy's default is 100) so both libraries see the same samples per update
  d3rlpy runs in its own virtualenv (`--peer-python`, default ~/.cache/rayoffline-peer-venv, created on first
  use like shared/bench/peer_speed.sh: torch 2.13 CPU, d3rlpy 2.8.1, gymnasium[mujoco] 1.0.0 (d3rlpy pins it;
  Hopper-v5 is the same env there), h5py).

Results: one JSON per (dataset, algorithm, library, budget) under CACHE/results/ (skipped when present, so a
stopped benchmark resumes); `--table` prints the markdown table from them (the README's learning table).

  python benchmarks/behavior.py --envs hopper --qualities medium --until medium   # the dataset first
  python benchmarks/learning.py --envs hopper --qualities medium --steps 100000
  python benchmarks/learning.py --envs hopper --qualities medium --steps 100000 --table
  python benchmarks/learning.py --quick            # smoke test of everything (tiny data, tiny budget)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# rayoffline run settings per algorithm, on top of the algorithm's defaults (easy to change here).
OURS_RUN_SETTINGS: dict[str, dict] = {
    "iql": {"reward_scale": "return_range", "lr_schedule": {"actor": "cosine"}},  # IQL's locomotion reference
    "td3_bc": {},
    "cql": {},
    "bc": {},
}
ALGOS = ("iql", "td3_bc", "cql", "bc")
ENV_IDS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
EVAL_EPISODES = 10
EVAL_SEED_OFFSET = 1_000_003  # rayoffline.evaluation.rollout.EVAL_SEED_OFFSET: episode i starts from reset seed
BATCH_SIZE = 256
D3RLPY_VERSION = "2.8.1"
TABLE_MARK = "<!-- learning-table -->"
HERE = Path(__file__).resolve().parent


def cache_dir(arg: str | None = None) -> Path:
    p = arg or os.environ.get("RAYOFFLINE_BENCH_CACHE") or Path.home() / ".cache" / "rayoffline-bench"
    return Path(p).expanduser().resolve()


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def normalized(ret: float, ref_min: float, ref_max: float) -> float:
    return 100.0 * (ret - ref_min) / (ref_max - ref_min)


# ---------------------------------------------------------------------------------------------------------
# d3rlpy side: runs inside the peer virtualenv (numpy, h5py, gymnasium, torch, d3rlpy; no rayoffline)
# ---------------------------------------------------------------------------------------------------------

def load_minari_episodes(path: Path):
    """(observations, actions, rewards, terminals, timeouts) of a Minari HDF5 dataset in d3rlpy's layout: one
    row per step (the last next-observation of each episode dropped), episode ends flagged."""
    import h5py

    obs, act, rew, term, tout = [], [], [], [], []
    with h5py.File(path / "main_data.hdf5", "r") as f:
        for key in sorted(f.keys(), key=lambda k: int(k.split("_")[1])):
            e = f[key]
            r = np.asarray(e["rewards"])
            obs.append(np.asarray(e["observations"])[:-1])
            act.append(np.asarray(e["actions"]))
            rew.append(r)
            t = np.asarray(e["terminations"]).astype(np.float32)
            tr = np.asarray(e["truncations"]).astype(np.float32)
            if not (t[-1] or tr[-1]):
                tr[-1] = 1.0
            term.append(t)
            tout.append(tr * (1.0 - t))
    return (np.concatenate(obs).astype(np.float32), np.concatenate(act).astype(np.float32),
            np.concatenate(rew).astype(np.float32), np.concatenate(term), np.concatenate(tout))


def d3rlpy_config(algo: str, steps: int, quality: str):
    """The d3rlpy config of `algo` (see the module docstring for where each setting comes from)."""
    import math

    import d3rlpy

    enc = d3rlpy.models.VectorEncoderFactory
    if algo == "iql":
        return d3rlpy.algos.IQLConfig(
            actor_learning_rate=3e-4, critic_learning_rate=3e-4, batch_size=BATCH_SIZE, weight_temp=3.0,
            max_weight=100.0, expectile=0.7,
            reward_scaler=d3rlpy.preprocessing.ReturnBasedRewardScaler(multiplier=1000.0),
            actor_optim_factory=d3rlpy.optimizers.AdamFactory(
                lr_scheduler_factory=d3rlpy.optimizers.CosineAnnealingLRFactory(T_max=steps)))
    if algo == "td3_bc":
        return d3rlpy.algos.TD3PlusBCConfig(
            actor_learning_rate=3e-4, critic_learning_rate=3e-4, batch_size=BATCH_SIZE, target_smoothing_sigma=0.2,
            target_smoothing_clip=0.5, alpha=2.5, update_actor_interval=2,
            observation_scaler=d3rlpy.preprocessing.StandardObservationScaler())
    if algo == "cql":
        return d3rlpy.algos.CQLConfig(
            actor_learning_rate=1e-4, critic_learning_rate=3e-4, temp_learning_rate=1e-4, alpha_learning_rate=3e-4,
            initial_alpha=math.e, actor_encoder_factory=enc([256, 256, 256]),
            critic_encoder_factory=enc([256, 256, 256]), batch_size=BATCH_SIZE, n_action_samples=10,
            alpha_threshold=10, conservative_weight=10.0 if quality == "medium" else 5.0)
    if algo == "bc":
        return d3rlpy.algos.BCConfig(batch_size=BATCH_SIZE, learning_rate=1e-3, policy_type="deterministic")
    raise ValueError(algo)


def d3rlpy_worker(spec: dict) -> dict:
    """Train d3rlpy's `spec['algo']` for each seed and evaluate it; returns the per-seed results."""
    import gymnasium as gym
    import torch

    import d3rlpy

    torch.set_num_threads(1)
    obs, act, rew, term, tout = load_minari_episodes(Path(spec["minari"]))
    device = spec.get("device") or "cpu"
    device = False if device == "cpu" else (device if ":" in device else f"{device}:0")
    seeds = []
    for seed in spec["seeds"]:
        d3rlpy.seed(seed)
        ds = d3rlpy.dataset.MDPDataset(obs, act, rew, term, tout)
        algo = d3rlpy_config(spec["algo"], spec["steps"], spec["quality"]).create(device=device)
        t0 = time.time()
        algo.fit(ds, n_steps=spec["steps"], n_steps_per_epoch=spec["steps"],  # one epoch: n_steps exactly
                 experiment_name=f"{spec['algo']}-{seed}", with_timestamp=False,
                 logger_adapter=d3rlpy.logging.NoopAdapterFactory(), show_progress=False,
                 save_interval=10 ** 9)
        train_s = time.time() - t0
        env = gym.make(spec["env_id"])
        rets = []
        for i in range(spec["episodes"]):
            o, _ = env.reset(seed=EVAL_SEED_OFFSET + i)
            ret = 0.0
            while True:
                a = algo.predict(np.asarray(o, np.float32)[None])[0]
                o, r, te, tr, _ = env.step(a)
                ret += float(r)
                if te or tr:
                    break
            rets.append(ret)
        env.close()
        seeds.append({"seed": seed, "returns": rets, "return_mean": float(np.mean(rets)),
                      "train_s": train_s, "updates_per_s": spec["steps"] / train_s})
        print(f"d3rlpy {spec['algo']} seed {seed}: return {np.mean(rets):.1f} ({train_s:.0f}s, "
              f"{spec['steps'] / train_s:.0f} updates/s)", file=sys.stderr, flush=True)
    return {"seeds": seeds, "transitions": int(len(obs)), "d3rlpy_version": d3rlpy.__version__}


# ---------------------------------------------------------------------------------------------------------
# Orchestration (the project's venv)
# ---------------------------------------------------------------------------------------------------------

def default_peer_python() -> Path:
    venv = os.environ.get("PEER_VENV") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
        / "rayoffline-peer-venv"
    return Path(venv) / "bin" / "python"


def ensure_peer_python(py: Path) -> Path:
    """The peer virtualenv's python with d3rlpy, gymnasium[mujoco] and h5py (created/completed when missing)."""
    ok = py.exists() and subprocess.run(
        [str(py), "-c", "import d3rlpy, gymnasium, mujoco, h5py; assert d3rlpy.__version__ == '%s'" % D3RLPY_VERSION],
        capture_output=True).returncode == 0
    if ok:
        return py
    venv = py.parent.parent
    if not py.exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0", f"d3rlpy=={D3RLPY_VERSION}",
                    "gymnasium[mujoco]==1.0.0", "h5py"], check=True)
    return py


def result_path(cache: Path, dataset: str, algo: str, lib: str, steps: int, n_seeds: int) -> Path:
    return cache / "results" / dataset / f"{algo}-{lib}-{steps}steps-{n_seeds}seeds.json"


def dataset_info(cache: Path, env: str, quality: str) -> dict | None:
    stats = cache / "datasets" / f"{env}-{quality}.json"
    conv = cache / "converted" / f"{env}-{quality}"
    minari = cache / "minari" / f"{env}-{quality}-v0" / "data"
    if not (stats.exists() and conv.is_dir() and (minari / "main_data.hdf5").exists()):
        return None
    st = json.loads(stats.read_text())
    return {**st, "converted": str(conv), "minari": str(minari)}


def run_ours(cache: Path, ds: dict, algo: str, steps: int, seeds: list[int], episodes: int, device: str) -> dict:
    import torch

    import rayoffline

    torch.set_num_threads(1)
    run_dir = cache / "runs" / ds["dataset"] / f"{algo}-ours-{steps}steps-{len(seeds)}seeds"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a run that stopped before writing its result: start it again
    config = {"members": [{"seed": s} for s in seeds], "eval_episodes": episodes, "batch_size": BATCH_SIZE,
              "device": device, "threads": 1, "progress": "off", "checkpoint_every": 0,
              "log_every": max(1, min(1000, steps)), **OURS_RUN_SETTINGS.get(algo, {})}
    t0 = time.time()
    r = rayoffline.train(algo, ds["converted"], out=str(run_dir), steps=steps, config=config)
    wall = time.time() - t0
    return {"seeds": [{"seed": m["seed"], "return_mean": m["eval_return_mean"], "return_std": m["eval_return_std"],
                       "normalized_reported": m["normalized_score"]} for m in r["members"]],
            "train_wall_s": wall, "updates_per_s": r.get("updates_per_s"),
            "member_updates_per_s": r.get("member_updates_per_s"), "run_dir": str(run_dir),
            "run_settings": OURS_RUN_SETTINGS.get(algo, {})}


def run_d3rlpy(cache: Path, ds: dict, algo: str, steps: int, seeds: list[int], episodes: int, device: str,
               peer: Path) -> dict:
    spec = {"algo": algo, "steps": steps, "seeds": seeds, "episodes": episodes, "device": device,
            "minari": ds["minari"], "env_id": ds["env_id"], "quality": ds["quality"]}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.time()
    p = subprocess.run([str(peer), str(Path(__file__).resolve()), "--_d3rlpy-worker", json.dumps(spec)],
                       stdout=subprocess.PIPE, env=env, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"d3rlpy worker failed ({p.returncode}) for {algo} on {ds['dataset']}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["train_wall_s"] = time.time() - t0
    return out


def run_one(cache: Path, ds: dict, algo: str, lib: str, steps: int, seeds: list[int], episodes: int,
            device: str, peer: Path | None) -> dict:
    path = result_path(cache, ds["dataset"], algo, lib, steps, len(seeds))
    if path.exists():
        return json.loads(path.read_text())
    print(f"== {ds['dataset']} {algo} {lib}: {steps} updates x {len(seeds)} seeds", flush=True)
    if lib == "ours":
        res = run_ours(cache, ds, algo, steps, seeds, episodes, device)
    else:
        res = run_d3rlpy(cache, ds, algo, steps, seeds, episodes, device, peer)
    for s in res["seeds"]:
        s["normalized"] = normalized(s["return_mean"], ds["ref_min_score"], ds["ref_max_score"])
    scores = [s["normalized"] for s in res["seeds"]]
    out = {"dataset": ds["dataset"], "env_id": ds["env_id"], "algo": algo, "lib": lib, "steps": steps,
           "seeds_n": len(seeds), "eval_episodes": episodes, "batch_size": BATCH_SIZE,
           "normalized_mean": float(np.mean(scores)), "normalized_std": float(np.std(scores)),
           "return_mean": float(np.mean([s["return_mean"] for s in res["seeds"]])),
           "ref_min_score": ds["ref_min_score"], "ref_max_score": ds["ref_max_score"],
           "behavior_return": ds["episode_return_mean"], "machine": machine(device),
           "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **res}
    _write_json(path, out)
    print(f"   {lib} {algo}: normalized {out['normalized_mean']:.1f} +- {out['normalized_std']:.1f} "
          f"(return {out['return_mean']:.1f}; behavior {ds['episode_return_mean']:.1f}); "
          f"{out['train_wall_s']:.0f}s", flush=True)
    return out


def machine(device: str) -> str:
    if device.startswith("cuda"):
        try:
            import torch
            return f"{torch.cuda.get_device_name(0)}"
        except Exception:  # noqa: BLE001
            return "cuda"
    from _readme import cpu_name  # benchmarks/ is the script's directory
    return f"{cpu_name()}, 1 torch thread"


# ---------------------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------------------

def table(cache: Path, datasets: list[str], algos: list[str], steps_of: dict[str, int], n_seeds: int) -> str:
    def cell(r):
        return f"{r['normalized_mean']:.1f} ± {r['normalized_std']:.1f}" if r else "–"

    rows, per_algo, meta = [], {a: {"ours": [], "d3rlpy": []} for a in algos}, {}
    for d in datasets:
        stats_p = cache / "datasets" / f"{d}.json"
        if not stats_p.exists():
            continue
        st = json.loads(stats_p.read_text())
        beh = normalized(st["episode_return_mean"], st["ref_min_score"], st["ref_max_score"])
        for a in algos:
            got = {}
            for lib in ("ours", "d3rlpy"):
                p = result_path(cache, d, a, lib, steps_of[a], n_seeds)
                got[lib] = json.loads(p.read_text()) if p.exists() else None
                if got[lib]:
                    meta.setdefault("machine", got[lib]["machine"])
                    meta.setdefault("episodes", got[lib]["eval_episodes"])
                    per_algo[a][lib].extend(s["normalized"] for s in got[lib]["seeds"])
            if not any(got.values()):
                continue
            rows.append(f"| {d} | {a} | {cell(got['ours'])} | {cell(got['d3rlpy'])} | {beh:.1f} "
                        f"(return {st['episode_return_mean']:.0f}) |")
    budget = ", ".join(f"{a} {steps_of[a]:,}" for a in algos)
    lines = [TABLE_MARK,
             f"Normalized score (100 = expert, 0 = random), mean ± std over {n_seeds} seeds of each seed's "
             f"{meta.get('episodes', EVAL_EPISODES)}-episode mean; updates per seed: {budget}; batch {BATCH_SIZE}; "
             f"d3rlpy {D3RLPY_VERSION}; {meta.get('machine', '')}. Made by `python benchmarks/learning.py --table`.",
             "",
             "| dataset | algorithm | rayoffline | d3rlpy | behavior |",
             "|---|---|---|---|---|", *rows]
    avg = []
    for a in algos:
        o, p = per_algo[a]["ours"], per_algo[a]["d3rlpy"]
        if o or p:
            avg.append(f"| all | {a} | {np.mean(o):.1f} ± {np.std(o):.1f} | "
                       f"{(f'{np.mean(p):.1f} ± {np.std(p):.1f}') if p else '–'} | |" if o else
                       f"| all | {a} | – | {np.mean(p):.1f} ± {np.std(p):.1f} | |")
    if avg:
        lines += ["| **average over datasets and seeds** | | | | |", *avg]
    lines.append(TABLE_MARK)
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="rayoffline vs d3rlpy learning benchmark on MuJoCo datasets")
    ap.add_argument("--envs", default="hopper,halfcheetah,walker2d")
    ap.add_argument("--qualities", default="medium,expert")
    ap.add_argument("--algos", default=",".join(ALGOS))
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (rayoffline: N members of one pass)")
    ap.add_argument("--steps", type=int, default=100_000, help="gradient updates per seed, both libraries")
    ap.add_argument("--algo-steps", default="", help="per-algorithm budgets overriding --steps, e.g. cql=50000")
    ap.add_argument("--libs", default="ours,d3rlpy")
    ap.add_argument("--episodes", type=int, default=EVAL_EPISODES, help="evaluation episodes per seed")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N")
    ap.add_argument("--cache", default=None, help="cache dir (default $RAYOFFLINE_BENCH_CACHE or "
                                                  "~/.cache/rayoffline-bench); also where behavior.py wrote data")
    ap.add_argument("--peer-python", default=None, help="python of the d3rlpy virtualenv")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny SAC data (behavior.py --quick), 300 "
                                                         "updates, 2 seeds, 2 episodes, hopper medium")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the finished results")
    ap.add_argument("--_d3rlpy-worker", dest="worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker is not None:
        print(json.dumps(d3rlpy_worker(json.loads(a.worker))), flush=True)
        return
    cache = cache_dir(a.cache)
    if a.quick:
        cache = cache / "quick"
        a.envs, a.qualities, a.steps, a.seeds, a.episodes = "hopper", "medium", 300, 2, 2
    envs = [e for e in a.envs.split(",") if e]
    qualities = [q for q in a.qualities.split(",") if q]
    algos = [x for x in a.algos.split(",") if x]
    libs = [x for x in a.libs.split(",") if x]
    for x in algos:
        if x not in ALGOS:
            ap.error(f"unknown algorithm {x}")
    steps_of = {x: a.steps for x in algos}
    for item in filter(None, a.algo_steps.split(",")):
        k, v = item.split("=")
        steps_of[k.strip()] = int(v)
    datasets = [f"{e}-{q}" for e in envs for q in qualities]
    if a.table:
        print(table(cache, datasets, algos, steps_of, a.seeds))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if a.quick and dataset_info(cache, "hopper", "medium") is None:
        subprocess.run([sys.executable, str(HERE / "behavior.py"), "--quick", "--envs", "hopper",
                        "--qualities", "medium", *(["--cache", a.cache] if a.cache else [])], check=True)
    peer = ensure_peer_python(Path(a.peer_python) if a.peer_python else default_peer_python()) \
        if "d3rlpy" in libs else None
    seeds = list(range(a.seeds))
    t0 = time.time()
    for e in envs:
        for q in qualities:
            ds = dataset_info(cache, e, q)
            if ds is None:
                print(f"{e}-{q}: no dataset in {cache} yet; make it with benchmarks/behavior.py --envs {e} "
                      f"--qualities {q}", file=sys.stderr)
                continue
            for algo in algos:
                for lib in libs:
                    run_one(cache, ds, algo, lib, steps_of[algo], seeds, a.episodes, a.device, peer)
    print(f"done in {time.time() - t0:.0f}s", flush=True)
    print(table(cache, datasets, algos, steps_of, a.seeds))


if __name__ == "__main__":
    main()
