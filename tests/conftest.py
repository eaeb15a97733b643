import os

# Local test clusters are single-machine, loopback-only and short-lived: no token auth, no dashboard,
# no usage stats; more logical CPUs than cores so Ray Data tasks find slots next to actors.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Builtin datasets are built once per test session into a private cache (never ~/.cache)."""
    if "RAYOFFLINE_TEST_CACHE" in os.environ:  # reuse across local runs: RAYOFFLINE_TEST_CACHE=/tmp/x pytest
        os.environ["RAYOFFLINE_CACHE"] = os.environ["RAYOFFLINE_TEST_CACHE"]
    else:
        os.environ["RAYOFFLINE_CACHE"] = str(tmp_path_factory.mktemp("rayoffline-cache"))
    yield


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    from rayoffline._ray import data_context
    data_context().enable_progress_bars = False  # (without Ray 2.60's own DataContext deprecation warnings)
    yield ray
    ray.shutdown()
