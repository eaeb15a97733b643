"""`rayoffline export`: standalone TorchScript / ONNX policies that equal Algorithm.act without rayoffline.

Two tiny runs (IQL with K=2 members on builtin:pendulum-medium, discrete CQL on builtin:cartpole-medium) are
exported in both formats and loaded in a clean interpreter that cannot import rayoffline (torch alone for
TorchScript, onnxruntime alone for ONNX); its actions on dataset observations must equal `algorithm.act(obs)` of
the exported member. A contract test exports every registered algorithm (random weights, no run) the same way.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from rayoffline import algorithms
from rayoffline.cli import main
from rayoffline.errors import CheckpointError, ConfigError
from rayoffline.export import (PolicyModule, export_policy, member_algorithm, prune_unused, read_metadata,
                               to_onnx, trace_torchscript)
from tests.helpers import CONT, DISC

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

FAST = {"batch_size": 64, "log_every": 100, "checkpoint_every": 0, "threads": 1, "algo": {"hidden": [32, 32]}}

# Run in a fresh interpreter (-I: no PYTHON* variables, no user site, no script directory on sys.path) from an
# empty directory; rayoffline's editable install is blocked at the import system, and the child proves it.
CHILD = textwrap.dedent("""
    import importlib.abc, json, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "rayoffline" or name.startswith("rayoffline."):
                raise ImportError("rayoffline is blocked in this interpreter")
    sys.meta_path.insert(0, _Block())
    try:
        import rayoffline
        sys.exit("rayoffline importable in the clean interpreter")
    except ImportError:
        pass
    import numpy as np
    fmt, jobs = sys.argv[1], json.loads(sys.argv[2])
    report = {}
    for model, obs, out in jobs:
        x = np.load(obs)
        if fmt == "torchscript":
            import torch
            extra = {"rayoffline.json": ""}
            policy = torch.jit.load(model, _extra_files=extra)
            y = policy(torch.from_numpy(x)).numpy()
            meta, names = json.loads(extra["rayoffline.json"]), None
        else:
            import onnxruntime as ort
            sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
            meta = json.loads(sess.get_modelmeta().custom_metadata_map["rayoffline.json"])
            names = [sess.get_inputs()[0].name, sess.get_outputs()[0].name]
        np.save(out, y)
        report[model] = {"meta": meta, "names": names}
    report["modules"] = sorted(m for m in ("rayoffline", "torch") if m in sys.modules)
    print(json.dumps(report))
""")


def _run_child(fmt: str, jobs: list[tuple[Path, Path, Path]], cwd: Path) -> dict:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-I", "-c", CHILD, fmt, json.dumps([[str(p) for p in j] for j in jobs])],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    """{name: (run_dir, observations (300, obs) float32 from the dataset)}: IQL K=2 (one online episode each, so
    result.json names a best member) and discrete CQL K=1."""
    import rayoffline
    from rayoffline.data.builtin import resolve
    root = tmp_path_factory.mktemp("export-runs")
    out = {}
    for name, algo, data, extra in [
        ("iql", "iql", "builtin:pendulum-medium", {"eval_episodes": 1, "members": [{"seed": 0}, {"seed": 1}]}),
        ("dcql", "discrete_cql", "builtin:cartpole-medium", {"eval_episodes": 0}),
    ]:
        rayoffline.train(algo, data, root / name, steps=300, config={**FAST, **extra})
        batch = rayoffline.load(resolve(data))
        idx = torch.linspace(0, batch.observations.shape[0] - 1, 300).long()
        out[name] = (root / name, batch.observations[idx].float().contiguous())
    return out


def _expected(run_dir: Path, obs: torch.Tensor, member: int) -> torch.Tensor:
    from rayoffline.learner.api import load_run
    algorithm, _, _ = load_run(run_dir)
    return algorithm.act(obs)[member]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_policy_equals_act_in_an_interpreter_without_rayoffline(runs, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    jobs, expected, results = [], {}, {}
    for name, (run_dir, obs) in runs.items():
        model = tmp_path / f"{name}.{'onnx' if fmt == 'onnx' else 'pt'}"
        results[name] = export_policy(run_dir, fmt, model)
        member = results[name]["member"]
        np.save(tmp_path / f"{name}-obs.npy", obs.numpy())
        jobs.append((model, tmp_path / f"{name}-obs.npy", tmp_path / f"{name}-act.npy"))
        expected[name] = _expected(run_dir, obs, member)
    clean = tmp_path / "clean"
    clean.mkdir()
    report = _run_child(fmt, jobs, clean)
    assert report["modules"] == ([] if fmt == "onnx" else ["torch"])  # onnxruntime alone runs the ONNX file
    for (model, _, act), name in zip(jobs, runs):
        got, want = torch.from_numpy(np.load(act)), expected[name]
        assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, got.dtype, want.shape)
        if name == "dcql":
            assert got.shape == (300,) and torch.equal(got, want)
            assert len(set(got.tolist())) == 2  # the greedy policy is not constant on these states
        else:
            assert got.shape == (300, 1) and torch.allclose(got, want, atol=1e-5, rtol=0)
            assert float(want.std()) > 0.05
        meta = report[str(model)]["meta"]
        run_meta = json.loads((runs[name][0] / "result.json").read_text())
        assert meta["algo"] == run_meta["algo"] and meta["member"] == results[name]["member"]
        assert meta["seed"] == run_meta["members"][meta["member"]]["seed"] and meta["step"] == 300
        assert meta["dataset_content_hash"] == results[name]["metadata"]["dataset_content_hash"]
        assert len(meta["dataset_content_hash"]) == 64 and meta["rayoffline_version"]
        assert meta["input"]["name"] == "observations" and meta["output"]["name"] == "actions"
        assert meta == read_metadata(model)
        if fmt == "onnx":
            assert report[str(model)]["names"] == ["observations", "actions"]


def test_member_selection_on_a_two_member_run(runs, tmp_path):
    run_dir, obs = runs["iql"]
    best = json.loads((run_dir / "result.json").read_text())["best_member"]
    acts = {}
    default = export_policy(run_dir, "torchscript", tmp_path / "default.pt")
    assert default["member"] == best and default["member_from"] == "best member in result.json"
    for k in (0, 1):
        r = export_policy(run_dir, "torchscript", tmp_path / f"m{k}.pt", member=k)
        assert r["member"] == k and r["metadata"]["seed"] == k and r["member_from"] == "--member"
        with torch.no_grad():
            acts[k] = torch.jit.load(str(tmp_path / f"m{k}.pt"))(obs)
        assert torch.allclose(acts[k], _expected(run_dir, obs, k), atol=1e-5, rtol=0)
    assert (acts[0] - acts[1]).abs().max() > 1e-3  # the members are different policies
    with torch.no_grad():
        assert torch.equal(torch.jit.load(str(tmp_path / "default.pt"))(obs), acts[best])
    # without result.json the default is member 0
    moved = tmp_path / "copy"
    moved.mkdir()
    (moved / "checkpoints").symlink_to(run_dir / "checkpoints")
    (moved / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    r = export_policy(moved, "torchscript", tmp_path / "nores.pt")
    assert r["member"] == 0 and r["member_from"] == "default: no best member in result.json"


def test_cli_refusals_leave_files_alone(runs, tmp_path, capsys):
    run_dir, _ = runs["iql"]
    out = tmp_path / "policy.pt"
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out} (torchscript") and "iql member" in line and "(batch, 3) float32" in line
    before = out.read_bytes()
    for argv, message in [
        ([str(run_dir), "--format", "torchscript", "--out", str(out)], "file exists; pass --force"),
        ([str(run_dir), "--format", "onnx", "--out", str(tmp_path / "x.onnx"), "--member", "2"],
         "the run has 2 members, valid indices are 0..1"),
        ([str(run_dir), "--format", "onnx", "--out", str(tmp_path / "x.onnx"), "--member", "-1"], "0..1"),
        ([str(tmp_path / "missing"), "--format", "onnx", "--out", str(tmp_path / "x.onnx")], "does not exist"),
        ([str(run_dir), "--format", "torchscript", "--out", str(tmp_path)], "is a directory"),
    ]:
        assert main(["export", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("rayoffline: error:") and message in err and len(err.strip().splitlines()) == 1, err
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.pt"]  # no temporary file left behind
    # --force replaces the file (another member: other weights)
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(out), "--force", "--member",
                 str(1 - json.loads((run_dir / "result.json").read_text())["best_member"])]) == 0
    assert out.read_bytes() != before
    # a run directory without checkpoints: load_run's error
    empty = tmp_path / "fresh"
    empty.mkdir()
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    with pytest.raises(CheckpointError, match="no checkpoint yet"):
        export_policy(empty, "torchscript", tmp_path / "y.pt")


def test_onnx_without_its_packages_names_the_extra(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    with pytest.raises(ConfigError, match=r"not installed: onnxscript\); install them with pip install "
                                          r"'rayoffline\[export\]'"):
        export_policy(runs["dcql"][0], "onnx", tmp_path / "p.onnx")
    assert not (tmp_path / "p.onnx").exists()


@pytest.mark.parametrize("name,kind", [(n, kind) for n in algorithms.names()
                                       for kind in algorithms.get(n).action_types])
def test_every_algorithm_exports_member_k_exactly(name, kind):
    """Random K=3 weights (no training): member 1's traced and ONNX programs equal act(obs)[1] at several batch
    sizes; the pruned module drops the target networks (acting never reads them)."""
    cls = algorithms.get(name)
    spec = DISC if kind == "discrete" else CONT
    extra = {"vae_hidden": (16, 16)} if name == "bcq" else {}
    g = torch.Generator().manual_seed(1)
    algorithm = cls(spec, [cls.Config(hidden=(16, 16), **extra)] * 3, [4, 5, 6],
                    obs_mean=torch.randn(spec.obs_dim, generator=g),
                    obs_std=torch.rand(spec.obs_dim, generator=g) + 0.5).eval()
    module = PolicyModule(member_algorithm(algorithm, 1)).eval()
    obs = 3.0 * torch.randn(40, spec.obs_dim, generator=g)
    dropped = prune_unused(module, obs[:5])
    targets = [n for n, _ in algorithm.named_children() if n.endswith("_target")]
    assert set(targets) <= set(dropped), (targets, dropped)
    want = algorithm.act(obs)                                            # (3, 40, act) | (3, 40)
    assert not torch.equal(want[0], want[1]) and not torch.equal(want[2], want[1])  # members differ
    want = want[1]
    with torch.no_grad():
        traced = trace_torchscript(module, obs[:8])
        for b in (1, 40):
            got = traced(obs[:b])
            assert got.dtype == want.dtype and torch.allclose(got.float(), want[:b].float(), atol=1e-6, rtol=0)
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(to_onnx(module, obs[:8], {"algo": name}).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    for b in (1, 40):
        got = torch.from_numpy(sess.run(None, {"observations": obs[:b].numpy()})[0])
        assert got.dtype == want.dtype and torch.allclose(got.float(), want[:b].float(), atol=1e-5, rtol=0)


def test_a_registered_version_exports_by_its_alias(runs, tmp_path, capsys):
    """`rayoffline export production --registry URI`: the version's member (here member 1 of a K=2 run)."""
    from rayoffline.cli import main
    from rayoffline.registry import Registry
    run_dir, obs = runs["iql"]
    reg = Registry.open(tmp_path / "registry", create=True)
    v = reg.register(run_dir, member=1)
    reg.promote("production", v.version)
    out = tmp_path / "prod.pt"
    assert main(["export", "production", "--registry", str(tmp_path / "registry"), "--format", "torchscript",
                 "--out", str(out)]) == 0
    with torch.no_grad():
        got = torch.jit.load(str(out))(obs)
    assert torch.allclose(got, _expected(run_dir, obs, 1), atol=1e-5, rtol=0)
    assert read_metadata(out)["seed"] == 1
    assert main(["export", "staging", "--registry", str(tmp_path / "registry"), "--format", "torchscript",
                 "--out", str(tmp_path / "x.pt")]) == 2
    assert "staging" in capsys.readouterr().err
