"""Starting the processes of a tensor-parallel group: ead spawns them itself, or joins those torchrun started.

The group runs SPMD: every rank runs the same command on the same requests. The large model is split across the
ranks (`ead.models.tensor_parallel`), the small model is whole on each, and each round rank 0's samplers and
routers decide for all (`BatchEngine`'s sync, set from `ModelPair.large_tp`), so every rank feeds its models the
same tokens. Rank 0 alone speaks: the other ranks' stdout and stderr go to /dev/null, apart from the traceback of
an exception that ends one.

This module owns the processes and the process group's life; what a rank computes is its command's business.
Each process keeps NCCL's NVLink multicast off (`MULTICAST_OFF`) unless the environment already says otherwise.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ead.errors import ConfigError
from ead.models.tensor_parallel import MULTICAST_OFF, init_rank


@dataclass(frozen=True)
class TorchrunRank:
    """What torchrun tells each process it starts. MASTER_ADDR and MASTER_PORT are left to torch (env://)."""

    rank: int
    world: int
    local_rank: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> TorchrunRank | None:
        """The rank torchrun gave this process, or None when it was not started by torchrun (or a like launcher)."""
        if "RANK" not in environ or "WORLD_SIZE" not in environ:
            return None
        try:
            return cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]),
                       int(environ.get("LOCAL_RANK", environ["RANK"])))
        except ValueError:
            raise ConfigError(f"RANK={environ['RANK']!r}, WORLD_SIZE={environ['WORLD_SIZE']!r} and LOCAL_RANK="
                              f"{environ.get('LOCAL_RANK')!r} must be integers (as torchrun sets them)") from None


def check_world(world: int, device_type: str) -> None:
    """Raise ConfigError unless `world` ranks can run here: an integer >= 1, and on CUDA one GPU each."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ConfigError(f"the tensor-parallel size must be an integer >= 1, got {world!r}")
    if device_type == "cuda":
        gpus = torch.cuda.device_count()
        if world > gpus:
            raise ConfigError(f"a tensor-parallel size of {world} needs {world} GPUs, one per rank, but this machine "
                              f"has {gpus}; use a size of at most {gpus}, or --device cpu to run the ranks on the "
                              "CPU (gloo, slow)")


def spawn(fn: Callable[..., int], world: int, args: tuple = (), device_type: str = "cuda") -> int:
    """Run `fn(*args)` in `world` new processes, rank r on cuda:r with NCCL (or all on the CPU with gloo for
    `device_type` "cpu"), each inside the group. Returns the exit status: 0 when every rank's `fn` returned 0, else
    the first failing rank's. A rank that raises ends them all, and the exception (with the rank's traceback)
    reaches the caller."""
    check_world(world, device_type)
    for name, value in MULTICAST_OFF.items():  # inherited by every rank
        os.environ.setdefault(name, value)
    backend = "gloo" if device_type == "cpu" else "nccl"
    ranks = mp.spawn(_run_spawned, args=(world, free_port(), backend, fn, args), nprocs=world, join=False)
    try:
        try:
            while not ranks.join():
                pass
        except KeyboardInterrupt:  # Ctrl-C meant for this process alone: pass it on, and let the ranks finish
            for process in ranks.processes:
                if process.is_alive():
                    os.kill(process.pid, signal.SIGINT)
            while not ranks.join():
                pass
    except mp.ProcessExitedException as e:
        return e.exit_code or 1
    return 0


def join(rank: TorchrunRank, fn: Callable[..., int], args: tuple = (), device_type: str = "cuda") -> int:
    """Run `fn(*args)` in this process as `rank` of a group torchrun started; returns fn's exit status."""
    check_world(rank.world, device_type)
    init_rank(rank.rank, rank.world, port=None, backend="gloo" if device_type == "cpu" else "nccl",
              local_rank=rank.local_rank)
    return run_in_group(fn, args)


def run_in_group(fn: Callable[..., int], args: tuple = ()) -> int:
    """`fn(*args)` in a process that has joined the group: quiet unless rank 0; the group is left afterwards."""
    try:
        with quiet(dist.get_rank() > 0):
            return fn(*args)
    finally:
        dist.destroy_process_group()


def _run_spawned(rank: int, world: int, port: int, backend: str, fn: Callable[..., int], args: tuple) -> None:
    init_rank(rank, world, port, backend)
    code = run_in_group(fn, args)
    if code:
        sys.exit(code)  # mp.spawn reports it to the parent as ProcessExitedException


@contextlib.contextmanager
def quiet(on: bool):
    """Send stdout and stderr to /dev/null inside the block when `on`."""
    if not on:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


def rank0_channel(timeout_s: float = 30 * 24 * 3600) -> tuple[Callable[[object], None], Callable[[], object]]:
    """(send, receive): Python objects from rank 0 to every other rank (a server's requests, each round). Every rank
    calls this, at the same point. It runs on a gloo group of its own, so that the ranks of an idle server may wait
    on it for days (`timeout_s`), where a collective on the NCCL group would time out in minutes."""
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))

    def send(obj: object) -> None:
        dist.broadcast_object_list([obj], group=group, group_src=0)

    def receive() -> object:
        box = [None]
        dist.broadcast_object_list(box, group=group, group_src=0)
        return box[0]

    return send, receive


def free_port() -> int:
    """A TCP port free on this machine now, for the group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
