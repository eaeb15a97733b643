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
    mean, log_std = out[:, :A], out[:, A:].clamp(-20.0, 2.0)
    return mean, log_std.exp(), TransformedDistribution(Normal(mean, log_std.exp()), TanhTransform())


def q(alg: CQL, net, k: int, e: int, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return mlp(weights(net, 2 * k + e), torch.cat([s, a], 1))[:, 0]


def reference(alg: CQL, bt: Batch, step: int, draws) -> dict[str, torch.Tensor]:
    """Every per-member loss (K,) from the parameters at the start of the step (the reference code's order)."""
    (k1, eps_cur), (k2, eps_next), (k3, uniform) = draws
    assert (k1, k2, k3) == ("randn", "randn", "rand")
    assert eps_cur.shape == eps_next.shape == uniform.shape == (K, B, N, A)
    out: dict[str, list] = {g: [] for g in ("alpha", "actor", "cql_alpha", "critic")}
    gaps = []
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
        target_q = torch.minimum(q(alg, alg.critic_target.net, k, 0, s2, a_next[0]),
                                 q(alg, alg.critic_target.net, k, 1, s2, a_next[0]))
        if cfg.backup_entropy:
            target_q = target_q - alpha * logp_next[0]
        y = bt.rewards[k].double() + cfg.discount * (1 - bt.terminations[k].double()) * target_q
        a_rand = [2.0 * uniform[k, :, j].double() - 1.0 for j in range(N)]
        gap_k, td = [], 0.0
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
            gap_k.append((soft_max - q_data).mean())
        gaps.append(torch.stack(gap_k))
        if cfg.cql_lagrange:
            alpha_prime = alg.log_alpha_prime[k].detach().double().exp().clamp(0.0, 1e6)
            excess = sum(g - cfg.cql_target_action_gap for g in gap_k)
            out["critic"].append(td + alpha_prime * cfg.cql_alpha * excess)
            out["cql_alpha"].append(-0.5 * alpha_prime * cfg.cql_alpha * excess)
        else:
            out["critic"].append(td + cfg.cql_alpha * sum(gap_k))
    return {**{g: torch.stack(v) for g, v in out.items() if v}, "gaps": torch.stack(gaps)}


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
