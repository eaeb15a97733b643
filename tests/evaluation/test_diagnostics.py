"""Training diagnostics (rayoffline/evaluation/diagnostics.py): exact numbers on a stub, the flags on real runs,
and what a run writes (metrics.jsonl, result.json; `diagnostics: off` adds nothing)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import rayoffline
from rayoffline.algorithms.base import AlgoConfig, Algorithm
from rayoffline.batch import Batch
from rayoffline.data.holdout import EpisodeRows
from rayoffline.evaluation.diagnostics import Diagnostics
from rayoffline.spec import EnvSpec

SPEC = EnvSpec(obs_dim=1, action_dim=1, discrete=False, action_low=(-2.0,), action_high=(2.0,), env_id=None)


class Stub(Algorithm):
    """Q_1(s, a) = w * s + v * a + offset_k, Q_2 = Q_1 + gap; pi(s) = `act` (normalized). noisy: `policy` draws
    from the member streams and from torch's global generator (as a sampling policy might)."""
    name = "stub"

    def __init__(self, *a, w=1.0, v=1.0, offset=(0.0, 1.0), gap=1.0, act=0.5, noisy=False, **kw):
        self.w, self.v, self.offsets, self.gap, self.act_value, self.noisy = w, v, offset, gap, act, noisy
        super().__init__(*a, **kw)

    def build(self, gens):
        self.dummy = nn.Parameter(torch.zeros(self.K))
        self.register_buffer("offset", torch.tensor(self.offsets, dtype=torch.float32))

    def optim_groups(self):
        return {"all": ([self.dummy], 1e-3)}

    def policy(self, obs):
        if self.noisy:
            self.rng.randn((3,))
            torch.rand(3)
        return torch.full((*obs.shape[:2], 1), self.act_value)

    def critic_values(self, obs, actions):
        q1 = self.w * obs[..., 0] + self.v * actions[..., 0] + self.offset[:, None]          # (K, B)
        return torch.stack([q1, q1 + self.gap], dim=1)


def _rows():
    """Episode 0: 3 rows, truncated; episode 1: 2 rows, terminated. Raw actions in [-2, 2] (normalized: / 2)."""
    obs = torch.tensor([[0.0], [1.0], [2.0], [5.0], [6.0]])
    nxt = torch.tensor([[1.0], [2.0], [3.0], [6.0], [7.0]])
    act = torch.tensor([[1.0], [-1.0], [2.0], [0.0], [1.0]])
    rew = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    term = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    trunc = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])
    b = Batch(observations=obs, actions=act, rewards=rew, next_observations=nxt, terminations=term, truncations=trunc)
    return EpisodeRows(b, np.array([7, 7, 7, 9, 9]), np.array([0, 1, 2, 0, 1]), np.array([0, 3]), np.array([3, 2]))


def _stub(**kw):
    cfgs = [AlgoConfig(normalize_obs=False, discount=0.9), AlgoConfig(normalize_obs=False, discount=0.5)]
    return Stub(SPEC, cfgs, [0, 1], **kw)


def test_numbers_on_a_stub_are_exact():
    alg, rows = _stub(), _rows()
    scale, bias = 2.0, -1.0
    d = Diagnostics(alg, rows, "holdout", reward=(scale, bias))
    m = d.run(alg, step=10)
    obs, nxt = np.array([0, 1, 2, 5, 6.0]), np.array([1, 2, 3, 6, 7.0])
    a = np.array([1, -1, 2, 0, 1.0]) / 2
    r = np.array([1, 2, 3, 4, 5.0]) * scale + bias
    term = np.array([0, 0, 0, 0, 1.0])
    for k, (gamma, off) in enumerate([(0.9, 0.0), (0.5, 1.0)]):
        q = obs + a + off                                              # min of the twins: Q_1
        g = np.array([r[0] + gamma * r[1] + gamma ** 2 * r[2], r[1] + gamma * r[2], r[2], r[3] + gamma * r[4], r[4]])
        # mc rows: tails gamma^(rows left) of the truncated episode (0.9: .729 .81 .9; 0.5: .125 .25 .5), 0 for
        # the terminated one's; fewer than 10 rows have tail <= 0.2, so the quarter with the least tail: q25 = 0
        mc = np.array([False, False, False, True, True])
        assert m["diag/q_data"][k] == pytest.approx(q.mean())
        assert m["diag/mc_return"][k] == pytest.approx(g[mc].mean())
        assert m["diag/overestimation"][k] == pytest.approx((q[mc].mean() - g[mc].mean()) / (g[mc].std() + 1e-6))
        target = r + gamma * (1 - term) * (nxt + 0.5 + off)
        assert m["diag/td_error"][k] == pytest.approx(np.abs(q - target).mean(), rel=1e-6)
        assert m["diag/action_distance"][k] == pytest.approx(np.abs(0.5 - a).mean())
        assert m["diag/critic_disagreement"][k] == pytest.approx(1.0)
        assert m["diag/q_spread"][k] == pytest.approx(q.std() / g.std(), rel=1e-6)
    assert m["diag/member_disagreement"] == pytest.approx([0.5, 0.5])  # members differ by 1 everywhere
    # the reference: nearest state in the other episode; rows 0-2 -> row 3 (s=5), rows 3-4 -> row 2 (s=2)
    ref = np.mean([abs(a[3] - a[0]), abs(a[3] - a[1]), abs(a[3] - a[2]), abs(a[2] - a[3]), abs(a[2] - a[4])])
    assert d.reference == pytest.approx(ref)
    assert d.summary()["last"] == m and d.summary()["rows"] == "holdout" and d.flags == []


@pytest.mark.parametrize("kw, flag", [
    ({"offset": (100.0, 0.0)}, "q_overestimation"),   # member 0 far above every return
    ({"offset": (-50.0, 0.0)}, "negative_q"),         # returns all positive, Q all negative
    ({"w": 0.0, "v": 0.0, "offset": (20.0, 0.0), "gap": 0.0}, "collapsed_q"),  # member 0: Q = 20 everywhere
])
def test_each_flag_trips_for_the_member_concerned_once(kw, flag):
    alg, rows = _stub(**kw), _rows()
    said = []
    d = Diagnostics(alg, rows, "holdout", warn=said.append)
    for step in (5, 10):
        d.run(alg, step)
    got = [(f["flag"], f["member"]) for f in d.flags]
    assert got == [(flag, 0)], d.flags
    assert d.flags[0]["step"] == 5 and d.flags[0]["last_step"] == 10
    assert len(said) == 1 and said[0].startswith(f"rayoffline: warning: step 5: member 0: {flag}: ")


def test_out_of_support_flag():
    alg, rows = _stub(act=-1.0), _rows()  # logged normalized actions 0.5 -0.5 1 0 0.5; reference 0.7
    d = Diagnostics(alg, rows, "holdout")
    d.run(alg, 1)
    assert d.reference == pytest.approx(0.7)
    assert d.last["diag/action_distance"][0] == pytest.approx(1.3)
    assert [f["flag"] for f in d.flags] == []  # 1.3 < 3 x 0.7
    d.reference = 0.4
    d.run(alg, 2)
    assert [(f["flag"], f["member"]) for f in d.flags] == [("out_of_support", 0), ("out_of_support", 1)]


class Beta:
    """log beta(a|s) = -sharp * (a - center)^2 / 2 (normalized a), raw obs in."""
    def __init__(self, sharp=1.0, center=0.0):
        self.sharp, self.center = sharp, center

    def log_prob(self, obs, actions):
        return -0.5 * self.sharp * (actions[..., 0] - self.center) ** 2


def test_behavior_nll_is_relative_to_the_logged_actions():
    alg, rows = _stub(act=1.0), _rows()
    d = Diagnostics(alg, rows, "holdout", behavior=Beta())
    m = d.run(alg, 1)
    a = np.array([1, -1, 2, 0, 1.0]) / 2
    assert m["diag/behavior_nll"] == pytest.approx([0.5 - np.mean(a ** 2 / 2)] * 2)
    assert d.flags == []  # 0.33 nats


@pytest.mark.parametrize("act, flagged", [(1.0, True), (0.6, False)])
def test_behavior_out_of_support_needs_nats_and_distance(act, flagged):
    """A sharp beta around -0.5 (logged actions: mean squared offset 0.9): pi = 1 is 10 x (2.25 - 0.9) = 13.5 nats
    less likely at distance 0.7 > floor 0.5 (reference 0.7: the distance criterion alone holds not); pi = 0.6 is
    10 x (1.21 - 0.9) = 3.1 nats less likely, but at distance 0.46 < 0.5."""
    alg, rows = _stub(act=act), _rows()
    d = Diagnostics(alg, rows, "holdout", behavior=Beta(sharp=20.0, center=-0.5))
    m = d.run(alg, 1)
    assert min(m["diag/behavior_nll"]) > 2.0
    assert [f["flag"] for f in d.flags] == (["out_of_support"] * 2 if flagged else [])


def test_the_pass_leaves_the_random_streams_alone():
    alg, twin = _stub(noisy=True), _stub(noisy=True)
    torch.manual_seed(3)
    expect = torch.rand(4)
    torch.manual_seed(3)
    Diagnostics(alg, _rows(), "holdout").run(alg, 1)
    assert torch.equal(torch.rand(4), expect)
    assert torch.equal(alg.rng.randn((4,)), twin.rng.randn((4,)))


# ----- real runs -------------------------------------------------------------------------------------------

FAST = {"batch_size": 64, "log_every": 250, "eval_every": 250, "eval_episodes": 0, "progress": "off", "threads": 1,
        "checkpoint_every": 0}


def _rows_of(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cql_without_penalty_on_expert_data_trips_q_overestimation(tmp_path):
    """cql_alpha 0 is off-policy SAC-style Q-learning: on the narrow expert data its critic diverges upward.
    Fast divergence: policy/critic lr 3e-3, target rate 0.2. Measured (seeds 1-3): mean Q 22-37 at step 750,
    93-122 at 1000, 224-361 at 1250 against the bound 38.2 (U ~ 0 plus one std of the returns-to-go); seed 0
    (not used) stayed near -16 for 1000 updates."""
    cfg = {**FAST, "algo": {"hidden": [64, 64], "cql_alpha": 0.0, "cql_n_actions": 1, "tau": 0.2,
                            "policy_lr": 3e-3, "critic_lr": 3e-3, "alpha_lr": 3e-3},
           "members": [{"seed": s} for s in (1, 2, 3)]}
    r = rayoffline.train("cql", "builtin:pendulum-expert", tmp_path / "cql", steps=1250, config=cfg)
    diag = r["diagnostics"]
    over = [f for f in diag["flags"] if f["flag"] == "q_overestimation"]
    assert len({f["member"] for f in over}) >= 2, diag["flags"]
    assert diag["rows"] == "train sample"
    bound = diag["q_bound"]
    assert all(30.0 < b < 50.0 for b in bound), bound  # U ~ 0 (every reward <= 0) plus one std (38.2)
    assert sum(q > b for q, b in zip(diag["last"]["diag/q_data"], bound)) >= 2


def test_healthy_iql_trips_nothing_and_the_run_records_diagnostics(tmp_path):
    from rayoffline.data.builtin import resolve
    from rayoffline.data.holdout import split
    data = tmp_path / "pm"
    shutil.copytree(resolve("builtin:pendulum-medium"), data)
    split(data, 0.1, seed=0)
    cfg = {**FAST, "algo": {"hidden": [64, 64]}, "members": [{"seed": s} for s in range(3)]}
    out = tmp_path / "iql"
    r = rayoffline.train("iql", str(data), out, steps=1000, config=cfg)
    diag = r["diagnostics"]
    assert diag["flags"] == [] and diag["rows"] == "holdout" and diag["step"] == 1000
    # measured: mean Q -15 against the bound 107 (U ~ 0 plus one std of the held-out returns), policy distance
    # 0.58 against 3 x 0.66; q_spread 0.04 at step 250 (below 0.05) but |mean Q| 5 < 0.1 rms G = 27
    rows = _rows_of(out)
    passes = [x for x in rows if "diag/q_data" in x]
    assert [x["step"] for x in passes] == [250, 500, 750, 1000]
    names = {"diag/q_data", "diag/mc_return", "diag/overestimation", "diag/td_error", "diag/action_distance",
             "diag/critic_disagreement", "diag/member_disagreement", "diag/q_spread"}
    assert names <= set(passes[-1]) and all(len(passes[-1][n]) == 3 for n in names)
    assert diag["last"] == {k: v for k, v in passes[-1].items() if k.startswith("diag/")}
    q, g = diag["last"]["diag/q_data"], diag["last"]["diag/mc_return"]
    assert all(x < 0 for x in q) and all(x < 0 for x in g)  # Pendulum: every return is negative
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert "diag/q_data/m0" in acc.Tags()["scalars"]


def test_diagnostics_off_adds_nothing(tmp_path):
    cfg = {**FAST, "log_every": 50, "eval_every": 50, "diagnostics": "off", "algo": {"hidden": [32, 32]}}
    r = rayoffline.train("td3_bc", "builtin:pendulum-medium", tmp_path / "off", steps=100, config=cfg)
    assert "diagnostics" not in r
    assert not any(k.startswith("diag/") for x in _rows_of(tmp_path / "off") for k in x)
    on = rayoffline.train("bc", "builtin:pendulum-medium", tmp_path / "bc", steps=100,
                          config={**FAST, "log_every": 50, "eval_every": 50, "algo": {"hidden": [32, 32]}})
    assert set(on["diagnostics"]["last"]) == {"diag/action_distance"}  # no critic: the policy's distance only
