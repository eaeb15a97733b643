from __future__ import annotations

import pytest
import torch

from rayoffline import algorithms
from rayoffline.errors import CheckpointError
from rayoffline.learner import checkpoint as ckpt
from rayoffline.learner.loop import Learner
from tests.helpers import random_data, spec_for


def _learner(name, seed=0):
    cls = algorithms.get(name)
    alg = cls(spec_for(cls), [cls.Config(hidden=(32, 32))] * 2, [seed, seed + 1])
    return Learner(alg, random_data(alg.spec, n=1024), batch_size=32)


@pytest.mark.parametrize("name", ["iql", "cql", "discrete_bcq"])
def test_resume_from_checkpoint_reproduces_uninterrupted_losses(name, tmp_path):
    straight = _learner(name)
    ref = []
    for s in range(1, 9):
        straight.step(s)
        ref.append(straight.pop_metrics())

    first = _learner(name)
    for s in range(1, 5):
        first.step(s)
        first.pop_metrics()
    path = ckpt.save(tmp_path, 4, {"algo": name, "learner": first.state_dict(), "member_configs": [], "seeds": [],
                                   "run_config": {}})
    del first
    resumed = _learner(name, seed=100)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt.load(path)["learner"])
    for s in range(5, 9):
        resumed.step(s)
        got = resumed.pop_metrics()
        assert got.keys() == ref[s - 1].keys()
        for k in got:
            assert got[k] == pytest.approx(ref[s - 1][k], rel=1e-6, abs=1e-7), f"step {s} {k}"


def test_metrics_are_per_member_means_over_the_interval():
    learner = _learner("bc")
    for s in range(1, 4):
        learner.step(s)
    m = learner.pop_metrics()
    assert m and all(len(v) == 2 for v in m.values())
    assert learner.pop_metrics() == {}


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    learner = _learner("bc")
    path = ckpt.save(tmp_path, 1, {"algo": "bc", "learner": learner.state_dict(), "member_configs": [],
                                   "seeds": [], "run_config": {}})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="step_00000001.pt.*corrupted"):
        ckpt.load(path)


def test_incompatible_checkpoint_is_a_clear_error(tmp_path):
    a = _learner("bc")
    path = ckpt.save(tmp_path, 1, {"algo": "bc", "learner": a.state_dict(), "member_configs": [], "seeds": [],
                                   "run_config": {}})
    b = _learner("iql")
    with pytest.raises(CheckpointError, match="does not fit"):
        b.load_state_dict(ckpt.load(path)["learner"], where=str(path))


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    learner = _learner("bc")
    for step in (1, 2, 3, 4):
        ckpt.save(tmp_path, step, {"algo": "bc", "learner": learner.state_dict(), "member_configs": [],
                                   "seeds": [], "run_config": {}}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000003.pt", "step_00000004.pt"]
    assert ckpt.latest(tmp_path).name == "step_00000004.pt"


def test_loads_with_weights_only(tmp_path, monkeypatch):
    seen = {}
    real = torch.load

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)
    monkeypatch.setattr(torch, "load", spy)
    learner = _learner("bc")
    path = ckpt.save(tmp_path, 1, {"algo": "bc", "learner": learner.state_dict(), "member_configs": [],
                                   "seeds": [], "run_config": {}})
    ckpt.load(path)
    assert seen.get("weights_only") is True


def test_delayed_groups_are_averaged_over_the_steps_they_ran():
    """TD3+BC updates its actor every 2nd step: its logged loss is the mean over those steps only."""
    learner = _learner("td3_bc")
    seen = []
    real_update = learner.algorithm.update

    def spy(batch, step):
        for group, loss, metrics in real_update(batch, step):
            if group == "actor":
                seen.append(loss.detach().clone())
            yield group, loss, metrics
    learner.algorithm.update = spy
    for s in range(1, 5):
        learner.step(s)
    m = learner.pop_metrics()
    assert len(seen) == 2
    assert m["loss/actor"] == pytest.approx(torch.stack(seen).mean(0).tolist(), rel=1e-6)
