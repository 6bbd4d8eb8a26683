#!/usr/bin/env python
"""Train an image classifier from a YAML recipe with timm's components; resumes by itself after any interruption.

    python train.py -c recipes/rn50_130ep.yaml [--flag value ...]
    torchrun --nproc_per_node=8 train.py -c recipes/rn50_130ep.yaml

Exit codes: 0 finished, 1 crashed, 2 bad input, 3 non-finite loss, 75 interrupted by a signal after saving a
recovery checkpoint (run the same command again to continue), 128+N a second signal N (exit without saving).
"""
import dataclasses
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV2, NativeScaler

import model_defs  # noqa: F401  registers resnet50_custom
from training import checkpoint, distributed, reporting
from training.checkpoint import Progress, RunCheckpointSaver
from training.config import UserError, experiment_changes, parse_config, save_config, saved_config
from training.data import (BatchLayout, create_datasets, create_eval_loader, create_random_erasing,
                           create_train_loader, data_configs, prepare_builtin_data, seed_all)
from training.engine import BatchNormSteps, Interrupted, NonFiniteLoss, Trainer, evaluate, train_one_epoch

_logger = logging.getLogger('train')

EXIT_USAGE, EXIT_NONFINITE, EXIT_INTERRUPTED = 2, 3, 75


def build_model(config: dict, num_classes: int) -> torch.nn.Module:
    seed_all(config['seed'])
    try:
        return create_model(config['model'], num_classes=num_classes, drop_rate=config['drop_rate'],
                            drop_path_rate=config['drop_path_rate'], zero_init_last=config['zero_init_last'])
    except RuntimeError as e:
        raise UserError(str(e).splitlines()[0]) from None


def build_mixup(config: dict, num_classes: int):
    if not (config['mixup'] > 0 or config['cutmix'] > 0 or config['cutmix_minmax']):
        return None
    return Mixup(mixup_alpha=config['mixup'], cutmix_alpha=config['cutmix'], cutmix_minmax=config['cutmix_minmax'],
                 prob=config['mixup_prob'], switch_prob=config['mixup_switch_prob'], mode=config['mixup_mode'],
                 label_smoothing=config['smoothing'], num_classes=num_classes)


def build_loss(config: dict, mixing: bool):
    """Soft-target cross-entropy when Mixup/CutMix makes the targets (smoothing included), else label smoothing."""
    if config['bce_loss']:
        return BinaryCrossEntropy(smoothing=0.0 if mixing else config['smoothing'])
    if mixing:
        return SoftTargetCrossEntropy()
    if config['smoothing'] > 0:
        return LabelSmoothingCrossEntropy(smoothing=config['smoothing'])
    return torch.nn.CrossEntropyLoss()


def build_optimizer(config: dict, model: torch.nn.Module):
    extra = {k: v for k, v in (('eps', config['opt_eps']), ('betas', config['opt_betas'])) if v is not None}
    try:
        return create_optimizer_v2(model, opt=config['opt'], lr=config['lr'], weight_decay=config['weight_decay'],
                                   momentum=config['momentum'], filter_bias_and_bn=True, **extra)
    except (AssertionError, ValueError, TypeError) as e:
        raise UserError(f"optimizer {config['opt']!r}: {e}") from None


def build_scheduler(config: dict, optimizer, steps_per_epoch: int):
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=config['sched'], num_epochs=config['epochs'], warmup_epochs=config['warmup_epochs'],
        warmup_lr=config['warmup_lr'], min_lr=config['min_lr'], decay_epochs=config['decay_epochs'],
        decay_milestones=config['decay_milestones'], decay_rate=config['decay_rate'],
        step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return scheduler


def prepare_run_dir(config: dict) -> Path:
    """Create the run folder, refuse one that cannot be written, and clear it on --start-over."""
    run_dir = Path(config['output']) / config['experiment']
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / '.write-test'
        probe.write_text('ok')
        probe.unlink()
    except OSError as e:
        raise UserError(f'cannot write to the run folder {run_dir}: {e.strerror or e}') from None
    if config['start_over']:
        for path in run_dir.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    return run_dir


def find_resume_state(config: dict, run_dir: Path, procs) -> tuple:
    """(path, state) to resume from: --resume, else the newest valid checkpoint in the run folder, else None."""
    if config['resume']:
        return config['resume'], checkpoint.load(config['resume'])

    found = {}

    def newest() -> Optional[str]:
        path, found['state'] = checkpoint.newest_valid(run_dir)
        if (path is None) and checkpoint.run_files(run_dir, '.corrupt'):
            raise UserError(f'{run_dir} holds checkpoints but none loads; pass --start-over to train from scratch')
        return None if path is None else str(path)
    path = distributed.on_primary(newest, procs)
    if path is None:
        return None, None
    return path, found.get('state') or checkpoint.load(path)  # rank 0 has loaded it already


def check_resume(config: dict, state: dict, path, num_classes: int, data_fingerprint: dict):
    checkpoint.check_compatible(state, path, config['model'], num_classes)
    changes = experiment_changes(state['config'], config)
    if state.get('data') and state['data'] != data_fingerprint:
        changes.append(f"data: {state['data']} -> {data_fingerprint}")
    if changes and not config['allow_config_change']:
        raise UserError(f"resuming {path} would change the experiment ({'; '.join(changes)}); "
                        'pass --allow-config-change to resume anyway')
    for change in changes:
        _logger.warning(f'WARNING: resuming with a changed setting: {change}')


def load_initial_weights(model: torch.nn.Module, config: dict):
    path = config['initial_checkpoint']
    weights = checkpoint.weights_from(checkpoint.load(path), config['initial_weights'], path)
    head = model.pretrained_cfg['classifier']
    if weights.get(f'{head}.weight') is not None and weights[f'{head}.weight'].shape[0] != model.num_classes:
        weights = {k: v for k, v in weights.items() if not k.startswith(head + '.')}
        _logger.info(f'Classifier of {path} has another class count: it starts from scratch')
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if not k.startswith(head + '.')]:
        raise UserError(f'{path} does not fit {config["model"]}: missing {missing[:3]}, unexpected {unexpected[:3]}')
    _logger.info(f"Initial weights: {config['initial_weights']} weights of {path}")


def summary_row(epoch: int, progress: Progress, steps_per_epoch: int, lr: float, speed: dict, raw: dict,
                ema: dict) -> dict:
    row = dict(epoch=epoch, train_loss=progress.loss_sum / steps_per_epoch, lr=lr,
               val_loss=raw['loss'], val_top1=raw['top1'], val_top5=raw['top5'],
               epoch_seconds=progress.seconds, img_per_sec=speed['img_per_sec'], data_wait=speed['data_wait'])
    if ema:
        row.update(ema_val_loss=ema['loss'], ema_val_top1=ema['top1'], ema_val_top5=ema['top5'])
    return row


def resume_state(config: dict, state: dict, model, model_ema, optimizer, scaler) -> Progress:
    """Load a checkpoint's full training state into the components; returns where the run stands."""
    model.load_state_dict(state['state_dict'])
    if model_ema is not None:
        if 'state_dict_ema' in state:
            model_ema.module.load_state_dict(state['state_dict_ema'])
        else:
            _logger.warning('WARNING: the checkpoint has no EMA weights; the EMA starts from the current weights')
            model_ema.set(model)
    if state['config']['opt'] == config['opt']:
        settings = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
        optimizer.load_state_dict(state['optimizer'])
        for group, setting in zip(optimizer.param_groups, settings):  # this run's weight decay, betas, ...
            group.update(setting)
    else:
        _logger.warning('WARNING: the optimizer changed, its state (momentum, moments) starts afresh')
    if scaler is not None and scaler.state_dict_key in state:
        scaler.load_state_dict(state[scaler.state_dict_key])
    checkpoint.set_rng_state(state['rng'])
    return Progress(**state['progress'])


class Run:
    """One training run: its components, where it stands, and how it saves and reports.

    Built from a resolved config in the order of the recipe (data, model, optimisation, resume, checkpoints,
    reporting); fit() then trains epoch after epoch until the schedule ends or a signal stops it.
    """

    def __init__(self, config: dict, procs):
        self.config, self.procs = config, procs
        self.layout = BatchLayout.create(config['batch_size'], procs.world_size, config['max_batch_per_device'])
        self.run_dir = Path(distributed.on_primary(lambda: str(prepare_run_dir(config)), procs))
        display = reporting.setup_logging(self.run_dir, procs.is_primary, procs.rank)
        self._log_start()
        if config['deterministic']:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = not config['deterministic']

        model, mixup = self._build_data_and_model()
        optimizer = build_optimizer(config, model)
        scheduler = build_scheduler(config, optimizer, self.steps_per_epoch)
        model_ema = ModelEmaV2(model, decay=config['model_ema_decay']) if config['model_ema'] else None
        self.amp_dtype = getattr(torch, config['amp_dtype']) if config['amp'] else None
        scaler = NativeScaler(procs.device.type) if self.amp_dtype == torch.float16 else None
        state = self._resume_or_start(model, model_ema, optimizer, scaler)
        scheduler.step_update(num_updates=self.progress.global_step)  # the lr is a function of the step alone
        self.trainer = self._build_trainer(model, mixup, optimizer, scheduler, model_ema, scaler)
        self._build_checkpoints_and_reporting(state, display)
        self.stop = distributed.StopRequest(procs)
        self.last_save = time.monotonic()

    def _build_data_and_model(self) -> tuple:
        config, procs, device = self.config, self.procs, self.procs.device
        distributed.on_primary(lambda: prepare_builtin_data(config), procs)
        train_ds, val_ds, self.num_classes = create_datasets(config)
        self.data_fingerprint = dict(train_images=len(train_ds), val_images=len(val_ds), classes=self.num_classes)
        model = build_model(config, self.num_classes)
        train_cfg, val_cfg = data_configs(config, model)
        self.train_loader, self.sampler = create_train_loader(train_ds, config, train_cfg, self.layout, procs.rank,
                                                              device)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        val_batch = config['validation_batch_size'] or self.layout.micro_batch
        self.val_loader = create_eval_loader(val_ds, val_cfg, val_batch, config['workers'], device, procs.rank,
                                             procs.world_size)
        mixup = build_mixup(config, self.num_classes)
        if (mixup is not None) and (self.layout.micro_batch % 2):
            raise UserError(f'Mixup/CutMix need an even micro-batch, got {self.layout.micro_batch}')
        if config['sync_bn'] and procs.distributed:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(device)
        if config['channels_last']:
            model.to(memory_format=torch.channels_last)
        return model, mixup

    def _resume_or_start(self, model, model_ema, optimizer, scaler) -> Optional[dict]:
        """Resume the run folder's newest checkpoint (or --resume), else start afresh or from initial weights."""
        config = self.config
        path, state = find_resume_state(config, self.run_dir, self.procs)
        self.progress = Progress()
        if state is not None:
            check_resume(config, state, path, self.num_classes, self.data_fingerprint)
            self.progress = resume_state(config, state, model, model_ema, optimizer, scaler)
            _logger.info(f'Resuming {path}: epoch {self.progress.epoch}, step '
                         f'{self.progress.step}/{self.steps_per_epoch}')
        elif config['initial_checkpoint']:
            load_initial_weights(model, config)
            if model_ema is not None:
                model_ema.set(model)
        return state

    def _build_trainer(self, model, mixup, optimizer, scheduler, model_ema, scaler) -> Trainer:
        config, procs, device = self.config, self.procs, self.procs.device
        train_model = model
        if procs.distributed:
            # BatchNormSteps keeps the processes' BN statistics equal; no need to broadcast them every forward
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=False)
        if config['torchcompile']:
            train_model = torch.compile(train_model)
        averaging_bn = procs.distributed or (self.layout.accum_steps > 1)
        return Trainer(
            model=model, train_model=train_model, optimizer=optimizer, scheduler=scheduler,
            loss_fn=build_loss(config, mixing=mixup is not None), mixup=mixup,
            random_erasing=create_random_erasing(config, device), model_ema=model_ema,
            batchnorm=BatchNormSteps(model, procs) if averaging_bn else None,
            scaler=scaler, layout=self.layout, procs=procs, amp_dtype=self.amp_dtype,
            channels_last=config['channels_last'], clip_grad=config['clip_grad'], clip_mode=config['clip_mode'],
            seed=config['seed'], log_interval=config['log_interval'], epochs=config['epochs'])

    def _build_checkpoints_and_reporting(self, state: Optional[dict], display):
        config, procs, t = self.config, self.procs, self.trainer
        self.metric_weights = None
        self.versions = checkpoint.versions()
        self.saver = RunCheckpointSaver(
            t.model, t.optimizer, model_ema=t.model_ema, amp_scaler=t.scaler, checkpoint_dir=str(self.run_dir),
            recovery_dir=str(self.run_dir), decreasing=config['eval_metric'] == 'loss',
            max_history=config['checkpoint_hist'], run_state=self.run_state)
        wandb_logger = None
        if procs.is_primary and config['log_wandb']:
            extra = dict(saved_config(config), environment=reporting.environment(procs.world_size),
                         versions=self.versions)
            wandb_logger = reporting.WandbLogger(config, self.run_dir, state and state.get('wandb_run_id'), extra)
        self.reporter = reporting.Reporter(self.run_dir, procs.is_primary, display, config['epochs'], wandb_logger)
        if procs.is_primary:
            if state is not None:
                self.saver.load_state_dict(state['saver'])
                self.saver.restore_recovery_files(self.run_dir)
            save_config(config, self.run_dir / 'config.yaml')
            self.reporter.files(self.progress.history)

    def _log_start(self):
        config, layout = self.config, self.layout
        if config['lr_rescaled_from']:
            lr, batch = config['lr_rescaled_from']
            _logger.info(f"batch_size {batch} -> {config['batch_size']}: lr {lr:g} -> {config['lr']:g} "
                         f"({config['lr_scale']} rule)")
        _logger.info(f"Run folder {self.run_dir}: {self.procs.world_size} process(es) on {self.procs.device}, "
                     f"global batch {layout.global_batch} = {self.procs.world_size} x {layout.accum_steps} x "
                     f"{layout.micro_batch}")

    def run_state(self) -> dict:
        """What a checkpoint holds besides timm's fields."""
        return dict(config=saved_config(self.config), progress=dataclasses.asdict(self.progress),
                    rng=checkpoint.rng_state(), data=self.data_fingerprint, versions=self.versions,
                    world_size=self.procs.world_size, metric_weights=self.metric_weights,
                    wandb_run_id=self.reporter.wandb.run_id if self.reporter.wandb else None)

    def _save(self, save, what: str):
        """Save on rank 0; a failed save is reported loudly and training goes on (the last good file stays)."""
        if self.procs.is_primary:
            try:
                save()
            except (OSError, RuntimeError) as e:
                _logger.error(f'ERROR: could not save the {what} checkpoint ({e}); the previous checkpoints are '
                              'intact and training continues')
        self.last_save = time.monotonic()
        distributed.barrier(self.procs)

    def save_recovery(self):
        epoch, step = self.progress.epoch, self.progress.step
        _logger.info(f'Saving recovery checkpoint recovery-{epoch}-{step}')
        self._save(lambda: self.saver.save_recovery(epoch, step), 'recovery')

    def after_step(self) -> tuple:
        """After each optimizer step: show progress, and agree on (stop now, save a recovery checkpoint now)."""
        progress, config = self.progress, self.config
        self.reporter.tick(progress.epoch, progress.step, self.steps_per_epoch)
        steps_due = (config['recovery_interval'] > 0) and (progress.global_step % config['recovery_interval'] == 0)
        minutes = config['recovery_minutes']
        time_due = (minutes > 0) and (time.monotonic() - self.last_save >= minutes * 60)
        stop_now, time_due = self.stop.agreed(time_due)
        return stop_now, (steps_due or time_due) and (progress.step < self.steps_per_epoch)

    def should_stop(self) -> bool:
        return self.stop.agreed()[0]

    def evaluate_both(self) -> tuple:
        """Raw and EMA weights on the validation set; a stop signal saves (evaluation pending) and exits."""
        kwargs = dict(amp_dtype=self.amp_dtype, channels_last=self.config['channels_last'],
                      should_stop=self.should_stop)
        try:
            raw = evaluate(self.trainer.model, self.val_loader, self.procs, **kwargs)
            ema = None
            if self.trainer.model_ema is not None:
                ema = evaluate(self.trainer.model_ema.module, self.val_loader, self.procs, **kwargs)
        except Interrupted:
            self.save_recovery()
            raise
        return raw, ema

    def fit(self) -> int:
        progress, config = self.progress, self.config
        self.stop.install()
        try:
            while progress.epoch < config['epochs']:
                epoch = progress.epoch
                speed = dict(img_per_sec=None, data_wait=None)  # none when resumed with only evaluation left
                if progress.step < self.steps_per_epoch:
                    self.sampler.set_position(epoch, progress.step)
                    speed = train_one_epoch(self.trainer, self.train_loader, progress, self.steps_per_epoch,
                                            self.after_step, self.save_recovery, self.reporter.step)
                lr = self.trainer.optimizer.param_groups[0]['lr']
                raw, ema = self.evaluate_both()
                progress.seconds += raw['seconds'] + (ema['seconds'] if ema else 0.0)
                row = summary_row(epoch, progress, self.steps_per_epoch, lr, speed, raw, ema)
                metric, self.metric_weights = reporting.ranking_metric(row, config['eval_metric'])
                progress.history.append(row)
                progress.epoch, progress.step, progress.loss_sum, progress.seconds = epoch + 1, 0, 0.0, 0.0
                # W&B first: a crash before the checkpoint repeats the epoch, and W&B keeps one copy of a step
                self.reporter.epoch(row, progress.history, progress.global_step)
                self._save(lambda: self.saver.save_checkpoint(epoch, metric), 'epoch')
                self.reporter.best('top1', *reporting.best_of(progress.history, 'top1'))
                if self.should_stop():
                    raise Interrupted()
        finally:
            self.reporter.finish()  # before the handlers go: a signal must not cut W&B's upload short
            self.stop.uninstall()
        if progress.history:
            value, weights, epoch = reporting.best_of(progress.history, config['eval_metric'])
            _logger.info(f"Finished: best {config['eval_metric']} {value:.2f} ({weights} weights) at epoch {epoch}; "
                         f"run folder {self.run_dir}")
        return 0


def main(argv=None) -> int:
    try:
        config = parse_config(argv)
        if config['deterministic']:  # cuBLAS reads it when CUDA starts
            os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        procs = distributed.setup(config['device'], config['dist_timeout'], config['sync_bn'])
    except UserError as e:
        print(f'train.py: error: {e}', file=sys.stderr)
        return EXIT_USAGE
    try:
        return Run(config, procs).fit()
    except UserError as e:
        print(f'train.py: error: {e}', file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLoss as e:
        _logger.error(f'ERROR: {e}')
        return EXIT_NONFINITE
    except Interrupted:
        _logger.warning('Interrupted: recovery checkpoint saved; run the same command again to continue')
        return EXIT_INTERRUPTED
    finally:
        distributed.teardown(procs)


if __name__ == '__main__':
    sys.exit(main())
