"""BC losses (continuous MSE to the normalized action, discrete cross-entropy) against a direct computation."""
from __future__ import annotations

import torch

from rayoffline.algorithms.bc import BC, BCConfig
from rayoffline.batch import Batch
from rayoffline.spec import EnvSpec

from ._reference import OBS_MEAN, OBS_STD, assert_close, drive, member_batch, mlp, norm, weights

K, B = 2, 8
CONT = EnvSpec(obs_dim=4, action_dim=2, discrete=False, action_low=(-1.0,) * 2, action_high=(1.0,) * 2)
DISC = EnvSpec(obs_dim=4, action_dim=2, discrete=True)


def make(spec: EnvSpec) -> BC:
    return BC(spec, [BCConfig(hidden=(16, 16)), BCConfig(hidden=(16, 16), discount=0.9)], [0, 1],
              obs_mean=OBS_MEAN, obs_std=OBS_STD)


def batch(spec: EnvSpec, seed: int) -> Batch:
    return member_batch(seed, K, B, discrete=spec.discrete)


def test_continuous_loss_is_the_mse_of_the_tanh_policy():
    alg = make(CONT)
    checked = []

    def check(group, loss, metrics):
        per = torch.stack([((torch.tanh(mlp(weights(alg.actor.net, k), norm(bt.observations[k])))
                             - bt.actions[k].double()) ** 2).mean() for k in range(K)])
        assert_close(loss, per, "bc loss")
        assert_close(metrics["mse"], per, "mse metric")
        checked.append(group)

    for step in range(1, 4):  # later steps see the weights the earlier Adam steps produced
        bt = batch(CONT, step)
        assert drive(alg, bt, step, check) == ["actor"]
    assert checked == ["actor"] * 3
    obs = torch.randn(K, 5, 4)
    expect = torch.stack([torch.tanh(mlp(weights(alg.actor.net, k), norm(obs[k]))) for k in range(K)])
    assert_close(alg.act(obs), expect, "act")


def test_discrete_loss_is_the_cross_entropy_and_acting_is_argmax():
    alg = make(DISC)

    def check(group, loss, metrics):
        ces, accs = [], []
        for k in range(K):
            logits = mlp(weights(alg.actor, k), norm(bt.observations[k]))
            a = bt.actions[k]
            logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
            ces.append(-logp[torch.arange(B), a].mean())
            accs.append((logits.argmax(1) == a).double().mean())
        assert_close(loss, torch.stack(ces), "bc cross-entropy")
        assert_close(metrics["ce"], torch.stack(ces), "ce metric")
        assert_close(metrics["accuracy"], torch.stack(accs), "accuracy metric")

    for step in range(1, 4):
        bt = batch(DISC, step)
        drive(alg, bt, step, check)
    obs = torch.randn(K, 64, 4) * 3
    expect = torch.stack([mlp(weights(alg.actor, k), norm(obs[k])).argmax(1) for k in range(K)])
    got = alg.act(obs)
    assert got.dtype == torch.int64 and torch.equal(got, expect)
    assert 0 < got.sum() < got.numel(), "degenerate test: the policy should pick both actions somewhere"
