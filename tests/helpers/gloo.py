"""Distributed code under test in several gloo processes on 127.0.0.1, without Ray (torch.multiprocessing.spawn)."""
from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def spawn(fn: Callable[..., None], *args: Any, world: int) -> None:
    """Run `fn(rank, *args)` in `world` processes sharing one gloo process group; an exception in any rank fails
    the call. `fn` must be a module-level function (the children import it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(fn, world, port, args), nprocs=world, join=True)


def _rank(rank: int, fn: Callable[..., None], world: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, *args)
        # every rank's collectives (FSDP's async reduce-scatters included) are done before any rank tears the
        # group down: a rank leaving early aborted its peer's gloo thread ("terminate called ...")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The results are written and the group is gone. Leave without interpreter finalization: gloo's worker threads
    # can still hold tensors then, and freeing them while Python shuts down aborts the process (SIGABRT,
    # "terminate called without an active exception") after every check passed.
    os._exit(0)
