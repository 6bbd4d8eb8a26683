#!/usr/bin/env python
"""Train an image classifier from a YAML recipe with timm's components; resumes by itself after any interruption.

    python train.py -c recipes/rn50_130ep.yaml [--flag value ...]
    torchrun --nproc_per_node=8 train.py -c recipes/rn50_130ep.yaml

The file reads top to bottom: builders (model, loss, optimizer, schedule, EMA and SWA), saving, the epoch loop
(train_one_epoch: every decision of a step in the order it happens), then train(), which wires them.

Exit codes: 0 finished, 1 crashed, 2 bad input, 3 non-finite loss, 74 the newest state could not be saved (disk full,
permissions: free space and run the same command again), 75 interrupted by a signal after saving (run the same
command again to continue), 128+N a second signal N (exit without saving).
"""
import dataclasses
import errno
import itertools
import logging
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import PIL.Image
import torch
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model
from timm.optim import create_optimizer_v2, get_optimizer_info
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad
from torch.optim.swa_utils import AveragedModel

import model_defs  # noqa: F401  registers resnet50_custom
from training import checkpoint, distill, distributed, per_class, reporting
from training.checkpoint import Progress, RunCheckpointSaver
from training.config import UserError, architecture_options, parse_config, save_config, saved_config
from training.data import (BUILTIN_ROOT, STEP, SWA_BN, BatchLayout, Datasets, Loaders, build_loaders, choice_line,
                           choose_share, create_random_erasing, data_configs, derive_seed, epoch_steps, image_sizes,
                           locate_dataset, open_datasets, open_image_folder, read_manifest, resolve_input_path,
                           seed_all)
from training.distributed import Processes, StopRequest, mean_over_ranks, sum_over_ranks
from training.engine import (BatchNormSteps, Interrupted, NonFiniteLoss, autocast, clipped_parameters, evaluate,
                             recompute_batchnorm)

_logger = logging.getLogger('train')

EXIT_USAGE, EXIT_NONFINITE, EXIT_NOT_SAVED, EXIT_INTERRUPTED = 2, 3, 74, 75


# builders: each returns what it builds

def build_model(config: dict, num_classes: int) -> torch.nn.Module:
    seed_all(config['seed'])
    try:
        return create_model(config['model'], num_classes=num_classes, drop_rate=config['drop_rate'],
                            drop_path_rate=config['drop_path_rate'], zero_init_last=config['zero_init_last'],
                            **architecture_options(config))
    except RuntimeError as e:
        raise UserError(str(e).splitlines()[0]) from None
    except TypeError as e:  # a model without one of the options, such as blur_pool
        raise UserError(f"model {config['model']} does not take these options: {e}") from None


def build_mixup(config: dict, num_classes: int, micro_batch: int) -> Optional[Mixup]:
    if not (config['mixup'] > 0 or config['cutmix'] > 0 or config['cutmix_minmax']):
        return None
    if micro_batch % 2:
        raise UserError(f'Mixup/CutMix need an even micro-batch, got {micro_batch}')
    return Mixup(mixup_alpha=config['mixup'], cutmix_alpha=config['cutmix'], cutmix_minmax=config['cutmix_minmax'],
                 prob=config['mixup_prob'], switch_prob=config['mixup_switch_prob'], mode=config['mixup_mode'],
                 label_smoothing=config['smoothing'], num_classes=num_classes)


def build_loss(bce: bool, smoothing: float, mixing: bool, target_threshold: Optional[float] = None):
    """Soft-target cross-entropy when Mixup/CutMix makes the targets (smoothing included), else label smoothing."""
    if bce:
        return BinaryCrossEntropy(smoothing=0.0 if mixing else smoothing, target_threshold=target_threshold)
    if mixing:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return torch.nn.CrossEntropyLoss()


# torch's optimizers that have a fused implementation on CPU and CUDA: one kernel for all parameters instead of
# several per parameter (AdamW's step on a CPU: 20 ms instead of 55 ms for ResNet-50). Same update, same state.
FUSED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def build_optimizer(config: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer factory; fused where torch has a fused kernel (timm leaves that to its caller)."""
    extra = {k: v for k, v in (('eps', config['opt_eps']), ('betas', config['opt_betas'])) if v is not None}
    try:
        fused = get_optimizer_info(config['opt']).opt_class in FUSED_OPTIMIZERS
    except ValueError:  # an unknown name: create_optimizer_v2 says so below
        fused = False
    if fused:
        extra['fused'] = True
    try:
        return create_optimizer_v2(model, opt=config['opt'], lr=config['lr'], weight_decay=config['weight_decay'],
                                   momentum=config['momentum'], filter_bias_and_bn=True, **extra)
    except (AssertionError, ValueError, TypeError) as e:
        raise UserError(f"optimizer {config['opt']!r}: {e}") from None


class FfcvStepScheduler(Scheduler):
    """FFCV's step schedule (train_imagenet.py's get_step_lr): lr * decay_rate ** (epoch // decay_epochs), 0 from the
    last epoch on, interpolated linearly over the steps of each epoch as FFCV's train_loop does.

    Ours because timm's StepLRScheduler holds each value up to the boundary: FFCV's lr falls over the epoch before each
    decay, and over the last epoch to 0. timm's Scheduler base gives it step_update() and state_dict().
    """

    def __init__(self, optimizer: torch.optim.Optimizer, epochs: int, decay_epochs: float, decay_rate: float,
                 steps_per_epoch: int):
        self.epochs, self.decay_epochs, self.decay_rate = epochs, decay_epochs, decay_rate
        self.steps_per_epoch = steps_per_epoch
        super().__init__(optimizer, param_group_field='lr', t_in_epochs=False)

    def _epoch_lr(self, lr: float, epoch: int) -> float:
        return 0.0 if epoch >= self.epochs else lr * self.decay_rate ** (epoch // self.decay_epochs)

    def _get_lr(self, t: int) -> list:
        epoch, step = divmod(t, self.steps_per_epoch)
        share = step / self.steps_per_epoch
        ends = [(self._epoch_lr(lr, epoch), self._epoch_lr(lr, epoch + 1)) for lr in self.base_values]
        return [start + (end - start) * share for start, end in ends]


class OneCycleScheduler(Scheduler):
    """torch's OneCycleLR (two phases, cosine annealing) as a timm Scheduler, stepped every optimizer step like the
    others: the lr rises from lr / div_factor to lr over the first pct_start of the steps, then falls to
    lr / div_factor / final_div_factor; momentum (SGD's, or beta1 of Adam's betas) moves against it, from max to base
    and back.

    Ours because timm has no one-cycle schedule, and torch's OneCycleLR counts its own steps: this one is a function
    of the step alone, so a resumed run needs only the counter. timm's Scheduler base gives it step_update() and
    state_dict(); momentum, a second field, is set here.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, pct_start: float, div_factor: float,
                 final_div_factor: float, momentum: Optional[tuple]):
        if momentum and not all(('momentum' in g) or ('betas' in g) for g in optimizer.param_groups):
            raise UserError('onecycle_momentum cycles SGD\'s momentum or Adam\'s beta1, which this optimizer has '
                            'not: set onecycle_momentum null')
        self.total_steps, self.pct_start = total_steps, pct_start
        self.div_factor, self.final_div_factor, self.momentum = div_factor, final_div_factor, momentum
        super().__init__(optimizer, param_group_field='lr', t_in_epochs=False)

    @staticmethod
    def _anneal(start: float, end: float, share: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * share) + 1)

    def _phase(self, t: int) -> tuple:
        """(rising, share of the phase done) at step t, as OneCycleLR.get_lr() finds them."""
        peak = float(self.pct_start * self.total_steps) - 1
        t = min(t, self.total_steps - 1)  # the evaluation after the last step asks for one more
        if t <= peak:
            return True, t / peak if peak > 0 else 1.0  # OneCycleLR divides by zero there
        return False, (t - peak) / (self.total_steps - 1 - peak)

    def _get_lr(self, t: int) -> list:
        rising, share = self._phase(t)
        lrs = []
        for peak in self.base_values:
            start = peak / self.div_factor
            lrs.append(self._anneal(start, peak, share) if rising else
                       self._anneal(peak, start / self.final_div_factor, share))
        return lrs

    def step_update(self, num_updates: int, metric: Optional[float] = None):
        super().step_update(num_updates, metric)
        if self.momentum is None:
            return
        rising, share = self._phase(num_updates)
        base, top = self.momentum
        momentum = self._anneal(top, base, share) if rising else self._anneal(base, top, share)
        for group in self.optimizer.param_groups:
            if 'betas' in group:
                group['betas'] = (momentum, *group['betas'][1:])
            else:
                group['momentum'] = momentum


class SwaScheduler(Scheduler):
    """The run's schedule up to the first step of SWA, then torch's SWALR: a cosine from the schedule's lr at that
    step to swa_lr over anneal_steps, then swa_lr.

    Ours because SWALR counts its own steps (it is meant to be stepped once an epoch) and anneals from whatever lr the
    optimizer holds when it is built, so a resumed run would need its step count and that lr restored. Here the lr is
    a function of the step alone, as with every schedule of train.py: a resumed run needs only the counter
    (tests/test_swa.py compares it with SWALR step by step). The run's schedule is still stepped first, so that what
    else it sets (onecycle's momentum) goes on.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Scheduler, start_step: int, anneal_steps: int,
                 swa_lr: float):
        self.schedule, self.start_step, self.anneal_steps, self.swa_lr = schedule, start_step, anneal_steps, swa_lr
        super().__init__(optimizer, param_group_field='lr', t_in_epochs=False)

    def _get_lr(self, t: int) -> list:
        # _get_lr(t), the lrs at step t, is what every timm Scheduler defines (timm 1.0.31; tests/test_swa.py checks
        # the result step by step); step_update() would set them on the optimizer
        starts = self.schedule._get_lr(self.start_step)
        share = min(1.0, (t - self.start_step) / self.anneal_steps) if self.anneal_steps > 0 else 1.0
        alpha = (1 - math.cos(math.pi * share)) / 2  # SWALR's anneal_strategy='cos'
        return [self.swa_lr * alpha + start * (1 - alpha) for start in starts]

    def step_update(self, num_updates: int, metric: Optional[float] = None):
        self.schedule.step_update(num_updates, metric)
        if num_updates >= self.start_step:
            super().step_update(num_updates, metric)


def build_scheduler(config: dict, optimizer, steps_per_epoch: int):
    """The run's schedule (see run_schedule), handed over to SwaScheduler from swa_start_epoch on when swa_lr is set."""
    schedule = run_schedule(config, optimizer, steps_per_epoch)
    if config['swa_lr'] is None:
        return schedule
    return SwaScheduler(optimizer, schedule, config['swa_start_epoch'] * steps_per_epoch,
                        config['swa_anneal_epochs'] * steps_per_epoch, config['swa_lr'])


def run_schedule(config: dict, optimizer, steps_per_epoch: int):
    """timm's scheduler, stepped every optimizer step: the lr is a function of the step alone.

    'triangular' (FFCV's cyclic schedule) is timm's poly schedule of power 1 after a warmup prefix: linear up to lr at
    warmup_epochs, linear down to min_lr at epochs. FFCV interpolates per step between its per-epoch values, which is
    the same line for a whole number of warmup epochs (tests/test_schedule.py compares them step by step).
    """
    if config['sched'] == 'ffcv_step':
        return FfcvStepScheduler(optimizer, config['epochs'], config['decay_epochs'], config['decay_rate'],
                                 steps_per_epoch)
    if config['sched'] == 'onecycle':
        momentum = config['onecycle_momentum']
        return OneCycleScheduler(optimizer, config['epochs'] * steps_per_epoch, config['onecycle_pct_start'],
                                 config['onecycle_div_factor'], config['onecycle_final_div_factor'],
                                 tuple(momentum) if momentum else None)
    sched, epochs, power, prefix = config['sched'], config['epochs'], config['decay_rate'], False
    if sched == 'triangular':
        sched, epochs, power, prefix = 'poly', epochs - config['warmup_epochs'], 1.0, True
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=epochs, warmup_epochs=config['warmup_epochs'], warmup_prefix=prefix,
        warmup_lr=config['warmup_lr'], min_lr=config['min_lr'], decay_epochs=config['decay_epochs'],
        decay_milestones=config['decay_milestones'], decay_rate=power,
        step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return scheduler


@dataclass
class Trainer:
    """What a training step touches."""
    model: torch.nn.Module  # unwrapped: saved, evaluated, and averaged by the EMA and SWA
    train_model: torch.nn.Module  # the model as trained: DDP and/or torch.compile around `model`
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: object
    mixup: Optional[Mixup]
    random_erasing: Optional[object]
    model_ema: Optional[ModelEmaV3]
    ema_interval: int  # optimizer steps between EMA updates
    model_swa: Optional[AveragedModel]  # updated at the end of each epoch from swa_start_epoch on
    swa_start_epoch: Optional[int]
    batchnorm: Optional[BatchNormSteps]  # None: a single process without accumulation needs no averaging
    scaler: Optional[NativeScaler]  # float16 only
    amp_dtype: Optional[torch.dtype]
    clip_grad: Optional[float]  # None: no gradient clipping
    clip_mode: str
    clip_params: list  # what clipping applies to
    distill: Optional[torch.nn.Module] = None  # timm's LogitDistillationTask around train_model, with the teacher


def build_trainer(config: dict, procs: Processes, layout: BatchLayout, model: torch.nn.Module,
                  num_classes: int, steps_per_epoch: int) -> Trainer:
    device = procs.device
    if config['sync_bn'] and procs.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if config['channels_last']:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model)
    # ModelEmaV3: the same average as V2 in one foreach update (V2 updates tensor by tensor, ~6% of a GPU step)
    model_ema = ModelEmaV3(model, decay=config['model_ema_decay']) if config['model_ema'] else None
    # equal weights for every epoch averaged; its BatchNorm statistics are recomputed, not averaged (swa_batchnorm)
    model_swa = AveragedModel(model) if config['swa_start_epoch'] is not None else None
    train_model = model
    if procs.distributed:
        # BatchNormSteps keeps the processes' BN statistics equal; no need to broadcast them every forward
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=False)
    if config['torchcompile']:
        train_model = torch.compile(train_model)
    mixup = build_mixup(config, num_classes, layout.micro_batch)
    amp_dtype = getattr(torch, config['amp_dtype']) if config['amp'] else None
    loss_fn = build_loss(config['bce_loss'], config['smoothing'], mixing=mixup is not None,
                         target_threshold=config['bce_target_thresh'])
    task = None
    if config['kd_teacher']:
        teacher = distill.build_teacher(config['kd_teacher'], num_classes, device, config['channels_last'])
        if config['torchcompile']:
            teacher.compile()
        train_cfg = data_configs(config, model)[0]
        task = distill.build_distillation(config, train_model, loss_fn, teacher, train_cfg['mean'], train_cfg['std'],
                                          device)
    return Trainer(
        model=model, train_model=train_model, optimizer=optimizer,
        scheduler=build_scheduler(config, optimizer, steps_per_epoch), loss_fn=loss_fn, mixup=mixup,
        random_erasing=create_random_erasing(config, device), model_ema=model_ema,
        ema_interval=config['model_ema_interval'], model_swa=model_swa, swa_start_epoch=config['swa_start_epoch'],
        batchnorm=BatchNormSteps(model, procs) if (procs.distributed or layout.accum_steps > 1) else None,
        scaler=NativeScaler(device.type) if amp_dtype == torch.float16 else None, amp_dtype=amp_dtype,
        clip_grad=config['clip_grad'], clip_mode=config['clip_mode'],
        clip_params=clipped_parameters(model, config['clip_mode']), distill=task)


# saving

class Checkpoints:
    """Saves the run's state (on rank 0) and remembers what was saved.

    A save takes a snapshot of the state (a CPU copy of the weights and optimizer) and writes it in the background
    while training goes on; the next save and the run's end wait for it, so the run's end knows what was saved.
    A save that fails (disk full, permissions) is logged and training goes on: the next save may succeed, and a
    spot VM's time is not wasted. The run's end says when its newest state is not saved (exit code 74).
    """

    def __init__(self, saver: Optional[RunCheckpointSaver], procs: Processes, config: dict, data_fingerprint: dict,
                 metric_weights: Optional[str], wandb_run_id: Optional[str]):
        self.saver, self.procs = saver, procs
        self.config, self.data_fingerprint = config, data_fingerprint
        self.metric_weights = metric_weights  # raw, ema or swa: the weights that earned the newest epoch its metric
        self.wandb_run_id = wandb_run_id
        self.versions = checkpoint.versions()
        self.last_time = time.monotonic()
        self.saved = None  # the newest state this process saved, in words
        self.unsaved = None  # why the newest state could not be saved; None once a save succeeds
        self.writing = checkpoint.BackgroundSave()  # rank 0's save in flight
        self.pending = None  # what the save in flight saves, in words, on every process

    def epoch_end(self, progress: Progress, metric: float, metric_weights: str):
        epoch = progress.epoch - 1
        self.metric_weights = metric_weights
        self._save(f'the epoch {epoch} checkpoint', progress, lambda state: self.saver.save_epoch(epoch, metric, state))

    def mid_epoch(self, progress: Progress):
        name = f'recovery-{progress.epoch}-{progress.step}'
        _logger.info(f'Saving recovery checkpoint {name}')
        epoch, step = progress.epoch, progress.step
        self._save(f'recovery checkpoint {name}', progress,
                   lambda state: self.saver.save_mid_epoch(epoch, step, state))

    def run_state(self, progress: Progress) -> dict:
        """What a checkpoint holds besides timm's fields, as plain types."""
        return dict(config=saved_config(self.config), progress=dataclasses.asdict(progress),
                    rng=checkpoint.rng_state(), data=self.data_fingerprint, versions=self.versions,
                    world_size=self.procs.world_size, metric_weights=self.metric_weights,
                    wandb_run_id=self.wandb_run_id)

    def _save(self, what: str, progress: Progress, write):
        """Snapshot the state now and write(state) it in the background, after the previous save has finished."""
        self.wait()
        if self.procs.is_primary:
            state = dict(self.saver.snapshot(), **self.run_state(progress))
            self.writing.start(lambda: self._write(what, write, state))
        self.pending = what
        self.last_time = time.monotonic()

    def _write(self, what: str, write, state: dict) -> Optional[str]:
        """In the background: write the state; returns why it could not be (None: saved)."""
        try:
            write(state)
            return None
        except (OSError, RuntimeError) as e:
            error = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
            _logger.error(f'ERROR: could not save {what} ({error}); training continues. The newest saved state '
                          f'is {self.saved or "none: nothing has been saved yet"}')
            return error

    def wait(self):
        """Wait for the save in flight; its outcome, shared by every process, updates `saved` and `unsaved`."""
        if self.pending is None:
            return
        error = self.writing.wait() if self.procs.is_primary else None
        error = distributed.broadcast_object(error, self.procs)
        if error is None:
            self.saved, self.unsaved = self.pending, None
        else:
            self.unsaved = error
        self.pending = None


def recovery_due(config: dict, progress: Progress, last_save: float) -> bool:
    steps_due = (config['recovery_interval'] > 0) and (progress.global_step % config['recovery_interval'] == 0)
    minutes = config['recovery_minutes']
    return steps_due or ((minutes > 0) and (time.monotonic() - last_save >= minutes * 60))


# the epoch loop

def forward_backward(t: Trainer, x: torch.Tensor, y: torch.Tensor, last_micro: bool, accum: int,
                     channels_last: bool) -> torch.Tensor:
    """One micro-batch: batch augmentation, forward, backward (gradients synchronised on the last one).

    Returns:
        The loss, detached; with a teacher, [loss, task loss, distillation loss].
    """
    if t.random_erasing is not None:
        x = t.random_erasing(x)
    if t.mixup is not None:
        x, y = t.mixup(x, y)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    no_sync = getattr(t.train_model, 'no_sync', None)
    with no_sync() if (no_sync is not None and not last_micro) else nullcontext():
        with autocast(x.device, t.amp_dtype):
            if t.distill is None:
                loss = t.loss_fn(t.train_model(x), y)
                parts = [loss]
            else:  # the teacher sees this batch: after Mixup/CutMix and erasing, in this AMP and memory format
                out = t.distill(x, y)
                loss = out['loss']
                parts = [loss, out['task_loss'], out['kd_loss']]
        if t.scaler is not None:  # float16: the scaler's backward, and its unscale-clip-step on the last micro-batch
            t.scaler(loss / accum, t.optimizer, clip_grad=t.clip_grad, clip_mode=t.clip_mode,
                     parameters=t.clip_params, need_update=last_micro)
        else:
            (loss / accum).backward()
    return torch.stack(parts).detach().float()


def optimizer_step(t: Trainer):
    """Clip, step (the float16 scaler stepped in its backward already), and clear the gradients."""
    if t.scaler is None:
        if t.clip_grad is not None:
            dispatch_clip_grad(t.clip_params, t.clip_grad, mode=t.clip_mode)
        t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)


def train_one_epoch(t: Trainer, loader, progress: Progress, config: dict, procs: Processes, layout: BatchLayout,
                    steps_per_epoch: int, checkpoints: Checkpoints, reporter: reporting.Reporter,
                    stop: StopRequest) -> dict:
    """Train from progress.step to the end of progress.epoch, updating `progress` after every optimizer step.

    After each optimizer step, in this order: show progress; agree with the other processes on stopping and on a
    recovery save; check the losses since the last check are finite (before anything is logged or saved); log;
    save a recovery checkpoint; stop.

    Returns:
        Speed of the steps this call ran: img_per_sec, data_wait (share of the time spent waiting for data).
    """
    t.train_model.train()
    accum, device = layout.accum_steps, procs.device
    loss_sum = torch.tensor(progress.loss_sum, dtype=torch.float64, device=device)
    step_loss = 0.0  # this step's losses: [loss], or [loss, task loss, distillation loss] with a teacher
    window, window_first_step = [], progress.step  # step losses not yet checked and logged
    first_step = progress.step
    epoch_start = clock = window_start = fetched = time.perf_counter()
    wait = epoch_wait = 0.0
    for i, (x, y) in enumerate(loader):
        waited = time.perf_counter() - fetched
        wait, epoch_wait = wait + waited, epoch_wait + waited

        # micro-batch j of this step: seeded by (seed, epoch, step, micro-batch) for Mixup, erasing and drop path
        j = i % accum
        last_micro = j == accum - 1
        seed_all(derive_seed(config['seed'], STEP, progress.epoch, progress.step, procs.rank * accum + j))
        if t.batchnorm is not None:
            t.batchnorm.before_micro(j)
        step_loss = step_loss + forward_backward(t, x, y, last_micro, accum, config['channels_last']) / accum
        if t.batchnorm is not None:
            t.batchnorm.after_micro()
        if not last_micro:
            fetched = time.perf_counter()
            continue

        # the optimizer step, BatchNorm statistics, EMA, SWA at the epoch's end, and the lr of the next step
        optimizer_step(t)
        if t.batchnorm is not None:
            t.batchnorm.end_step(accum)
        if (t.model_ema is not None) and ((progress.global_step + 1) % t.ema_interval == 0):
            t.model_ema.update(t.model)
        if swa_due(t, progress.epoch) and (progress.step + 1 == steps_per_epoch):
            t.model_swa.update_parameters(t.model)  # in the step: a save from here on holds it, and is not repeated
        progress.step += 1
        progress.global_step += 1
        t.scheduler.step_update(num_updates=progress.global_step)
        loss_sum += step_loss[0]
        window.append(step_loss)
        step_loss = 0.0

        # decisions, agreed by all processes: log, save a recovery checkpoint, stop
        reporter.tick(progress.epoch, progress.step, steps_per_epoch)
        stop_now, save_due = stop.agreed(recovery_due(config, progress, checkpoints.last_time))
        save_due = save_due and (progress.step < steps_per_epoch)  # the epoch's end saves anyway
        log_due = (progress.step % config['log_interval'] == 0) or (progress.step == steps_per_epoch)
        if log_due or save_due or stop_now:
            losses = mean_over_ranks(torch.stack(window), procs)  # [steps, parts]
            finite = torch.isfinite(losses).all(dim=1)
            if not finite.all():  # a diverged state is never saved
                raise NonFiniteLoss(progress.epoch, window_first_step + int((~finite).nonzero()[0]))
        if log_due:
            elapsed = time.perf_counter() - window_start
            steps_done = progress.step - window_first_step
            step_time = elapsed / steps_done
            steps_left = (config['epochs'] - progress.epoch) * steps_per_epoch - progress.step
            parts = dict(zip(('task_loss', 'kd_loss'), losses[:, 1:].mean(dim=0).tolist()))
            reporter.step(dict(
                epoch=progress.epoch, step=progress.step, steps_per_epoch=steps_per_epoch,
                global_step=progress.global_step, loss=losses[:, 0].mean().item(), **parts,
                lr=t.optimizer.param_groups[0]['lr'], img_per_sec=steps_done * layout.global_batch / elapsed,
                data_wait=wait / elapsed, eta_epoch=(steps_per_epoch - progress.step) * step_time,
                eta_run=steps_left * step_time))
            window, window_first_step, wait = [], progress.step, 0.0
            window_start = time.perf_counter()
        if save_due or stop_now:
            progress.loss_sum = mean_over_ranks(loss_sum, procs).item()
            now = time.perf_counter()
            progress.spend(now - clock, procs.world_size)
            clock = now
            checkpoints.mid_epoch(progress)
        if stop_now:
            raise Interrupted()
        fetched = time.perf_counter()
    progress.loss_sum = mean_over_ranks(loss_sum, procs).item()
    now = time.perf_counter()
    progress.spend(now - clock, procs.world_size)
    seconds = max(now - epoch_start, 1e-9)
    return dict(img_per_sec=(progress.step - first_step) * layout.global_batch / seconds,
                data_wait=epoch_wait / seconds)


def summary_row(epoch: int, progress: Progress, steps_per_epoch: int, lr: float, img_size: int, speed: dict,
                results: dict, bad_images: int, price_per_hour: Optional[float]) -> dict:
    """Args:
        results: evaluate()'s result of each weights kind evaluated: raw, and ema and swa where evaluated.
        price_per_hour: of one device; the epoch's cost and the run's so far (at this price) when given.
    """
    raw = results['raw']
    row = dict(epoch=epoch, train_loss=progress.loss_sum / steps_per_epoch, lr=lr, img_size=img_size,
               val_loss=raw['loss'], val_top1=raw['top1'], val_top5=raw['top5'],
               epoch_seconds=progress.seconds, img_per_sec=speed['img_per_sec'], data_wait=speed['data_wait'],
               bad_images=bad_images)
    before = progress.history[-1].get('total_gpu_hours') if progress.history else None  # older runs had none
    hours = progress.device_seconds / 3600
    row.update(gpu_hours=hours, total_gpu_hours=(before or 0.0) + hours)
    if price_per_hour is not None:
        row.update(cost=row['gpu_hours'] * price_per_hour, total_cost=row['total_gpu_hours'] * price_per_hour)
    for kind in ('ema', 'swa'):
        if kind in results:
            row.update({f'{kind}_val_{k}': results[kind][k] for k in ('loss', 'top1', 'top5')})
    return row


def bad_images_met(train_count: int, loaders: Loaders, procs: Processes) -> int:
    """Unreadable files met (each replaced, and logged with its path once) since the last epoch, over all processes.

    Args:
        train_count: those of the training loader's epoch report, taken before the SWA BatchNorm pass met its first
            files again.
    """
    count = train_count + loaders.val.epoch_report().count
    return int(sum_over_ranks(torch.tensor(count, device=procs.device), procs))


def swa_due(t: Trainer, epoch: int) -> bool:
    """Whether epoch's end updates the SWA average, and its evaluation includes it."""
    return (t.model_swa is not None) and (epoch >= t.swa_start_epoch)


def swa_batchnorm(t: Trainer, loaders: Loaders, epoch: int, config: dict, procs: Processes,
                  layout: BatchLayout) -> float:
    """Recompute the BatchNorm statistics of the SWA average (torch's update_bn) from the first swa_bn_batches
    training batches of `epoch` (at most the epoch), before its evaluation; returns the seconds it took.

    The same batches whether or not the run was interrupted: the training sampler at (epoch, 0) draws the same images
    with the same augmentation (seeded by position), and the drop path of each forward is seeded right before it, as
    training seeds its micro-batches, whatever the loader drew meanwhile; so a resumed run recomputes the same
    statistics, and any number of processes the same as one. Batch augmentation (Mixup, CutMix, random erasing) is left
    out, as torch's update_bn takes the loader's batches.
    """
    def seeded(batches):
        for i, batch in enumerate(batches):
            step, j = divmod(i, layout.accum_steps)
            seed_all(derive_seed(config['seed'], SWA_BN, epoch, step, procs.rank * layout.accum_steps + j))
            yield batch
    start = time.perf_counter()
    steps = min(config['swa_bn_batches'], loaders.steps_per_epoch)
    loaders.sampler.set_position(epoch, 0)
    recompute_batchnorm(t.model_swa.module, seeded(itertools.islice(loaders.train, steps * layout.accum_steps)),
                        procs, t.amp_dtype, config['channels_last'])
    loaders.train.epoch_report()  # the unreadable files it met again were counted in training
    return time.perf_counter() - start


def export_model(run_dir: Path) -> Path:
    """tools/export.py's folder of the run's best checkpoint, at run_dir/model: written beside it first, then swapped
    in, so that an interruption never leaves a half-written model/."""
    from tools import export
    final, new, old = run_dir / 'model', run_dir / 'model.tmp', run_dir / 'model.old'
    for leftover in (new, old):  # of an export cut short
        shutil.rmtree(leftover, ignore_errors=True)
    export.export(str(run_dir / 'model_best.pth.tar'), new)
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def log_model(config: dict, checkpoints: Checkpoints, reporter: reporting.Reporter, history: list, procs: Processes,
              aliases: list):
    """wandb_log_model: export the best checkpoint and log it as the run's model artifact (rank 0; every process
    waits for the checkpoint save in flight, which is agreed on by all)."""
    checkpoints.wait()
    if (not procs.is_primary) or (reporter.wandb is None) or checkpoints.unsaved:
        return
    value, weights, epoch = reporting.best_of(history, config['eval_metric'])
    folder = export_model(reporter.run_dir)
    reporter.wandb.log_model(folder, [*aliases, f'epoch-{epoch}'],
                             dict(epoch=epoch, weights=weights, **{config['eval_metric']: value}))
    _logger.info(f'Model of epoch {epoch} ({weights} weights) exported to {folder} and logged to W&B as '
                 f"model-{reporter.wandb.run_id}:{' '.join(aliases)}")


def fit(config: dict, procs: Processes, layout: BatchLayout, t: Trainer, loaders: Loaders, progress: Progress,
        checkpoints: Checkpoints, reporter: reporting.Reporter, stop: StopRequest, class_names: list) -> int:
    """Epoch after epoch: train, evaluate raw, EMA and SWA weights, report, save; returns the exit code.

    Args:
        class_names: the dataset's, in label order ('' where it names none), for the per-class top-1 of the end.
    """
    steps_per_epoch = loaders.steps_per_epoch
    numerics = dict(amp_dtype=t.amp_dtype, channels_last=config['channels_last'], eval_flip=config['eval_flip'],
                    stop=stop, num_classes=len(class_names))
    first_epoch = progress.epoch
    while progress.epoch < config['epochs']:
        epoch = progress.epoch
        speed = dict(img_per_sec=None, data_wait=None)  # none when resumed with only evaluation left
        img_size = loaders.sizes.at(epoch)
        if loaders.sizes.start is not None:
            _logger.info(f'Epoch {epoch}: training images of {img_size} px')
        if progress.step < steps_per_epoch:
            loaders.sampler.set_position(epoch, progress.step)
            speed = train_one_epoch(t, loaders.train, progress, config, procs, layout, steps_per_epoch,
                                    checkpoints, reporter, stop)
        train_bad_images = loaders.train.epoch_report().count
        models = {'raw': t.model}
        if t.model_ema is not None:
            models['ema'] = t.model_ema.module
        if swa_due(t, epoch):
            progress.spend(swa_batchnorm(t, loaders, epoch, config, procs, layout), procs.world_size)
            models['swa'] = t.model_swa.module
        try:  # raw, EMA and SWA weights in one pass over the validation images
            results = dict(zip(models, evaluate(list(models.values()), loaders.val, procs, **numerics)))
        except Interrupted:  # saved with its evaluation pending
            checkpoints.mid_epoch(progress)
            raise
        progress.spend(results['raw']['seconds'], procs.world_size)
        row = summary_row(epoch, progress, steps_per_epoch, t.optimizer.param_groups[0]['lr'], img_size, speed,
                          results, bad_images_met(train_bad_images, loaders, procs), config['price_per_hour'])
        metric, metric_weights = reporting.ranking_metric(row, config['eval_metric'])
        progress.history.append(row)
        progress.epoch, progress.step, progress.loss_sum = epoch + 1, 0, 0.0
        progress.seconds = progress.device_seconds = 0.0
        # W&B first: a crash before the checkpoint repeats the epoch, and W&B keeps one copy of a step
        reporter.epoch(row, progress.history, progress.global_step)
        # the run's end: top-1 per class of the weights ranked first; before the checkpoint, which would leave a
        # crash in between nothing to evaluate again
        if progress.epoch == config['epochs']:
            classes = per_class.class_rows(results[metric_weights], class_names, metric_weights)
            reporter.class_top1(classes, epoch, progress.global_step)
        checkpoints.epoch_end(progress, metric, metric_weights)
        best = reporting.best_of(progress.history, config['eval_metric'])
        reporter.best(config['eval_metric'], *best, progress.global_step)
        if (config['wandb_log_model'] == 'best') and (best[2] == epoch):
            log_model(config, checkpoints, reporter, progress.history, procs, ['best', 'latest'])
        if stop.agreed()[0]:
            raise Interrupted()
    checkpoints.wait()
    if checkpoints.unsaved:
        _logger.error(f'ERROR: training finished, but its final state was not saved ({checkpoints.unsaved}); the '
                      f'newest saved state is {checkpoints.saved or "none"}. Free space and run the same command '
                      'again to train from there and save it')
        return EXIT_NOT_SAVED
    if (config['wandb_log_model'] == 'end') and (first_epoch < config['epochs']):  # not again on a finished run
        log_model(config, checkpoints, reporter, progress.history, procs, ['best', 'latest'])
    if progress.history:
        value, weights, epoch = reporting.best_of(progress.history, config['eval_metric'])
        _logger.info(f"Finished: best {config['eval_metric']} {value:.2f} ({weights} weights) at epoch {epoch}; "
                     f'{reporting.cost_words(progress.history[-1], hours_unit(procs))}')
        best = reporter.run_dir / 'model_best.pth.tar'
        _logger.info(f'Best model: {best}. Next: python validate.py --checkpoint {best}; python tools/export.py '
                     f'--checkpoint {best} --out export/{reporter.run_dir.name}')
    return 0


# wiring

def hours_unit(procs: Processes) -> str:
    """What the run's hours are hours of: GPU-hours on CUDA, CPU-hours (of whole machines, one per process) else."""
    return 'GPU' if procs.device.type == 'cuda' else 'CPU'


def measure_decode_share(t: Trainer, loaders: Loaders, progress: Progress, config: dict, procs: Processes) -> tuple:
    """The fastest cpu_decode_share on this machine and {share: img/s} (decode_choice.choose_share).

    The trial steps run forward and backward on the first batches of the current epoch, with no optimizer step; the
    BatchNorm statistics they change are put back, so training starts from the same state.
    """
    buffers = [b.detach().clone() for b in t.model.buffers()]
    loaders.sampler.set_position(min(progress.epoch, config['epochs'] - 1), 0)
    t.train_model.train()

    def step(x, y):
        forward_backward(t, x, y, False, 1, config['channels_last'])  # not the last micro-batch: no update
        t.optimizer.zero_grad(set_to_none=True)

    def agree(speeds: list) -> list:
        return mean_over_ranks(torch.tensor(speeds, dtype=torch.float64, device=procs.device), procs).tolist()
    share, speeds = choose_share(loaders.train, step, sync=lambda: torch.cuda.synchronize(procs.device), agree=agree)
    with torch.no_grad():
        for buffer, saved in zip(t.model.buffers(), buffers):
            buffer.copy_(saved)
    return share, speeds


def claim_run_folder(config: dict, procs: Processes) -> tuple:
    """The run folder, locked by rank 0 for the life of the run: (path, its RunFolderLock or None).

    A run that stops with an error before train() closes the lock releases it as the lock is garbage-collected, and a
    folder that this run created and wrote nothing into (bad input) goes with it.
    """
    run_dir = checkpoint.run_folder(config['output'], config['experiment'])
    lock = None

    def claim():
        nonlocal lock
        lock = checkpoint.RunFolderLock(run_dir)
    distributed.on_primary(claim, procs)
    return run_dir, lock


def resume_or_start(config: dict, procs: Processes, run_dir: Path, t: Trainer, datasets: Datasets,
                    steps_per_epoch: int) -> tuple:
    """Load the newest checkpoint (or --resume) into the components, or start afresh or from initial weights.

    Returns:
        (progress, the checkpoint's state or None)
    """
    if config['start_over']:  # refused now, before the weights load, rather than once the files are deleted
        distributed.on_primary(lambda: checkpoint.start_over_files(run_dir, config['initial_checkpoint']), procs)
    path, state = (None, None) if config['start_over'] else \
        checkpoint.find_resume_state(config['resume'], run_dir, procs)
    if state is None:
        if config['initial_checkpoint']:
            checkpoint.load_initial_weights(t.model, config['initial_checkpoint'], config['initial_weights'])
            if t.model_ema is not None:
                t.model_ema.set(t.model)
        return Progress(), None
    checkpoint.check_resume(config, state, path, datasets.fingerprint)
    progress = checkpoint.restore(state, t.model, t.model_ema, t.model_swa, t.optimizer, t.scaler,
                                  same_optimizer=state['config']['opt'] == config['opt'])
    if progress.epoch >= config['epochs']:
        _logger.info(f"The run in {run_dir} is finished ({config['epochs']} epochs): nothing left to train (more "
                     'epochs: --epochs N --allow-config-change; a new run: --experiment NAME)')
    else:
        _logger.info(f'Resuming {path}: epoch {progress.epoch}, step {progress.step}/{steps_per_epoch}')
    return progress, state


def rescaling_lines(config: dict) -> list:
    """What a batch_size (or EMA interval) given on the command line did to lr and the EMA decay, in words."""
    lines = []
    if config['lr_rescaled_from']:
        lr, batch = config['lr_rescaled_from']
        lines.append(f"batch_size {batch} -> {config['batch_size']}: lr {lr:g} -> {config['lr']:g} "
                     f"({config['lr_scale']} rule)")
    if config['ema_decay_rescaled_from']:
        decay, batch, interval = config['ema_decay_rescaled_from']
        changes = [f'{name} {old} -> {new}' for name, old, new in (
            ('batch_size', batch, config['batch_size']), ('model_ema_interval', interval, config['model_ema_interval']))
            if old != new]
        images, recipe_images = config['batch_size'] * config['model_ema_interval'], batch * interval
        lines.append(f"{', '.join(changes)}: model_ema_decay {decay:g} -> {config['model_ema_decay']:.8g} (an EMA "
                     f'update every {images:,} images instead of {recipe_images:,}: decay ** '
                     f'{images / recipe_images:g}, the same horizon in images)')
    return lines


def log_start(config: dict, procs: Processes, layout: BatchLayout, run_dir: Path):
    for line in rescaling_lines(config):
        _logger.info(line)
    _logger.info(f"Run folder {run_dir}: {procs.world_size} process(es) on {procs.device}, global batch "
                 f"{layout.global_batch} = {procs.world_size} x {layout.accum_steps} x {layout.micro_batch}")


def train(config: dict, procs: Processes) -> int:
    """Build the run from its config, resume or start it, and train it to the end of its schedule."""
    # Pillow imports its format plugins on first use, and matplotlib's savefig (curves.png, drawn by a thread) imports
    # them all: a loader worker forked while that thread held a plugin's import lock waited on it for ever (an
    # evaluation that never started, seen in CI). Imported here, before any thread, no import is left to hold a lock.
    PIL.Image.init()
    layout = BatchLayout.create(config['batch_size'], procs.world_size, config['max_batch_per_device'])
    display = reporting.setup_logging(procs.is_primary, procs.rank)  # lines are kept until log.txt can be opened
    run_dir, lock = claim_run_folder(config, procs)
    # set either way: a second run in the same process (a test, a notebook) gets its own setting, not the last run's
    torch.use_deterministic_algorithms(config['deterministic'], warn_only=True)
    torch.backends.cudnn.benchmark = not config['deterministic']

    # every input is checked (data, model, optimizer, checkpoints) before --start-over deletes anything
    root, dataset = distributed.on_primary(lambda: locate_dataset(config['data_dir'], config['dataset']), procs)
    datasets = open_datasets(root, dataset, config['train_split'], config['val_split'], config['num_classes'])
    model = build_model(config, datasets.num_classes)
    steps_per_epoch = epoch_steps(len(datasets.train), layout)
    t = build_trainer(config, procs, layout, model, datasets.num_classes, steps_per_epoch)
    progress, state = resume_or_start(config, procs, run_dir, t, datasets, steps_per_epoch)
    decode, share, why = resolve_input_path(config, datasets, model, procs.device, state and state['config'])
    config.update(decode=decode, cpu_decode_share=share)  # the choice of decode: auto, recorded with the config
    loaders = build_loaders(config, datasets, model, layout, procs)
    t.scheduler.step_update(num_updates=progress.global_step)
    if procs.is_primary:
        if config['start_over']:
            checkpoint.clear_run_folder(run_dir, config['initial_checkpoint'])
        reporting.log_to_file(run_dir)
    log_start(config, procs, layout, run_dir)
    speeds = None
    if (decode == 'gpu') and (share is None):
        config['cpu_decode_share'], speeds = measure_decode_share(t, loaders, progress, config, procs)
    _logger.info(choice_line(decode, config['cpu_decode_share'], why, speeds))

    saver = None
    if procs.is_primary:
        saver = RunCheckpointSaver(
            t.model, t.optimizer, model_ema=t.model_ema, model_swa=t.model_swa, amp_scaler=t.scaler,
            checkpoint_dir=str(run_dir), recovery_dir=str(run_dir), decreasing=config['eval_metric'] == 'loss',
            max_history=config['checkpoint_hist'])
        if state is not None:
            saver.load_state_dict(state['saver'])
            saver.restore_recovery_files(run_dir)
    wandb_logger = None
    if procs.is_primary and config['log_wandb']:
        extra = dict(saved_config(config), environment=reporting.environment(procs.world_size),
                     versions=checkpoint.versions(), data=datasets.fingerprint,
                     decode_choice=dict(why=why, img_per_sec={f'{s:g}': v for s, v in (speeds or {}).items()}))
        wandb_logger = reporting.WandbLogger(config, run_dir, state and state.get('wandb_run_id'), extra)
    reporter = reporting.Reporter(run_dir, procs.is_primary, display, config['epochs'], wandb_logger,
                                  unit=hours_unit(procs))
    if procs.is_primary:
        save_config(config, run_dir / 'config.yaml')
        reporter.files(progress.history)
    checkpoints = Checkpoints(saver, procs, config, datasets.fingerprint, state and state.get('metric_weights'),
                              wandb_logger.run_id if wandb_logger else None)
    stop = StopRequest(procs)
    stop.install()
    try:
        return fit(config, procs, layout, t, loaders, progress, checkpoints, reporter, stop,
                   datasets.fingerprint['class_names'] or [''] * datasets.num_classes)
    except Interrupted:
        checkpoints.wait()
        if checkpoints.unsaved:
            _logger.error(f'ERROR: interrupted, and the state could not be saved ({checkpoints.unsaved}); the newest '
                          f'saved state is {checkpoints.saved or "none"}')
            return EXIT_NOT_SAVED
        _logger.warning(f'Interrupted: {checkpoints.saved} saved; run the same command again to continue')
        return EXIT_INTERRUPTED
    finally:
        loaders.train.close()  # first: a worker still alive could hold up W&B's finish (see WandbLogger)
        loaders.val.close()
        reporter.finish()  # before the handlers go: a signal must not cut W&B's upload short
        stop.uninstall()
        checkpoints.writing.wait()  # a crash too lets the save in flight finish, in the locked run folder
        if lock is not None:
            lock.close()


# dry run: what a command would train, for how long and at what cost, without training

IMAGENET_TRAIN_IMAGES = 1_281_167  # ImageNet-1k's train split (ILSVRC 2012), what tools/prepare_imagenet.py finds


def hours_text(hours: float) -> str:
    return f'{hours:,.1f}' if hours >= 1 else f'{hours:.2g}'


def count_train_images(config: dict) -> tuple:
    """(training images or None, where the number comes from or why it is missing), opening no more than needed."""
    if (config['dataset'] == 'builtin') and not config['data_dir'] and not BUILTIN_ROOT.exists():
        return None, f'the built-in shapes are generated at {BUILTIN_ROOT} by the first run'
    root, dataset = locate_dataset(config['data_dir'], config['dataset'])
    if not dataset and not root.is_dir():
        if (config['data_dir'] is None) and (config['num_classes'] in (None, 1000)):  # a recipe of ImageNet-1k
            return IMAGENET_TRAIN_IMAGES, (f"ImageNet-1k's train split; not at {root} yet: set --data-dir or "
                                           'IMAGENET_DIR once it is')
        return None, f'no dataset at {root} (set --data-dir or IMAGENET_DIR)'
    try:
        manifest = read_manifest(root)
        split = manifest['splits'].get(config['train_split']) if manifest else None
        if split:
            return split['images'], f'manifest of tools/prepare_imagenet.py at {root}'
        return len(open_image_folder(root, config['train_split'], dataset)), f'counted at {root}'
    except UserError as e:
        return None, str(e)


def epoch_ranges(ranges: list) -> str:
    """'160 px epochs 0-11, 192 px epochs 12-15' from ImageSizes.ranges()."""
    return ', '.join(f'{size} px epoch{"s" if last > first else ""} {first}{f"-{last}" if last > first else ""}'
                     for first, last, size in ranges)


def dry_run_lines(config: dict, world_size: int) -> list:
    """What `--dry-run` prints: the batch layout, lr and EMA after rescaling, steps, image sizes, time and cost."""
    layout = BatchLayout.create(config['batch_size'], world_size, config['max_batch_per_device'])
    with torch.device('meta'):  # the model's default input size, without allocating its weights
        model = build_model(config, config['num_classes'] or 1000)
    train_cfg, val_cfg = data_configs(config, model)
    sizes = image_sizes(config, train_cfg['input_size'][-1])
    images, source = count_train_images(config)
    ema = (f"decay {config['model_ema_decay']:.8g} per update, every {config['model_ema_interval']} optimizer "
           'step(s)') if config['model_ema'] else 'off'
    swa = 'off'
    if config['swa_start_epoch'] is not None:
        lr = (f"lr to {config['swa_lr']:g} over {config['swa_anneal_epochs']} epoch(s)" if config['swa_lr'] is not None
              else "the run's lr schedule")
        swa = (f"average of the epoch ends from epoch {config['swa_start_epoch']} on, {lr}; BatchNorm from "
               f"{config['swa_bn_batches']} batches")
    # a recipe for device auto is planned for GPUs (it may be planned on a laptop); device: cpu (the quickstart) runs
    # on CPU processes
    on_cpu = config['device'] == 'cpu'
    devices, device, unit = ('CPU process(es)', 'process', 'CPU') if on_cpu else ('GPU(s)', 'GPU', 'GPU')
    lines = [
        f"Dry run of {config['experiment']} on {world_size} {devices} (WORLD_SIZE=N for N): nothing is written",
        f'global batch:   {layout.global_batch} = {world_size} {devices} x {layout.accum_steps} accumulated x '
        f'{layout.micro_batch} per device',
        f"lr:             {config['lr']:g} ({config['sched']} schedule, {config['epochs']} epochs, warmup "
        f"{config['warmup_epochs']:g})",
        f'EMA:            {ema}',
        f'SWA:            {swa}',
        *(f"{'rescaled:' if i == 0 else '':16}{line}" for i, line in enumerate(rescaling_lines(config))),
        f"image size:     {epoch_ranges(sizes.ranges(config['epochs']))}; validation {val_cfg['input_size'][-1]} px "
        f"(crop_pct {val_cfg['crop_pct']:g})",
    ]
    step_cost = 1.0  # a training step's cost per image, in plain steps of the student
    if config['kd_teacher']:
        size = train_cfg['input_size'][-1]
        teacher, student, step_cost = distill.step_cost(config, model, size)
        lines.append(f"teacher:        {config['kd_teacher']}: {teacher / 1e9:.1f} GFLOPs per image forward at "
                     f'{size} px, {teacher / student:.1f}x the student\'s; a step costs ~{step_cost:.2f}x a plain one '
                     '(its forward, backward = 2 forwards, and the teacher\'s forward)')
    if images is None:
        return lines + [f'train images:   unknown: {source}', 'steps, time and cost need the number of images']
    steps = epoch_steps(images, layout)  # the last partial batch of an epoch is left out; none: the run's error
    per_epoch = steps * layout.global_batch
    trained = config['epochs'] * per_epoch
    lines += [f'train images:   {images:,} ({source})',
              f"steps:          {steps:,} per epoch, {config['epochs'] * steps:,} in all ({per_epoch:,} images per "
              f'epoch, {trained:,} in all)']
    if config['throughput'] is None:
        return lines + [f'expected time:  throughput not given: pass --throughput (img/s per {device}) from '
                        'tools/benchmark.py']
    throughput = config['throughput'] / step_cost
    seconds = trained / (throughput * world_size)
    gpu_hours = seconds * world_size / 3600
    upper_bound = '; the epochs at smaller sizes run faster: an upper bound' if sizes.start is not None else ''
    teacher = f' / {step_cost:.2f} for the teacher' if config['kd_teacher'] else ''
    lines.append(f"expected time:  {reporting.duration(seconds)} on {world_size} {devices} at {throughput:,g} "
                 f'img/s per {device} (given by --throughput{teacher}{upper_bound})')
    if config['price_per_hour'] is None:
        return lines + [f'cost:           {hours_text(gpu_hours)} {unit}-hours (pass --price-per-hour for the price)']
    return lines + [f"cost:           {hours_text(gpu_hours)} {unit}-hours x {config['price_per_hour']:g} = "
                    f"{gpu_hours * config['price_per_hour']:,.2f}"]


def dry_run(config: dict) -> int:
    try:
        world_size = int(os.environ.get('WORLD_SIZE', '1'))
    except ValueError:
        world_size = 0
    if world_size < 1:
        raise UserError(f"WORLD_SIZE must be a number of processes, 1 or more, got {os.environ['WORLD_SIZE']!r}")
    print('\n'.join(dry_run_lines(config, world_size)))
    return 0


def main(argv=None) -> int:
    procs = None
    try:
        config = parse_config(argv)
        if config['dry_run']:
            return dry_run(config)
        if config['deterministic']:  # cuBLAS reads it when CUDA starts
            os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        procs = distributed.setup(config['device'], config['dist_timeout'], config['sync_bn'])
        return train(config, procs)
    except UserError as e:
        print(f'train.py: error: {e}', file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLoss as e:
        _logger.error(f'ERROR: {e}')
        return EXIT_NONFINITE
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f'train.py: error: {e.strerror}: {e.filename or "writing the run folder"}; nothing of this start is '
              'saved: free space and run the same command again', file=sys.stderr)
        return EXIT_NOT_SAVED
    finally:
        if procs is not None:
            distributed.teardown(procs)


if __name__ == '__main__':
    sys.exit(main())
