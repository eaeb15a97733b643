"""Counter-based member streams (rayoffline/nn/rng.py): statistics, member independence of K, data-parallel
slices, exact state, and whole training runs on the hashed streams (the CUDA backend, forced here on CPUs)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from rayoffline import algorithms
from rayoffline.learner import pack_state
from rayoffline.learner.loop import Learner
from rayoffline.nn import rng as rng_mod
from rayoffline.nn.rng import MemberRNG
from tests.helpers import random_data, spec_for
from tests.learner.test_members import _check_member, _run


def _counter(seeds, **kw):
    return MemberRNG(seeds, "cpu", 2, backend="counter", **kw)


def test_auto_hashes_on_cuda_only():
    assert MemberRNG([0], "cpu", 1).backend == "generator"
    assert _counter([0]).backend == "counter"


def test_distributions():
    r = _counter([0, 1, 2])
    n = 200_000
    u = r.rand((n,))
    assert u.dtype == torch.float32 and u.min() >= 0.0 and u.max() < 1.0
    assert u.mean(1).sub(0.5).abs().max() < 5 * math.sqrt(1 / 12 / n)
    assert u.var(1).sub(1 / 12).abs().max() < 0.002
    z = r.randn((n,))
    assert z.mean(1).abs().max() < 5 / math.sqrt(n) and z.std(1).sub(1.0).abs().max() < 0.01
    kurt = ((z - z.mean(1, keepdim=True)) ** 4).mean(1) / z.var(1) ** 2
    assert kurt.sub(3.0).abs().max() < 0.1
    i = r.randint(1000, (n,))
    assert i.dtype == torch.int64 and i.min() >= 0 and i.max() < 1000
    counts = torch.stack([torch.bincount(x, minlength=1000) for x in i]).double()
    chi2 = ((counts - n / 1000) ** 2 / (n / 1000)).sum(1)          # df 999: mean 999, sd ~45
    assert chi2.max() < 999 + 6 * 45
    big = r.randint(3_000_000_007, (n,))                            # indices past 2^31 are reachable
    assert big.max() > 2**31 and big.max() < 3_000_000_007
    # members and successive draws are uncorrelated
    assert torch.corrcoef(z).fill_diagonal_(0).abs().max() < 0.02
    z2 = r.randn((n,))
    assert abs(torch.corrcoef(torch.stack([z[0], z2[0]]))[0, 1]) < 0.02
    assert abs(torch.corrcoef(torch.stack([z[0, :-1], z[0, 1:]]))[0, 1]) < 0.02


def test_member_k_depends_only_on_its_seed():
    many, one = _counter([5, 9, 2]), _counter([9])
    for draw in (lambda r: r.randn((4, 6)), lambda r: r.rand((7,)), lambda r: r.randint(50, (3, 2))):
        assert torch.equal(draw(many)[1:2], draw(one))


def test_replicate_ranks_compute_slices_of_the_global_draw_and_split_ranks_differ():
    whole = _counter([0, 4]).randn((8, 3))
    parts = [_counter([0, 4], rank=k, world=2).randn((4, 3)) for k in range(2)]
    assert torch.equal(torch.cat(parts, dim=1), whole)
    solo = _counter([0, 4]).randint(100, (8,))
    assert torch.equal(_counter([0, 4], rank=0, world=2, shared=False).randint(100, (8,)), solo)
    assert not torch.equal(_counter([0, 4], rank=1, world=2, shared=False).randint(100, (8,)), solo)


def test_state_is_a_count_and_key_per_member_and_resumes_exactly():
    a = _counter([1, 2])
    a.randn((5,))
    a.rand((2,))
    state = a.get_state()
    assert [s[0] for s in state] == [2, 2] and state[0][1] != state[1][1]
    b, c, d = _counter([1, 2]), _counter([2]), _counter([7, 8])
    b.set_state(state)
    c.set_state(state[1:])  # a member's state moves with it (a sweep pack's select/concat)
    d.set_state(state)  # other seeds: the state says which streams these are
    want = a.randn((6,))
    assert torch.equal(b.randn((6,)), want) and torch.equal(c.randn((6,)), want[1:])
    assert torch.equal(d.randn((6,)), want)
    e = _counter([1, 2])
    e.set_state([2, 2])  # plain counts (checkpoints before the keys were stored): this learner's own streams
    assert torch.equal(e.randn((6,)), want)


def test_generator_states_continue_on_generators():
    """Checkpoints of the CPU backend (and of every run before the counter streams) resume exactly."""
    old = MemberRNG([3, 4], "cpu", 1, backend="generator")
    old.randn((10,))
    saved = old.get_state()
    assert all(s.dtype == torch.uint8 for s in saved)
    new = MemberRNG([3, 4], "cpu", 1, backend="counter")
    new.set_state(saved)
    assert new.backend == "generator" and torch.equal(new.randn((7,)), old.randn((7,)))
    with pytest.raises(ValueError, match="RNG state for 1 members, this run has 2"):
        new.set_state(saved[:1])
    with pytest.raises(ValueError, match="unrecognized RNG state"):
        new.set_state(["x", "y"])


@pytest.fixture
def hashed(monkeypatch):
    monkeypatch.setattr(rng_mod, "BACKEND", "counter")


@pytest.mark.parametrize("name", ["cql", "td3_bc", "bcq", "iql"])
def test_members_match_single_runs_on_hashed_streams(name, hashed):
    cls = algorithms.get(name)
    data = random_data(spec_for(cls), n=2048)
    cfg = cls.Config(hidden=(16, 16))
    pack, pack_hist = _run(name, [cfg, cfg], [3, 11], data)
    assert pack.rng.backend == "counter"
    single, single_hist = _run(name, [cfg], [11], data)
    _check_member(pack, pack_hist, 1, 2, single, single_hist)


def test_pack_join_and_resume_on_hashed_streams(hashed):
    cls = algorithms.get("cql")
    data = random_data(spec_for(cls), n=512)
    cfg = cls.Config(hidden=(16, 16))

    def learner(seeds):
        return Learner(cls(spec_for(cls), [cfg] * len(seeds), seeds), data, batch_size=16)

    a, b = learner([3]), learner([11])
    for _ in range(2):
        a.step()
    for _ in range(5):
        b.step()
    pack = learner([3, 11])
    pack.load_state_dict(pack_state.concat([copy.deepcopy(a.state_dict()), copy.deepcopy(b.state_dict())]))
    assert [s[0] for s in pack.state_dict()["sampler_rng"]] == [2, 5]
    for _ in range(3):
        pack.step()
        a.step()
        b.step()
    for i, solo in enumerate((a, b)):
        for p, q in zip(pack.algorithm.parameters(), solo.algorithm.parameters()):
            rows = p.shape[0] // 2
            torch.testing.assert_close(p[i * rows:(i + 1) * rows], q, rtol=1e-4, atol=1e-5)
