"""The sweep file: validation (every refusal names its key), --set overrides, Tune objects, pack keys and the
checks against the dataset and the cluster. No Ray cluster."""
from __future__ import annotations

import copy

import pytest

from rayoffline.errors import ConfigError
from rayoffline.sweep import space as S

SWEEP_YAML = """\
algo: cql
data: builtin:pendulum-medium
config:
  steps: 20000
  log_every: 1000
  eval_every: 5000
  algo: {hidden: [32, 32]}
space:
  algo.cql_alpha: {grid: [0.5, 1, 2, 5, 10]}
  batch_size: {choice: [256, 1024]}
  algo.critic_lr: {loguniform: [1.0e-4, 1.0e-3]}
  algo.tau: {uniform: [0.001, 0.01]}
  algo.cql_n_actions: {randint: [4, 16]}
  algo.cql_temp: {quniform: [0.5, 2, 0.25]}
  algo.policy_lr: {qloguniform: [1.0e-5, 1.0e-3, 1.0e-5]}
  algo.bc_steps: {qrandint: [0, 1000, 100]}
seeds: 3
metric: eval/return_mean
mode: max
scheduler: {type: asha, grace_period: 2000, reduction_factor: 2}
search: {type: random}
resources: {cpus: 1, gpus: 0}
max_concurrency: 8
"""

BASE = {"algo": "cql", "data": "builtin:pendulum-medium", "config": {"steps": 20000, "algo": {"hidden": [32]}},
        "space": {"algo.cql_alpha": {"grid": [1, 5]}}}


def sweep(**changes):
    d = copy.deepcopy(BASE)
    for key, value in changes.items():
        section, _, rest = key.partition("__")
        if rest:
            d.setdefault(section, {})[rest.replace("__", ".")] = value
        elif value is None:
            d.pop(section, None)
        else:
            d[section] = value
    return d


@pytest.fixture(scope="module")
def pendulum_meta():
    from rayoffline.learner.worker import open_dataset
    return open_dataset("builtin:pendulum-medium")[1]


def test_valid_sweep_loads_and_gives_tune_domains(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    path = tmp_path / "cql-sweep.yaml"
    path.write_text(SWEEP_YAML)
    s = S.load_sweep(path)
    assert (s.algo, s.data, s.name, s.seeds, s.fuse, s.pack_size) == ("cql", "builtin:pendulum-medium",
                                                                       "cql-sweep", [0, 1, 2], True, "auto")
    assert s.scheduler == {"type": "asha", "grace_period": 2000, "reduction_factor": 2.0, "max_t": 20000,
                           "brackets": 1}
    assert s.resources == {"cpus": 1.0, "gpus": 0.0, "workers": 0}
    ps = S.param_space(s)
    assert ps["algo.cql_alpha"] == {"grid_search": [0.5, 1, 2, 5, 10]}
    assert isinstance(ps["batch_size"], Categorical) and ps["batch_size"].categories == [256, 1024]
    bounds = {"algo.critic_lr": (1e-4, 1e-3), "algo.tau": (0.001, 0.01), "algo.cql_temp": (0.5, 2),
              "algo.policy_lr": (1e-5, 1e-3)}
    for key, (lo, hi) in bounds.items():
        assert isinstance(ps[key], Float)
        values = ps[key].sample(size=50)
        assert all(lo <= v <= hi for v in values), key
    assert "LogUniform" in type(ps["algo.critic_lr"].get_sampler()).__name__
    temps = ps["algo.cql_temp"].sample(size=50)
    assert all(abs(t / 0.25 - round(t / 0.25)) < 1e-9 for t in temps)
    assert isinstance(ps["algo.cql_n_actions"], Integer)
    assert set(ps["algo.cql_n_actions"].sample(size=200)) <= set(range(4, 16))
    bc = ps["algo.bc_steps"].sample(size=200)
    assert all(v % 100 == 0 and 0 <= v <= 1000 for v in bc) and max(bc) == 1000  # qrandint includes hi


def test_defaults_and_shorthands():
    s = S.load_sweep({"algo": "iql", "data": "d", "scheduler": "fifo", "search": "random"})
    assert (s.name, s.seeds, s.num_samples, s.metric, s.mode, s.max_failures) == ("sweep", [0], 1,
                                                                                 "eval/return_mean", "max", 1)
    assert s.space == {} and s.config == {} and s.scheduler == {"type": "fifo"}
    assert S.load_sweep({**BASE, "seeds": [4, 2]}).seeds == [4, 2]


BAD = [
    ({"sead": 3}, "sead", "seeds"),
    ({"algo": None}, "'algo'", "missing"),
    ({"data": None}, "'data'", "missing"),
    ({"algo": "nope"}, "sweep key 'algo'", "unknown algorithm 'nope'"),
    ({"config": {"steps": 0}}, "config.steps", ">= 1"),
    ({"config": {"stepz": 5}}, "config.stepz", "run keys"),
    ({"config": {"algo": {"cql_alpha": -1}}}, "config.algo.cql_alpha", ">= 0"),
    ({"config": {"members": [{"cql_alpha": 1}]}}, "config.members", "seeds:"),
    ({"config": {"seed": 3}}, "config.seed", "seeds:"),
    ({"config": {"num_workers": 2}}, "config.num_workers", "resources.workers"),
    ({"space__algo.nope": {"grid": [1]}}, "space.algo.nope", "not a config key"),
    ({"space__stepz": {"grid": [1]}}, "space.stepz", "not a config key"),
    ({"space__seed": {"grid": [1, 2]}}, "space.seed", "seeds:"),
    ({"config": {"algo": {"cql_alpha": 2}}}, "space.algo.cql_alpha", "config.algo.cql_alpha"),
    ({"config": {"batch_size": 64}, "space__batch_size": {"grid": [32]}}, "space.batch_size", "config.batch_size"),
    ({"space__algo.tau": {"grid": [0.1], "choice": [0.2]}}, "space.algo.tau", "one distribution"),
    ({"space__algo.tau": {"normal": [0, 1]}}, "space.algo.tau", "unknown distribution"),
    ({"space__algo.tau": {"grid": []}}, "space.algo.tau", "non-empty"),
    ({"space__algo.tau": {"uniform": [0.1, 0.01]}}, "space.algo.tau", "lo < hi"),
    ({"space__algo.tau": {"uniform": [0.1]}}, "space.algo.tau", "[lo, hi]"),
    ({"space__algo.tau": {"uniform": ["a", 0.2]}}, "space.algo.tau", "numbers"),
    ({"space__algo.critic_lr": {"loguniform": [0, 0.1]}}, "space.algo.critic_lr", "0 < lo"),
    ({"space__algo.tau": {"quniform": [0.001, 0.01, 0]}}, "space.algo.tau", "q > 0"),
    ({"space__algo.tau": {"quniform": [0.001, 0.002, 0.005]}}, "space.algo.tau", "no multiple"),
    ({"space__algo.cql_n_actions": {"randint": [1.5, 4]}}, "space.algo.cql_n_actions", "integers"),
    ({"space__algo.cql_alpha": {"uniform": [-1, 2]}}, "space.algo.cql_alpha", "must be >= 0"),
    ({"space__algo.tau": {"grid": [0.01, 2]}}, "space.algo.tau", "(0, 1]"),
    ({"space__algo.discount": {"uniform": [0.9, 1.0]}}, "space.algo.discount", "upper bound"),
    ({"space__algo.cql_n_actions": {"uniform": [4, 16]}}, "space.algo.cql_n_actions", "randint"),
    ({"space__algo.cql_n_actions": {"randint": [0, 4]}}, "space.algo.cql_n_actions", "positive"),
    ({"seeds": 0}, "seeds", "positive"),
    ({"seeds": [1, 1]}, "seeds", "distinct"),
    ({"seeds": [-1]}, "seeds", ">= 0"),
    ({"seeds": True}, "seeds", "count"),
    ({"num_samples": 0}, "num_samples", ">= 1"),
    ({"mode": "maximize"}, "mode", "'max' or 'min'"),
    ({"metric": ""}, "metric", "non-empty"),
    ({"max_concurrency": -1}, "max_concurrency", ">= 0"),
    ({"max_failures": -2}, "max_failures", "-1"),
    ({"pack_size": 0}, "pack_size", "'auto'"),
    ({"pack_size": "big"}, "pack_size", "'auto'"),
    ({"fuse": "yes"}, "fuse", "true or false"),
    ({"name": "a/b"}, "name", "separators"),
    ({"resources": {"cpus": 0}}, "resources.cpus", "> 0"),
    ({"resources": {"gpus": -1}}, "resources.gpus", ">= 0"),
    ({"resources": {"gpus": 1.5}}, "resources.gpus", "whole"),
    ({"resources": {"workers": -1}}, "resources.workers", ">= 0"),
    ({"resources": {"memory": 4}}, "resources.memory", "cpus, gpus, workers"),
    ({"resources": {"workers": 2}}, "resources.workers", "fuse: false"),
    ({"scheduler": {"type": "hyperband"}}, "scheduler.type", "asha"),
    ({"scheduler": {"type": "fifo", "grace_period": 1000}}, "scheduler.grace_period", "unknown option"),
    ({"scheduler": {"type": "asha", "perturbation_interval": 1000}}, "scheduler.perturbation_interval",
     "unknown option"),
    ({"scheduler": {"type": "asha", "grace_period": 0}, "metric": "loss/critic"}, "scheduler.grace_period", ">= 1"),
    ({"scheduler": {"type": "asha", "grace_period": 1500}, "metric": "loss/critic"}, "scheduler.grace_period",
     "multiple of log_every 1000"),
    ({"scheduler": {"type": "asha", "max_t": 2500}, "metric": "loss/critic"}, "scheduler.max_t", "multiple"),
    ({"scheduler": {"type": "asha", "reduction_factor": 1}, "metric": "loss/critic"}, "scheduler.reduction_factor",
     "> 1"),
    ({"scheduler": {"type": "asha", "brackets": 0}, "metric": "loss/critic"}, "scheduler.brackets", ">= 1"),
    ({"scheduler": {"type": "asha"}}, "config.eval_every", "eval_every is 0"),
    ({"scheduler": {"type": "asha"}, "metric": "loss/critic", "space__log_every": {"grid": [500, 1000]}},
     "space.log_every", "config:"),
    ({"scheduler": {"type": "pbt", "hyperparam_mutations": {"algo.cql_alpha": [1, 2]}}, "metric": "loss/critic"},
     "scheduler.perturbation_interval", "required"),
    ({"scheduler": {"type": "pbt", "perturbation_interval": 2000, "quantile_fraction": 0.7,
                    "hyperparam_mutations": {"algo.cql_alpha": [1, 2]}}, "metric": "loss/critic"},
     "scheduler.quantile_fraction", "(0, 0.5]"),
    ({"scheduler": {"type": "pbt", "perturbation_interval": 2000}, "metric": "loss/critic"},
     "scheduler.hyperparam_mutations", "required"),
    ({"scheduler": {"type": "pbt", "perturbation_interval": 2000,
                    "hyperparam_mutations": {"algo.cql_temp": [1, 2]}}, "metric": "loss/critic"},
     "scheduler.hyperparam_mutations.algo.cql_temp", "not a space key"),
    ({"scheduler": {"type": "pbt", "perturbation_interval": 2000,
                    "hyperparam_mutations": {"algo.critic_lr": [1e-4, 3e-4]}},
      "space__algo.critic_lr": {"choice": [1e-4, 3e-4]}, "metric": "loss/critic"},
     "scheduler.hyperparam_mutations.algo.critic_lr", "fuse: false"),
    ({"scheduler": {"type": "pbt", "perturbation_interval": 2000,
                    "hyperparam_mutations": {"algo.cql_alpha": {"grid": [1, 2]}}}, "metric": "loss/critic"},
     "scheduler.hyperparam_mutations.algo.cql_alpha", "choice"),
    ({"scheduler": {"type": "pbt", "perturbation_interval": 2000,
                    "hyperparam_mutations": {"algo.cql_alpha": [1, -2]}}, "metric": "loss/critic"},
     "scheduler.hyperparam_mutations.algo.cql_alpha", "must be >= 0"),
    ({"scheduler": {"type": "pbt", "perturbation_interval": 2000,
                    "hyperparam_mutations": {"algo.cql_alpha": [1, 2]}}, "metric": "loss/critic",
      "space__algo.cql_alpha": {"choice": [1, 2]}, "search": {"type": "optuna"}}, "search.type", "pbt"),
    ({"search": {"type": "bayes"}}, "search.type", "optuna"),
    ({"search": {"type": "random", "seed": 1}}, "search.seed", "unknown option"),
    ({"search": {"type": "grid"}, "space__batch_size": {"choice": [32, 64]}}, "space.batch_size", "grid"),
    ({"search": {"type": "optuna"}}, "space.algo.cql_alpha", "use choice"),
    ({"search": {"type": "optuna", "sampler": "cmaes"}, "space": {"algo.cql_alpha": {"choice": [1, 5]}}},
     "search.sampler", "'tpe'"),
    ({"search": {"type": "optuna"}, "space": {}}, "space", "at least one"),
]


@pytest.mark.parametrize("changes, key, text", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_sweeps_name_the_key(changes, key, text):
    with pytest.raises(ConfigError) as info:
        S.load_sweep(sweep(**changes))
    msg = str(info.value)
    assert key in msg and text in msg, msg


def test_bad_sweep_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        S.load_sweep(path)
    with pytest.raises(ConfigError, match="cannot read"):
        S.load_sweep(tmp_path / "missing.yaml")


def test_set_overrides(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SWEEP_YAML)
    s = S.load_sweep(path, ["config.steps=5000", "max_concurrency=2", "space.algo.cql_alpha={grid: [1, 2]}",
                            "config.algo.hidden=[64,64]", "config.progress=off", "name=off", "fuse=false",
                            "scheduler.grace_period=1000", "search={type: grid}", "space.algo.tau={grid: [0.01]}",
                            "space.batch_size={grid: [64]}", "space.algo.critic_lr={grid: [1e-3]}",
                            "space.algo.cql_n_actions={grid: [4]}", "space.algo.cql_temp={grid: [1]}",
                            "space.algo.policy_lr={grid: [1e-4]}", "space.algo.bc_steps={grid: [0]}"])
    assert s.config["steps"] == 5000 and s.config["algo"] == {"hidden": [64, 64]} and s.config["progress"] == "off"
    assert s.space["algo.cql_alpha"] == {"grid": [1, 2]}  # the whole entry replaced, not merged
    assert (s.max_concurrency, s.name, s.fuse, s.search["type"]) == (2, "off", False, "grid")
    assert s.scheduler["grace_period"] == 1000 and s.scheduler["max_t"] == 5000
    pbt = sweep(scheduler={"type": "pbt", "perturbation_interval": 2000,
                           "hyperparam_mutations": {"algo.cql_alpha": [1, 5]}}, metric="loss/critic")
    s = S.load_sweep(pbt, ["scheduler.hyperparam_mutations.algo.cql_alpha={uniform: [1, 8]}"])
    assert s.scheduler["hyperparam_mutations"] == {"algo.cql_alpha": {"uniform": [1, 8]}}


@pytest.mark.parametrize("item, key", [
    ("config.steps=0", "config.steps"),
    ("config.algo.hidden=wide", "config.algo.hidden"),
    ("space.algo.cql_alpha.grid=[1, 2]", "space.algo.cql_alpha={grid"),
    ("space.algo.cql_alpha={uniform: [-1, 1]}", "space.algo.cql_alpha"),
    ("max_concurrency=many", "max_concurrency"),
    ("steps", "key=value"),
])
def test_bad_overrides_name_the_key(item, key):
    with pytest.raises(ConfigError) as info:
        S.load_sweep(sweep(), [item])
    assert key in str(info.value), str(info.value)


def test_member_keys_and_pack_key():
    assert {"algo.cql_alpha", "algo.cql_temp", "algo.discount"} <= S.member_keys("cql")
    assert "algo.critic_lr" not in S.member_keys("cql") and "algo.hidden" not in S.member_keys("cql")
    s = S.load_sweep(sweep(space={"algo.cql_alpha": {"grid": [1, 5]}, "algo.discount": {"choice": [0.9, 0.99]},
                                  "batch_size": {"choice": [32, 64]}, "algo.hidden": {"choice": [[32], [64]]}},
                           config={"steps": 1000}))
    base = {"algo.cql_alpha": 1, "algo.discount": 0.9, "batch_size": 32, "algo.hidden": [32]}
    config, key = S.pack_fields(s, base)
    assert config == {"steps": 1000, "algo": {"cql_alpha": 1, "discount": 0.9, "hidden": [32]}, "batch_size": 32}
    assert len(key) == 12 and int(key, 16) >= 0
    assert S.pack_fields(s, {**base, "algo.cql_alpha": 5, "algo.discount": 0.99})[1] == key
    assert S.pack_fields(s, {**base, "algo.cql_alpha": 5.0})[1] == key
    assert S.pack_fields(s, {**base, "batch_size": 64})[1] != key
    assert S.pack_fields(s, {**base, "algo.hidden": [64]})[1] != key
    other = S.load_sweep({**sweep(space={}), "data": "builtin:pendulum-expert"})
    assert S.pack_fields(other, base)[1] != key


def test_check_metric(pendulum_meta):
    s = S.load_sweep(sweep(metric="eval/return_mean"))
    S.check_metric(s, pendulum_meta)
    S.check_metric(S.load_sweep(sweep(metric="loss/critic")), pendulum_meta)
    S.check_metric(S.load_sweep(sweep(metric="eval/normalized_score")), pendulum_meta)
    with pytest.raises(ConfigError) as info:
        S.check_metric(S.load_sweep(sweep(metric="loss/nope")), pendulum_meta)
    msg = str(info.value)
    assert "'metric'" in msg and "loss/nope" in msg and "loss/critic" in msg and "eval/return_mean" in msg
    no_ref = {k: v for k, v in pendulum_meta.items() if k not in ("ref_min_score", "ref_max_score")}
    with pytest.raises(ConfigError, match="available"):
        S.check_metric(S.load_sweep(sweep(metric="eval/normalized_score")), no_ref)
    with pytest.raises(ConfigError, match="eval_episodes is 0"):
        S.check_metric(S.load_sweep(sweep(metric="eval/return_mean", config={"eval_episodes": 0})), pendulum_meta)
    # ope/ metrics: reported by the trials whose run config asks for them (run key ope), fused (packs) or not
    ope_cfg = {**BASE["config"], "ope": ["fqe"], "eval_episodes": 0}
    for fuse in (True, False):
        S.check_metric(S.load_sweep(sweep(metric="ope/fqe", config=ope_cfg, fuse=fuse)), pendulum_meta)
        with pytest.raises(ConfigError, match="no trial reports 'ope/wis'"):
            S.check_metric(S.load_sweep(sweep(metric="ope/wis", config=ope_cfg, fuse=fuse)), pendulum_meta)
    with pytest.raises(ConfigError, match="no trial reports 'ope/fqe'"):
        S.check_metric(S.load_sweep(sweep(metric="ope/fqe")), pendulum_meta)
    # a warm start (run key init_from) is applied by unfused trials only
    warm_cfg = {**BASE["config"], "init_from": "runs/production"}
    S.check_metric(S.load_sweep(sweep(config=warm_cfg, fuse=False)), pendulum_meta)
    with pytest.raises(ConfigError, match="config.init_from.*fuse: false"):
        S.check_metric(S.load_sweep(sweep(config=warm_cfg, fuse=True)), pendulum_meta)
    # the Lagrange multiplier's loss exists only in configurations with cql_lagrange
    lagrange = sweep(metric="loss/cql_alpha", space={"algo.cql_lagrange": {"choice": [True, False]}})
    with pytest.raises(ConfigError, match="not with algo.cql_lagrange=False"):
        S.check_metric(S.load_sweep(lagrange), pendulum_meta)
    lagrange["space"]["algo.cql_lagrange"] = {"choice": [True]}
    S.check_metric(S.load_sweep(lagrange), pendulum_meta)


def test_check_resources():
    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    cluster = {"CPU": 16.0, "GPU": 2.0}
    S.check_resources(S.load_sweep(sweep(resources={"cpus": 4, "gpus": 0.5})), cluster, nodes)
    with pytest.raises(ConfigError, match=r"resources\.gpus.*2 GPUs per pack.*no node"):
        S.check_resources(S.load_sweep(sweep(resources={"gpus": 2})), cluster, nodes)
    with pytest.raises(ConfigError, match=r"resources\.cpus.*12 CPUs per trial"):
        S.check_resources(S.load_sweep(sweep(resources={"cpus": 12}, fuse=False)), cluster, nodes)
    unfused = sweep(fuse=False, resources={"workers": 2, "gpus": 1, "cpus": 4})
    S.check_resources(S.load_sweep(unfused), cluster, nodes)
    unfused["resources"]["workers"] = 3
    with pytest.raises(ConfigError, match=r"resources\.gpus.*3 workers x 1 GPUs = 3 GPUs.*has 2"):
        S.check_resources(S.load_sweep(unfused), cluster, nodes)
    unfused["resources"] = {"workers": 3, "cpus": 6}
    with pytest.raises(ConfigError, match=r"resources\.cpus.*18 CPUs"):
        S.check_resources(S.load_sweep(unfused), cluster, nodes)
    unfused["resources"] = {"workers": 3, "cpus": 5}  # 15 of 16 CPUs, but only one 5-CPU worker fits a node
    with pytest.raises(ConfigError, match=r"resources\.workers.*room for 2"):
        S.check_resources(S.load_sweep(unfused), cluster, nodes)


def test_schedulers_and_search():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search.optuna import OptunaSearch

    assert isinstance(S.make_scheduler(S.load_sweep(sweep())), FIFOScheduler)
    asha = S.load_sweep(sweep(scheduler={"type": "asha"}, metric="loss/critic"))
    assert asha.scheduler["max_t"] == 20000 and asha.scheduler["grace_period"] == 1000
    sched = S.make_scheduler(asha)
    assert isinstance(sched, ASHAScheduler) and sched._time_attr == "step" and sched._max_t == 20000
    evaled = S.load_sweep(sweep(scheduler={"type": "asha"}, config={"eval_every": 2500, "algo": {"hidden": [32]}}))
    assert evaled.scheduler["grace_period"] == 3000  # the first result that carries an evaluation
    pbt = S.load_sweep(sweep(scheduler={"type": "pbt", "perturbation_interval": 2000,
                                        "hyperparam_mutations": {"algo.cql_alpha": {"loguniform": [0.5, 20]}}},
                             metric="loss/critic"))
    sched = S.make_scheduler(pbt)
    assert isinstance(sched, PopulationBasedTraining) and sched._time_attr == "step"
    assert list(sched._hyperparam_mutations) == ["algo.cql_alpha"]
    unfused = S.load_sweep(sweep(fuse=False, scheduler={"type": "pbt", "perturbation_interval": 2000,
                                                        "hyperparam_mutations": {"algo.critic_lr": [1e-4, 3e-4]}},
                                 space={"algo.critic_lr": {"choice": [1e-4, 3e-4]}}, metric="loss/critic"))
    assert S.make_scheduler(unfused)._hyperparam_mutations == {"algo.critic_lr": [1e-4, 3e-4]}
    assert S.make_search(S.load_sweep(sweep())) is None

    opt = S.load_sweep(sweep(search={"type": "optuna", "seed": 1},
                             space={"algo.cql_alpha": {"loguniform": [0.5, 20]}, "batch_size": {"choice": [32, 64]},
                                    "algo.cql_n_actions": {"randint": [2, 5]}}))
    search = S.make_search(opt)
    assert isinstance(search, OptunaSearch)
    assert search.set_search_properties("loss/critic", "min", S.param_space(opt))
    trial = search.suggest("t0")
    assert 0.5 <= trial["algo.cql_alpha"] <= 20 and trial["batch_size"] in (32, 64)
    assert trial["algo.cql_n_actions"] in (2, 3, 4)
    S.pack_fields(opt, trial)
