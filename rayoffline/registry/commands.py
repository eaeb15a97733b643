"""`rayoffline registry list|show|promote|rollback|register`: what the CLI prints about a registry (store.py)."""
from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .store import AliasEntry, Registry, VersionInfo

HELP = """\
A model registry on a local path or a URI (s3://, gs://, file://, ...): versions/ (each one member of a run as a
K=1 run directory with its config, dataset content hash and partitions, metrics, parent and job), aliases/NAME/
(the alias's history; each promote or rollback is a new entry) and decisions/.

Concurrency: promote and rollback are compare-and-swap on the alias (--expect VERSION|none; without it, the
version read at the start of the command), and registering allocates ids by exclusive file creation. On a local
filesystem or NFS this is atomic: of concurrent promotions from the same version exactly one wins, the others
fail with a conflict and change nothing. Object stores (s3://, gs://) have no conditional write through pyarrow:
there the check is best effort (a race inside a few milliseconds can let two writers both think they won); keep
one writer per alias at a time there, or use a local/NFS registry."""


def add_arguments(sub: Any) -> None:
    """The `registry` subcommands on `sub` (the registry parser's subparsers)."""
    ls = sub.add_parser("list", help="versions and aliases")
    ls.add_argument("uri", help="registry path or URI")
    sh = sub.add_parser("show", help="one version (by id, or an alias: then also the alias's history)")
    sh.add_argument("uri", help="registry path or URI")
    sh.add_argument("ref", help="version (v3, 3, v000003) or alias name")
    pr = sub.add_parser("promote", help="point an alias at a version (compare-and-swap)")
    pr.add_argument("uri", help="registry path or URI")
    pr.add_argument("version", help="version (v3, 3, v000003) or another alias")
    pr.add_argument("--alias", default="production", help="alias to move (default: production)")
    pr.add_argument("--expect", default=None, metavar="VERSION|none",
                    help="only if the alias points at VERSION now (none: only if it does not exist yet)")
    pr.add_argument("--reason", default="", help="why (kept in the alias's history)")
    rb = sub.add_parser("rollback", help="point an alias back at the version it held before (a new history entry)")
    rb.add_argument("uri", help="registry path or URI")
    rb.add_argument("--alias", default="production", help="alias to roll back (default: production)")
    rb.add_argument("--expect", default=None, metavar="VERSION", help="only if the alias points at VERSION now")
    rb.add_argument("--reason", default="", help="why (kept in the alias's history)")
    rg = sub.add_parser("register", help="register one member of a run as a new version (creates the registry)")
    rg.add_argument("uri", help="registry path or URI (created if it does not exist)")
    rg.add_argument("run_dir", help="run directory (`rayoffline train --out DIR`)")
    rg.add_argument("--member", type=int, default=None, help="member index (default: the run's best member)")
    rg.add_argument("--parent", default=None, help="version (or alias) this run was warm-started from")


def run(args: argparse.Namespace) -> int:
    """Execute a parsed `rayoffline registry ...` command."""
    from .store import Registry
    cmd = args.registry_command
    if cmd == "register":
        reg = Registry.open(args.uri, create=True)
        info = reg.register(args.run_dir, member=args.member, parent=args.parent)
        print(f"registered {info.version}: member {info.member} of {args.run_dir} (step {info.step}) in {reg.uri}")
        return 0
    reg = Registry.open(args.uri)
    if cmd == "list":
        print(format_list(reg))
    elif cmd == "show":
        print(format_show(reg, args.ref))
    elif cmd == "promote":
        before = reg.alias(args.alias)
        entry = reg.promote(args.alias, args.version, expected=_expect(args.expect), reason=args.reason)
        if entry.version == before:  # promote() changes nothing then
            print(f"{args.alias}: already {entry.version}; nothing changed")
        else:
            print(f"{args.alias}: {entry.previous or '(new)'} -> {entry.version} (history entry {entry.entry})")
    elif cmd == "rollback":
        entry = reg.rollback(args.alias, expected=_expect(args.expect), reason=args.reason)
        print(f"{args.alias}: rolled back {entry.previous} -> {entry.version} (history entry {entry.entry})")
    else:
        raise AssertionError(cmd)
    return 0


def _expect(value: str | None) -> Any:
    from .store import CURRENT
    if value is None:
        return CURRENT
    return None if value.strip().lower() == "none" else value


def _num(x: Any, fmt: str = ".4g") -> str:
    return "-" if x is None else (f"{x:{fmt}}" if isinstance(x, (int, float)) else str(x))


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]


def format_list(reg: "Registry") -> str:
    """The versions as a table (newest last) and the aliases."""
    versions = reg.versions()
    aliases = reg.aliases()
    pointing: dict[str, list[str]] = {}
    for name, v in aliases.items():
        pointing.setdefault(v, []).append(name)
    lines = [f"registry {reg.uri}: {len(versions)} version{'s' if len(versions) != 1 else ''}"]
    if versions:
        rows = []
        for v in versions:
            online = v.metrics.get("online") or {}
            rows.append([v.version, v.created[:19].replace("T", " "), v.algo, str(v.member), str(v.seed), str(v.step),
                         (v.dataset.get("content_hash") or "-")[:12], _num(online.get("return_mean")),
                         _num(online.get("normalized_score"), ".1f"), ", ".join(sorted(v.metrics.get("ope", {})
                                                                                      .get("estimates", {}))) or "-",
                         v.parent or "-", ", ".join(pointing.get(v.version, [])) or "-"])
        lines += _table(["version", "created (UTC)", "algo", "member", "seed", "step", "data hash", "return", "score",
                         "ope", "parent", "aliases"], rows)
    if aliases:
        lines.append("aliases: " + ", ".join(f"{n} -> {v}" for n, v in aliases.items()))
    return "\n".join(lines)


def format_show(reg: "Registry", ref: str) -> str:
    """One version in detail; for an alias also its history."""
    from .store import parse_version
    info = reg.get(ref)
    is_alias = parse_version(ref) is None
    lines = [f"version   {info.version}" + (f" (alias {ref})" if is_alias else "")]
    lines += _describe(info, reg)
    if is_alias:
        lines.append(f"history of alias {ref}:")
        lines += ["  " + s for s in format_history(reg.history(ref))]
    return "\n".join(lines)


def _describe(info: "VersionInfo", reg: "Registry") -> list[str]:
    d = info.dataset
    h = d.get("holdout")
    held = (f"; {h['num_episodes']} episodes held out (fraction {h['fraction']:g}, seed {h['seed']})" if h
            else "; no held-out split")
    parts = d.get("partitions") or []
    job = info.job or {}
    lines = [
        f"created   {info.created}",
        f"algo      {info.algo}: member {info.member} of {info.record.get('source_members', '?')} of "
        f"{info.source_run}, seed {info.seed}, step {info.step}",
        f"data      {d.get('uri')}  content hash {(d.get('content_hash') or '-')[:16]}  "
        f"{len(parts)} partition{'s' if len(parts) != 1 else ''} ({', '.join(p['name'] for p in parts)}), "
        f"{d.get('num_transitions')} transitions{held}",
        f"parent    {info.parent or '-'}",
        f"job       {json.dumps(job, sort_keys=True) if job else '-'}",
    ]
    online = info.metrics.get("online")
    if online:
        lines.append(f"online    return {_num(online.get('return_mean'))} +- {_num(online.get('return_std'))} over "
                     f"{online.get('episodes')} episodes, normalized score {_num(online.get('normalized_score'))}")
    ope = info.metrics.get("ope")
    if ope:
        est = "; ".join(f"{n} {_num(e.get('value'))} [{_num(e.get('low'))}, {_num(e.get('high'))}]"
                        for n, e in ope.get("estimates", {}).items())
        level = ope.get("level")
        lines.append(f"ope       {est}" + (f" ({int(level * 100)}% intervals)" if isinstance(level, float) else ""))
    other = {k: v for k, v in info.metrics.items() if k not in ("online", "ope", "step")}
    if other:
        lines.append(f"metrics   {json.dumps(other, sort_keys=True)}")
    lines.append(f"config    {json.dumps(info.config.get('algo'), sort_keys=True)}")
    held_by = [n for n, v in reg.aliases().items() if v == info.version]
    lines.append(f"aliases   {', '.join(held_by) or '-'}")
    lines.append(f"location  {info.location}")
    return lines


def format_history(entries: "list[AliasEntry]") -> list[str]:
    """An alias's history as table lines."""
    rows = [[str(e.entry), e.time[:19].replace("T", " "), e.action, e.version, e.previous or "-", e.by,
             e.reason or "-"] for e in entries]
    return _table(["entry", "time (UTC)", "action", "version", "previous", "by", "reason"], rows)
