"""Issue 12, the model registry (rayoffline/registry/store.py): versions made from a run member load as K=1 runs
acting like that member; concurrent processes promoting or registering never both win; registries on object-store
URIs work; a crash before version.json leaves no version; bad input gets a clear error."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import uuid

import pytest

from rayoffline.cli import main

CFG = {"batch_size": 64, "log_every": 100, "eval_episodes": 1, "checkpoint_every": 0, "threads": 1,
       "progress": "off", "diagnostics": "off", "algo": {"hidden": [32, 32]}, "members": [{"seed": 0}, {"seed": 1}]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A K=2 IQL run on a copy of builtin:pendulum-medium with a held-out split, and its ope.json (FQE)."""
    import rayoffline
    from rayoffline.data.builtin import resolve
    from rayoffline.data.holdout import split
    from rayoffline.evaluation.offpolicy import run_ope

    root = tmp_path_factory.mktemp("registry")
    ds = root / "pendulum"
    shutil.copytree(resolve("builtin:pendulum-medium"), ds)
    split(ds, 0.1, seed=3)
    run = root / "run"
    rayoffline.train("iql", str(ds), run, steps=200, config=CFG)
    run_ope(run, estimators="fqe", fqe_steps=100, bootstrap=50)
    return ds, run


def _registry(tmp_path, name="reg"):
    from rayoffline.registry import Registry
    return Registry.open(tmp_path / name, create=True)


def _obs(ds, n=64):
    from rayoffline.data import load
    return load(ds).observations[:n]


def test_a_registered_member_is_a_k1_run_that_acts_like_it(trained, tmp_path):
    import torch
    import yaml

    from rayoffline.data import load_metadata
    from rayoffline.learner.api import load_run

    ds, run = trained
    reg = _registry(tmp_path)
    info = reg.register(run, member=1, job={"name": "nightly", "id": 7})
    assert info.version == "v000001" and info.member == 1 and info.seed == 1 and info.algo == "iql"
    assert info.job == {"name": "nightly", "id": 7} and info.parent is None
    meta = load_metadata(ds)
    assert info.dataset["content_hash"] == meta["content_hash"]
    assert [p["content_hash"] for p in info.dataset["partitions"]] == [p["content_hash"] for p in meta["partitions"]]
    assert info.dataset["holdout"]["seed"] == 3 and info.dataset["holdout"]["num_episodes"] == \
        meta["holdout"]["num_episodes"]
    result = json.loads((run / "result.json").read_text())
    assert info.metrics["online"]["return_mean"] == result["members"][1]["eval_return_mean"]
    ope = json.loads((run / "ope.json").read_text())
    fqe = ope["estimates"]["fqe"][ope["members"].index(1)]
    got = info.metrics["ope"]["estimates"]["fqe"]
    assert (got["value"], got["low"], got["high"]) == (fqe["value"], fqe["low"], fqe["high"]) and got["low"] < \
        got["high"]

    path = reg.checkout("v1")
    assert path == tmp_path / "reg" / "versions" / "v000001"
    alg, _, state = load_run(path)
    src, _, _ = load_run(run)
    assert alg.K == 1 and state["seeds"] == [1] and len(state["member_configs"]) == 1
    obs = _obs(ds)
    with torch.no_grad():
        mine, theirs = alg.act(obs)[0], src.act(obs)
    torch.testing.assert_close(mine, theirs[1])
    assert not torch.allclose(theirs[0], theirs[1])  # the members differ: member 1 really was the one cut out
    cfg = yaml.safe_load((path / "config.yaml").read_text())
    assert cfg["members"] == [{"seed": 1}] and cfg["algo"]["hidden"] == [32, 32]
    res = json.loads((path / "result.json").read_text())
    assert len(res["members"]) == 1 and res["eval_return_mean"] == result["members"][1]["eval_return_mean"]
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    src_rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(not isinstance(v, list) for r in rows for v in r.values())
    assert rows[0]["loss/actor"] == src_rows[0]["loss/actor"][1]

    # the default member is the run's best; parent lineage through an alias; extra metrics kept
    reg.promote("production", "v1", expected=None)
    best = reg.register(run, parent="production", metrics={"note": "warm start"})
    assert best.member == result["best_member"] and best.parent == "v000001"
    assert best.metrics["note"] == "warm start" and best.metrics["online"]["return_mean"] == \
        result["members"][result["best_member"]]["eval_return_mean"]
    assert [v.version for v in reg.versions()] == ["v000001", "v000002"]
    assert reg.get("production").version == "v000001" and reg.get(2).version == "v000002"


def test_promote_rollback_history_and_decisions(trained, tmp_path):
    from rayoffline.registry import AliasConflict, RegistryError

    _, run = trained
    reg = _registry(tmp_path)
    for m in (0, 1, 0):
        reg.register(run, member=m)
    assert reg.alias("production") is None
    reg.promote("production", "v1", expected=None, reason="first")
    reg.promote("production", "v2", expected="v1")
    reg.promote("production", "3")
    with pytest.raises(AliasConflict, match="points at v000003, not at the expected v000002") as e:
        reg.promote("production", "v1", expected="v2")
    assert (e.value.expected, e.value.actual, e.value.attempted) == ("v000002", "v000003", "v000001")
    assert reg.promote("production", "v3").entry == 3  # already there: no new entry
    assert reg.rollback("production").version == "v000002"
    assert reg.rollback("production", expected="v2").version == "v000001"
    with pytest.raises(RegistryError, match="no earlier version to roll back to"):
        reg.rollback("production")
    reg.promote("staging", "production")  # an alias as the version: the one it points at
    assert reg.aliases() == {"production": "v000001", "staging": "v000001"}
    hist = reg.history("production")
    assert [(h.entry, h.action, h.version, h.previous) for h in hist] == [
        (1, "promote", "v000001", None), (2, "promote", "v000002", "v000001"), (3, "promote", "v000003", "v000002"),
        (4, "rollback", "v000002", "v000003"), (5, "rollback", "v000001", "v000002")]
    assert hist[0].reason == "first" and hist[-1].stack == ["v000001"]

    a = reg.record_decision({"candidates": ["v2", "v3"], "chosen": "v3", "evidence": {"fqe": [1.5, 2.0]}})
    b = reg.record_decision({"chosen": None})
    got = reg.decisions()
    assert sorted(d["id"] for d in got) == sorted([a, b]) and reg.decision(a)["evidence"] == {"fqe": [1.5, 2.0]}
    assert [d["time"] for d in got] == sorted(d["time"] for d in got)  # oldest first (ids name only the second)
    with pytest.raises(RegistryError, match="key 'id' is set by the registry"):
        reg.record_decision({"id": 3})


def _race_promote(root, i, barrier, queue):
    """Round 1: promote from v1; round 2: promote or roll back from what round 1 left. Reports each outcome."""
    from rayoffline.registry import AliasConflict, Registry
    reg = Registry.open(root)
    barrier.wait(120)
    try:
        e = reg.promote("production", "v2" if i % 2 else "v3", expected="v1", reason=f"racer {i}")
        queue.put((1, i, "won", e.version, e.entry))
    except AliasConflict as c:
        queue.put((1, i, "lost", c.actual, None))
    barrier.wait(120)
    current = reg.alias("production")  # every racer reads after round 1 ended, before round 2 writes
    barrier.wait(120)
    try:
        if i % 2:
            e = reg.rollback("production", expected=current, reason=f"racer {i}")
        else:
            e = reg.promote("production", "v2" if current == "v000003" else "v3", expected=current,
                            reason=f"racer {i}")
        queue.put((2, i, "won", e.version, e.entry))
    except AliasConflict as c:
        queue.put((2, i, "lost", c.actual, None))


def _race_register(root, run, barrier, queue):
    """Register after the barrier. The member's files are cut out before it, so the racers reach the id
    allocation together rather than spread over their checkpoint loading, and listing the versions is slowed
    down (as on an object store), so they all see the same listing: only the exclusive claim separates them."""
    import copy
    import time

    from rayoffline.registry import Registry, store
    files, record = store.build_version(run, 0)
    store.build_version = lambda *args: (files, copy.deepcopy(record))
    listing = store.Registry._numbers

    def slow(self, complete=True):
        found = listing(self, complete)
        time.sleep(0.2)
        return found
    store.Registry._numbers = slow
    reg = Registry.open(root)
    barrier.wait(120)
    queue.put(reg.register(run, member=0).version)


def _spawn(target, args_of, n, reports):
    """Run target(*args_of(i), barrier, queue) in n fresh processes; the `reports` items they put on the queue."""
    import queue as q
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_of(i), barrier, queue)) for i in range(n)]
    for p in procs:
        p.start()
    out = []
    try:
        for _ in range(reports):
            out.append(queue.get(timeout=180))
    except q.Empty:
        pass
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert len(out) == reports, out
    return out


def test_concurrent_promotions_exactly_one_wins(trained, tmp_path):
    _, run = trained
    reg = _registry(tmp_path)
    for m in (0, 1, 0):
        reg.register(run, member=m)
    reg.promote("production", "v1", expected=None)
    n = 8
    results = _spawn(_race_promote, lambda i: (str(reg.root.path), i), n, 2 * n)
    hist = reg.history("production")
    assert len(hist) == 3  # the start and one winner per round
    for rnd in (1, 2):
        got = [r for r in results if r[0] == rnd]
        winners = [r for r in got if r[2] == "won"]
        assert len(winners) == 1, got
        _, i, _, version, entry = winners[0]
        assert entry == rnd + 1 and hist[entry - 1].reason == f"racer {i}" and hist[entry - 1].version == version
        assert all(r[3] == version for r in got if r[2] == "lost")  # each loser was told who won
    # round 2: a rollback (odd racer) returns to v1; a promotion (even racer) pushes the other version
    last = hist[-1]
    assert last.previous == hist[1].version
    assert (last.action, last.version) in {("rollback", "v000001"),
                                           ("promote", "v000002" if hist[1].version == "v000003" else "v000003")}
    assert reg.alias("production") == last.version
    assert sorted(os.listdir(tmp_path / "reg" / "aliases" / "production")) == ["000001.json", "000002.json",
                                                                                "000003.json"]


def test_concurrent_registrations_get_distinct_ids(trained, tmp_path):
    _, run = trained
    reg = _registry(tmp_path)
    n = 4
    got = _spawn(_race_register, lambda i: (str(reg.root.path), str(run)), n, n)
    assert sorted(got) == [f"v{i:06d}" for i in range(1, n + 1)]
    assert [v.version for v in reg.versions()] == sorted(got)
    assert all(v.member == 0 and v.seed == 0 for v in reg.versions())


def test_registry_on_an_object_store_uri(trained, tmp_path):
    import torch

    from rayoffline.learner.api import load_run
    from rayoffline.registry import AliasConflict, Registry

    from rayoffline.data.storage import locate

    ds, run = trained
    uri = f"memory://registry-test-{uuid.uuid4().hex[:8]}/models"
    for loc in (locate(f"{uri}-probe/x"), locate(tmp_path / "x")):  # the primitive: the first creation wins
        assert loc.parent.mkdir() is None and loc.create_exclusive(b"first")
        assert not loc.create_exclusive(b"second") and loc.read_bytes() == b"first"
    reg = Registry.open(uri, create=True)
    assert not reg.root.local
    v = reg.register(run, member=0)
    reg.promote("production", v.version, expected=None)
    assert Registry.open(uri).get("production").version == "v000001"
    with pytest.raises(AliasConflict):
        reg.promote("production", v.version, expected="v7")
    path = reg.checkout("production", dest=tmp_path / "co")
    assert path == tmp_path / "co" and (path / "version.json").is_file()
    assert reg.checkout("v1", dest=tmp_path / "co") == path  # already there: reused
    alg, _, _ = load_run(path)
    src, _, _ = load_run(run)
    obs = _obs(ds)
    with torch.no_grad():
        torch.testing.assert_close(alg.act(obs)[0], src.act(obs)[0])
    cached = reg.checkout("v1")  # the default destination: $RAYOFFLINE_CACHE/registry/...
    assert cached.is_dir() and "registry" in cached.parts and (cached / "config.yaml").read_text() == \
        (path / "config.yaml").read_text()


def test_a_crash_before_version_json_leaves_no_version(trained, tmp_path, monkeypatch):
    from rayoffline.data.storage import Location
    from rayoffline.registry import UnknownVersion

    _, run = trained
    reg = _registry(tmp_path)
    reg.register(run, member=0)
    real = Location.create_exclusive

    def crash(self, data):
        if self.name == "version.json":
            raise RuntimeError("simulated crash")
        return real(self, data)

    monkeypatch.setattr(Location, "create_exclusive", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        reg.register(run, member=1)
    monkeypatch.undo()
    half = tmp_path / "reg" / "versions" / "v000002"
    assert (half / "checkpoints").is_dir() and not (half / "version.json").exists()  # its files were written
    assert [v.version for v in reg.versions()] == ["v000001"]
    with pytest.raises(UnknownVersion, match="incomplete"):
        reg.get("v2")
    # a temporary file left by a crashed promotion is not an entry either
    reg.promote("production", "v1")
    (tmp_path / "reg" / "aliases" / "production" / ".tmp-000002.json.abc").write_text('{"half": ')
    assert reg.alias("production") == "v000001"
    v = reg.register(run, member=1)
    assert v.version == "v000003" and [x.version for x in reg.versions()] == ["v000001", "v000003"]
    assert reg.promote("production", "v3").entry == 2


def test_bad_input_is_a_clear_error(trained, tmp_path, capsys):
    from rayoffline.registry import Registry, RegistryError, UnknownAlias, UnknownVersion

    _, run = trained
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(RegistryError, match="cannot write"):
        Registry.open(afile / "reg", create=True)
    with pytest.raises(RegistryError, match="is a file"):
        Registry.open(afile, create=True)
    with pytest.raises(RegistryError, match="does not exist"):
        Registry.open(tmp_path / "nowhere")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "data.txt").write_text("x")
    with pytest.raises(RegistryError, match="not empty and is not a registry"):
        Registry.open(tmp_path / "busy", create=True)
    reg = _registry(tmp_path)
    reg.register(run, member=0)
    with pytest.raises(UnknownAlias, match="no alias 'staging'"):
        reg.get("staging")
    with pytest.raises(UnknownAlias, match="no alias 'staging'"):
        reg.rollback("staging")
    with pytest.raises(UnknownVersion, match=r"no version 'v9' \(the registry holds version v000001\)"):
        reg.promote("production", "v9")
    with pytest.raises(UnknownVersion):
        reg.register(run, parent="v5")
    with pytest.raises(RegistryError, match="member 2 is not a member"):
        reg.register(run, member=2)
    with pytest.raises(RegistryError, match="does not exist"):
        reg.register(tmp_path / "norun")
    with pytest.raises(RegistryError, match="an alias name starts with a letter"):
        reg.promote("v3", "v1")
    assert [v.version for v in reg.versions()] == ["v000001"]  # nothing half-registered by the failures

    uri = str(tmp_path / "reg")
    cases = [(["registry", "register", str(afile / "reg"), str(run)], "cannot write"),
             (["registry", "list", str(tmp_path / "nowhere")], "does not exist"),
             (["registry", "show", uri, "staging"], "no alias 'staging'"),
             (["registry", "show", uri, "v4"], "no version 'v4'"),
             (["registry", "promote", uri, "v4"], "no version 'v4'"),
             (["registry", "rollback", uri, "--alias", "staging"], "no alias 'staging'"),
             (["registry", "promote", uri, "v1", "--expect", "v1"], "points at nothing, not at the expected v000001")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_registry_is_a_clear_error(trained, tmp_path):
    from rayoffline.registry import RegistryError
    _, run = trained
    reg = _registry(tmp_path)
    reg.register(run, member=0)
    os.chmod(tmp_path / "reg" / "versions", 0o555)
    try:
        with pytest.raises(RegistryError, match="cannot write"):
            reg.register(run, member=0)
    finally:
        os.chmod(tmp_path / "reg" / "versions", 0o755)


def test_cli(trained, tmp_path, capsys):
    _, run = trained
    uri = str(tmp_path / "reg")
    assert main(["registry", "register", uri, str(run), "--member", "1"]) == 0
    assert "registered v000001: member 1" in capsys.readouterr().out
    assert main(["registry", "register", uri, str(run), "--member", "0", "--parent", "v1"]) == 0
    assert main(["registry", "promote", uri, "v1", "--expect", "none", "--reason", "first"]) == 0
    assert main(["registry", "promote", uri, "2", "--expect", "v1"]) == 0
    capsys.readouterr()
    assert main(["registry", "rollback", uri]) == 0
    assert "production: rolled back v000002 -> v000001 (history entry 3)" in capsys.readouterr().out
    assert main(["registry", "list", uri]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].endswith("2 versions") and "aliases: production -> v000001" in out
    row1, row2 = (next(line for line in lines if line.startswith(v)) for v in ("v000001", "v000002"))
    assert row1.split()[-1] == "production" and row2.split()[-2] == "v000001"  # aliases; parent
    assert main(["registry", "show", uri, "production"]) == 0
    out = capsys.readouterr().out
    assert "version   v000001 (alias production)" in out and "seed 1" in out and "fqe" in out
    assert [line.split()[3] for line in out.splitlines() if line.startswith("  ") and line.split()[0].isdigit()] \
        == ["promote", "promote", "rollback"]
