"""The training epoch and the evaluation, shared by train.py and validate.py."""
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from timm.utils import dispatch_clip_grad

from .checkpoint import Progress
from .data import STEP, BatchLayout, derive_seed, seed_all
from .distributed import Processes, mean_over_ranks, sum_over_ranks

_logger = logging.getLogger(__name__)


class Interrupted(Exception):
    """A stop signal was agreed on; the caller saves a recovery checkpoint and exits."""


class NonFiniteLoss(Exception):
    def __init__(self, epoch: int, step: int):
        super().__init__(f'non-finite loss at epoch {epoch}, step {step}: training stopped, no checkpoint written '
                         'after the last good one')


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


class BatchNormSteps:
    """One update of the BatchNorm running statistics per optimizer step: the mean over its micro-batches and
    processes.

    BatchNorm updates its running mean and variance on every forward. With gradient accumulation that makes several
    updates per step, and under DDP every process keeps its own; either way the evaluated weights would depend on
    how the global batch is split. Here each micro-batch updates from the statistics the step started with and the
    results are averaged, then over processes: the same as one update with the mean micro-batch statistics, on any
    number of processes. The processes' statistics stay equal, so the EMA and the checkpoints see the same ones.
    """

    def __init__(self, model: torch.nn.Module, procs: Processes):
        self.stats = [b for name, b in model.named_buffers()
                      if name.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
        self.procs = procs
        self.start = self.total = None

    def before_micro(self, j: int):
        if j == 0:
            self.start = [b.clone() for b in self.stats]
            self.total = [torch.zeros_like(b) for b in self.stats]
        else:
            torch._foreach_copy_(self.stats, self.start)

    def after_micro(self):
        torch._foreach_add_(self.total, self.stats)

    def end_step(self, accum: int):
        flat = torch.cat([t.double().flatten() for t in self.total]) / accum
        flat = mean_over_ranks(flat, self.procs)
        for b, mean in zip(self.stats, flat.split([b.numel() for b in self.stats])):
            b.copy_(mean.view_as(b))


@dataclass
class Trainer:
    """What a training step needs: built by train.py, used by train_one_epoch()."""
    model: torch.nn.Module  # unwrapped: saved, evaluated, and averaged by the EMA
    train_model: torch.nn.Module  # the model as trained: DDP and/or torch.compile around `model`
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: Callable
    mixup: Optional[Callable]
    random_erasing: Optional[Callable]
    model_ema: Optional[torch.nn.Module]
    batchnorm: Optional[BatchNormSteps]  # None: a single process without accumulation needs no averaging
    scaler: Optional[object]  # timm NativeScaler, for float16
    layout: BatchLayout
    procs: Processes
    amp_dtype: Optional[torch.dtype]
    channels_last: bool
    clip_grad: Optional[float]
    clip_mode: str
    seed: int
    log_interval: int
    epochs: int


def _loss_backward(t: Trainer, loss: torch.Tensor, last_micro: bool):
    if t.scaler is not None:
        t.scaler(loss, t.optimizer, clip_grad=t.clip_grad, clip_mode=t.clip_mode,
                 parameters=t.model.parameters(), need_update=last_micro)
        return
    loss.backward()
    if last_micro:
        if t.clip_grad is not None:
            dispatch_clip_grad(t.model.parameters(), t.clip_grad, mode=t.clip_mode)
        t.optimizer.step()


def train_one_epoch(t: Trainer, loader, progress: Progress, steps_per_epoch: int,
                    after_step: Callable[[], tuple], save: Callable[[], None], log: Callable[[dict], None]) -> dict:
    """Train from progress.step to the end of progress.epoch, updating `progress` after every optimizer step.

    After each optimizer step, after_step() returns (stop, save_due), agreed by all processes. Before a save the losses
    since the last check are verified finite, so a diverged state is never written; on stop, a recovery checkpoint is
    saved and Interrupted raised. log() receives the step metrics every log_interval steps and at the epoch's end.

    Returns:
        Speed of the steps this call ran: img_per_sec, data_wait (share of the time spent waiting for data).
    """
    t.train_model.train()
    accum = t.layout.accum_steps
    micro_index = t.procs.rank * accum
    device = t.procs.device
    loss_sum = torch.tensor(progress.loss_sum, dtype=torch.float64, device=device)
    step_loss = torch.zeros((), device=device)
    window, window_first_step = [], progress.step
    first_step = progress.step
    epoch_start = clock = window_start = last_end = time.perf_counter()
    wait = epoch_wait = 0.0
    for i, (x, y) in enumerate(loader):
        waited = time.perf_counter() - last_end
        wait, epoch_wait = wait + waited, epoch_wait + waited
        j = i % accum
        seed_all(derive_seed(t.seed, STEP, progress.epoch, progress.step, micro_index + j))
        if t.random_erasing is not None:
            x = t.random_erasing(x)
        if t.mixup is not None:
            x, y = t.mixup(x, y)
        if t.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        last_micro = j == accum - 1
        if t.batchnorm is not None:
            t.batchnorm.before_micro(j)
        no_sync = getattr(t.train_model, 'no_sync', None)
        with no_sync() if (no_sync is not None and not last_micro) else nullcontext():
            with autocast(device, t.amp_dtype):
                loss = t.loss_fn(t.train_model(x), y)
            step_loss += loss.detach().float() / accum
            _loss_backward(t, loss / accum, last_micro)
        if t.batchnorm is not None:
            t.batchnorm.after_micro()
        if not last_micro:
            last_end = time.perf_counter()
            continue

        t.optimizer.zero_grad(set_to_none=True)
        if t.batchnorm is not None:
            t.batchnorm.end_step(accum)
        if t.model_ema is not None:
            t.model_ema.update(t.model)
            progress.ema_updates += 1
        progress.step += 1
        progress.global_step += 1
        t.scheduler.step_update(num_updates=progress.global_step)
        loss_sum += step_loss
        window.append(step_loss)
        step_loss = torch.zeros((), device=device)

        stop, save_due = after_step()
        log_due = (progress.step % t.log_interval == 0) or (progress.step == steps_per_epoch)
        if log_due or save_due or stop:
            losses = mean_over_ranks(torch.stack(window), t.procs)
            finite = torch.isfinite(losses)
            if not finite.all():
                raise NonFiniteLoss(progress.epoch, window_first_step + int((~finite).nonzero()[0]))
        if log_due:
            elapsed = time.perf_counter() - window_start
            steps_done = progress.step - window_first_step
            step_time = elapsed / steps_done
            steps_left = (t.epochs - progress.epoch) * steps_per_epoch - progress.step
            log(dict(
                epoch=progress.epoch, step=progress.step, steps_per_epoch=steps_per_epoch,
                global_step=progress.global_step, loss=losses.mean().item(),
                lr=t.optimizer.param_groups[0]['lr'], img_per_sec=steps_done * t.layout.global_batch / elapsed,
                data_wait=wait / elapsed, eta_epoch=(steps_per_epoch - progress.step) * step_time,
                eta_run=steps_left * step_time,
            ))
            window, window_first_step, wait = [], progress.step, 0.0
            window_start = time.perf_counter()
        if save_due or stop:
            progress.loss_sum = mean_over_ranks(loss_sum, t.procs).item()
            now = time.perf_counter()
            progress.seconds, clock = progress.seconds + now - clock, now
            save()
        if stop:
            raise Interrupted()
        last_end = time.perf_counter()
    progress.loss_sum = mean_over_ranks(loss_sum, t.procs).item()
    now = time.perf_counter()
    progress.seconds += now - clock
    seconds = max(now - epoch_start, 1e-9)
    return dict(img_per_sec=(progress.step - first_step) * t.layout.global_batch / seconds,
                data_wait=epoch_wait / seconds)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, procs: Processes, amp_dtype: Optional[torch.dtype] = None,
             channels_last: bool = False, tta_flip: bool = False,
             should_stop: Optional[Callable[[], bool]] = None) -> dict:
    """Top-1, top-5 and mean cross-entropy over every image of the loader's dataset, once each.

    Every process evaluates its own shard; sums are reduced, so the result does not depend on the number of
    processes. should_stop() is asked in the batches all processes share, and raises Interrupted when it says so.
    """
    model.eval()
    device = procs.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images
    common_batches = getattr(loader.batch_sampler, 'common_batches', len(loader))
    start = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if (should_stop is not None) and (i < common_batches) and should_stop():
            raise Interrupted()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(x)
            if tta_flip:
                logits = (logits + model(x.flip(3))) / 2
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == y[:, None]
        sums[:3] += torch.stack([F.cross_entropy(logits, y, reduction='sum'), hits[:, :1].sum(), hits.sum()]).double()
        sums[3] += len(y)
    sum_over_ranks(sums, procs)
    elapsed = time.perf_counter() - start
    loss, top1, top5, images = sums.tolist()
    images = max(images, 1)
    return dict(loss=loss / images, top1=100 * top1 / images, top5=100 * top5 / images, images=int(images),
                img_per_sec=images / elapsed, seconds=elapsed)
