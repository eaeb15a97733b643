"""Behavior policies and MuJoCo datasets for the learning benchmark (benchmarks/learning.py).

For each env (Hopper-v5, HalfCheetah-v5, Walker2d-v5) this script

1. trains one SAC agent with stable-baselines3 (benchmark-only dependency: `pip install -e .[bench]`), seed 0,
   SB3's SAC defaults except `learning_starts=10000` (the RL Zoo's MuJoCo setting). Every `--ckpt-every` env
   steps it saves the policy and evaluates it: `EVAL_EPISODES` episodes with *stochastic* actions (SAC's
   sampled actions, which is how the data is collected, so this is the behavior policy's return) and
   `DET_EPISODES` with deterministic (mean) actions, for information. The latest checkpoint also keeps the
   replay buffer, so an interrupted run resumes where it stopped.
2. picks the behavior policies:
     expert  the final checkpoint of a run trained to `--train-steps` (default 1M env steps).
     medium  the FIRST checkpoint whose stochastic evaluation return reaches 1/3 of the expert return
             (D4RL's "medium": SAC early-stopped at about a third of the expert's performance; Minari's
             mujoco/*/medium-v0 follow D4RL). Before an expert is trained (`--until medium`, which stops SAC at
             the first such checkpoint), "the expert return" is D4RL's reference expert score of the env
             (`D4RL_REF_MAX`), and the dataset records that it is.
3. collects `--transitions` (default 200k) transitions of whole episodes (the last episode is completed, so a
   few more) with the policy's stochastic actions, env reset seeds 10_000 + episode index, into a Minari
   dataset (`minari.create_dataset_from_buffers`, as rayoffline/data/builtin.py builds its datasets) with
     ref_min_score  mean return of uniformly random actions over `REF_EPISODES` episodes (measured here, in v5)
     ref_max_score  the expert return of step 2 (our expert's stochastic return over `REF_EPISODES` episodes,
                    or D4RL's reference expert score while no expert has been trained)
4. converts it with `rayoffline data convert PATH --out DIR --env-id ENV` for rayoffline, and the same
   transitions feed d3rlpy.

Cache (`--cache`, or `$RAYOFFLINE_BENCH_CACHE`, default ~/.cache/rayoffline-bench), outside git:

  sac/<env>/checkpoints/step_<N>.zip   SAC policies; sac/<env>/evals.json their evaluations
  sac/<env>/latest.zip, latest_buffer.pkl, train.log
  refs/<env>.json                      ref_min_score (random) and how it was obtained
  minari/<env>-<quality>-v0/data/      the Minari dataset;  converted/<env>-<quality>/  the rayoffline dataset
  datasets/<env>-<quality>.json        dataset stats: behavior checkpoint, its return, the refs, transitions

Every step is skipped when its output exists, so re-running continues where it stopped (SAC resumes from
latest.zip with its replay buffer: a run stopped by `--until medium` continues to the expert later). A dataset
once written is kept as it is: a medium dataset made before the expert existed keeps D4RL's expert score as
ref_max_score and the checkpoint chosen against it; delete CACHE/minari/<env>-medium-v0, converted/<env>-medium
and datasets/<env>-medium.json to remake it against the trained expert.

  python benchmarks/behavior.py --envs hopper --qualities medium --until medium   # what this machine can do
  python benchmarks/behavior.py --envs hopper,halfcheetah,walker2d               # expert runs: a GPU machine
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ENVS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
# D4RL's reference scores (d4rl/infos.py: REF_MIN_SCORE / REF_MAX_SCORE of the -v2 datasets): the expert score
# stands in until our own expert exists; the random scores are for comparison only (ours are measured in v5).
D4RL_REF_MAX = {"hopper": 3234.3, "halfcheetah": 12135.0, "walker2d": 4592.3}
D4RL_REF_MIN = {"hopper": -20.272305, "halfcheetah": -280.178953, "walker2d": 1.629008}
EVAL_EPISODES = 10
DET_EPISODES = 5
REF_EPISODES = 100
MEDIUM_FRACTION = 1 / 3
SAC_SEED = 0
COLLECT_SEED_BASE = 10_000
EVAL_SEED_BASE = 1_000_000
DATASET_VERSION = 0
QUICK = False  # --quick: a tiny SAC run, medium = its first checkpoint (smoke test of the pipeline only)


def cache_dir(arg: str | None = None) -> Path:
    p = arg or os.environ.get("RAYOFFLINE_BENCH_CACHE") or Path.home() / ".cache" / "rayoffline-bench"
    return Path(p).expanduser().resolve()


def _log(path: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(path, "a") as fh:
        fh.write(line + "\n")


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path, default=None):
    return json.loads(path.read_text()) if path.exists() else default


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------

def run_episodes(env_id: str, act, episodes: int, seed_base: int) -> list[tuple[float, int]]:
    """(return, length) of `episodes` episodes of `act(obs) -> action`, env reset seeds seed_base + i."""
    import gymnasium as gym

    env = gym.make(env_id)
    out = []
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed_base + i)
            ret, n = 0.0, 0
            while True:
                obs, r, term, trunc, _ = env.step(act(obs))
                ret += float(r)
                n += 1
                if term or trunc:
                    break
            out.append((ret, n))
    finally:
        env.close()
    return out


def sac_actor(model, deterministic: bool):
    def act(obs):
        a, _ = model.predict(obs, deterministic=deterministic)
        return a
    return act


def evaluate_model(env_id: str, model, seed_base: int = EVAL_SEED_BASE) -> dict:
    n, n_det = (2, 1) if QUICK else (EVAL_EPISODES, DET_EPISODES)
    sto = [r for r, _ in run_episodes(env_id, sac_actor(model, False), n, seed_base)]
    det = [r for r, _ in run_episodes(env_id, sac_actor(model, True), n_det, seed_base)]
    return {"return": float(np.mean(sto)), "return_std": float(np.std(sto)),
            "return_det": float(np.mean(det)), "episodes": n, "det_episodes": n_det}


def random_ref(cache: Path, env: str) -> dict:
    """ref_min_score: mean return of uniform random actions over REF_EPISODES episodes (seeds 2_000_000 + i)."""
    import gymnasium as gym

    path = cache / "refs" / f"{env}.json"
    got = _read_json(path)
    if got:
        return got
    env_id = ENVS[env]
    space = gym.make(env_id).action_space
    rng = np.random.default_rng(0)
    n = 5 if QUICK else REF_EPISODES
    rets = [r for r, _ in run_episodes(
        env_id, lambda _o: rng.uniform(space.low, space.high).astype(np.float32), n, 2_000_000)]
    got = {"env_id": env_id, "ref_min_score": float(np.mean(rets)), "ref_min_std": float(np.std(rets)),
           "ref_min_how": f"uniform random actions, {n} episodes, reset seeds 2000000+i",
           "d4rl_ref_min_score": D4RL_REF_MIN[env], "d4rl_ref_max_score": D4RL_REF_MAX[env]}
    _write_json(path, got)
    return got


# ---------------------------------------------------------------------------------------------------------
# SAC training
# ---------------------------------------------------------------------------------------------------------

def sac_dir(cache: Path, env: str) -> Path:
    return cache / "sac" / env


def evals(cache: Path, env: str) -> list[dict]:
    return _read_json(sac_dir(cache, env) / "evals.json", [])


def medium_target(cache: Path, env: str) -> tuple[float, str]:
    """(the return a medium policy must reach, where the expert return behind it comes from)."""
    exp = expert_info(cache, env)
    if exp is not None:
        return MEDIUM_FRACTION * exp["return"], f"our expert (SAC step {exp['step']})"
    return MEDIUM_FRACTION * D4RL_REF_MAX[env], "D4RL reference expert score (no expert trained yet)"


def pick_medium(cache: Path, env: str) -> dict | None:
    target, _ = medium_target(cache, env)
    if QUICK:
        target = -float("inf")
    for e in evals(cache, env):
        if e["return"] >= target:
            return e
    return None


def expert_info(cache: Path, env: str) -> dict | None:
    st = _read_json(sac_dir(cache, env) / "state.json", {})
    if not st.get("finished"):
        return None
    ev = evals(cache, env)
    return ev[-1] if ev else None


def train_sac(cache: Path, env: str, train_steps: int, ckpt_every: int, until: str, device: str) -> None:
    import torch
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    d = sac_dir(cache, env)
    (d / "checkpoints").mkdir(parents=True, exist_ok=True)
    log = d / "train.log"
    state = _read_json(d / "state.json", {})
    if state.get("finished"):
        return
    if until == "medium" and pick_medium(cache, env) is not None:
        return
    env_id = ENVS[env]
    torch.set_num_threads(1)
    import gymnasium as gym

    if (d / "latest.zip").exists():
        model = SAC.load(d / "latest.zip", env=gym.make(env_id), device=device)
        if (d / "latest_buffer.pkl").exists():
            model.load_replay_buffer(d / "latest_buffer.pkl")
        _log(log, f"resuming {env_id} SAC at step {model.num_timesteps}")
    else:
        model = SAC("MlpPolicy", gym.make(env_id), learning_starts=500 if QUICK else 10_000, seed=SAC_SEED,
                    device=device, verbose=0, **({"buffer_size": 10_000} if QUICK else {}))
        _log(log, f"training {env_id} SAC to {train_steps} steps (until {until}), checkpoints every {ckpt_every}")

    class Ckpt(BaseCallback):
        def __init__(self):
            super().__init__()
            self.t0, self.n0 = time.time(), None
            self.stop = False

        def _on_step(self) -> bool:
            n = self.model.num_timesteps
            if self.n0 is None:
                self.n0 = n - 1
            if n % ckpt_every:
                return True
            self.model.save(d / "checkpoints" / f"step_{n}.zip")
            t = time.time()
            ev = evaluate_model(env_id, self.model)
            ev.update(step=n, path=str(d / "checkpoints" / f"step_{n}.zip"))
            allev = [e for e in evals(cache, env) if e["step"] < n] + [ev]
            _write_json(d / "evals.json", allev)
            self.model.save(d / "latest.zip")
            self.model.save_replay_buffer(d / "latest_buffer.pkl")
            sps = (n - self.n0) / max(t - self.t0, 1e-9)
            _log(log, f"step {n}: return {ev['return']:.1f} +- {ev['return_std']:.1f} (stochastic), "
                      f"{ev['return_det']:.1f} (deterministic); {sps:.1f} env steps/s training, "
                      f"eval {time.time() - t:.1f}s")
            if until == "medium" and pick_medium(cache, env) is not None:
                _log(log, f"medium reached at step {n} (target {medium_target(cache, env)[0]:.1f}); stopping")
                return False
            return True

    remaining = train_steps - model.num_timesteps
    if remaining > 0:
        model.learn(total_timesteps=remaining, callback=Ckpt(), reset_num_timesteps=False)
    if model.num_timesteps >= train_steps:
        _write_json(d / "state.json", {"finished": True, "steps": model.num_timesteps})
        _log(log, f"finished at step {model.num_timesteps}")


# ---------------------------------------------------------------------------------------------------------
# Dataset collection
# ---------------------------------------------------------------------------------------------------------

def dataset_name(env: str, quality: str) -> str:
    return f"{env}-{quality}"


def minari_path(cache: Path, env: str, quality: str) -> Path:
    return cache / "minari" / f"{dataset_name(env, quality)}-v{DATASET_VERSION}"


def converted_path(cache: Path, env: str, quality: str) -> Path:
    return cache / "converted" / dataset_name(env, quality)


def stats_path(cache: Path, env: str, quality: str) -> Path:
    return cache / "datasets" / f"{dataset_name(env, quality)}.json"


def behavior_checkpoint(cache: Path, env: str, quality: str) -> dict | None:
    if quality == "medium":
        return pick_medium(cache, env)
    if quality == "expert":
        return expert_info(cache, env)
    raise ValueError(f"unknown quality {quality!r}")


def expert_ref(cache: Path, env: str, device: str) -> dict:
    """ref_max_score: our expert's stochastic return over REF_EPISODES episodes, else D4RL's expert score."""
    exp = expert_info(cache, env)
    if exp is None:
        return {"ref_max_score": D4RL_REF_MAX[env],
                "ref_max_how": "D4RL reference expert score (d4rl infos REF_MAX_SCORE); no expert trained yet"}
    path = cache / "refs" / f"{env}-expert.json"
    got = _read_json(path)
    if got and got.get("ref_max_step") == exp["step"]:
        return got
    from stable_baselines3 import SAC

    model = SAC.load(exp["path"], device=device)
    n = 2 if QUICK else REF_EPISODES
    rets = [r for r, _ in run_episodes(ENVS[env], sac_actor(model, False), n, 3_000_000)]
    got = {"ref_max_score": float(np.mean(rets)), "ref_max_step": exp["step"],
           "ref_max_how": f"our SAC expert (step {exp['step']}), stochastic actions, {n} episodes"}
    _write_json(path, got)
    return got


def collect(cache: Path, env: str, quality: str, transitions: int, device: str) -> Path | None:
    import torch

    out = minari_path(cache, env, quality)
    if (out / "data" / "metadata.json").exists():
        return out
    ck = behavior_checkpoint(cache, env, quality)
    if ck is None:
        print(f"{env}-{quality}: no behavior policy yet (train SAC first)", file=sys.stderr)
        return None
    import minari
    from minari.data_collector import EpisodeBuffer
    from stable_baselines3 import SAC

    torch.set_num_threads(1)
    env_id = ENVS[env]
    rmin = random_ref(cache, env)
    rmax = expert_ref(cache, env, device)
    model = SAC.load(ck["path"], device=device)
    import gymnasium as gym

    t0 = time.time()
    genv = gym.make(env_id)
    buffers, total = [], 0
    while total < transitions:
        seed = COLLECT_SEED_BASE + len(buffers)
        obs, _ = genv.reset(seed=seed)
        ol, al, rl, tl, trl = [obs], [], [], [], []
        while True:
            a, _ = model.predict(obs, deterministic=False)
            obs, r, term, trunc, _ = genv.step(a)
            ol.append(obs); al.append(a); rl.append(r); tl.append(term); trl.append(trunc)
            if term or trunc:
                break
        buffers.append(EpisodeBuffer(id=len(buffers), seed=seed, observations=np.asarray(ol, np.float64),
                                     actions=np.asarray(al, np.float32), rewards=np.asarray(rl, np.float64),
                                     terminations=np.asarray(tl, bool), truncations=np.asarray(trl, bool)))
        total += len(rl)
    genv.close()
    rets = np.array([b.rewards.sum() for b in buffers])
    lens = np.array([len(b.rewards) for b in buffers])
    collect_s = time.time() - t0
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ds_id = out.name
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(tmp)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            minari.create_dataset_from_buffers(
                dataset_id=ds_id, buffer=buffers, env=env_id, eval_env=env_id,
                algorithm_name=f"stable-baselines3 SAC ({quality}: step {ck['step']}), stochastic actions",
                author="rayoffline benchmarks", code_permalink="benchmarks/behavior.py",
                description=f"{env_id} {quality}: SAC checkpoint at step {ck['step']} (evaluated stochastic return "
                            f"{ck['return']:.1f}), {total} transitions, {len(buffers)} episodes",
                ref_min_score=rmin["ref_min_score"], ref_max_score=rmax["ref_max_score"], data_format="hdf5")
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp / ds_id, out)
    shutil.rmtree(tmp, ignore_errors=True)
    stats = {"dataset": dataset_name(env, quality), "env_id": env_id, "quality": quality,
             "behavior_step": ck["step"], "behavior_checkpoint": ck["path"],
             "behavior_eval_return": ck["return"], "behavior_eval_return_std": ck["return_std"],
             "behavior_eval_return_det": ck["return_det"],
             "transitions": int(total), "episodes": len(buffers),
             "episode_return_mean": float(rets.mean()), "episode_return_std": float(rets.std()),
             "episode_return_min": float(rets.min()), "episode_return_max": float(rets.max()),
             "episode_length_mean": float(lens.mean()),
             "terminated_episodes": int(sum(bool(b.terminations[-1]) for b in buffers)),
             "medium_rule": (f"first checkpoint with stochastic eval return >= {MEDIUM_FRACTION:.3f} x expert return"
                             f" (target {medium_target(cache, env)[0]:.1f}; {medium_target(cache, env)[1]})"
                             if quality == "medium" else "final SAC checkpoint"),
             **{k: v for k, v in rmin.items() if k.startswith("ref_min")}, **rmax,
             "collect_seconds": collect_s}
    _write_json(stats_path(cache, env, quality), stats)
    print(json.dumps(stats, indent=1))
    return out


def convert(cache: Path, env: str, quality: str) -> Path | None:
    src = minari_path(cache, env, quality)
    out = converted_path(cache, env, quality)
    if (out / "dataset.json").exists() or (out.is_dir() and any(out.iterdir())):
        return out
    if not (src / "data" / "metadata.json").exists():
        return None
    exe = Path(sys.executable).parent / "rayoffline"
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "rayoffline"]),
           "data", "convert", str(src / "data"), "--out", str(out), "--env-id", ENVS[env]]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--envs", default="hopper", help="comma list of " + ",".join(ENVS))
    ap.add_argument("--qualities", default="medium,expert")
    ap.add_argument("--cache", default=None, help="cache dir (default $RAYOFFLINE_BENCH_CACHE or "
                                                  "~/.cache/rayoffline-bench)")
    ap.add_argument("--train-steps", type=int, default=1_000_000, help="SAC env steps of the expert run")
    ap.add_argument("--ckpt-every", type=int, default=10_000)
    ap.add_argument("--until", choices=["expert", "medium"], default="expert",
                    help="medium: stop SAC at the first medium checkpoint (no expert; D4RL's expert score stands "
                         "in for the expert return)")
    ap.add_argument("--transitions", type=int, default=200_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-train", action="store_true", help="only collect/convert from existing checkpoints")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2000 SAC steps, 3000 transitions, under CACHE/quick (not a real dataset)")
    a = ap.parse_args(argv)
    cache = cache_dir(a.cache)
    if a.quick:
        global QUICK
        QUICK = True
        cache = cache / "quick"
        a.train_steps, a.ckpt_every, a.transitions, a.until = 2000, 1000, 3000, "expert"
    for env in [e.strip() for e in a.envs.split(",") if e.strip()]:
        if env not in ENVS:
            ap.error(f"unknown env {env}")
        if not a.skip_train:
            train_sac(cache, env, a.train_steps, a.ckpt_every, a.until, a.device)
        for q in [q.strip() for q in a.qualities.split(",") if q.strip()]:
            if collect(cache, env, q, a.transitions, a.device) is not None:
                convert(cache, env, q)


if __name__ == "__main__":
    main()
