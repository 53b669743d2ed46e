"""The little moedistill needs from torch.distributed, safe to call without it.

Under torchrun / accelerate the training (transformers) and cache generation (gloo)
set up a process group; a single process has none and every call here is a no-op.
"""

from __future__ import annotations

import os
import sys

from moedistill.errors import UserError


def launched_world() -> int:
    """How many processes the launcher (torchrun, accelerate launch) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank as the launcher set it (readable before any process group exists)."""
    return int(os.environ.get("RANK", "0"))


def rank() -> int:
    """This process's rank: in the process group once there is one, else as the launcher set it."""
    dist = _initialized()
    return dist.get_rank() if dist is not None else launched_rank()


def _initialized():
    if "torch" not in sys.modules:  # nothing can have set up a process group
        return None
    import torch.distributed as dist  # only reached once torch is loaded (checked above)

    return dist if dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    dist = _initialized()
    if dist is not None:
        dist.barrier()


def agree(ok: bool, message: str = "") -> None:
    """Rank 0's verdict, on every process: if rank 0 says not ``ok``, every process raises
    ``UserError(message)`` with rank 0's message (the others' arguments are ignored), so none is
    left waiting in a collective for a process that stopped. Without a process group: raises
    if not ``ok``. Every process of the group must call it."""
    dist = _initialized()
    if dist is not None:
        verdict = [bool(ok), str(message)]
        dist.broadcast_object_list(verdict, src=0)
        ok, message = verdict
    if not ok:
        raise UserError(message)


def shutdown(wait: bool = True) -> None:
    """Tear the process group down before the interpreter exits.

    Left to interpreter exit, gloo's worker threads are destroyed while still joinable
    and a process that has finished its work aborts ("terminate called without an
    active exception", SIGABRT; pytorch/pytorch#190489), which fails the whole launch.
    ``wait`` first waits for the other processes (the normal end); an error path passes
    False, as the others may never arrive."""
    dist = _initialized()
    if dist is None:
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()
