"""The few torch.distributed facts every layer needs: who am I, how many are we, reduce a statistic.

Each function is the identity in a single process (no process group), so code that calls them runs
unchanged in one process, under torchrun with gloo on CPU, or with NCCL on GPUs. Statistics that
decide something (a KL reference point clamped at 0, a batch mean used to scale rewards) must be
reduced across ranks *before* the decision: ``global_sum``/``global_mean`` do that reduction.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from lmforge.utils.errors import SetupError


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def is_distributed() -> bool:
    return _dist() is not None


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the body first (fills a cache, downloads); the others wait, then run it (read the cache)."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()


def global_sum(value: Any) -> Any:
    """Sum a tensor (detached) over all ranks; the identity in one process."""
    d = _dist()
    if d is None:
        return value
    out = value.detach().clone()
    d.all_reduce(out, op=d.ReduceOp.SUM)
    return out


def global_mean(total: Any, count: Any) -> Any:
    """``sum(total) / sum(count)`` over all ranks: the mean of the global batch, not a mean of rank means."""
    import torch

    device = total.device if isinstance(total, torch.Tensor) else collective_device()
    both = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device).detach().reshape(())
                        for x in (total, count)])
    both = global_sum(both)
    return both[0] / both[1].clamp(min=1)


def collective_device() -> Any:
    """Where a tensor must live to take part in a collective: the GPU under NCCL, else the CPU."""
    import torch

    d = _dist()
    if d is not None and d.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (decisions such as a timestamped output folder must be made once)."""
    d = _dist()
    if d is None:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]


def init_distributed(on_gpu: bool, backend: str | None = None, timeout_s: int = 1800) -> None:
    """Join the process group that a launcher (torchrun, accelerate launch) described, once.

    Done through accelerate's ``PartialState`` so that the Trainer finds the same state later; it binds
    each process to its GPU (``LOCAL_RANK``). Nothing happens in a single process. NCCL is checked here
    so that a missing one is a sentence, not a stack trace from the first collective.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return
    import datetime

    import torch
    from accelerate import PartialState

    if on_gpu and backend in (None, "nccl") and not torch.distributed.is_nccl_available():
        raise SetupError("several GPU processes need NCCL, and this torch build has none: install a CUDA build "
                           "of torch with NCCL, or pass --ddp_backend gloo (slow)")
    if not on_gpu and backend == "nccl":
        raise SetupError("--ddp_backend nccl needs CUDA GPUs; on CPU the backend is gloo")
    PartialState(cpu=not on_gpu, backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def shutdown() -> None:
    """Leave the process group together (every rank has finished its work and its writes)."""
    d = _dist()
    if d is not None:
        d.barrier()
        d.destroy_process_group()


def exit_process(code: int) -> None:
    """End a launched worker process without the interpreter's teardown.

    Seen here with torch 2.13 on CPU (gloo): about one exit in six aborts in C++ static destruction
    ("terminate called without an active exception", only the main thread left) after all work and
    writes are done, and torchrun then reports the whole launch as failed. Output is flushed first.
    """
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (a list of one in a single process)."""
    d = _dist()
    if d is None:
        return [obj]
    out: list[Any] = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def all_gather_with_grad(tensor: Any) -> tuple[Any, int]:
    """Every rank's ``tensor`` concatenated along dim 0 (ranks may hold different numbers of rows), with
    gradients flowing back to each rank's own rows; also where this rank's rows start.

    A contrastive loss uses it to score each query against the documents of the *global* batch, so
    N processes see the same negatives as one process with their batches joined. The backward pass
    sums every rank's gradient for a rank's rows, and DDP then averages the parameters' gradients:
    the result is the gradient of the mean of the ranks' losses. ``(tensor, 0)`` in one process.
    """
    d = _dist()
    if d is None:
        return tensor, 0
    import torch
    import torch.distributed.nn.functional as dist_fn

    sizes = [int(n) for n in gather_objects(int(tensor.shape[0]))]
    most = max(sizes)
    padded = torch.cat([tensor, tensor.new_zeros((most - tensor.shape[0], *tensor.shape[1:]))]) \
        if tensor.shape[0] < most else tensor
    parts = dist_fn.all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[:rank()])
