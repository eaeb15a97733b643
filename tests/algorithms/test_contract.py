"""The Algorithm contract (DESIGN.md), checked for every registered algorithm."""
from __future__ import annotations

import pytest
import torch

from rayoffline import algorithms
from rayoffline.batch import Batch
from rayoffline.errors import ConfigError
from rayoffline.learner.loop import Learner
from tests.helpers import CONT, DISC, random_data, spec_for

NAMES = algorithms.names()
SMALL = (32, 32)


def make(name: str, k: int = 2, seeds=None, **cfg):
    cls = algorithms.get(name)
    spec = spec_for(cls)
    config = cls.Config(hidden=SMALL, **cfg)
    return cls(spec, [config] * k, seeds if seeds is not None else list(range(k)))


def _trainable(alg) -> dict[int, str]:
    return {id(p): n for n, p in alg.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", NAMES)
def test_groups_partition_the_trainable_parameters(name):
    alg = make(name)
    groups = alg.optim_groups()
    seen: dict[int, str] = {}
    for g, (params, lr) in groups.items():
        assert lr > 0
        for p in params:
            assert p.requires_grad, f"{name}: group {g} holds a frozen parameter"
            assert id(p) not in seen, f"{name}: parameter in groups {seen[id(p)]} and {g}"
            seen[id(p)] = g
    missing = set(_trainable(alg)) - set(seen)
    assert not missing, f"{name}: trainable params outside every group: {[_trainable(alg)[i] for i in missing]}"


@pytest.mark.parametrize("name", NAMES)
def test_update_yields_finite_losses_and_each_step_moves_only_its_group(name):
    alg = make(name)
    learner = Learner(alg, random_data(alg.spec), batch_size=16)
    groups = learner.groups
    names = dict(alg.named_parameters())
    yielded = []
    for step in range(1, 5):
        gen = alg.update(learner.sample(), step)
        for group, loss, metrics in gen:
            yielded.append(group)
            assert group in groups, f"{name}: yielded unknown group {group}"
            assert torch.isfinite(loss).all(), f"{name}/{group}: loss {loss}"
            assert loss.requires_grad
            for mname, v in metrics.items():
                assert v.shape == (alg.K,), f"{name}: metric {mname} has shape {tuple(v.shape)}, want (K,)"
                assert not v.requires_grad and torch.isfinite(v).all(), f"{name}: metric {mname}"
            assert loss.shape == (alg.K,), f"{name}/{group}: loss must be per member, got {tuple(loss.shape)}"
            before = {n: p.detach().clone() for n, p in names.items()}
            learner.apply(group, loss)
            own = {n for n, p in names.items() if any(p is q for q in groups[group].params)}
            moved = {n for n, p in names.items() if not torch.equal(before[n], p.detach())}
            assert moved <= own, f"{name}: stepping group {group} changed {sorted(moved - own)}"
            assert moved, f"{name}: stepping group {group} changed nothing"
    assert set(yielded) == set(groups), f"{name}: groups never yielded: {set(groups) - set(yielded)}"


@pytest.mark.parametrize("name", NAMES)
def test_targets_never_get_gradients(name):
    alg = make(name)
    learner = Learner(alg, random_data(alg.spec), batch_size=16)
    for step in range(1, 4):
        learner.step(step)
    frozen = [(n, p) for n, p in alg.named_parameters() if not p.requires_grad]
    for n, p in frozen:
        assert p.grad is None, f"{name}: frozen parameter {n} received a gradient"
    for n, p in alg.named_parameters():
        if "target" in n:
            assert not p.requires_grad, f"{name}: target parameter {n} is trainable"


@pytest.mark.parametrize("name", NAMES)
def test_act_shapes_and_bounds(name):
    alg = make(name, k=3)
    obs = torch.randn(7, alg.spec.obs_dim) * 3
    a = alg.act(obs)
    if alg.spec.discrete:
        assert a.shape == (3, 7) and a.dtype == torch.int64
        assert ((a >= 0) & (a < alg.spec.action_dim)).all()
    else:
        assert a.shape == (3, 7, alg.spec.action_dim)
        low, high = torch.tensor(alg.spec.action_low), torch.tensor(alg.spec.action_high)
        assert ((a >= low - 1e-5) & (a <= high + 1e-5)).all()


@pytest.mark.parametrize("name", NAMES)
def test_critic_values_shape_and_no_grad(name):
    """critic_values: (K, C, B) without gradient, member k's values those of the K=1 network of its seed."""
    alg = make(name, k=2, seeds=[3, 4])
    b = alg.prepare(_members(random_data(alg.spec, n=6), 2))
    q = alg.critic_values(b.observations, b.actions)
    if name == "bc":
        assert q is None
        return
    c = 1 if alg.spec.discrete else 2
    assert q.shape == (2, c, 6) and not q.requires_grad and torch.isfinite(q).all()
    alone = make(name, k=1, seeds=[4])
    q1 = alone.critic_values(b.observations[1:], b.actions[1:])
    torch.testing.assert_close(q[1:], q1)


def _members(batch: Batch, k: int) -> Batch:
    return Batch(**{f: getattr(batch, f).unsqueeze(0).expand(k, *getattr(batch, f).shape)
                    for f in ("observations", "actions", "rewards", "next_observations", "terminations",
                              "truncations")})


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    a = make(name, seeds=[0, 1])
    learner = Learner(a, random_data(a.spec), batch_size=16)
    for step in range(1, 3):
        learner.step(step)
    b = make(name, seeds=[5, 6])
    obs = torch.randn(2, 9, a.spec.obs_dim)
    assert not torch.equal(a.act(obs).float(), b.act(obs).float()) or a.spec.discrete
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.act(obs), b.act(obs))
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("name", NAMES)
def test_members_are_independent_of_k(name):
    """Member k of a K-member network has the weights of the K=1 network with member k's seed."""
    pair = make(name, k=2, seeds=[3, 4])
    alone = make(name, k=1, seeds=[4])
    for (n, p), (_, q) in zip(pair.named_parameters(), alone.named_parameters()):
        e = p.shape[0] // 2 if p.dim() and p.shape[0] % 2 == 0 else None
        assert e is not None, f"{name}: parameter {n} lacks a member dim ({tuple(p.shape)})"
        torch.testing.assert_close(p[e:], q, msg=f"{name}: {n}")


def test_action_space_mismatch_is_a_clear_error():
    with pytest.raises(ConfigError, match="td3_bc.*Discrete"):
        algorithms.get("td3_bc")(DISC, algorithms.get("td3_bc").Config(), 0)
    with pytest.raises(ConfigError, match="discrete_cql.*Box"):
        algorithms.get("discrete_cql")(CONT, algorithms.get("discrete_cql").Config(), 0)


def test_unknown_algorithm_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown algorithm 'nope'.*iql"):
        algorithms.get("nope")
