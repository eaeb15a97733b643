"""The compiled step (rayoffline/learner/compiled.py) against the eager one.

Inductor takes 30-130 s to generate and build one algorithm's step on a 2-core CPU, the rest of compiling
(Dynamo's trace, AOTAutograd's forward/backward graphs) 3-10 s. So every algorithm is compared with the eager
step through the traced graph run by eager kernels (backend aot_eager: everything that is ours, i.e. what the
trace captured, the branch specialization, the state handling), and IQL and BC through Inductor's generated
code as well; RAYOFFLINE_TEST_COMPILE_BACKEND=inductor runs every algorithm through Inductor (about 8 minutes
here; done for issue 10). RAYOFFLINE_TEST_DEVICE=cuda runs the same comparisons on a GPU (graphs replayed as
CUDA graphs there; benchmarks/gpu_checks.sh).
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from rayoffline import algorithms
from rayoffline.learner import compiled as compiled_mod
from rayoffline.learner.compiled import CompileError, resolve
from rayoffline.learner.loop import Learner
from tests.helpers import random_data, spec_for

STEPS, EVERY = 100, 25
DEVICE = torch.device(os.environ.get("RAYOFFLINE_TEST_DEVICE", "cpu"))


def _learner(name: str, compile: bool, seeds=(0, 1), **cfg) -> Learner:
    cls = algorithms.get(name)
    if name == "cql":
        cfg.setdefault("bc_steps", 40)  # the run crosses CQL's BC warm-up: two branches, two graphs
    alg = cls(spec_for(cls), [cls.Config(hidden=(32, 32), **cfg)] * len(seeds), list(seeds), device=DEVICE)
    data = random_data(alg.spec, n=1024, seed=7).to(DEVICE)
    # the eager reference uses the same counter-based streams as the compiled step
    learner = Learner(alg, data, batch_size=32, compile=compile)
    if not compile:
        learner.sampler.set_state([0] * alg.K)
        alg.rng.set_state([0] * alg.K)
    return learner


def _run(learner: Learner, steps: int = STEPS, start: int = 0) -> list[dict[str, list[float]]]:
    out = []
    for s in range(start + 1, start + steps + 1):
        learner.step(s)
        if s % EVERY == 0:
            out.append(learner.pop_metrics())
    return out


def _close_metrics(got, ref, rel=1e-2, abs_=1e-3):
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.keys() == r.keys()
        for k in g:
            assert g[k] == pytest.approx(r[k], rel=rel, abs=abs_), f"interval {i} {k}"


def _close(got: torch.Tensor, ref: torch.Tensor, what: str, tol: float = 1e-2) -> None:
    """Equal to float tolerance relative to the tensor's scale (Adam's moments of a loss near 100, e.g. CQL's
    critic, differ by ~1e-3 in absolute terms after 100 steps of reordered float sums)."""
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(got, ref, atol=tol * scale, rtol=1e-2, msg=lambda m: f"{what}: {m}")


def _close_state(a: Learner, b: Learner) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for k, t in sa["algorithm"].items():
        _close(sb["algorithm"][k], t, k)
    for g, opt in sa["optimizers"].items():
        other = sb["optimizers"][g]["state"]
        assert opt["state"].keys() == other.keys(), g
        for i, st in opt["state"].items():
            assert float(other[i]["step"]) == float(st["step"])
            _close(other[i]["exp_avg"], st["exp_avg"], f"{g} exp_avg {i}")
            _close(other[i]["exp_avg_sq"], st["exp_avg_sq"], f"{g} exp_avg_sq {i}")
    assert sa["sampler_rng"] == sb["sampler_rng"] and sa["member_steps"] == sb["member_steps"]
    assert sa["algorithm_extra"] == sb["algorithm_extra"]


INDUCTOR = ("iql",)  # besides the API test's BC


@pytest.fixture
def backend(request, monkeypatch):
    name = getattr(request, "param", "inductor")
    chosen = os.environ.get("RAYOFFLINE_TEST_COMPILE_BACKEND") or name
    monkeypatch.setattr(compiled_mod, "BACKEND", chosen)
    return chosen


@pytest.mark.parametrize("name,backend", [(n, "inductor" if n in INDUCTOR else "aot_eager")
                                          for n in algorithms.names()], indirect=["backend"])
def test_compiled_step_equals_eager_over_100_steps(name, backend):
    """Every 25 steps: the interval's losses and metrics, the parameters and the Adam state agree; then the eager
    learner continues from the compiled one's state. (Over 100 uninterrupted steps the two drift apart like any
    two float orders of summation: Adam turns a gradient's last-bit difference near eps into a full step of
    either sign; an eager run whose initial weights are scaled by 1 + 1e-7 drifts as far, e.g. BCQ's VAE by
    ~1e-2.)"""
    eager, compiled = _learner(name, False), _learner(name, True)
    for start in range(0, STEPS, EVERY):
        ref = _run(eager, EVERY, start)
        got = _run(compiled, EVERY, start)
        _close_metrics(got, ref)
        _close_state(eager, compiled)
        eager.load_state_dict(compiled.state_dict())
    assert compiled.compiled is not None and compiled.compiled._seen  # it really ran compiled graphs
    if name == "td3_bc":  # the delayed actor: one graph per phase
        assert len(compiled.compiled._seen) == 2
    if name == "cql":  # BC warm-up, then the Q objective
        assert len(compiled.compiled._seen) == 2


def test_compiled_members_equal_their_single_runs_and_resume_exactly(backend):
    pair = _learner("iql", True, seeds=(0, 1))
    ref = _run(pair, 75)
    solo = _learner("iql", True, seeds=(1,))  # member 1 alone: its own graph (K=1)
    for a, b in zip(_run(solo, 75), ref):
        for k in a:
            assert a[k][0] == pytest.approx(b[k][1], rel=1e-2, abs=1e-3), k

    # a compiled learner's state continues in a fresh compiled learner, and in an eager one, as uninterrupted
    first = _learner("iql", True, seeds=(0, 1))
    _run(first, 50)
    state = first.state_dict()
    assert all(isinstance(c[0], int) for c in state["sampler_rng"])  # counter-based streams
    for compile in (False, True):
        again = _learner("iql", compile, seeds=(5, 6))  # other seeds: everything must come from the state
        again.load_state_dict(state)
        _close_metrics(_run(again, 25, start=50), ref[-1:])
        _close_state(pair, again)
    # loaded into a learner whose step is already compiled (its Adam state is the graph's, updated in place);
    # the state loaded before was not changed by the training that followed
    again.load_state_dict(state)
    _close_metrics(_run(again, 25, start=50), ref[-1:])
    assert len(again.compiled._seen) == 1


def test_resolve_auto_on_off():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve("off", gpu, 10**6, 1)[0] is False
    assert resolve("on", cpu, 10, 1)[0] is True
    use, why = resolve("auto", gpu, 500, 1)
    assert not use and "short run" in why and "compile: on" in why
    assert resolve("auto", gpu, 10**6, 1)[0] is True
    assert resolve("auto", cpu, 10**6, 1)[0] is True  # K=1 on a CPU: measured faster compiled
    assert resolve("auto", cpu, 500, 1)[0] is False
    use, why = resolve("auto", cpu, 10**6, 1, members=16)
    assert not use and "K > 1 on CPUs" in why and "compile: on" in why
    assert resolve("auto", gpu, 10**6, 1, members=64)[0] is True
    assert resolve("auto", gpu, 10**6, 2) == (False,
                                              "compile: auto -> off (2 data-parallel workers run the eager step)")
    with pytest.raises(CompileError, match="compile: on is not supported with 2 data-parallel workers.*compile: off"):
        resolve("on", cpu, 10**6, 2)


@pytest.fixture
def no_compiler():
    """A machine without a working C++ compiler (and nothing cached to hide it)."""
    if DEVICE.type != "cpu":
        pytest.skip("the C++ compiler is the CPU backend's")
    import torch._inductor.config as ic
    torch._dynamo.reset()
    with ic.patch({"cpp.cxx": (None, "/nonexistent/c++"), "fx_graph_cache": False}):
        yield
    torch._dynamo.reset()


def test_compile_on_without_a_compiler_is_a_clear_error(no_compiler, backend):
    learner = _learner("bc", True)
    with pytest.raises(CompileError, match=r"compile: off"):
        learner.step(1)
    assert learner.member_steps == [1, 1]  # nothing was trained: parameters untouched (below)
    fresh = _learner("bc", True)
    for k, t in fresh.algorithm.state_dict().items():
        torch.testing.assert_close(learner.algorithm.state_dict()[k], t, atol=0, rtol=0)


def test_compile_auto_falls_back_to_eager_with_one_warning(no_compiler, backend):
    learner = _learner("bc", True)
    learner.compile_fallback = True
    eager = _learner("bc", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _run(learner, 50)
    assert [str(w.message) for w in caught if "compile: auto" in str(w.message)].__len__() == 1
    assert learner.compiled is None and not learner.compile
    _close_metrics(got, _run(eager, 50), rel=1e-6, abs_=1e-7)


@pytest.mark.parametrize("override,match", [
    ({"compile": "maybe"}, r"'compile': 'auto', 'on' or 'off', got 'maybe'"),
    ({"precision": "fp16"}, r"'precision': 'fp32' or 'bf16', got 'fp16'"),
    ({"compile": "on", "num_workers": 2}, r"'compile': compile: on is not supported with 2 data-parallel workers"),
])
def test_bad_settings_name_the_key_and_write_nothing(override, match, tmp_path):
    import rayoffline
    from rayoffline.errors import ConfigError
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        rayoffline.train("bc", "builtin:pendulum-medium", out=out, steps=5, overrides=override)
    assert not out.exists()


def test_a_compiled_run_reports_compile_time_apart_and_resumes_eagerly(tmp_path, backend):
    import json

    import rayoffline
    out = tmp_path / "run"
    common = {"eval_episodes": 0, "progress": "off", "log_every": 10, "algo.hidden": [32, 32], "batch_size": 32}
    result = rayoffline.train("bc", "builtin:pendulum-medium", out=out, steps=30,
                              overrides={**common, "compile": "on"})
    assert result["compiled"] is True and result["compile_s"] > 0  # (seconds cold, under one with a warm cache)
    # updates/s counts training time only: the steps' time at that rate and the compile time fit in the run
    assert 30 / result["updates_per_s"] + result["compile_s"] <= result["wall_s"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["perf/compile_s"] == pytest.approx(result["compile_s"])
    # a compiled run's checkpoint continues in the eager step (its counter-based streams work there too)
    resumed = rayoffline.train(None, None, out=out, steps=40, resume=True, overrides={"compile": "off"})
    assert resumed["compiled"] is False and resumed["compile_s"] == 0


def test_bf16_autocast_keeps_fp32_weights_and_state():
    cls = algorithms.get("iql")
    runs = {}
    for precision in ("fp32", "bf16"):
        alg = cls(spec_for(cls), [cls.Config(hidden=(32, 32))] * 2, [0, 1])
        learner = Learner(alg, random_data(alg.spec, n=1024, seed=7), batch_size=32, precision=precision)
        runs[precision] = _run(learner, 25)
        assert all(p.dtype == torch.float32 for p in alg.parameters())
        state = learner.state_dict()["optimizers"]
        assert all(t.dtype == torch.float32 for g in state.values() for st in g["state"].values()
                   for k, t in st.items() if k != "step")
    fp32, bf16 = runs["fp32"][0], runs["bf16"][0]
    assert all(all(map(lambda x: x == x, v)) for v in bf16.values())  # finite, not nan
    # bf16 matmuls really ran (the losses differ), and stay close to fp32's (8 mantissa bits)
    assert bf16["loss/critic"] != fp32["loss/critic"]
    assert bf16["loss/critic"] == pytest.approx(fp32["loss/critic"], rel=0.1)


def test_an_uncompilable_op_is_named_with_its_line(backend):
    """The algorithm contract forbids host transfers in `update`; one that makes one fails to compile, and the
    error names the operation and the line."""
    from rayoffline.algorithms.bc import BC

    class Syncing(BC):
        def update(self, batch, step):
            for group, loss, metrics in super().update(batch, step):
                if loss.sum().item() > 1e9:  # a host sync
                    raise RuntimeError("unreachable")
                yield group, loss, metrics

    alg = Syncing(spec_for(BC), [BC.Config(hidden=(8, 8))], [0])
    learner = Learner(alg, random_data(alg.spec, n=256), batch_size=16, compile=True)
    with pytest.raises(CompileError, match=r"could not compile .*test_compiled.py:\d+ in update: `if loss.sum\(\)"
                                           r".item\(\).*compile: off"):
        learner.step(1)


@pytest.mark.parametrize("backend", ["aot_eager"], indirect=True)
def test_bf16_compiled_equals_bf16_eager(backend):
    """Autocast around the update generator's stretches is traced into the graph as it runs eagerly."""
    runs = []
    for compile in (False, True):
        cls = algorithms.get("iql")
        alg = cls(spec_for(cls), [cls.Config(hidden=(32, 32))] * 2, [0, 1], device=DEVICE)
        learner = Learner(alg, random_data(alg.spec, n=1024, seed=7).to(DEVICE), batch_size=32, compile=compile,
                          precision="bf16")
        if not compile:
            learner.sampler.set_state([0, 0])
            alg.rng.set_state([0, 0])
        runs.append(_run(learner, 25))
    _close_metrics(runs[1], runs[0])
