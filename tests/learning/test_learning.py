"""Learning tests: each algorithm must clearly beat the behavior policy that logged its data.

"Clearly" = the mean evaluation return exceeds the dataset's mean episode return (the behavior policy's
return) by a margin of 15% of the reference range (random -> expert), i.e. 15 normalized-score points.
Step counts and network widths are small so the suite stays inside the CI budget; the `slow` ones are
longer and still run in CI.
"""
from __future__ import annotations

import pytest

import rayoffline

MARGIN = 15.0  # normalized-score points above the behavior policy

# CQL: CORL's policy_lr 3e-5 barely moves the policy in a few thousand steps (normalized ~21 after 2500);
# the test uses 3e-4 for policy and temperature, a lighter penalty and 5 sampled actions per source.
CQL_FAST = {"policy_lr": 3e-4, "alpha_lr": 3e-4, "cql_alpha": 5.0, "cql_n_actions": 5}

CASES = [
    # algo, dataset, steps, algo overrides
    pytest.param("iql", "builtin:pendulum-medium", 2500, {}, id="iql-pendulum"),
    pytest.param("td3_bc", "builtin:pendulum-medium", 8000, {}, id="td3_bc-pendulum", marks=pytest.mark.slow),
    pytest.param("cql", "builtin:pendulum-medium", 2500, CQL_FAST, id="cql-pendulum", marks=pytest.mark.slow),
    pytest.param("discrete_cql", "builtin:cartpole-medium", 3000, {}, id="discrete_cql-cartpole"),
    pytest.param("discrete_bcq", "builtin:cartpole-medium", 3000, {}, id="discrete_bcq-cartpole"),
]


@pytest.mark.parametrize("algo, data, steps, overrides", CASES)
def test_beats_the_behavior_policy(algo, data, steps, overrides, ray_cluster, tmp_path):
    config = {"batch_size": 256, "eval_episodes": 20, "log_every": 500, "checkpoint_every": 0, "threads": 1,
              "algo": {"hidden": [128, 128], **overrides}}
    result = rayoffline.train(algo, data, tmp_path / "run", steps=steps, config=config, seed=0)
    behavior = result["behavior_return_mean"]
    from rayoffline.data import load_metadata, resolve
    meta = load_metadata(resolve(data))
    lo, hi = meta["ref_min_score"], meta["ref_max_score"]
    margin = MARGIN / 100.0 * (hi - lo)
    assert result["eval_return_mean"] > behavior + margin, (
        f"{algo}: eval return {result['eval_return_mean']:.1f} not clearly above behavior {behavior:.1f} "
        f"(+{margin:.1f})")
