"""Every file in tune_configs/ is valid: `sweep_*.yaml` as a sweep (`load_sweep`: pure validation, no Ray, the
dataset never opened, so the MuJoCo sweeps pass without their converted data), every other YAML as a train
config (`build_config`). Plus the conventions of the shipped sweeps: a quick sweep per algorithm on a builtin
dataset, sweeping per-member coefficients over 2 seeds; cluster sweeps that say how to convert their data."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rayoffline import algorithms
from rayoffline.config import load_yaml
from rayoffline.errors import ConfigError
from rayoffline.learner.config import build_config
from rayoffline.sweep.space import load_sweep, member_keys

CONFIGS = Path(__file__).resolve().parents[2] / "tune_configs"
SWEEPS = sorted(CONFIGS.glob("sweep_*.yaml"))
TRAIN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("sweep_"))
QUICK = [p for p in SWEEPS if p.stem.endswith("_quick")]
CLUSTER = [p for p in SWEEPS if not p.stem.endswith("_quick")]
RUN_RECORD_KEYS = ("data", "data_hash", "data_changes")  # what a run's config.yaml / best.yaml carry besides


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


@pytest.fixture
def no_data_access(monkeypatch, tmp_path):
    """Any attempt to open a dataset fails the test; relative data paths (data/hopper) resolve under an empty
    directory."""
    import rayoffline.data as data_mod
    import rayoffline.learner.worker as worker

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"load_sweep opened a dataset: {args}")

    for name in ("resolve", "read_metadata", "load_metadata", "load"):
        monkeypatch.setattr(data_mod, name, refuse)
    monkeypatch.setattr(worker, "open_dataset", refuse)
    monkeypatch.chdir(tmp_path)


def check_train_config(path: Path) -> str:
    """Validates a train config file with build_config; returns the algorithm it is valid for. A file that names
    its algorithm (algo_name:, as best.yaml does) is checked against it; one that does not (used with --algo)
    must be valid for at least one algorithm."""
    raw = load_yaml(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path.name}: expected a non-empty mapping of config keys")
    named = raw.pop("algo_name", None)
    for key in RUN_RECORD_KEYS:
        raw.pop(key, None)
    if named is not None:
        build_config(named, raw)
        return named
    errors = []
    for name in algorithms.names():
        try:
            build_config(name, raw)
            return name
        except ConfigError as e:
            errors.append(f"{name}: {e}")
    raise ConfigError(f"{path.name} is no valid train config for any algorithm:\n" + "\n".join(errors))


def test_the_directory_holds_both_kinds():
    assert len(QUICK) >= len(algorithms.names()), ids(QUICK)
    assert CLUSTER, "no cluster-scale sweeps"
    assert TRAIN_CONFIGS, "no train configs"


@pytest.mark.parametrize("path", SWEEPS, ids=ids(SWEEPS))
def test_sweep_loads(path, no_data_access):
    spec = load_sweep(path)
    assert spec.metric == "eval/return_mean" and spec.mode == "max"
    assert spec.space, f"{path.name} sweeps nothing"
    n = spec.num_samples
    for dist in spec.space.values():
        n *= len(dist.get("grid", dist.get("choice", [None])))
    assert n >= 2, f"{path.name}: one configuration only"


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=ids(TRAIN_CONFIGS))
def test_train_config_builds(path):
    check_train_config(path)


def test_a_quick_sweep_per_algorithm():
    assert sorted(p.stem[len("sweep_"):-len("_quick")] for p in QUICK) == sorted(algorithms.names())


@pytest.mark.parametrize("path", QUICK, ids=ids(QUICK))
def test_quick_sweep_conventions(path, no_data_access):
    spec = load_sweep(path)
    cls = algorithms.get(spec.algo)
    expected = "builtin:pendulum-medium" if "continuous" in cls.action_types else "builtin:cartpole-medium"
    assert spec.data == expected
    assert len(spec.seeds) == 2
    assert spec.scheduler["type"] in ("fifo", "asha")
    assert spec.fuse and spec.resources["gpus"] == 0
    hidden = spec.config.get("algo", {}).get("hidden")
    assert hidden is not None and max(hidden) <= 128, f"{path.name}: small networks expected, got {hidden}"
    tunable = member_keys(spec.algo) - {"algo.discount"}  # discount is every algorithm's, not a conservatism knob
    if tunable:  # (BC has no coefficient of that kind)
        assert set(spec.space) <= member_keys(spec.algo), f"{path.name}: {set(spec.space)} are not all per member"
        assert set(spec.space) & tunable


@pytest.mark.parametrize("path", CLUSTER, ids=ids(CLUSTER))
def test_cluster_sweep_conventions(path, no_data_access):
    spec = load_sweep(path)
    assert not spec.data.startswith("builtin:")
    text = path.read_text(encoding="utf-8")
    header = text.split("\nalgo:", 1)[0]
    assert "rayoffline data convert minari:" in header and f"--out {spec.data}" in header, (
        f"{path.name}: the header comment must say how to convert {spec.data}")
    assert spec.resources["gpus"] >= 1
    assert len(spec.seeds) >= 3
    assert spec.config["steps"] >= 500_000


# ----- the checks above can fail ---------------------------------------------------------------------------
BROKEN_SWEEPS = {
    "unknown top key": "algo: iql\ndata: data/x\nspaces: {}\n",
    "not a field": "algo: iql\ndata: data/x\nspace:\n  algo.expectyle: {grid: [0.7, 0.9]}\n",
    "refused value": "algo: iql\ndata: data/x\nspace:\n  algo.expectile: {grid: [0.7, 1.5]}\n",
    "no data": "algo: iql\nspace:\n  algo.expectile: {grid: [0.7, 0.9]}\n",
}
BROKEN_TRAIN = {
    "unknown run key": "stepz: 100\n",
    "no algorithm has the field": "algo: {cql_alpha: 1.0, expectile: 0.7}\n",
    "refused value": "algo_name: iql\nalgo: {expectile: 1.5}\n",
    "bad members": "algo_name: cql\nmembers: {cql_alpha: 1.0}\n",
}


@pytest.mark.parametrize("text", BROKEN_SWEEPS.values(), ids=BROKEN_SWEEPS.keys())
def test_a_broken_sweep_fails(text, tmp_path, no_data_access):
    path = tmp_path / "sweep_broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_sweep(path)


@pytest.mark.parametrize("text", BROKEN_TRAIN.values(), ids=BROKEN_TRAIN.keys())
def test_a_broken_train_config_fails(text, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        check_train_config(path)


def test_a_sweep_that_opens_its_data_is_caught(tmp_path, no_data_access):
    """The fixture itself works: opening the data inside the guarded block fails."""
    from rayoffline.learner import worker
    with pytest.raises(AssertionError, match="opened a dataset"):
        worker.open_dataset("data/hopper")
