"""What the CLI's train/eval/algos/demo commands print, and the demo itself (the CLI stays argument parsing)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from .. import algorithms
from ..config import field_docs
from .api import evaluate_run, train
from .config import RunConfig


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _rate(result: dict[str, Any]) -> str:
    ups, k = result.get("updates_per_s"), result.get("members_per_pass", 1)
    if ups is None:
        return "no updates this time"
    compiled = f" compiled (+{result['compile_s']:.0f} s compiling)" if result.get("compile_s") else ""
    if k > 1:
        return f"{ups:.3g} passes/s = {ups * k:.3g} member-updates/s (K={k}){compiled}"
    return f"{ups:.1f} updates/s{compiled}"


def member_table(members: list[dict[str, Any]], means: list, stds: list, scores: list,
                 best: int | None) -> list[str]:
    """One row per member: its seed and the coefficients that differ between members, return, score."""
    keys = sorted({k for m in members for k, v in m["algo"].items() if v != members[0]["algo"].get(k)})
    head = ["member", "seed", *keys, "return (mean +- std)", "normalized"]
    rows = []
    for i, m in enumerate(members):
        rows.append([f"{i}{' *' if i == best else ''}", str(m["seed"]), *[f"{m['algo'].get(k)}" for k in keys],
                     f"{_fmt(means[i])} +- {_fmt(stds[i])}", _fmt(scores[i])])
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    return ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in [head, *rows]]


def format_result(result: dict[str, Any], run_dir: str | Path) -> str:
    """The summary `rayoffline train` prints: one line for K=1, a member table (best marked *) for K>1."""
    where = f"wrote {Path(run_dir) / 'result.json'}"
    behavior = _fmt(result["behavior_return_mean"])
    members = result["members"]
    if len(members) == 1:
        ev = (f"eval return {_fmt(result['eval_return_mean'])} +- {_fmt(result['eval_return_std'])} over "
              f"{result['eval_episodes']} episodes (behavior {behavior}), normalized score "
              f"{_fmt(result['normalized_score'])}" if result["eval_episodes"] else "not evaluated (eval_episodes 0)")
        return f"{result['algo']}: {result['steps']} steps, {ev}; {_rate(result)}; {where}"
    lines = [f"{result['algo']}: {len(members)} members, {result['steps']} steps; {_rate(result)}"]
    if result["eval_episodes"]:
        lines.append(f"eval over {result['eval_episodes']} episodes per member; behavior policy (dataset mean) "
                     f"{behavior}; * best member")
        lines += member_table(members, [m["eval_return_mean"] for m in members],
                              [m["eval_return_std"] for m in members], [m["normalized_score"] for m in members],
                              result["best_member"])
    else:
        lines.append("not evaluated (eval_episodes 0)")
    lines.append(where)
    return "\n".join(lines)


def train_from_cli(args: argparse.Namespace) -> int:
    ray_flags = {"num_workers": args.num_workers, "gpus_per_worker": args.gpus_per_worker,
                 "cpus_per_worker": args.cpus_per_worker, "data_mode": args.data_mode,
                 "max_failures": args.max_failures, "address": args.address}
    overrides = list(args.set) + [f"{k}={v}" for k, v in ray_flags.items() if v is not None]
    result = train(args.algo, args.data, args.out, steps=args.steps, config=args.config, overrides=overrides,
                   seed=args.seed, resume=args.resume, allow_data_change=args.allow_data_change,
                   verbose=args.verbose, preset=args.preset)
    print(format_result(result, args.out))
    return 0


def eval_from_cli(args: argparse.Namespace) -> int:
    out = evaluate_run(args.run_dir, episodes=args.episodes)
    means = out["eval_return_mean"]
    if len(means) == 1:
        print(f"step {out['step']}: return {_fmt(means[0])} +- {_fmt(out['eval_return_std'][0])} over "
              f"{out['episodes']} episodes, normalized score {_fmt(out['normalized_score'][0])} "
              f"(behavior {_fmt(out['behavior_return_mean'])}); wrote {Path(args.run_dir) / 'eval.json'}")
        return 0
    best = max(range(len(means)), key=lambda i: means[i])
    print(f"step {out['step']}: {len(means)} members, {out['episodes']} episodes each; behavior policy "
          f"{_fmt(out['behavior_return_mean'])}; * best member")
    print("\n".join(member_table(out["members"], means, out["eval_return_std"], out["normalized_score"], best)))
    print(f"wrote {Path(args.run_dir) / 'eval.json'}")
    return 0


def _groups(cls) -> list[str]:
    from ..spec import EnvSpec
    spec = (EnvSpec(obs_dim=1, action_dim=2, discrete=True, env_id=None) if "continuous" not in cls.action_types
            else EnvSpec(obs_dim=1, action_dim=1, discrete=False, action_low=(-1.0,), action_high=(1.0,), env_id=None))
    return list(cls(spec, [cls.Config(hidden=(1,))], [0]).optim_groups())


def describe_algorithms() -> str:
    lines = []
    for name in algorithms.names():
        cls = algorithms.get(name)
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or name).strip().splitlines()[0]
        lines.append(f"{name}  [{', '.join(cls.action_types)} actions]  {doc}")
        docs = field_docs(cls.Config)
        for f in dataclasses.fields(cls.Config):
            member = " (per member)" if f.metadata.get("member") else ""
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
            doc = docs.get(f.name, "")
            if f.name == "hidden" and doc.startswith("Hidden layer widths of the algorithm's MLPs"):
                doc = f"Hidden layer widths of the {cls.networks}."
            lines.append(f"    algo.{f.name} = {default!r}{member}: {doc}")
        lines.append(f"    optimizer groups (lr_schedule keys), with the defaults: {', '.join(_groups(cls))}")
        lines.append("")
    lines.append("run settings (all algorithms)")
    docs = field_docs(RunConfig)
    for f in dataclasses.fields(RunConfig):
        lines.append(f"    {f.name} = {f.default!r}: {docs.get(f.name, '')}")
    return "\n".join(lines)


def describe_presets() -> str:
    from . import presets
    found = presets.names()
    if not found:
        return f"no presets in {presets.preset_dir()}"
    rows = []
    for name in found:
        p = presets.load(name)
        rows.append((name, str(p.get("algo_name")), str(p.get("data") or "(pass --data)"), str(p.get("source", ""))))
    w0, w1, w2 = (max(len(r[i]) for r in rows) for i in range(3))
    lines = [f"{'preset':<{w0}}  {'algo':<{w1}}  {'dataset':<{w2}}  source"]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c:<{w2}}  {d}" for a, b, c, d in rows]
    lines.append(f"\nuse: rayoffline train --preset NAME --data DIR --out RUN  (files in {presets.preset_dir()})")
    return "\n".join(lines)


DEMO_STEPS = 10_000

def demo(out: str | Path = "runs/demo", steps: int | None = None) -> int:
    """The main job on an embedded dataset: IQL on builtin:pendulum-medium, evaluated next to the behavior."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = out.with_name(f"{out.name}-{stamp}")
    print(f"rayoffline demo: IQL on builtin:pendulum-medium -> {out}")
    result = train("iql", "builtin:pendulum-medium", out, steps=DEMO_STEPS if steps is None else steps,
                   overrides={"eval_episodes": 10, "log_every": 1000})
    print(f"IQL eval return {_fmt(result['eval_return_mean'])} +- {_fmt(result['eval_return_std'])} over "
          f"{result['eval_episodes']} episodes; behavior policy (dataset mean) {_fmt(result['behavior_return_mean'])}; "
          f"normalized score {_fmt(result['normalized_score'])}; {_rate(result)}")
    return 0


