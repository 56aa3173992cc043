"""Training on several processes: ``torchrun --nproc_per_node=N -m pipelines.cli train ...``.

torchrun starts N copies of the command and tells each its place through the environment
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``).
:func:`distributed` reads them, and with ``WORLD_SIZE`` > 1 joins the process group (NCCL when
training on CUDA, each process on ``cuda:LOCAL_RANK``; gloo on the CPU) for the length of a run;
with one process it changes nothing. :func:`pipelines.fit.fit` sees the process group and does
the rest: the net in DistributedDataParallel, each rank its share of every epoch
(:func:`shard`), rank 0 alone validating and writing.

On the CPU the ranks share the machine's cores: each gets ``cores // LOCAL_WORLD_SIZE`` torch
threads (at least one, at most the count it started with; torchrun itself sets
``OMP_NUM_THREADS=1`` when it is unset), and :class:`~pipelines.threads.AdaptiveThreads` stays
off, since a rank that lowered its threads would hold up the others at every gradient exchange.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch

from medvit.core.errors import MedvitError

TIMEOUT = timedelta(hours=1)
"""How long a rank waits at a collective: the other ranks wait this long for rank 0's validation."""


@dataclass(frozen=True)
class World:
    """This process's place among torchrun's: ``rank`` of ``size`` in all, ``local_rank`` of ``local_size`` on this machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that validates, writes the outputs and prints."""
        return self.rank == 0


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The :class:`World` torchrun's environment variables describe (one process without them)."""
    env = os.environ if env is None else env

    def read(name: str, default: int) -> int:
        raw = env.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise MedvitError(f"environment variable {name}={raw!r}: expected a whole number (torchrun sets it)") from None

    size = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local_size = read("LOCAL_WORLD_SIZE", size)
    local_rank = read("LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size or not 0 <= local_rank < max(1, local_size):
        raise MedvitError(f"environment variables RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={size} do not fit "
                          "together; start several processes with torchrun --nproc_per_node=N")
    return World(rank, size, local_rank, local_size)


def shard(order: list[int], rank: int, size: int) -> list[int]:
    """Rank ``rank``'s share of an epoch's global sample order, dealt as torch's ``DistributedSampler``
    deals it: the order padded to a multiple of ``size`` by repeating it from its start, then every
    ``size``-th item from position ``rank``. Every rank gets the same count, so all run the same number
    of steps; a sample or two of the epoch's first may be seen twice."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} of {size}")
    pad = -len(order) % size
    if pad and order:
        order = order + (order * (pad // len(order) + 1))[:pad]
    return order[rank::size]


@contextlib.contextmanager
def distributed(device: str) -> Iterator[tuple[World, str]]:
    """Join torchrun's process group for a training run: yields (:class:`World`, the device this rank
    trains on). ``device``: ``cpu`` or ``cuda`` (under torchrun a ``cuda:N`` other than
    ``cuda:LOCAL_RANK`` is a MedvitError: each process takes its own GPU). With ``WORLD_SIZE`` 1 or
    unset this yields ``(World(), device)`` and does nothing else. On ranks other than 0, log records
    below ERROR are dropped (rank 0 says each warning once)."""
    world = world_from_env()
    if world.size == 1:
        yield world, device
        return
    import torch.distributed as dist

    dev = torch.device(device)
    threads = torch.get_num_threads()
    if dev.type == "cuda":
        if dev.index not in (None, world.local_rank):
            raise MedvitError(f"--device {device}: under torchrun each process trains on cuda:LOCAL_RANK; "
                              "give --device cuda (or none)")
        if torch.cuda.device_count() < world.local_size:
            raise MedvitError(f"torchrun started {world.local_size} processes on this machine but it has "
                              f"{torch.cuda.device_count()} CUDA device(s); lower --nproc_per_node")
        dev = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, min(threads, cores // world.local_size)))
        backend = "gloo"
    try:
        dist.init_process_group(backend, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as e:
        torch.set_num_threads(threads)
        raise MedvitError(f"cannot join the {backend} process group of WORLD_SIZE={world.size} "
                          f"({' '.join(str(e).split())[:160]}); start the command with torchrun") from None
    if not world.main:
        logging.disable(logging.WARNING)
    try:
        yield world, str(dev)
        # every rank leaves together: a rank that tore down its group while a peer still had gloo
        # work in flight aborted that peer (SIGABRT, "terminate called without an active exception")
        dist.barrier()
    finally:
        logging.disable(logging.NOTSET)
        dist.destroy_process_group()
        torch.set_num_threads(threads)
