"""CQL losses against a direct computation from the paper's equations (Kumar et al. 2020, CQL(H))."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, TanhTransform, TransformedDistribution

from rayoffline.algorithms import cql
from rayoffline.algorithms.cql import CQL, CQLConfig
from rayoffline.batch import Batch
from rayoffline.errors import ConfigError
from rayoffline.spec import EnvSpec

from ._reference import OBS_MEAN, OBS_STD, RecordingRNG, assert_close, drive, member_batch, mlp, norm, weights

SPEC = EnvSpec(obs_dim=4, action_dim=2, discrete=False, action_low=(-1.0,) * 2, action_high=(1.0,) * 2)
K, B, N, A = 2, 12, 3, 2


def make(per_member=({}, {}), **kw) -> CQL:
    base = dict(hidden=(16, 16), cql_n_actions=N)
    member = [dict(cql_alpha=1.0, cql_temp=1.0, discount=0.99, entropy_alpha=1.0, cql_target_action_gap=0.5),
              dict(cql_alpha=5.0, cql_temp=0.5, discount=0.9, entropy_alpha=0.3, cql_target_action_gap=50.0)]
    configs = [CQLConfig(**base, **m, **extra, **kw) for m, extra in zip(member, per_member)]
    alg = CQL(SPEC, configs, [0, 1], obs_mean=OBS_MEAN, obs_std=OBS_STD)
    alg.rng = RecordingRNG(alg.rng)
    return alg


def batch(seed: int) -> Batch:
    return member_batch(seed, K, B, act_dim=A)


def policy(alg: CQL, k: int, s: torch.Tensor):
    out = mlp(weights(alg.actor.net, k), s)
    mean, head = out[:, :A], out[:, A:]
    if alg.cfg.log_std_offset != 0.0:  # CORL: log std = multiplier * head + offset, then the clamp
        head = (alg.actor.log_std_multiplier[k].detach().double() * head
                + alg.actor.log_std_offset[k].detach().double())
    log_std = head.clamp(-20.0, 2.0)
    return mean, log_std.exp(), TransformedDistribution(Normal(mean, log_std.exp()), TanhTransform())


def q(alg: CQL, net, k: int, e: int, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return mlp(weights(net, 2 * k + e), torch.cat([s, a], 1))[:, 0]


def reference(alg: CQL, bt: Batch, step: int, draws) -> dict[str, torch.Tensor]:
    """Every per-member loss (K,) from the parameters at the start of the step (the reference code's order)."""
    (k1, eps_cur), (k2, eps_next), (k3, uniform) = draws
    assert (k1, k2, k3) == ("randn", "randn", "rand")
    assert eps_cur.shape == eps_next.shape == uniform.shape == (K, B, N, A)
    out: dict[str, list] = {g: [] for g in ("alpha", "actor", "cql_alpha", "critic")}
    gaps, raw_gaps, targets = [], [], []
    for k, cfg in enumerate(alg.configs):
        s, s2, a = norm(bt.observations[k]), norm(bt.next_observations[k]), bt.actions[k].double()
        log_alpha = alg.log_alpha[k].detach().double() if cfg.auto_entropy else torch.tensor(cfg.entropy_alpha).log()
        alpha = log_alpha.exp()
        mean, std, dist = policy(alg, k, s)
        a_cur = [torch.tanh(mean + std * eps_cur[k, :, j].double()) for j in range(N)]
        logp_cur = [dist.log_prob(x).sum(-1) for x in a_cur]
        # entropy temperature and actor: the first policy sample at s
        out["alpha"].append(-(log_alpha * (logp_cur[0] + (-A))).mean())
        if step <= cfg.bc_steps:
            obj = dist.log_prob(a).sum(-1)
        else:
            obj = torch.minimum(q(alg, alg.critic.net, k, 0, s, a_cur[0]), q(alg, alg.critic.net, k, 1, s, a_cur[0]))
        out["actor"].append((alpha * logp_cur[0] - obj).mean())
        # TD target from the first next-policy sample
        nmean, nstd, ndist = policy(alg, k, s2)
        a_next = [torch.tanh(nmean + nstd * eps_next[k, :, j].double()) for j in range(N)]
        logp_next = [ndist.log_prob(x).sum(-1) for x in a_next]
        next_qs = torch.stack([torch.minimum(q(alg, alg.critic_target.net, k, 0, s2, x),
                                             q(alg, alg.critic_target.net, k, 1, s2, x)) for x in a_next], 1)
        if cfg.max_target_backup:  # CORL's cql_max_target_backup: the best of the N samples, and its log-prob
            target_q, best = next_qs.max(1)
            backup_logp = torch.stack(logp_next, 1).gather(1, best[:, None])[:, 0]
        else:
            target_q, backup_logp = next_qs[:, 0], logp_next[0]
        if cfg.backup_entropy:
            target_q = target_q - alpha * backup_logp
        y = bt.rewards[k].double() + cfg.discount * (1 - bt.terminations[k].double()) * target_q
        targets.append(y.mean())
        a_rand = [2.0 * uniform[k, :, j].double() - 1.0 for j in range(N)]
        gap_k, raw_k, td = [], [], 0.0
        for e in range(2):
            q_data = q(alg, alg.critic.net, k, e, s, a)
            td = td + ((q_data - y) ** 2).mean()
            q_rand = [q(alg, alg.critic.net, k, e, s, x) for x in a_rand]
            q_next = [q(alg, alg.critic.net, k, e, s, x) for x in a_next]  # policy(s') actions scored at s
            q_cur = [q(alg, alg.critic.net, k, e, s, x) for x in a_cur]
            if cfg.cql_importance_sample:
                terms = ([x - math.log(0.5 ** A) for x in q_rand] + [x - lp for x, lp in zip(q_next, logp_next)]
                         + [x - lp for x, lp in zip(q_cur, logp_cur)])
            else:
                terms = q_rand + [q_data] + q_next + q_cur
            soft_max = cfg.cql_temp * torch.logsumexp(torch.stack(terms, 1) / cfg.cql_temp, dim=1)
            raw_k.append((soft_max - q_data).mean())
            # CORL's cql_clip_diff_min/max: each state's gap clamped, then the batch mean
            gap_k.append((soft_max - q_data).clamp(cfg.clip_diff_min, cfg.clip_diff_max).mean())
        gaps.append(torch.stack(gap_k))
        raw_gaps.append(torch.stack(raw_k))
        if cfg.cql_lagrange:
            alpha_prime = alg.log_alpha_prime[k].detach().double().exp().clamp(0.0, 1e6)
            excess = sum(g - cfg.cql_target_action_gap for g in gap_k)
            out["critic"].append(td + alpha_prime * cfg.cql_alpha * excess)
            out["cql_alpha"].append(-0.5 * alpha_prime * cfg.cql_alpha * excess)
        else:
            out["critic"].append(td + cfg.cql_alpha * sum(gap_k))
    return {**{g: torch.stack(v) for g, v in out.items() if v}, "gaps": torch.stack(gaps),
            "raw_gaps": torch.stack(raw_gaps), "target_q": torch.stack(targets)}


def run_and_check(alg: CQL, steps=(1, 2)) -> list[dict]:
    opts: dict = {}
    refs = []
    for step in steps:
        bt = batch(step)
        snapshot = {n: p.detach().clone() for n, p in alg.named_parameters()}
        target_before = [p.detach().clone() for p in alg.critic_target.parameters()]
        checked, holder = [], {}

        def check(group, loss, metrics):
            if "ref" not in holder:  # all draws of the step happen before the first yield
                draws = alg.rng.draws[-3:]
                # the reference must see the pre-step parameters: nothing has been stepped before the first yield
                for n, p in alg.named_parameters():
                    assert torch.equal(p.detach(), snapshot[n]), n
                holder["ref"] = reference(alg, bt, step, draws)
            assert_close(loss, holder["ref"][group], f"{group} loss, step {step}")
            if group == "critic":
                assert_close(metrics["cql_gap"], holder["ref"]["gaps"].mean(1), "cql_gap metric")
                assert_close(metrics["target_q"], holder["ref"]["target_q"], "target_q metric")
            checked.append(group)

        groups = drive(alg, bt, step, check, opts)
        assert groups == checked
        for old, new, online in zip(target_before, alg.critic_target.parameters(), alg.critic.parameters()):
            torch.testing.assert_close(new.detach(), (1 - alg.cfg.tau) * old + alg.cfg.tau * online.detach())
        refs.append(holder["ref"])
    return refs


def test_losses_match_the_equations(monkeypatch):
    monkeypatch.setattr(cql, "_CHUNK_BYTES", 1)  # the penalty's critic call in chunks of 8 states: 8 + 4
    alg = make()
    assert list(alg.optim_groups()) == ["alpha", "actor", "critic"]
    run_and_check(alg)


def test_without_importance_sampling_with_backup_entropy_and_fixed_alpha():
    alg = make(cql_importance_sample=False, backup_entropy=True, auto_entropy=False)
    assert list(alg.optim_groups()) == ["actor", "critic"]
    run_and_check(alg)


def test_bc_warm_up_uses_the_dataset_actions_log_likelihood():
    alg = make(bc_steps=1)
    run_and_check(alg, steps=(1, 2))  # step 1: BC objective, step 2: Q objective


def test_lagrange_group_loss_and_direction():
    alg = make(cql_lagrange=True)
    assert list(alg.optim_groups()) == ["alpha", "actor", "cql_alpha", "critic"]
    before = alg.log_alpha_prime.detach().clone()
    (ref,) = run_and_check(alg, steps=(1,))
    # member 0's gap exceeds its target (0.5): alpha' grows; member 1's target (50) is above its gap: it shrinks
    gaps = ref["gaps"].sum(1)
    assert gaps[0] > 2 * 0.5 and gaps[1] < 2 * 50.0
    after = alg.log_alpha_prime.detach()
    assert after[0] > before[0] and after[1] < before[1]


def test_invalid_config_values_raise():
    with pytest.raises(ConfigError, match="cql_n_actions"):
        CQLConfig(cql_n_actions=0)
    with pytest.raises(ConfigError, match="cql_temp"):
        CQLConfig(cql_temp=0.0)
    with pytest.raises(ConfigError, match="cql_alpha"):
        CQLConfig(cql_lagrange=True, cql_alpha=0.0)


# ----- CORL's options: initialization, log-std affine, max target backup, gap clipping -------------------------

CORL = dict(orthogonal_init=True, last_layer_gain=1e-2, log_std_offset=-1.0, max_target_backup=True)


def _gram(w: torch.Tensor) -> torch.Tensor:
    """W W^T or W^T W, whichever is the identity-sized one for a (semi-)orthogonal W (in, out)."""
    w = w.double()
    return w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w


def test_default_config_builds_the_networks_of_before():
    """With every new option at its default, the parameter set is the old one: old checkpoints load."""
    alg = make()
    names = {n: tuple(p.shape) for n, p in alg.named_parameters()}
    h = (16, 16)
    expect = {}
    for net, dims, m in (("actor", (4, *h, 2 * A), K), ("critic", (4 + A, *h, 1), 2 * K),
                         ("critic_target", (4 + A, *h, 1), 2 * K)):
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            expect[f"{net}.net.layers.{i}.weight"] = (m, a, b)
            expect[f"{net}.net.layers.{i}.bias"] = (m, 1, b)
    expect["log_alpha"] = (K,)
    assert names == expect
    # PyTorch's default init: nonzero uniform biases, weights within 1/sqrt(fan_in)
    for layer in alg.critic.net.layers:
        assert layer.bias.abs().min() > 0 and layer.weight.abs().max() <= 1 / math.sqrt(layer.in_features)


@pytest.mark.parametrize("hidden", [(16, 16), (8, 32)])
def test_orthogonal_init_and_last_layer_gain(hidden):
    alg = CQL(SPEC, CQLConfig(hidden=hidden, orthogonal_init=True, last_layer_gain=1e-2), [0, 1])
    plain = CQL(SPEC, CQLConfig(hidden=hidden), [0, 1])
    *hid, last = alg.critic.net.layers
    for layer in hid:  # every member copy (K * 2 of them) orthogonal with gain sqrt(2), zero bias
        assert layer.weight.shape[0] == 2 * K
        for w in layer.weight:
            n = min(w.shape)
            torch.testing.assert_close(_gram(w), 2.0 * torch.eye(n, dtype=torch.float64), atol=1e-5, rtol=0)
        assert torch.count_nonzero(layer.bias) == 0
    for w in last.weight:  # (hidden, 1): orthogonal with gain 1e-2 is a column of norm 1e-2
        assert w.norm().item() == pytest.approx(1e-2, rel=1e-5)
    assert torch.count_nonzero(last.bias) == 0
    # the actor's hidden layers keep PyTorch's init (CORL's policy ignores orthogonal_init): the same weights
    # as without the options, since the actor is drawn first; its output layer is xavier-uniform with gain 1e-2
    for a, b in zip(alg.actor.net.layers[:-1], plain.actor.net.layers[:-1]):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    out = alg.actor.net.layers[-1]
    bound = 1e-2 * math.sqrt(6.0 / (out.in_features + out.out_features))
    assert out.weight.abs().max() <= bound and out.weight.abs().max() > 0.5 * bound
    assert torch.count_nonzero(out.bias) == 0


def test_last_layer_gain_without_orthogonal_init_is_xavier_for_both():
    alg = CQL(SPEC, CQLConfig(hidden=(16, 16), last_layer_gain=0.5), [0])
    plain = CQL(SPEC, CQLConfig(hidden=(16, 16)), [0])
    for net in (alg.actor.net, alg.critic.net):
        out = net.layers[-1]
        bound = 0.5 * math.sqrt(6.0 / (out.in_features + out.out_features))
        assert out.weight.abs().max() <= bound and out.weight.abs().max() > 0.5 * bound
        assert torch.count_nonzero(out.bias) == 0
    for layer in alg.critic.net.layers[:-1]:  # hidden layers: PyTorch's default
        assert layer.bias.abs().min() > 0 and layer.weight.abs().max() <= 1 / math.sqrt(layer.in_features)
    # orthogonal_init alone leaves the output layers at PyTorch's default
    ortho = CQL(SPEC, CQLConfig(hidden=(16, 16), orthogonal_init=True), [0])
    assert torch.equal(ortho.actor.net.layers[-1].weight, plain.actor.net.layers[-1].weight)
    out = ortho.critic.net.layers[-1]
    assert out.bias.abs().min() > 0 and out.weight.abs().max() <= 1 / math.sqrt(out.in_features)


def test_options_keep_members_independent_of_k():
    """Member k of a K=2 network with the options equals the K=1 network with member k's seed."""
    cfg = CQLConfig(hidden=(16, 16), **CORL)
    pair, alone = CQL(SPEC, cfg, [3, 4]), CQL(SPEC, cfg, [4])
    names = [n for n, _ in pair.named_parameters()]
    assert names == [n for n, _ in alone.named_parameters()]
    for (n, p), (_, q_) in zip(pair.named_parameters(), alone.named_parameters()):
        e = p.shape[0] // 2
        assert e == q_.shape[0], n
        torch.testing.assert_close(p[e:], q_, rtol=0, atol=0, msg=n)
    assert not torch.equal(pair.critic.net.layers[0].weight[0], pair.critic.net.layers[0].weight[2])


def test_log_std_offset_adds_learnable_per_member_scalars():
    alg = make(log_std_offset=-1.0)
    plain = make()
    extra = {n for n, _ in alg.named_parameters()} - {n for n, _ in plain.named_parameters()}
    assert extra == {"actor.log_std_multiplier", "actor.log_std_offset"}
    assert alg.actor.log_std_multiplier.tolist() == [1.0] * K and alg.actor.log_std_offset.tolist() == [-1.0] * K
    assert {id(alg.actor.log_std_multiplier), id(alg.actor.log_std_offset)} <= {
        id(p) for p in alg.optim_groups()["actor"][0]}
    # same network weights (the scalars draw nothing): log std shifts by exactly the offset at the start
    obs = torch.randn(K, 64, 4)
    mean, log_std = alg.actor.dist(obs)
    mean0, log_std0 = plain.actor.dist(obs)
    assert torch.equal(mean, mean0)
    torch.testing.assert_close(log_std, log_std0 - 1.0)
    # with the small output layer (CORL: gain 1e-2) the head is near 0 and the initial std about exp(-1)
    small = make(log_std_offset=-1.0, last_layer_gain=1e-2)
    std = small.actor.dist(obs)[1].exp()
    assert std.mean().item() == pytest.approx(math.exp(-1.0), rel=0.05)
    # the scalars learn with the actor, each member from its own loss (checked against the equations)
    run_and_check(alg, steps=(1, 2))
    assert (alg.actor.log_std_multiplier != 1.0).all() and (alg.actor.log_std_offset != -1.0).all()
    assert alg.actor.log_std_offset[0] != alg.actor.log_std_offset[1]


def test_losses_match_the_equations_with_corl_options():
    """Every group's loss against the equations with orthogonal init, gain 1e-2, the log-std affine (the
    reference reads the learned scalars), the max target backup and the entropy backup."""
    run_and_check(make(backup_entropy=True, **CORL), steps=(1, 2, 3))
    run_and_check(make(cql_lagrange=True, cql_importance_sample=False, **CORL), steps=(1, 2))


def test_max_target_backup_takes_the_best_of_the_n_next_samples():
    """Same weights and draws: the max backup's target is at least the one-sample target, and above it."""
    targets = {}
    for flag in (False, True):
        alg = make(max_target_backup=flag)
        drive(alg, batch(1), 1, lambda g, loss, m: targets.update({flag: m["target_q"]}) if g == "critic" else None)
    assert (targets[True] > targets[False]).all()


def test_clip_diff_clamps_each_states_gap():
    lo, hi = 2.5, 3.0
    alg = make(clip_diff_min=lo, clip_diff_max=hi)
    (ref,) = run_and_check(alg, steps=(1,))  # the loss and the cql_gap metric equal the clamped reference
    assert ((ref["gaps"] >= lo) & (ref["gaps"] <= hi)).all()
    assert not torch.allclose(ref["gaps"], ref["raw_gaps"])  # the clamp bound on this batch
    seen = {}
    drive(alg, batch(2), 2, lambda g, loss, m: seen.update(m) if g == "critic" else None)
    assert ((seen["cql_gap"] >= lo) & (seen["cql_gap"] <= hi)).all()
    # equal bounds pin the gap
    pinned = make(clip_diff_min=1.0, clip_diff_max=1.0)
    drive(pinned, batch(1), 1, lambda g, loss, m: seen.update(m) if g == "critic" else None)
    assert seen["cql_gap"].tolist() == [1.0, 1.0]


def test_clip_bounds_from_yaml_and_overrides():
    from rayoffline.config import from_dict, load_yaml, parse_overrides

    cfg = from_dict(CQLConfig, load_yaml("clip_diff_min: -.inf\nclip_diff_max: 5\n"))
    assert cfg.clip_diff_min == -math.inf and cfg.clip_diff_max == 5.0
    cfg = from_dict(CQLConfig, load_yaml("clip_diff_min: -200.0\nclip_diff_max: .inf\n"))
    assert cfg.clip_diff_min == -200.0 and cfg.clip_diff_max == math.inf
    cfg = from_dict(CQLConfig, parse_overrides(["clip_diff_min=-.inf", "clip_diff_max=1e3", "log_std_offset=-1",
                                                "orthogonal_init=true", "max_target_backup=true"]))
    assert (cfg.clip_diff_min, cfg.clip_diff_max, cfg.log_std_offset) == (-math.inf, 1000.0, -1.0)
    assert cfg.orthogonal_init and cfg.max_target_backup
    with pytest.raises(ConfigError, match="'algo.clip_diff_min'"):
        from_dict(CQLConfig, {"clip_diff_min": 1.0, "clip_diff_max": 0.0}, prefix="algo.")


def test_invalid_option_values_raise():
    with pytest.raises(ConfigError, match="clip_diff_min.*<= clip_diff_max"):
        CQLConfig(clip_diff_min=1.0, clip_diff_max=0.5)
    with pytest.raises(ConfigError, match="clip_diff_max"):
        CQLConfig(clip_diff_max=math.nan)
    with pytest.raises(ConfigError, match="last_layer_gain"):
        CQLConfig(last_layer_gain=-1e-2)
    with pytest.raises(ConfigError, match="log_std_offset"):
        CQLConfig(log_std_offset=math.inf)


def _learner_run(configs, seeds, steps=5):
    from rayoffline.learner.loop import Learner
    from tests.helpers import random_data, spec_for

    alg = CQL(spec_for(CQL), configs, seeds)
    learner = Learner(alg, random_data(spec_for(CQL), n=512), batch_size=16)
    hist = []
    for s in range(1, steps + 1):
        learner.step(s)
        hist.append(learner.pop_metrics())
    return alg, hist


def test_member_of_a_pack_with_the_options_trains_as_alone():
    opts = dict(hidden=(16, 16), clip_diff_min=-1.0, clip_diff_max=2.0, backup_entropy=True, **CORL)
    cfgs = [CQLConfig(cql_alpha=a, **opts) for a in (1.0, 5.0)]
    pack, pack_hist = _learner_run(cfgs, [3, 11])
    alone, alone_hist = _learner_run(cfgs[1:], [11])
    for s, (hp, hs) in enumerate(zip(pack_hist, alone_hist), 1):
        assert set(hp) == set(hs)
        for key in hs:
            assert hp[key][1] == pytest.approx(hs[key][0], rel=1e-4, abs=1e-5), f"step {s} {key}"
    for (n, p), (_, q_) in zip(pack.named_parameters(), alone.named_parameters()):
        e = p.shape[0] // 2
        torch.testing.assert_close(p[e:], q_, rtol=1e-4, atol=1e-5, msg=n)
    # state_dict round trip: a fresh network with other seeds acts (and samples) like the trained one
    other = CQL(pack.spec, cfgs, [5, 6])
    other.load_state_dict(pack.state_dict())
    obs = torch.randn(2, 9, pack.spec.obs_dim)
    assert torch.equal(other.act(obs), pack.act(obs))
    for x, y in zip(other.actor.dist(obs), pack.actor.dist(obs)):
        assert torch.equal(x, y)
    assert not torch.equal(other.actor.log_std_offset, torch.full((2,), -1.0))
    # a checkpoint of the other parameter set does not load silently
    with pytest.raises(RuntimeError, match="log_std"):
        CQL(pack.spec, [CQLConfig(hidden=(16, 16))] * 2, [5, 6]).load_state_dict(pack.state_dict())
