"""Run by test_ray_train.py in a fresh process: a 2-node Ray cluster on loopback (ray.cluster_utils.Cluster),
a 2-worker Ray Train run spread across both nodes. Prints one JSON line with the result and worker nodes."""
import json
import os
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import rayoffline  # noqa: E402

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
try:
    result = rayoffline.train("bc", sys.argv[1], sys.argv[2], steps=40, config={
        "batch_size": 64, "log_every": 20, "eval_episodes": 0, "checkpoint_every": 0, "threads": 1,
        "progress": "off", "num_workers": 2, "placement": "spread", "data_mode": "split",
        "algo": {"hidden": [16, 16]}})
    print(json.dumps({"steps": result["steps"], "num_workers": result["num_workers"],
                      "worker_nodes": sorted(result["worker_nodes"]),
                      "cluster_nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])}))
finally:
    ray.shutdown()
    cluster.shutdown()
