"""Run a function on several gloo ranks (CPU processes) and collect what each returned; a hang fails the test."""

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world, port, body, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(body(rank, world), Path(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(body, tmp_path, world=2, timeout=120):
    """Run ``body(rank, world)`` (a module-level function) on ``world`` gloo ranks; their results, or a failure if
    one raises or they outlive ``timeout`` seconds (a hang)."""
    context = mp.start_processes(_worker, args=(world, _free_port(), body, str(tmp_path)), nprocs=world,
                                 join=False, start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} ranks did not finish within {timeout} s: a collective hung")
    return [torch.load(Path(tmp_path, f"rank{rank}.pt"), weights_only=False) for rank in range(world)]
