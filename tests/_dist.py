"""Run a function on W gloo processes (CPU) and collect what each rank returns.

    results = spawn(fn, world_size, *args)   # fn(rank, world_size, *args) -> picklable / tensors

fn must be a top-level function of an importable test module. Each process gets RANK/WORLD_SIZE/
MASTER_ADDR/MASTER_PORT in its environment, so common.setup_distributed() works exactly as under
torchrun. One thread per process keeps 2 ranks from fighting over 2 cores.
"""
import os
import socket
import tempfile

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, out_dir, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import common

    common.setup_distributed()
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        common.cleanup_distributed()


def spawn(fn, world_size, *args):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world_size, _free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]
