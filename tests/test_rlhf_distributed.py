"""Batch statistics over two gloo processes: reduced over the global batch *before* they are clamped or used.

Issue #18: KTO's reference point was clamped at 0 on each process and then averaged. Here process 0's
mismatched pairs have KL terms [-0.6, -0.4] (mean -0.5) and process 1's [0.2, 0.4] (mean 0.3):

    clamp then average (the bug):  (max(0, -0.5) + max(0, 0.3)) / 2 = 0.15
    average then clamp (the paper): max(0, (-0.6 - 0.4 + 0.2 + 0.4) / 4) = max(0, -0.1) = 0

The same processes check the GRPO batch std and the logged std of a metric against the pooled values
(process 0 rewards [1, 2, unscored], process 1 [4, 3]: sum 10, squares 30, n 4, std 1.2909944).
Two spawned CPU processes, about 10 s.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    from lmforge.utils.distributed import exit_process

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from lmforge.rlhf import grpo as G
        from lmforge.rlhf.losses import kto_kl_estimate
        from lmforge.utils.distributed import global_sum

        policy = torch.tensor([[-1.6, -1.4], [-0.8, -0.6]][rank])
        ref = torch.full((2,), -1.0)
        z0 = kto_kl_estimate(policy, ref).item()
        rewards = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 3.0, float("nan")]][rank])
        std = G.BatchStd(*global_sum(G.BatchStd.local(rewards)).tolist()).std()
        from lmforge.rlhf.metrics import MetricStore

        store = MetricStore()
        store.add("train", "r/std", rewards[~rewards.isnan()], reduce="std")
        store.add("train", "r/mean", rewards[~rewards.isnan()])
        store.add("train", "r/max", rewards[~rewards.isnan()], reduce="max")
        logged = store.pop("train")
        Path(out, f"{rank}.json").write_text(json.dumps([z0, std, logged["r/std"], logged["r/mean"], logged["r/max"]]))
    finally:
        dist.destroy_process_group()
    exit_process(0)  # torch 2.13 on CPU sometimes aborts in its teardown after the work (utils/distributed.py)


def test_reduce_then_clamp_over_two_processes(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        z0, std, logged_std, logged_mean, logged_max = json.loads((tmp_path / f"{rank}.json").read_text())
        assert z0 == 0.0  # not 0.15
        assert std == pytest.approx(1.2909944, abs=1e-6) and logged_std == pytest.approx(1.290994, abs=1e-6)
        assert logged_mean == pytest.approx(2.5) and logged_max == 4.0
