"""``NPROC_PER_NODE=N lmforge sft ...``: re-launch the same command under ``torch.distributed.run``.

The environment variables are the ones ms-swift reads, so its users' launch scripts work unchanged:
``NPROC_PER_NODE`` (processes on this node), ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
torchrun does the rest (rendezvous, one process per GPU, restarts, signal forwarding); a command
already running under torchrun, ``accelerate launch`` or any launcher that sets ``LOCAL_RANK`` is never
re-launched. Only the training commands spread over processes this way; inference scales with
``--data_parallel_size`` instead.
"""
from __future__ import annotations

import os
import sys

TRAINING_COMMANDS = ("pt", "sft", "rlhf")


def torchrun_argv(cmd: str, rest: list[str], env: dict[str, str]) -> list[str] | None:
    """The torchrun command line for ``lmforge cmd rest`` when ``env`` asks for several processes, else None."""
    nproc = env.get("NPROC_PER_NODE")
    if not nproc or "LOCAL_RANK" in env or cmd not in TRAINING_COMMANDS:
        return None
    if not nproc.isdigit() or int(nproc) < 1:
        raise ValueError(f"NPROC_PER_NODE={nproc!r}: expected a positive number of processes")
    nnodes = env.get("NNODES", "1")
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}"]
    if nnodes == "1" and not env.get("MASTER_ADDR") and not env.get("MASTER_PORT"):
        argv.append("--standalone")  # one node: torchrun picks a free local port
    else:
        if nnodes != "1" and not env.get("MASTER_ADDR"):
            raise ValueError(f"NNODES={nnodes}: set MASTER_ADDR (the address of node 0) and MASTER_PORT on every node")
        argv += [f"--node_rank={env.get('NODE_RANK', '0')}", f"--master_addr={env.get('MASTER_ADDR', '127.0.0.1')}",
                 f"--master_port={env.get('MASTER_PORT', '29500')}"]
    return argv + ["-m", "lmforge.cli.main", cmd, *rest]


def relaunch_under_torchrun(cmd: str, rest: list[str]) -> None:
    """Replace this process with torchrun when NPROC_PER_NODE asks for it; return otherwise."""
    argv = torchrun_argv(cmd, rest, dict(os.environ))
    if argv is None:
        return
    print(f"lmforge {cmd}: launching {os.environ['NPROC_PER_NODE']} processes per node with torch.distributed.run",
          file=sys.stderr, flush=True)
    os.execv(sys.executable, argv)
