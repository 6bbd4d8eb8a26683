"""Processes and devices: torchrun / torch.distributed setup, collectives, and agreeing to stop on a signal.

Started by torchrun, each process reads RANK, WORLD_SIZE and LOCAL_RANK from the environment and joins the process
group: NCCL between GPUs, gloo on CPU. Control decisions (stop now, save now) travel over a separate gloo group, so
agreeing on them never waits for the GPU.
"""
import ctypes
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from .config import UserError

_logger = logging.getLogger(__name__)


@dataclass
class Processes:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control_group: Optional[object] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f'device {name} asked for, but CUDA is not available here')
    if name == 'cuda':
        return torch.device('cuda', local_rank)
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None


# glibc's mallopt() parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_cpu_memory(device: torch.device) -> bool:
    """On a CPU device, let glibc's malloc keep the memory that tensors free, for the next step, instead of returning
    it to the kernel; False on other devices and where the C library has no mallopt (not glibc).

    PyTorch's CPU tensors come from malloc. A training step frees megabytes of activations and gradients that the next
    step allocates again, and by default glibc unmaps blocks above its mmap threshold and trims the heap's free top
    above its trim threshold: every step then faults that memory back in, page by page, zeroed by the kernel. With
    ResNet-50 at 32 px, batch 64 on a 2-core CPU that was ~26,000 page faults and ~10% of each step (measured); with
    the largest mmap threshold glibc accepts (32 MB) and a 1 GB trim threshold, ~3,800. On a GPU the CUDA caching
    allocator already keeps freed memory.
    """
    mallopt = getattr(ctypes.CDLL(None), 'mallopt', None)
    if (device.type != 'cpu') or (mallopt is None):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def setup(device_name: str, timeout_minutes: float, sync_bn: bool = False) -> Processes:
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if world_size > 1 and device_name.startswith('cuda:'):
        raise UserError(f'device {device_name} names one GPU, but torchrun starts a process per GPU: use cuda or auto')
    device = pick_device(device_name, local_rank)
    if sync_bn and world_size > 1 and device.type != 'cuda':
        raise UserError('sync_bn needs GPUs (NCCL); on CPU the processes already share BatchNorm statistics every '
                        'step')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    keep_freed_cpu_memory(device)
    if world_size == 1:
        return Processes(0, 1, 0, device)
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    timeout = timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend, timeout=timeout)
    control = dist.new_group(backend='gloo', timeout=timeout) if backend != 'gloo' else None
    return Processes(rank, world_size, local_rank, device, control)


def teardown(procs: Processes):
    if procs.distributed and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(tensor: torch.Tensor, procs: Processes) -> torch.Tensor:
    if not procs.distributed:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / procs.world_size


def sum_over_ranks(tensor: torch.Tensor, procs: Processes) -> torch.Tensor:
    if procs.distributed:
        dist.all_reduce(tensor)
    return tensor


def agree_any(flags: list, procs: Processes) -> list:
    """Each flag becomes True on every process when it is True on any."""
    if not procs.distributed:
        return flags
    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=procs.control_group)
    return [bool(v) for v in tensor.tolist()]


def broadcast_object(obj, procs: Processes):
    if not procs.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, group=procs.control_group)
    return holder[0]


def on_primary(fn, procs: Processes):
    """Run fn() on rank 0 only and return its result on every rank; a UserError it raises is raised on every
    rank, so no process waits forever for one that stopped."""
    result, error = None, None
    if procs.is_primary:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    result, error = broadcast_object((result, error), procs)
    if error is not None:
        raise UserError(error)
    return result


def barrier(procs: Processes):
    if procs.distributed:
        dist.barrier(group=procs.control_group)


def _last_words(message: str):
    """A line to stderr and to the log files, written straight to their file descriptors: from a signal handler the
    logging module could re-enter a call it interrupted, and os._exit flushes nothing."""
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n".encode()
    streams = [sys.stderr] + [h.stream for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for stream in streams:
        try:
            os.write(stream.fileno(), line)
        except (OSError, ValueError, AttributeError):  # closed, or not a file
            continue


class StopRequest:
    """Turns SIGTERM and SIGINT into a request to stop at the next step boundary; a second signal exits at once.

    Every process checks it at the same points (`agreed`), so a signal seen by any one of them stops them all at the
    same step, where they save one recovery checkpoint together. A repeat within REPEAT_GRACE seconds is the same
    notice arriving twice (a job scheduler signals every process, and torchrun forwards its own copy), not a second
    request. The handler only records the signal: logging from it could re-enter a log call it interrupted.
    """
    REPEAT_GRACE = 5.0

    def __init__(self, procs: Processes):
        self.procs = procs
        self.signal = None
        self.received_at = None
        self.reported = False
        self._previous = {}

    def install(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal is None:
            self.signal, self.received_at = signum, time.monotonic()
        elif time.monotonic() - self.received_at > self.REPEAT_GRACE:
            _last_words(f'{signal.Signals(signum).name} received again: exiting at once, without saving; the next '
                        'run resumes from the newest checkpoint saved')
            os._exit(128 + signum)

    def agreed(self, *other_flags: bool) -> list:
        """[stop, *other_flags], each True on every process when True on any."""
        if self.signal is not None and not self.reported:
            self.reported = True
            _logger.warning(f'{signal.Signals(self.signal).name} received: stopping after this step to save a '
                            f'recovery checkpoint (another signal more than {self.REPEAT_GRACE:g} s after this one '
                            'exits at once, without saving)')
        return agree_any([self.signal is not None, *other_flags], self.procs)
