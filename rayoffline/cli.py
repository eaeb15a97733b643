"""Command line: parses arguments and calls the package. User errors print one line and exit 2."""
from __future__ import annotations

import argparse
import sys

from .errors import RayOfflineError


MAP_HELP = ("column mapping for plain Parquet/CSV/HDF5: FIELD=COLUMN pairs, comma-separated or repeated "
            "(--map observations=obs,actions=act --map rewards=r). A list column or numbered columns obs_0, obs_1, "
            ".. via observations=obs_*; an explicit column list by continuing after a comma without '=': "
            "observations=x,y,z,actions=a stacks x, y, z into the observation vector")


SHARDS_HELP = ("number of Parquet files (default: one per 16 MiB of transitions, 1 to 8: a small source gets one "
               "file, a large one 8, i.e. 4 per worker for 2 workers)")


def _parse_mapping(items: list[str] | None) -> dict[str, str | list[str]] | None:
    """`--map` values -> {field: column or [columns]}. Comma-separated FIELD=COLUMN pairs; a fragment without
    '=' continues the previous field's column list (observations=x,y,z -> ["x", "y", "z"])."""
    if not items:
        return None
    out: dict[str, str | list[str]] = {}
    for item in items:
        field = None
        for frag in item.split(","):
            frag = frag.strip()
            if "=" in frag:
                field, col = (x.strip() for x in frag.split("=", 1))
                if field in out:
                    raise RayOfflineError(f"--map {item!r}: field {field!r} is mapped twice; give it once (a "
                                          f"column list as {field}=c1,c2,c3)")
                out[field] = col
            elif field is None:
                raise RayOfflineError(f"--map {item!r}: expected FIELD=COLUMN before {frag!r}, e.g. "
                                      f"observations=obs or observations=x,y,z")
            elif not frag:
                raise RayOfflineError(f"--map {item!r}: empty column name after {field}=")
            else:  # continues `field`'s column list
                prev = out[field]
                out[field] = (prev if isinstance(prev, list) else [prev]) + [frag]
    return out


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line error format (subcommand parsers inherit it)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"rayoffline: error: {self.prog.removeprefix('rayoffline ')}: {message} "
                     f"(see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = _Parser(prog="rayoffline", description="Offline RL at cluster scale on Ray")
    p.add_argument("--version", action="version", version=f"rayoffline {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="convert, append to and inspect datasets").add_subparsers(
        dest="data_command", required=True)
    c = data.add_parser("convert", help="convert a source into sharded Parquet + _rayoffline.json (streaming)")
    c.add_argument("source", help="minari:ID | builtin:NAME | path to a Minari dataset, .hdf5, RLlib Parquet, "
                                  "or Parquet/CSV with --map")
    c.add_argument("--out", required=True, help="output directory or URI (s3://, gs://, file://; must not exist)")
    c.add_argument("--shards", type=int, default=None, help=SHARDS_HELP)
    c.add_argument("--map", action="append", metavar="FIELD=COLUMN", help=MAP_HELP)
    c.add_argument("--env-id", default=None, help="gymnasium id to record for evaluation")
    c.add_argument("--holdout", type=float, default=None, metavar="F",
                   help="hold out this fraction of the episodes for off-policy evaluation (e.g. 0.1); training "
                        "never samples them, and appended partitions are split the same way")
    c.add_argument("--holdout-seed", type=int, default=0, help="seed choosing the held-out episodes (default 0)")
    a = data.add_parser("append", help="add a new partition to a converted dataset")
    a.add_argument("source")
    a.add_argument("--to", required=True, help="existing converted dataset directory or URI")
    a.add_argument("--shards", type=int, default=None, help=SHARDS_HELP)
    a.add_argument("--map", action="append", metavar="FIELD=COLUMN", help=MAP_HELP)
    a.add_argument("--allow-duplicate", action="store_true",
                   help="append although the dataset already holds a partition with the same content hash (the "
                        "same transitions would count twice); recorded as duplicate_of in the dataset's metadata")
    sp = data.add_parser("split", help="hold out a fraction of an existing dataset's episodes for off-policy "
                                       "evaluation (metadata only, no shard rewritten)")
    sp.add_argument("dir", help="converted dataset directory or URI")
    sp.add_argument("--holdout", type=float, required=True, metavar="F", help="fraction of the episodes, e.g. 0.1")
    sp.add_argument("--seed", type=int, default=0, help="seed choosing the held-out episodes (default 0)")
    sp.add_argument("--replace", action="store_true",
                    help="replace an existing split (runs trained on the old one saw episodes the new one holds out)")
    i = data.add_parser("inspect", help="data-quality report and PNG")
    i.add_argument("dir", help="converted dataset directory, URI or builtin:NAME")
    i.add_argument("--out", "--png", dest="out", default=None, metavar="PATH",
                   help="where to write the figure: a .png file, or a directory that gets NAME-inspect.png "
                        "(default: the current directory); --png is an alias")

    t = sub.add_parser("train", help="train an offline RL algorithm")
    t.add_argument("--algo", default=None, help="algorithm name (see `rayoffline algos`); not needed with --resume")
    t.add_argument("--data", default=None, help="converted dataset directory or builtin:NAME; not needed with --resume")
    t.add_argument("--steps", type=int, default=None,
                   help="gradient updates per member (default: the config's steps, else 100000)")
    t.add_argument("--out", required=True, help="run directory (new or empty; with --resume, the run to continue)")
    t.add_argument("--config", default=None, help="YAML file with run and algo.* keys")
    t.add_argument("--preset", default=None, metavar="NAME",
                   help="reference settings tune_configs/presets/NAME.yaml, e.g. iql-hopper-medium (`rayoffline "
                        "presets` lists them); --config and --set win over it, --data replaces its dataset")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. algo.cql_alpha=5")
    t.add_argument("--seed", type=int, default=None,
                   help="run seed: every member's seed unless members: sets its own (default: the config's, else 0)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    r = t.add_argument_group("Ray Train (distributed; without --num-workers the run stays in this process)")
    r.add_argument("--num-workers", type=int, default=None, metavar="N",
                   help="data-parallel Ray Train workers (run key num_workers)")
    r.add_argument("--gpus-per-worker", type=float, default=None, metavar="G", help="GPUs per worker (default 0)")
    r.add_argument("--cpus-per-worker", type=float, default=None, metavar="C", help="CPUs per worker (default 1)")
    r.add_argument("--data-mode", choices=["auto", "replicate", "split"], default=None,
                   help="replicate: every worker holds all data; split: each its share; auto (default): "
                        "replicate when it fits memory_budget_gb")
    r.add_argument("--max-failures", type=int, default=None, metavar="M",
                   help="restarts from the last checkpoint after a worker dies (default 0)")
    r.add_argument("--verbose", action="store_true",
                   help="show Ray's logs and the workers' output (always kept in RUN_DIR/ray.log and Ray's session "
                        "directory)")
    r.add_argument("--address", default=None,
                   help="Ray cluster to join: auto or ray://HOST:10001 (default: $RAY_ADDRESS, else a local Ray)")
    t.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: continue although the dataset changed since the run started (recorded "
                        "in config.yaml); without it such a resume is refused")

    e = sub.add_parser("eval", help="re-evaluate a run's latest checkpoint")
    e.add_argument("run_dir")
    e.add_argument("--episodes", type=int, default=10, help="episodes per member (default: 10)")

    x = sub.add_parser("export", help="write one member's policy as a standalone TorchScript or ONNX file "
                                      "(observation normalization and action scaling inside; no rayoffline needed)")
    x.add_argument("run_dir", metavar="RUN_DIR|VERSION",
                   help="run directory (`rayoffline train --out DIR`; its latest checkpoint is exported), or with "
                        "--registry a version (v3) or an alias (production)")
    x.add_argument("--registry", default=None, metavar="URI",
                   help="model registry holding VERSION (rayoffline registry); the version's member is exported")
    x.add_argument("--format", required=True, choices=["torchscript", "onnx"],
                   help="torchscript (load with torch.jit.load) or onnx (needs pip install 'rayoffline[export]')")
    x.add_argument("--out", required=True, metavar="FILE", help="the file to write, e.g. policy.pt or policy.onnx")
    x.add_argument("--member", type=int, default=None, metavar="K",
                   help="member index (default: the best member in RUN_DIR/result.json, else 0)")
    x.add_argument("--force", action="store_true", help="replace --out if it exists")

    w = sub.add_parser("tune", help="hyperparameter sweep with Ray Tune, configurations fused into packs")
    w.add_argument("sweep", nargs="?", default=None,
                   help="sweep YAML (see tune_configs/); not needed with --resume (OUT/sweep.yaml is used)")
    w.add_argument("--out", default=None, help="sweep directory (default: runs/<sweep name>; with --resume, the "
                                               "sweep to continue)")
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sweep key, e.g. config.steps=5000, max_concurrency=4, "
                        "space.algo.cql_alpha={grid: [1, 5]}")
    w.add_argument("--resume", action="store_true",
                   help="continue the sweep in --out after its driver stopped: finished configurations are not "
                        "run again, the others continue from their last checkpoints")
    w.add_argument("--address", default=None,
                   help="Ray cluster to join: auto or ray://HOST:10001 (default: $RAY_ADDRESS, else a local Ray)")
    w.add_argument("--verbose", action="store_true", help="show Ray Tune's own output (always kept in OUT/ray.log)")

    rp = sub.add_parser("report", help="one self-contained HTML page about a run or a sweep (figures embedded)")
    rp.add_argument("dir", help="run directory (`rayoffline train --out DIR`) or sweep directory "
                                "(`rayoffline tune --out DIR`)")
    rp.add_argument("--out", default=None, metavar="FILE", help="where to write the page (default: DIR/report.html)")

    o = sub.add_parser("ope", help="off-policy estimates of a run's policies on its dataset's held-out episodes")
    o.add_argument("run_dir", help="run directory (`rayoffline train --out DIR`)")
    o.add_argument("--estimators", default=None,
                   help="comma-separated: fqe, is, wis, pdis, pdwis, dr, mb, or all (default fqe,wis,pdwis,dr,mb)")
    o.add_argument("--members", default="all", help="members to evaluate: all (default) or indices like 0,2")
    o.add_argument("--data", default=None, help="evaluate on this dataset's held-out episodes instead of the "
                                                 "run's own (same spaces), e.g. a newer version of it")
    o.add_argument("--fqe-steps", type=int, default=None, help="FQE updates (default 20000)")
    o.add_argument("--device", default="cpu", help="torch device for the fits (default cpu), e.g. cuda")
    o.add_argument("--seed", type=int, default=0, help="seed of the fits and the bootstrap (default 0)")

    rt = sub.add_parser("retrain", help="a retraining job: append new data, train a candidate, evaluate it beside the "
                                        "registry's production version, promote it only if it is better")
    rt.add_argument("job", help="job YAML (name, registry, data, train, evaluate, gate; see the README)")
    rt.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a job key, e.g. gate.margin=5")

    from .registry.commands import HELP as REGISTRY_HELP, add_arguments as registry_arguments
    registry_arguments(sub.add_parser("registry", help="versioned models and aliases (list, show, promote, rollback, "
                                                       "register)", description=REGISTRY_HELP,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
                       .add_subparsers(dest="registry_command", required=True))
    sub.add_parser("algos", help="list algorithms and their config fields")
    sub.add_parser("presets", help="list the reference presets for `train --preset NAME`")
    d = sub.add_parser("demo", help="the main job on an embedded dataset (IQL on builtin:pendulum-medium)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=None, help="IQL updates (default: 10000)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except RayOfflineError as e:
        print(f"rayoffline: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rayoffline: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rayoffline presets | head`: the reader left; not an error of ours
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _held_out(meta: dict) -> str:
    h = meta.get("holdout")
    if not h:
        return ""
    return (f"; held out {h['num_episodes']} of {meta['num_episodes']} episodes ({h['num_transitions']} transitions, "
            f"fraction {h['fraction']:g}, seed {h['seed']}) for off-policy evaluation")


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "data":
        import warnings

        from . import data
        from .errors import DataWarning

        with warnings.catch_warnings():  # the package's DataWarnings as one line each (what was dropped and why)
            warnings.simplefilter("always", DataWarning)
            show = warnings.showwarning

            def one_line(message, category, filename, lineno, file=None, line=None):
                if issubclass(category, DataWarning):
                    print(f"rayoffline: warning: {message}", file=sys.stderr)
                else:
                    show(message, category, filename, lineno, file, line)

            warnings.showwarning = one_line
            if args.data_command == "convert":
                meta = data.convert(args.source, args.out, shards=args.shards, mapping=_parse_mapping(args.map),
                                    env_id=args.env_id, holdout=args.holdout, holdout_seed=args.holdout_seed)
                print(f"wrote {meta['num_transitions']} transitions in {meta['num_episodes']} episodes to {args.out}"
                      + _held_out(meta))
            elif args.data_command == "append":
                meta = data.append(args.source, args.to, mapping=_parse_mapping(args.map), shards=args.shards,
                                   allow_duplicate=args.allow_duplicate)
                print(f"{args.to} now holds {meta['num_transitions']} transitions in {meta['num_episodes']} episodes")
            elif args.data_command == "split":
                from .data.holdout import split
                meta = split(args.dir, args.holdout, seed=args.seed, replace=args.replace)
                print(f"{args.dir}: {_held_out(meta).lstrip('; ')}")
            else:
                report = data.inspect(args.dir, out=args.out)
                print(report["text"])
                print(f"plot: {report['png']}")
        return 0
    if args.command == "train":
        from .learner.commands import train_from_cli
        return train_from_cli(args)
    if args.command == "eval":
        from .learner.commands import eval_from_cli
        return eval_from_cli(args)
    if args.command == "export":
        from .export import describe, export_policy
        source = args.run_dir
        if args.registry is not None:
            from .registry import Registry
            source = Registry.open(args.registry).checkout(args.run_dir)
        print(describe(export_policy(source, args.format, args.out, member=args.member, force=args.force)))
        return 0
    if args.command == "tune":
        from .sweep.run import tune
        tune(args.sweep, out=args.out, overrides=args.set, resume=args.resume, address=args.address,
             verbose=args.verbose)
        return 0
    if args.command == "report":
        from .evaluation.report import report
        print(report(args.dir, out=args.out))
        return 0
    if args.command == "ope":
        from .evaluation.offpolicy import format_table, run_ope
        extra = {"fqe_steps": args.fqe_steps} if args.fqe_steps is not None else {}
        out = run_ope(args.run_dir, estimators=args.estimators, members=args.members, data=args.data,
                      device=args.device, progress=True, seed=args.seed, **extra)
        print(format_table(out))
        print(f"wrote {args.run_dir.rstrip('/')}/ope.json")
        return 0
    if args.command == "retrain":
        from .retrain import run_job
        run_job(args.job, overrides=args.set)
        return 0
    if args.command == "registry":
        from .registry.commands import run as registry_run
        return registry_run(args)
    if args.command == "presets":
        from .learner.commands import describe_presets
        print(describe_presets())
        return 0
    if args.command == "algos":
        from .learner.commands import describe_algorithms
        print(describe_algorithms())
        return 0
    if args.command == "demo":
        from .learner.commands import demo
        return demo(args.out, steps=args.steps)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
