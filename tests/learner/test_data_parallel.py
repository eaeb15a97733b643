"""Issue 7: data-parallel learners. Two gloo workers in replicate mode with global batch B compute exactly the
update of one worker with batch B; in split mode each worker draws from streams of its own."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from rayoffline import algorithms
from rayoffline.learner.loop import Learner
from tests.helpers import random_data, spec_for

STEPS, BATCH = 20, 256


def _build(name: str, seeds=(0, 3)):
    cls = algorithms.get(name)
    extra = {"cql_n_actions": 3} if name == "cql" else {}
    cfgs = [cls.Config(hidden=(32, 32), **extra)] * len(seeds)
    return cls(spec_for(cls), cfgs, list(seeds))


def _train(name: str, mode: str = "replicate") -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    alg = _build(name)
    learner = Learner(alg, random_data(alg.spec, n=2048), BATCH, mode=mode)
    for step in range(1, STEPS + 1):
        learner.step(step)
    metrics = learner.pop_metrics()
    out = {k: v.detach().clone() for k, v in alg.state_dict().items()}
    out["__metrics__"] = torch.tensor([sum(v) for v in metrics.values()])
    out["__indices__"] = learner.sampler.randint(learner.n, (4,))
    return out


def _worker(rank: int, world: int, port: int, name: str, mode: str, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_train(name, mode), f"{path}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed(name: str, mode: str, tmp_path, world: int = 2) -> list[dict[str, torch.Tensor]]:
    path = str(tmp_path / f"{name}-{mode}")
    mp.start_processes(_worker, args=(world, _free_port(), name, mode, path), nprocs=world, start_method="spawn")
    return [torch.load(f"{path}.{r}", weights_only=True) for r in range(world)]


@pytest.mark.parametrize("name", ["bc", "iql", "cql", "td3_bc"])
def test_two_replicate_workers_equal_one_worker_with_the_global_batch(name, tmp_path):
    solo = _train(name)
    ranks = _distributed(name, "replicate", tmp_path)
    for key, value in solo.items():
        if key == "__indices__":
            continue  # each rank holds its slice of the next global draw
        for r, state in enumerate(ranks):
            torch.testing.assert_close(state[key], value, rtol=2e-4, atol=2e-5, msg=f"{name} rank {r} {key}")


def test_split_workers_draw_streams_of_their_own(tmp_path):
    from rayoffline.nn.members import STREAM_SAMPLE
    from rayoffline.nn.rng import MemberRNG
    solo = MemberRNG([0, 3], "cpu", STREAM_SAMPLE).randint(100, (8,))
    assert torch.equal(MemberRNG([0, 3], "cpu", STREAM_SAMPLE, rank=0, world=2, shared=False).randint(100, (8,)), solo)
    assert not torch.equal(MemberRNG([0, 3], "cpu", STREAM_SAMPLE, rank=1, world=2, shared=False).randint(100, (8,)),
                           solo)  # rank 0 keeps the single-process stream; rank 1 has its own
    ranks = _distributed("bc", "split", tmp_path)
    assert not torch.equal(ranks[0]["__indices__"], ranks[1]["__indices__"])
    for key, value in ranks[0].items():  # gradients are still averaged: the workers' weights agree
        if not key.startswith("__"):
            torch.testing.assert_close(ranks[1][key], value)
