"""Off-policy evaluation with logged behavior probabilities (rayoffline/evaluation/offpolicy.py with the dataset's
`action_logp` column): datasets whose actions were drawn from a known behavior policy, with its true log-probabilities
logged, and target policies whose true values are known exactly. Plain IS (and PDIS, WIS, PDWIS) then run without a
fitted behavior model and find the truth; without the column they refuse or fit, as before."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from rayoffline.cli import main
from rayoffline.data import convert, read_metadata
from rayoffline.errors import ConfigError, DataWarning
from rayoffline.evaluation.offpolicy import OPESettings, estimate_policy
from rayoffline.evaluation.policies import TargetPolicy

from ..data._convert_helpers import write_parquet

GAMMA = 0.9
SEEDS = range(5)
Z = 1.959964  # the 95% interval's half-width in standard errors


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class Tabular:
    """S states seen as one-hot observations, A actions; each step ends the episode (a termination) with
    probability `stop` after its reward, and at the latest after H steps (a truncation). Rewards R[s, a] + noise."""

    def __init__(self, S=3, A=3, H=4, stop=0.2, noise=0.3, seed=0):
        g = np.random.default_rng(seed)
        self.S, self.A, self.H, self.stop, self.noise = S, A, H, stop, noise
        self.P = g.dirichlet(np.ones(S), size=(S, A))
        self.R = g.normal(size=(S, A))
        self.d0 = g.dirichlet(np.ones(S))
        self.behavior = _softmax(g.normal(size=(S, A)))
        self.target = _softmax(1.5 * self.R)                        # seeks reward: far from the behavior's value

    def value(self, pi):
        """V(pi) from d0 over the horizon, by backward induction."""
        v = np.zeros(self.S)
        for t in range(self.H - 1, -1, -1):
            cont = 0.0 if t == self.H - 1 else 1.0 - self.stop
            v = (pi * (self.R + GAMMA * cont * self.P @ v)).sum(-1)
        return float(self.d0 @ v)

    def rows(self, n, seed):
        g = np.random.default_rng(seed)
        out = {k: [] for k in ("obs", "act", "rew", "next", "term", "trunc", "ep", "logp")}
        eye = np.eye(self.S, dtype=np.float32)
        for i in range(n):
            s = g.choice(self.S, p=self.d0)
            for t in range(self.H):
                a = g.choice(self.A, p=self.behavior[s])
                s2 = g.choice(self.S, p=self.P[s, a])
                end = g.random() < self.stop
                out["obs"].append(eye[s]), out["act"].append(a), out["next"].append(eye[s2])
                out["rew"].append(self.R[s, a] + self.noise * g.normal())
                out["term"].append(end), out["trunc"].append(not end and t == self.H - 1)
                out["ep"].append(i), out["logp"].append(math.log(self.behavior[s, a]))
                if end:
                    break
                s = s2
        return {"observations": np.stack(out["obs"]), "actions": np.asarray(out["act"], np.int64),
                "rewards": np.asarray(out["rew"], np.float32), "next_observations": np.stack(out["next"]),
                "terminations": np.asarray(out["term"]), "truncations": np.asarray(out["trunc"]),
                "episode_id": np.asarray(out["ep"], np.int64), "action_logp": np.asarray(out["logp"])}


class TablePolicy(TargetPolicy):
    """pi(a | s) from a table over one-hot observations: K = 1."""

    def __init__(self, table):
        self.table = torch.as_tensor(np.log(table), dtype=torch.float32)
        self.K, self.discrete, self.action_dim, self.device = 1, True, table.shape[1], torch.device("cpu")

    def probs(self, obs):
        return self.table[self.members_obs(obs).argmax(-1)].exp()                     # (K, B, A)

    def log_prob(self, obs, actions):
        lp = self.table[self.members_obs(obs).argmax(-1)]                               # (K, B, A)
        return lp.gather(-1, self.members_actions(actions).unsqueeze(-1)).squeeze(-1)   # (K, B)

    def act(self, obs):
        return self.probs(obs).argmax(-1)


class Linear:
    """A continuous problem on Pendulum's action space Box(-2, 2): observations s ~ N(mean, I_3) each step, the
    action a = 2x with x in [-1, 1] of density (1 + c(s) x) / 2, reward x + noise, H steps then a truncation.
    Behavior: c = 0.8 tanh(s_1); target: c = tanh(s_0), so E[r_t] = E[c(s)] / 3 under either."""

    H, MEAN = 3, np.array([0.5, -0.5, 0.0])

    @staticmethod
    def mean_tanh(mu, scale=1.0):
        x, w = np.polynomial.hermite_e.hermegauss(80)
        return float((w * scale * np.tanh(mu + x)).sum() / w.sum())

    def value(self, behavior=False):
        per_step = self.mean_tanh(self.MEAN[1], 0.8) if behavior else self.mean_tanh(self.MEAN[0])
        return per_step / 3 * sum(GAMMA ** t for t in range(self.H))

    def rows(self, n, seed):
        g = np.random.default_rng(seed)
        s = (g.standard_normal((n, self.H + 1, 3)) + self.MEAN).astype(np.float32)
        c = 0.8 * np.tanh(s[:, :-1, 1])                                              # (n, H)
        x = np.empty_like(c)
        todo = np.ones_like(c, bool)
        while todo.any():                                                            # rejection sampling
            u, v = g.uniform(-1, 1, todo.sum()), g.uniform(0, 1, todo.sum())
            ok = v < (1 + c[todo] * u) / 2
            idx = np.flatnonzero(todo.reshape(-1))[ok]
            x.reshape(-1)[idx] = u[ok]
            todo.reshape(-1)[idx] = False
        logp = np.log((1 + c * x) / 2) - math.log(2.0)                               # density of a = 2x
        trunc = np.zeros((n, self.H), bool)
        trunc[:, -1] = True
        return {"observations": s[:, :-1].reshape(-1, 3), "actions": (2 * x).reshape(-1, 1).astype(np.float32),
                "rewards": (x + 0.1 * g.standard_normal(x.shape)).reshape(-1).astype(np.float32),
                "next_observations": s[:, 1:].reshape(-1, 3), "terminations": np.zeros(n * self.H, bool),
                "truncations": trunc.reshape(-1), "episode_id": np.repeat(np.arange(n), self.H),
                "action_logp": logp.reshape(-1)}


class LinearTarget(TargetPolicy):
    """The target density (1 + tanh(s_0) x) / 2 of the normalized action x in [-1, 1] (K = 1)."""

    K, discrete, action_dim, device = 1, False, 1, torch.device("cpu")

    def log_prob(self, obs, actions):
        c = torch.tanh(self.members_obs(obs)[..., 0])
        return torch.log((1 + c * self.members_actions(actions)[..., 0]) / 2)

    def sample(self, obs, n):
        """n draws by the inverse of the CDF (x + 1) / 2 + c (x^2 - 1) / 4: (n, K, B, 1)."""
        c = torch.tanh(self.members_obs(obs)[..., 0]).expand(n, self.K, -1)
        u = torch.rand(c.shape, generator=torch.Generator().manual_seed(0))
        safe = torch.where(c.abs() < 1e-6, torch.ones_like(c), c)
        x = torch.where(c.abs() < 1e-6, 2 * u - 1, (torch.sqrt(1 - c * (2 - c - 4 * u)) - 1) / safe)
        return x.clamp(-1, 1).unsqueeze(-1)


def _dataset(tmp_path, name, rows, logged=True, **kw):
    if not logged:
        rows = {k: v for k, v in rows.items() if k != "action_logp"}
    src = write_parquet(tmp_path / f"{name}.parquet", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        meta = convert(str(src), tmp_path / name, holdout=0.5, **kw)
    return str(tmp_path / name), meta


def _estimates(policy, data_dir, meta, names, norm=lambda a: a, **kw):
    cfg = OPESettings(estimators=tuple(names), bootstrap=100, **kw)
    return estimate_policy(policy, norm, data_dir, meta, GAMMA, cfg, torch.device("cpu"))


def _check_unbiased(values, halfwidths, truth, other):
    """The mean over seeds within 3 standard errors of the truth, and the other policy's value far outside."""
    se = math.sqrt(np.mean(np.square(halfwidths)) / len(values))
    assert abs(np.mean(values) - truth) < 3 * se, (np.mean(values), truth, se)
    assert abs(other - truth) > 6 * se, (other, truth, se)                         # the test can tell them apart


def test_plain_is_with_logged_probabilities_finds_the_true_value_discrete(tmp_path):
    mdp = Tabular()
    truth, behavior_value = mdp.value(mdp.target), mdp.value(mdp.behavior)
    policy = TablePolicy(mdp.target)
    got = {n: [] for n in ("is", "pdis", "wis", "pdwis")}
    half = []
    for seed in SEEDS:
        data_dir, meta = _dataset(tmp_path, f"tab{seed}", mdp.rows(600, seed))
        out = _estimates(policy, data_dir, meta, got)
        assert out["models"] == {"behavior": {"source": "logged"}}                 # nothing fitted
        for n in got:
            got[n].append(out["estimates"][n][0]["value"])
        e = out["estimates"]["is"][0]
        half.append((e["high"] - e["low"]) / (2 * Z))
    _check_unbiased(got["is"], half, truth, behavior_value)
    _check_unbiased(got["pdis"], half, truth, behavior_value)                      # PDIS: no wider than IS here
    for n in ("wis", "pdwis"):                                                     # consistent: O(1/N) bias
        assert abs(np.mean(got[n]) - truth) < 4 * math.sqrt(np.mean(np.square(half)) / len(SEEDS)), n


def test_plain_is_with_logged_densities_finds_the_true_value_continuous(tmp_path):
    """Logged densities are of the raw actions in [-2, 2]; the target's are of the normalized x = a / 2: the
    estimate is right only with the Jacobian log 2 added to the logged values (a miss doubles each step's ratio)."""
    prob = Linear()
    truth, behavior_value = prob.value(), prob.value(behavior=True)
    vals, pd_vals, half = [], [], []
    for seed in SEEDS:
        data_dir, meta = _dataset(tmp_path, f"lin{seed}", prob.rows(400, seed), env_id="Pendulum-v1")
        assert meta["action_space"]["low"] == [-2.0] and meta["action_space"]["high"] == [2.0]
        out = _estimates(LinearTarget(), data_dir, meta, ("is", "pdis"), norm=lambda a: a / 2.0)
        assert out["models"]["behavior"]["source"] == "logged"
        vals.append(out["estimates"]["is"][0]["value"])
        pd_vals.append(out["estimates"]["pdis"][0]["value"])
        e = out["estimates"]["is"][0]
        half.append((e["high"] - e["low"]) / (2 * Z))
    _check_unbiased(vals, half, truth, behavior_value)
    _check_unbiased(pd_vals, half, truth, behavior_value)


def test_without_logged_probabilities_is_refuses_and_wis_fits(tmp_path):
    mdp = Tabular()
    data_dir, meta = _dataset(tmp_path, "plain", mdp.rows(200, 0), logged=False)
    assert "action_logp" not in meta
    with pytest.raises(ConfigError, match=r"estimator 'pdis' \(plain importance sampling\) needs the behavior "
                                          r"policy's logged action probabilities.*wis, pdwis and dr apply with a "
                                          r"behavior model fitted.*--map action_logp=COLUMN.*--map action_prob=COLUMN"):
        _estimates(TablePolicy(mdp.target), data_dir, meta, ("wis", "pdis"))
    out = _estimates(TablePolicy(mdp.target), data_dir, meta, ("wis",), behavior_steps=50, batch_size=64)
    assert out["models"]["behavior"]["source"] == "fitted" and out["models"]["behavior"]["steps"] == 50


def test_rayoffline_ope_runs_is_and_pdis_on_logged_data(tmp_path, capsys):
    mdp = Tabular()
    data_dir, _ = _dataset(tmp_path, "ds", mdp.rows(200, 0))
    run = tmp_path / "run"
    assert main(["train", "--algo", "bc", "--data", data_dir, "--steps", "30", "--out", str(run),
                 "--set", "eval_episodes=0", "--set", "progress=off", "--set", "algo.hidden=[16, 16]"]) == 0
    assert main(["ope", str(run), "--estimators", "is,pdis,wis"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((run / "ope.json").read_text())
    assert list(saved["estimates"]) == ["is", "pdis", "wis"] and "pdis" in printed
    assert saved["models"]["behavior"] == {"source": "logged"}
    assert saved["content_hash"] == read_metadata(data_dir)["content_hash"]
    for rows in saved["estimates"].values():
        assert math.isfinite(rows[0]["value"]) and rows[0]["low"] <= rows[0]["value"] <= rows[0]["high"]


def test_a_run_may_ask_for_is_at_its_eval_points_only_on_logged_data(tmp_path, capsys):
    mdp = Tabular()
    logged, _ = _dataset(tmp_path, "logged", mdp.rows(200, 0))
    plain, _ = _dataset(tmp_path, "plain", mdp.rows(200, 0), logged=False)
    args = ["--steps", "30", "--set", "eval_episodes=0", "--set", "progress=off", "--set", "algo.hidden=[16, 16]",
            "--set", "ope=[is, pdis]", "--set", "ope_steps=10", "--set", "diagnostics=off"]
    assert main(["train", "--algo", "bc", "--data", logged, "--out", str(tmp_path / "a"), *args]) == 0
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "ope/is" in r][-1]
    assert math.isfinite(last["ope/is"]) and math.isfinite(last["ope/pdis"])  # K=1: a number
    capsys.readouterr()
    assert main(["train", "--algo", "bc", "--data", plain, "--out", str(tmp_path / "b"), *args]) == 2
    err = capsys.readouterr().err
    assert "run key 'ope': 'is'" in err and "logged action probabilities" in err
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
