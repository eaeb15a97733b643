"""The model registry: versioned models on a local path or an object-store URI, with aliases such as `production`.

Layout under the registry root (any `rayoffline.data.storage` location: a local path, file://, s3://, gs://, ...):

    registry.json                      marker {"format": 1, "created"}: what makes the root a registry
    versions/v000001/                  one version: a K=1 run directory, loadable by `load_run` after `checkout`
        claim.json                     written first: allocates the id (exclusive create)
        config.yaml, result.json, metrics.jsonl, checkpoints/step_XXXXXXXX.pt
        version.json                   written last: {version, created, algo, config, seed, step, dataset {uri,
                                       content_hash, partitions, holdout}, metrics {online, ope, ...}, parent, job,
                                       source_run, member, files {path: {bytes, sha256}}}
    aliases/production/000001.json     the alias's history: immutable numbered entries {alias, entry, action
                                       (promote | rollback), version, previous, stack, time, by, reason}
    decisions/<time>-<random>.json     records of retraining decisions (any JSON object; id and time added)

Versions are immutable. A version exists once its version.json does: a registration that crashed before it
leaves a directory nobody lists (its id is skipped, never reused), so readers never see half a version.
Results that arrive later (a new evaluation, a decision to promote) go into decisions, not into the version.

A version is ONE member of a run: the member's slice of the learner state (`pack_state.select`) with its config
and seed, saved as a K=1 checkpoint, plus the run's config.yaml, result.json and metrics.jsonl cut to that member.
Its metrics are the run's online evaluation of the member (result.json), the off-policy estimates with their
intervals when the run directory has an ope.json for that member at the registered step, and what the caller
adds. The dataset record names the data exactly: its content hash, each partition's hash and the held-out split
(fraction, seed, count and a hash of the held-out episode ids).

An alias's current version is its newest history entry. Each entry records the alias's `stack` (promotions not
yet rolled back): promote pushes a version, rollback pops one and points the alias at the version below it, so
rolling back twice goes two versions back, and every change, rollbacks included, is an entry of its own.

Concurrency. Ids and alias entries are allocated by exclusive creation (`Location.create_exclusive`):
- `register` lists versions/, takes the next number and creates versions/vN/claim.json exclusively; a process
  that loses the race takes the next number. Two registering processes never get the same id.
- `promote(alias, version, expected)` is a compare-and-swap: it reads the newest entry n, refuses when the alias
  does not point at `expected` (AliasConflict), and creates entry n+1 exclusively; if entry n+1 already exists,
  another writer changed the alias since it was read and the call raises AliasConflict naming both versions.
  Of several processes promoting from the same expected version exactly one wins.
Guarantees. Local filesystems and NFS: exclusive creation is atomic (a finished temporary file hard-linked under
its name; link(2) fails if the name exists), so the above holds, and entries are complete when visible (tested
with concurrent processes). Object stores through pyarrow (s3://, gs://, ...) have no conditional write: there
creation is check, PUT, read back; a competitor whose PUT lands between another writer's check and read-back
is detected, one that lands after it is not, and then both writers believe they won and the later PUT is the
entry that stays (the history stays parseable, but one promotion is lost). Run at most one writer per alias at
a time on an object store (e.g. a scheduled retrain with concurrencyPolicy: Forbid), or keep the registry on a
local or NFS path, when concurrent promotions must be safe. Reading is safe everywhere: every file is written
whole (one PUT, or a local rename) and a version is listed only once its version.json exists.
"""
from __future__ import annotations

import getpass
import hashlib
import io
import json
import os
import re
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..data.storage import Location, locate
from ..errors import RayOfflineError
from ..learner.checkpoint import json_safe

FORMAT = 1
MARKER = "registry.json"
CLAIM = "claim.json"
VERSION_FILE = "version.json"
_VERSION = re.compile(r"^v(\d{6,})$")
_REF = re.compile(r"^[vV]?0*(\d+)$")
_ENTRY = re.compile(r"^(\d{6,})\.json$")
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_DECISION = re.compile(r"^(\d{8}T\d{6}Z-[0-9a-f]{8})\.json$")
RESERVED_DECISION_KEYS = ("id", "time")


class _Current:
    def __repr__(self) -> str:
        return "CURRENT"


CURRENT: Any = _Current()
"""`expected=CURRENT` (the default): compare against what the alias holds when the call reads it."""


class RegistryError(RayOfflineError):
    """A registry cannot be opened, read or written, or a request to it is invalid."""


class UnknownVersion(RegistryError):
    """A version id that the registry does not hold."""


class UnknownAlias(RegistryError):
    """An alias name that has never been promoted to."""


class AliasConflict(RegistryError):
    """A compare-and-swap on an alias failed: it does not point where the caller expected (someone else moved
    it). Nothing was changed."""

    def __init__(self, message: str, alias: str, expected: str | None, actual: str | None, attempted: str | None):
        super().__init__(message)
        self.alias, self.expected, self.actual, self.attempted = alias, expected, actual, attempted


@dataclass(frozen=True)
class VersionInfo:
    """A registered version (its version.json)."""

    version: str
    created: str
    algo: str
    config: dict[str, Any]
    seed: int
    step: int
    dataset: dict[str, Any]
    metrics: dict[str, Any]
    parent: str | None
    job: dict[str, Any]
    source_run: str
    member: int
    location: str
    """Where the version's run directory lives (path or URI)."""
    record: dict[str, Any] = field(repr=False, default_factory=dict)
    """version.json as written."""

    @classmethod
    def from_record(cls, record: dict[str, Any], location: str) -> "VersionInfo":
        return cls(version=record["version"], created=record["created"], algo=record["algo"],
                   config=record["config"], seed=int(record["seed"]), step=int(record["step"]),
                   dataset=record["dataset"], metrics=record["metrics"], parent=record.get("parent"),
                   job=record.get("job") or {}, source_run=record.get("source_run", ""),
                   member=int(record.get("member", 0)), location=location, record=record)


@dataclass(frozen=True)
class AliasEntry:
    """One change of an alias (aliases/NAME/NNNNNN.json)."""

    alias: str
    entry: int
    action: str
    """'promote' or 'rollback'."""
    version: str
    previous: str | None
    stack: list[str]
    time: str
    by: str
    reason: str

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> "AliasEntry":
        return cls(alias=r["alias"], entry=int(r["entry"]), action=r["action"], version=r["version"],
                   previous=r.get("previous"), stack=list(r["stack"]), time=r["time"], by=r.get("by", ""),
                   reason=r.get("reason", ""))


def version_id(n: int) -> str:
    """The id of version number n: 'v000003'."""
    return f"v{n:06d}"


def parse_version(ref: Any) -> int | None:
    """The number of a version ref (3, '3', 'v3', 'v000003'), or None when `ref` is not one."""
    if isinstance(ref, bool):
        return None
    if isinstance(ref, int):
        return ref if ref > 0 else None
    m = _REF.match(str(ref).strip())
    return int(m.group(1)) if m and int(m.group(1)) > 0 else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


def _dumps(obj: Any) -> bytes:
    """Strict JSON (non-finite floats as the strings "inf", "-inf", "nan", as run files write them)."""
    return (json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n").encode()


class Registry:
    """A model registry at a local path or URI (module docstring). Open one with `Registry.open`."""

    def __init__(self, root: Location):
        self.root = root

    # --- opening --------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, uri: str | os.PathLike | Location, create: bool = False) -> "Registry":
        """The registry at `uri`; with create=True a new one is made there if none exists (the path must be new,
        an empty directory, or already a registry)."""
        try:
            root = locate(uri)
        except RayOfflineError as e:
            raise RegistryError(f"registry {uri}: {e}") from None
        reg = cls(root)
        marker = root / MARKER
        try:
            found = marker.is_file()
            exists = root.exists()
            is_dir = root.is_dir() if exists else False
        except OSError as e:
            raise RegistryError(f"registry {root}: cannot be read ({type(e).__name__}: {e})") from None
        if found:
            reg._check_marker()
            return reg
        if exists and not is_dir:
            raise RegistryError(f"registry {root}: is a file, not a registry directory; choose another path")
        if not create:
            if not exists:
                raise RegistryError(f"registry {root}: does not exist; `rayoffline registry register {root} RUN_DIR` "
                                    f"(or Registry.open(..., create=True)) creates one")
            raise RegistryError(f"registry {root}: not a model registry (no {MARKER}); check the path")
        if exists and [n for n in root.listdir() if not n.startswith(".")]:
            raise RegistryError(f"registry {root}: the directory exists, is not empty and is not a registry (no "
                                f"{MARKER}); choose a new or empty path")
        with reg._writing(root):
            root.mkdir()
            marker.create_exclusive(_dumps({"format": FORMAT, "created": _now()}))
        reg._check_marker()
        return reg

    def _check_marker(self) -> None:
        rec = self._read_json(self.root / MARKER)
        if not isinstance(rec, dict) or rec.get("format") != FORMAT:
            found = rec.get("format") if isinstance(rec, dict) else rec
            raise RegistryError(f"{self.root / MARKER}: registry format {found!r} is not the format {FORMAT} this "
                                f"rayoffline reads")

    @property
    def uri(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"Registry({self.uri!r})"

    # --- versions -------------------------------------------------------------------------------------------
    def _numbers(self, complete: bool = True) -> list[int]:
        vdir = self.root / "versions"
        nums = sorted(int(m.group(1)) for n in vdir.listdir() if (m := _VERSION.match(n)))
        if not complete or not nums:
            return nums
        ok = vdir.files_exist([vdir / version_id(n) / VERSION_FILE for n in nums])
        return [n for n, good in zip(nums, ok) if good]

    def versions(self) -> list[VersionInfo]:
        """Every complete version, oldest first."""
        return [self._info(n) for n in self._numbers()]

    def _info(self, n: int) -> VersionInfo:
        d = self.root / "versions" / version_id(n)
        rec = self._read_json(d / VERSION_FILE)
        try:
            return VersionInfo.from_record(rec, str(d))
        except (KeyError, TypeError, ValueError) as e:
            raise RegistryError(f"{d / VERSION_FILE}: not a registry version record (missing or bad {e})") from None

    def resolve(self, ref: Any) -> str:
        """The version id that `ref` names: a version id (3, 'v3', 'v000003') or an alias name."""
        n = parse_version(ref)
        if n is not None:
            d = self.root / "versions" / version_id(n)
            if not (d / VERSION_FILE).is_file():
                raise UnknownVersion(self._unknown_version(ref, d))
            return version_id(n)
        name = str(ref)
        if not _ALIAS.match(name):
            raise RegistryError(f"{self.root}: {ref!r} is neither a version id (v3, 3, v000003) nor an alias name")
        current = self.alias(name)
        if current is None:
            raise UnknownAlias(self._unknown_alias(name))
        return current

    def get(self, ref: Any) -> VersionInfo:
        """The version `ref` names (a version id or an alias)."""
        n = parse_version(self.resolve(ref))
        assert n is not None
        return self._info(n)

    def _unknown_version(self, ref: Any, d: Location) -> str:
        if d.exists():
            return (f"{self.root}: version {ref!r} is incomplete ({d} has no {VERSION_FILE}: a registration that "
                    f"crashed or is still running); it is not a registered version")
        nums = self._numbers()
        have = (f"versions {version_id(nums[0])}..{version_id(nums[-1])}" if len(nums) > 1 else
                f"version {version_id(nums[0])}" if nums else "no versions yet")
        return f"{self.root}: no version {ref!r} (the registry holds {have}); `rayoffline registry list {self.root}`"

    def _unknown_alias(self, name: str) -> str:
        names = sorted(self.aliases())
        have = f"aliases: {', '.join(names)}" if names else "no aliases yet"
        return (f"{self.root}: no alias {name!r} ({have}); create it with `rayoffline registry promote {self.root} "
                f"VERSION --alias {name}`")

    # --- registering ----------------------------------------------------------------------------------------
    def register(self, run_dir: str | os.PathLike, member: int | None = None, metrics: dict[str, Any] | None = None,
                 parent: Any = None, job: dict[str, Any] | None = None) -> VersionInfo:
        """Register member `member` (default: the run's best member) of the latest checkpoint of `run_dir` as a
        new version. metrics: extra entries for the version's metrics; parent: the version (id or alias) this
        one was warm-started from; job: what made it (default: user, host, pid, command line)."""
        files, record = build_version(run_dir, member)
        if metrics is not None:
            if not isinstance(metrics, dict):
                raise RegistryError(f"register: metrics must be a mapping, got {type(metrics).__name__}")
            record["metrics"].update(metrics)
        if parent is not None:
            record["parent"] = self.resolve(parent)
        if job is not None and not isinstance(job, dict):
            raise RegistryError(f"register: job must be a mapping, got {type(job).__name__}")
        record["job"] = dict(job) if job is not None else {"by": _who(), "argv": list(sys.argv)}
        try:
            json.dumps(record["metrics"]), json.dumps(record["job"])
        except (TypeError, ValueError) as e:
            raise RegistryError(f"register: metrics and job must be JSON-serializable ({e})") from None
        record["files"] = {rel: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                           for rel, b in files.items()}
        with self._writing(self.root / "versions"):
            n, d = self._claim()
            for rel, data in files.items():
                loc = d / rel
                if "/" in rel:
                    loc.parent.mkdir()
                loc.write_atomic(data)
            record = {"version": version_id(n), "created": _now(), **record}
            if not (d / VERSION_FILE).create_exclusive(_dumps(record)):
                raise RegistryError(f"{d}: another writer completed version {version_id(n)} at the same time (an "
                                    f"object-store race; see `rayoffline registry --help`); register again")
        return self._info(n)

    def _claim(self) -> tuple[int, Location]:
        """Allocate the next version id: exclusive creation of versions/vN/claim.json (a loser tries N+1)."""
        vdir = self.root / "versions"
        body = {"token": uuid.uuid4().hex, "by": _who(), "time": _now()}
        for _ in range(10_000):
            nums = self._numbers(complete=False)
            n = (nums[-1] if nums else 0) + 1
            while True:
                d = vdir / version_id(n)
                d.mkdir()
                if (d / CLAIM).create_exclusive(_dumps(body)):
                    return n, d
                n += 1
                if n > (nums[-1] if nums else 0) + 64:  # many racers: list again
                    break
        raise RegistryError(f"{vdir}: could not allocate a version id")

    # --- aliases --------------------------------------------------------------------------------------------
    def aliases(self) -> dict[str, str]:
        """Every alias and the version it points at."""
        out = {}
        for name in sorted((self.root / "aliases").listdir()):
            if _ALIAS.match(name):
                last = self._last(name)
                if last is not None:
                    out[name] = last.version
        return out

    def alias(self, name: str) -> str | None:
        """The version alias `name` points at (None if it was never promoted to)."""
        last = self._last(_check_alias(name))
        return None if last is None else last.version

    def history(self, name: str) -> list[AliasEntry]:
        """Every change of alias `name`, oldest first (UnknownAlias if there is none)."""
        d = self.root / "aliases" / _check_alias(name)
        nums = self._entries(d)
        if not nums:
            raise UnknownAlias(self._unknown_alias(name))
        return [self._entry(d, n) for n in nums]

    def _entries(self, d: Location) -> list[int]:
        return sorted(int(m.group(1)) for n in d.listdir() if (m := _ENTRY.match(n)))

    def _entry(self, d: Location, n: int) -> AliasEntry:
        rec = self._read_json(d / f"{n:06d}.json")
        try:
            return AliasEntry.from_record(rec)
        except (KeyError, TypeError, ValueError) as e:
            raise RegistryError(f"{d / f'{n:06d}.json'}: not an alias history entry (missing or bad {e})") from None

    def _last(self, name: str) -> AliasEntry | None:
        d = self.root / "aliases" / name
        nums = self._entries(d)
        return self._entry(d, nums[-1]) if nums else None

    def promote(self, alias: str, version: Any, expected: Any = CURRENT, reason: str = "",
                by: str | None = None) -> AliasEntry:
        """Point `alias` at `version` (an id or another alias), if it still points at `expected` (a version id, or
        None for a new alias; CURRENT: whatever it holds when read). AliasConflict if it does not, or if another
        writer changes it meanwhile. Promoting the version it already points at changes nothing."""
        name = _check_alias(alias)
        target = self.resolve(version)
        last = self._last(name)
        current = None if last is None else last.version
        self._compare(name, expected, current, target)
        if current == target and last is not None:
            return last
        stack = (last.stack if last is not None else []) + [target]
        return self._append(name, last, "promote", target, current, stack, reason, by)

    def rollback(self, alias: str, expected: Any = CURRENT, reason: str = "", by: str | None = None) -> AliasEntry:
        """Point `alias` back at the version it held before its current one (a new history entry; compare-and-
        swap as `promote`). RegistryError if it has no earlier version."""
        name = _check_alias(alias)
        last = self._last(name)
        if last is None:
            raise UnknownAlias(self._unknown_alias(name))
        self._compare(name, expected, last.version, None)
        if len(last.stack) < 2:
            raise RegistryError(f"{self.root}: alias {name!r} has no earlier version to roll back to (it points at "
                                f"{last.version}, the first version promoted to it or every earlier one already "
                                f"rolled back); promote a version instead")
        stack = last.stack[:-1]
        return self._append(name, last, "rollback", stack[-1], last.version, stack, reason, by)

    def _compare(self, name: str, expected: Any, current: str | None, target: str | None) -> None:
        if expected is CURRENT:
            return
        if expected is None or (isinstance(expected, str) and expected.lower() == "none"):
            want = None
        else:
            n = parse_version(expected)
            if n is None:
                raise RegistryError(f"expected version {expected!r}: not a version id (v3, 3, v000003) or none")
            want = version_id(n)
        if want != current:
            raise AliasConflict(self._conflict(name, want, current), name, want, current, target)

    def _conflict(self, name: str, expected: str | None, actual: str | None, by_whom: str = "") -> str:
        return (f"{self.root}: alias {name!r} points at {actual or 'nothing'}, not at the expected "
                f"{expected or 'nothing (a new alias)'}{by_whom}; nothing was changed. Check it "
                f"(`rayoffline registry show {self.root} {name}`) and retry with --expect {actual or 'none'}")

    def _append(self, name: str, last: AliasEntry | None, action: str, version: str, previous: str | None,
                stack: list[str], reason: str, by: str | None) -> AliasEntry:
        d = self.root / "aliases" / name
        n = (last.entry if last is not None else 0) + 1
        rec = {"alias": name, "entry": n, "action": action, "version": version, "previous": previous,
               "stack": stack, "time": _now(), "by": by or _who(), "reason": reason or "",
               "nonce": uuid.uuid4().hex}
        with self._writing(d):
            d.mkdir()
            won = (d / f"{n:06d}.json").create_exclusive(_dumps(rec))
        if not won:
            winner = self._entry(d, n)
            raise AliasConflict(self._conflict(name, previous, winner.version,
                                               f" (changed by {winner.by} at {winner.time}, {winner.action})"),
                                name, previous, winner.version, version)
        return AliasEntry.from_record(rec)

    # --- decisions ------------------------------------------------------------------------------------------
    def record_decision(self, record: dict[str, Any]) -> str:
        """Store a decision record (any JSON object: candidates, evidence, outcome); returns its id."""
        if not isinstance(record, dict):
            raise RegistryError(f"record_decision: expected a mapping, got {type(record).__name__}")
        clash = [k for k in RESERVED_DECISION_KEYS if k in record]
        if clash:
            raise RegistryError(f"record_decision: key {clash[0]!r} is set by the registry; rename it")
        d = self.root / "decisions"
        now = datetime.now(timezone.utc)
        with self._writing(d):
            d.mkdir()
            for _ in range(100):
                ident = f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"
                rec = {"id": ident, "time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"), **record}
                try:
                    data = _dumps(rec)
                except (TypeError, ValueError) as e:
                    raise RegistryError(f"record_decision: the record is not JSON-serializable ({e})") from None
                if (d / f"{ident}.json").create_exclusive(data):
                    return ident
        raise RegistryError(f"{d}: could not allocate a decision id")

    def decisions(self) -> list[dict[str, Any]]:
        """Every decision record, oldest first (by their millisecond times; ids only name the second)."""
        d = self.root / "decisions"
        ids = sorted(m.group(1) for n in d.listdir() if (m := _DECISION.match(n)))
        records = [self._read_json(d / f"{i}.json") for i in ids]
        return sorted(records, key=lambda r: (str(r.get("time", "")), str(r.get("id", ""))))

    def decision(self, ident: str) -> dict[str, Any]:
        """One decision record by id."""
        loc = self.root / "decisions" / f"{ident}.json"
        if not _DECISION.match(f"{ident}.json") or not loc.is_file():
            raise RegistryError(f"{self.root}: no decision {ident!r}")
        return self._read_json(loc)

    # --- using a version ------------------------------------------------------------------------------------
    def checkout(self, ref: Any, dest: str | os.PathLike | None = None) -> Path:
        """A local run directory of version `ref` (for `load_run`, export): the version's own directory in a
        local registry (when `dest` is None), else a verified copy in `dest` or the cache
        ($RAYOFFLINE_CACHE/registry/...), downloaded once (versions are immutable). Treat it as read-only:
        commands that write into a run directory (`rayoffline eval`, `ope`) belong on a copy (`dest`)."""
        info = self.get(ref)
        src = self.root / "versions" / info.version
        if dest is None and self.root.local:
            return Path(src.path)
        if dest is None:
            from ..data.builtin import cache_root
            key = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
            dest = cache_root() / "registry" / key / info.version
        dest = Path(dest)
        if (dest / VERSION_FILE).is_file():
            return dest
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise RegistryError(f"checkout {info.version}: {dest} exists and is not a copy of it; choose another "
                                f"destination")
        files = info.record.get("files") or {}
        tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
        try:
            for rel, meta in files.items():
                data = (src / rel).read_bytes()
                if len(data) != meta["bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
                    raise RegistryError(f"{src / rel}: does not match the size and hash {VERSION_FILE} records; "
                                        f"the version is damaged")
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(data)
            (tmp / VERSION_FILE).write_bytes(_dumps(info.record))
            if dest.is_dir():
                dest.rmdir()
            try:
                os.rename(tmp, dest)
            except OSError:
                if not (dest / VERSION_FILE).is_file():  # not a concurrent checkout of the same version
                    raise
        except OSError as e:
            raise RegistryError(f"checkout {info.version} to {dest}: {type(e).__name__}: {e}") from None
        finally:
            if tmp.exists():
                import shutil
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    # --- helpers --------------------------------------------------------------------------------------------
    def _read_json(self, loc: Location) -> Any:
        for attempt in range(20):
            try:
                return json.loads(loc.read_text())
            except FileNotFoundError:
                raise RegistryError(f"{loc}: missing") from None
            except OSError as e:
                raise RegistryError(f"{loc}: cannot be read ({type(e).__name__}: {e})") from None
            except ValueError as e:  # only a writer on a filesystem without hard links shows a file mid-write
                if attempt == 19:
                    raise RegistryError(f"{loc}: corrupt JSON ({e}); restore it from a backup") from None
                time.sleep(0.05)

    def _writing(self, where: Location):
        return _Writing(self.root, where)


class _Writing:
    """Turns an OSError while writing into a RegistryError that names the registry and the place."""

    def __init__(self, root: Location, where: Location):
        self.root, self.where = root, where

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is not None and isinstance(err, OSError):
            raise RegistryError(f"registry {self.root}: cannot write {self.where} ({type(err).__name__}: "
                                f"{err}); use a registry path you can write to") from None
        return False


def _check_alias(name: Any) -> str:
    name = str(name)
    if not _ALIAS.match(name) or parse_version(name) is not None:
        raise RegistryError(f"alias {name!r}: an alias name starts with a letter, holds letters, digits, '_', '.', "
                            f"'-' (at most 64) and is not a version id like v3")
    return name


# --- a run member as a K=1 run directory -------------------------------------------------------------------

def build_version(run_dir: str | os.PathLike, member: int | None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The files of member `member` of `run_dir` as a K=1 run directory ({relative path: bytes}) and the
    version record without its id, time, job and files (module docstring)."""
    import torch
    import yaml

    from ..errors import CheckpointError
    from ..learner import checkpoint as ckpt
    from ..learner.pack_state import select

    run = Path(run_dir)
    if not run.is_dir():
        raise RegistryError(f"register: run directory {run} does not exist" if not run.exists() else
                            f"register: {run} is a file, not a run directory")
    try:
        path = ckpt.latest(run)
    except CheckpointError as e:
        raise RegistryError(f"register: {e}") from None
    state = ckpt.load(path)
    k = len(state["seeds"])
    result = _read_optional_json(run / "result.json")
    if member is None:
        member = int(result.get("best_member", 0)) if result else 0
    if isinstance(member, bool) or not isinstance(member, int) or not 0 <= member < k:
        raise RegistryError(f"register: member {member!r} is not a member of {run} (it has {k}: 0..{k - 1})")
    m = member
    learner = state["learner"]
    if k > 1:
        try:
            learner = select(learner, [m])
        except ValueError as e:
            raise RegistryError(f"register: {path}: cannot cut member {m} out of the checkpoint ({e})") from None
    payload = {**state, "learner": learner, "member_configs": [state["member_configs"][m]],
               "seeds": [state["seeds"][m]]}
    buf = io.BytesIO()
    torch.save(payload, buf)
    files: dict[str, bytes] = {f"checkpoints/{path.name}": buf.getvalue()}

    run_cfg = dict(state["run_config"])
    cfg_file = run / "config.yaml"
    if cfg_file.is_file():
        src_cfg = yaml.safe_load(cfg_file.read_text()) or {}
    else:
        src_cfg = {"algo_name": state["algo"], "data": state["data"], **run_cfg}
    cfg = {key: v for key, v in src_cfg.items() if key not in ("algo", "members")}
    cfg["algo"] = state["member_configs"][m]
    if state["seeds"][m] != run_cfg.get("seed"):
        cfg["members"] = [{"seed": state["seeds"][m]}]
    files["config.yaml"] = yaml.safe_dump(cfg, sort_keys=False).encode()

    online = None
    if result:
        res = _member_result(result, m, k)
        files["result.json"] = _dumps(res)
        mem = res["members"][0]
        if mem.get("eval_return_mean") is not None:
            online = {"return_mean": mem["eval_return_mean"], "return_std": mem.get("eval_return_std"),
                      "normalized_score": mem.get("normalized_score"), "episodes": result.get("eval_episodes"),
                      "behavior_return_mean": result.get("behavior_return_mean")}
    if (run / "metrics.jsonl").is_file():
        files["metrics.jsonl"] = _member_metrics((run / "metrics.jsonl").read_text(), m, k).encode()

    meta = state.get("metadata") or {}
    metrics: dict[str, Any] = {"step": int(state["step"])}
    if online is not None:
        metrics["online"] = online
    ope = _member_ope(_read_optional_json(run / "ope.json"), m, int(state["step"]), meta.get("content_hash"))
    if ope is not None:
        metrics["ope"] = ope
    record = {"algo": state["algo"],
              "config": {"algo": state["member_configs"][m], "run": run_cfg},
              "seed": int(state["seeds"][m]), "step": int(state["step"]), "dataset": dataset_record(state, src_cfg),
              "metrics": metrics, "parent": None, "job": {}, "source_run": str(run.resolve()), "member": m,
              "source_members": k, "checkpoint": f"checkpoints/{path.name}"}
    return files, record


def dataset_record(state: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """What a version records about its training data: where, content hash, partitions, held-out split."""
    meta = state.get("metadata") or {}
    parts = [{"name": p.get("name"), "content_hash": p.get("content_hash"),
              "num_transitions": p.get("num_transitions"), "num_episodes": p.get("num_episodes")}
             for p in meta.get("partitions") or []]
    holdout = None
    h = meta.get("holdout")
    if h:
        ids = [int(i) for i in h.get("episode_ids", [])]
        holdout = {"fraction": h.get("fraction"), "seed": h.get("seed"), "num_episodes": h.get("num_episodes"),
                   "num_transitions": h.get("num_transitions"),
                   "episode_ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}
    out = {"uri": state.get("data"), "content_hash": meta.get("content_hash"), "partitions": parts,
           "holdout": holdout, "num_transitions": meta.get("num_transitions"), "env_id": meta.get("env_id")}
    if cfg.get("data_changes"):
        out["changes"] = cfg["data_changes"]  # resumes that continued on changed data
    return out


def _read_optional_json(p: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _member_result(result: dict[str, Any], m: int, k: int) -> dict[str, Any]:
    """result.json as a K=1 run holding member m would have written it."""
    res = dict(result)
    members = result.get("members") or []
    if len(members) != k:
        return res
    mem = members[m]
    res.update(members=[mem], best_member=0, eval_return_mean=mem.get("eval_return_mean"),
               eval_return_std=mem.get("eval_return_std"), normalized_score=mem.get("normalized_score"),
               members_per_pass=1, member_updates_per_s=result.get("updates_per_s"))
    diag = result.get("diagnostics")
    if isinstance(diag, dict) and k > 1:
        diag = dict(diag)
        if isinstance(diag.get("q_bound"), list) and len(diag["q_bound"]) == k:
            diag["q_bound"] = [diag["q_bound"][m]]
        if isinstance(diag.get("last"), dict):
            diag["last"] = {n: [v[m]] if isinstance(v, list) and len(v) == k else v for n, v in diag["last"].items()}
        diag["flags"] = [{**f, "member": 0} for f in diag.get("flags") or [] if f.get("member") == m]
        res["diagnostics"] = diag
    return res


def _member_metrics(text: str, m: int, k: int) -> str:
    """metrics.jsonl as a K=1 run writes it: member m's value of every per-member list (scalars stay)."""
    if k == 1:
        return text
    out = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line of a crashed run
        out.append(json.dumps({n: v[m] if isinstance(v, list) and len(v) == k else v for n, v in row.items()}))
    return "".join(s + "\n" for s in out)


def _member_ope(ope: dict[str, Any] | None, m: int, step: int, content_hash: str | None) -> dict[str, Any] | None:
    """Member m's off-policy estimates from the run's ope.json, if they are of the registered checkpoint."""
    if not ope or int(ope.get("step", -1)) != step or m not in (ope.get("members") or []):
        return None
    j = ope["members"].index(m)
    est = {}
    for name, rows in (ope.get("estimates") or {}).items():
        if j < len(rows):
            est[name] = {key: v for key, v in rows[j].items() if key != "member"}
    return {"estimates": est, "level": ope.get("level"), "gamma": ope.get("gamma"), "data": ope.get("data"),
            "content_hash": ope.get("content_hash"), "same_data": ope.get("content_hash") == content_hash,
            "holdout": ope.get("holdout")}
