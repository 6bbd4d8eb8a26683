#!/usr/bin/env python
"""Train an image classifier from a YAML recipe with timm's components; resumes by itself after any interruption.

    python train.py -c recipes/rn50_130ep.yaml [--flag value ...]
    torchrun --nproc_per_node=8 train.py -c recipes/rn50_130ep.yaml

Exit codes: 0 finished, 1 crashed, 2 bad input, 3 non-finite loss, 75 interrupted by a signal after saving a
recovery checkpoint (run the same command again to continue), 128+N a second signal N (exit without saving).
"""
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV2, NativeScaler, distribute_bn

import model_defs  # noqa: F401  registers resnet50_custom
from training import checkpoint, distributed, reporting
from training.checkpoint import Progress, RunCheckpointSaver
from training.config import UserError, experiment_changes, parse_config, save_config, saved_config
from training.data import (BatchLayout, create_datasets, create_eval_loader, create_random_erasing,
                           create_train_loader, data_configs, seed_all)
from training.engine import Interrupted, NonFiniteLoss, Trainer, evaluate, train_one_epoch

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
    path = None
    if procs.is_primary:
        had_checkpoints = bool(checkpoint.run_files(run_dir))
        path, _ = checkpoint.newest_valid(run_dir)
        if had_checkpoints and path is None:
            path = ''
    path = distributed.broadcast_object(None if path is None else str(path), procs)
    if path == '':
        raise UserError(f'{run_dir} holds checkpoints but none loads; pass --start-over to train from scratch')
    return (path, checkpoint.load(path)) if path else (None, None)


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
    head = model.get_classifier(name_only=True)
    if weights.get(f'{head}.weight') is not None and weights[f'{head}.weight'].shape[0] != model.num_classes:
        weights = {k: v for k, v in weights.items() if not k.startswith(head + '.')}
        _logger.info(f'Classifier of {path} has another class count: it starts from scratch')
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if not k.startswith(head + '.')]:
        raise UserError(f'{path} does not fit {config["model"]}: missing {missing[:3]}, unexpected {unexpected[:3]}')
    _logger.info(f"Initial weights: {config['initial_weights']} weights of {path}")


def summary_row(epoch: int, progress: Progress, steps_per_epoch: int, lr: float, timing: dict, raw: dict,
                ema: dict) -> dict:
    row = dict(epoch=epoch, train_loss=progress.loss_sum / steps_per_epoch, lr=lr,
               val_loss=raw['loss'], val_top1=raw['top1'], val_top5=raw['top5'],
               epoch_seconds=timing['seconds'], img_per_sec=timing['img_per_sec'], data_wait=timing['data_wait'])
    if ema:
        row.update(ema_val_loss=ema['loss'], ema_val_top1=ema['top1'], ema_val_top5=ema['top5'])
    return row


def ranking_metric(row: dict, metric: str) -> tuple:
    """(value, weights kind) of the better of the raw and EMA weights for the ranking metric."""
    candidates = [(row[f'val_{metric}'], 'raw')]
    if row.get(f'ema_val_{metric}') is not None:
        candidates.append((row[f'ema_val_{metric}'], 'ema'))
    return (min if metric == 'loss' else max)(candidates, key=lambda c: c[0])


def best_of(history: list, metric: str) -> tuple:
    """(value, weights kind, epoch) of the best epoch of a run."""
    ranked = [(*ranking_metric(row, metric), int(row['epoch'])) for row in history]
    return (min if metric == 'loss' else max)(ranked, key=lambda r: r[0])


def main(argv=None) -> int:
    try:
        config = parse_config(argv)
        procs = distributed.setup(config['device'], config['dist_timeout'])
    except UserError as e:
        print(f'train.py: error: {e}', file=sys.stderr)
        return EXIT_USAGE
    try:
        return train(config, procs)
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


def train(config: dict, procs) -> int:
    layout = BatchLayout.create(config['batch_size'], procs.world_size, config['max_batch_per_device'])
    run_dir = Path(config['output']) / config['experiment']
    if procs.is_primary:
        run_dir = prepare_run_dir(config)
    distributed.barrier(procs)
    reporting.setup_logging(run_dir, procs.is_primary, procs.rank)
    if config['lr_rescaled_from']:
        lr, batch = config['lr_rescaled_from']
        _logger.info(f"batch_size {batch} -> {config['batch_size']}: lr {lr:g} -> {config['lr']:g} "
                     f"({config['lr_scale']} rule)")
    _logger.info(f"Run folder {run_dir}: {procs.world_size} process(es) on {procs.device}, global batch "
                 f"{layout.global_batch} = {procs.world_size} x {layout.accum_steps} x {layout.micro_batch}")
    if config['deterministic']:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not config['deterministic']
    device = procs.device

    # data and model
    train_ds, val_ds, num_classes = create_datasets(config)
    data_fingerprint = dict(train_images=len(train_ds), val_images=len(val_ds), classes=num_classes)
    model = build_model(config, num_classes)
    train_cfg, val_cfg = data_configs(config, model)
    train_loader, sampler = create_train_loader(train_ds, config, train_cfg, layout, procs.rank, device)
    steps_per_epoch = sampler.steps_per_epoch
    val_loader = create_eval_loader(val_ds, val_cfg, config['validation_batch_size'] or layout.micro_batch,
                                    config['workers'], device, procs.rank, procs.world_size)
    mixup = build_mixup(config, num_classes)
    if mixup is not None and layout.micro_batch % 2:
        raise UserError(f'Mixup/CutMix need an even micro-batch, got {layout.micro_batch}')
    if config['sync_bn'] and procs.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if config['channels_last']:
        model.to(memory_format=torch.channels_last)

    # optimisation
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    model_ema = ModelEmaV2(model, decay=config['model_ema_decay']) if config['model_ema'] else None
    amp_dtype = getattr(torch, config['amp_dtype']) if config['amp'] else None
    scaler = NativeScaler(device.type) if amp_dtype == torch.float16 else None

    # resume, or start from scratch or from initial weights
    path, state = find_resume_state(config, run_dir, procs)
    progress = Progress()
    if state is not None:
        check_resume(config, state, path, num_classes, data_fingerprint)
        model.load_state_dict(state['state_dict'])
        if model_ema is not None:
            model_ema.module.load_state_dict(checkpoint.weights_from(state, 'ema', path))
        if state['config']['opt'] == config['opt']:
            optimizer.load_state_dict(state['optimizer'])
        else:
            _logger.warning('WARNING: the optimizer changed, its state (momentum, moments) starts afresh')
        if scaler is not None and scaler.state_dict_key in state:
            scaler.load_state_dict(state[scaler.state_dict_key])
        checkpoint.set_rng_state(state['rng'])
        progress = checkpoint.progress_from(state)
        _logger.info(f'Resuming {path}: epoch {progress.epoch}, step {progress.step}/{steps_per_epoch}')
    elif config['initial_checkpoint']:
        load_initial_weights(model, config)
        if model_ema is not None:
            model_ema.set(model)

    train_model = model
    if procs.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    if config['torchcompile']:
        train_model = torch.compile(train_model)

    trainer = Trainer(
        model=model, train_model=train_model, optimizer=optimizer, scheduler=scheduler,
        loss_fn=build_loss(config, mixing=mixup is not None), mixup=mixup,
        random_erasing=create_random_erasing(config, device), model_ema=model_ema, scaler=scaler, layout=layout,
        procs=procs, amp_dtype=amp_dtype, channels_last=config['channels_last'], clip_grad=config['clip_grad'],
        clip_mode=config['clip_mode'], seed=config['seed'], log_interval=config['log_interval'],
        epochs=config['epochs'])

    # checkpoints: what each one holds besides timm's fields
    save_info = dict(metric_weights=None)
    run_versions = checkpoint.versions()

    def run_state() -> dict:
        return dict(config=saved_config(config), progress=checkpoint.progress_state(progress),
                    rng=checkpoint.rng_state(), data=data_fingerprint, versions=run_versions,
                    world_size=procs.world_size, metric_weights=save_info['metric_weights'])

    saver = RunCheckpointSaver(model, optimizer, model_ema=model_ema, amp_scaler=scaler, checkpoint_dir=str(run_dir),
                               recovery_dir=str(run_dir), decreasing=config['eval_metric'] == 'loss',
                               max_history=config['checkpoint_hist'], run_state=run_state)
    if procs.is_primary:
        if state is not None:
            saver.load_state_dict(state['saver'])
            saver.restore_recovery_files(run_dir)
        save_config(config, run_dir / 'config.yaml')
        reporting.write_summary(run_dir, progress.history)
    state = None  # the checkpoint's tensors are in the model now; free them

    last_save = [time.monotonic()]

    def save_or_warn(save, what: str):
        """Save on rank 0; a failed save is reported loudly and training goes on (the last good file stays)."""
        if procs.is_primary:
            try:
                save()
            except (OSError, RuntimeError) as e:
                _logger.error(f'ERROR: could not save the {what} checkpoint ({e}); the previous checkpoints are '
                              'intact and training continues')
        last_save[0] = time.monotonic()
        distributed.barrier(procs)

    def save_recovery():
        save_or_warn(lambda: saver.save_recovery(progress.epoch, progress.step), 'recovery')

    stop = distributed.StopRequest(procs)

    def decide() -> tuple:
        steps_due = config['recovery_interval'] > 0 and progress.global_step % config['recovery_interval'] == 0
        minutes = config['recovery_minutes']
        time_due = minutes > 0 and time.monotonic() - last_save[0] >= minutes * 60
        stop_now, time_due = stop.agreed(time_due)
        return stop_now, (steps_due or time_due) and progress.step < steps_per_epoch

    def log_step(metrics: dict):
        _logger.info(reporting.step_line(metrics))

    def should_stop() -> bool:
        return stop.agreed()[0]

    stop.install()
    try:
        while progress.epoch < config['epochs']:
            epoch = progress.epoch
            timing = dict(seconds=0.0, img_per_sec=0.0, data_wait=0.0)
            if progress.step < steps_per_epoch:
                sampler.set_position(epoch, progress.step)
                timing = train_one_epoch(trainer, train_loader, progress, steps_per_epoch, decide, save_recovery,
                                         log_step)
            lr = optimizer.param_groups[0]['lr']
            try:
                if procs.distributed and not config['sync_bn']:
                    distribute_bn(model, procs.world_size, reduce=True)
                raw = evaluate(model, val_loader, procs, amp_dtype, config['channels_last'], should_stop=should_stop)
                ema = None
                if model_ema is not None:
                    ema = evaluate(model_ema.module, val_loader, procs, amp_dtype, config['channels_last'],
                                   should_stop=should_stop)
            except Interrupted:
                save_recovery()
                raise
            row = summary_row(epoch, progress, steps_per_epoch, lr, timing, raw, ema)
            metric, save_info['metric_weights'] = ranking_metric(row, config['eval_metric'])
            progress.history.append(row)
            progress.epoch, progress.step, progress.loss_sum = epoch + 1, 0, 0.0
            save_or_warn(lambda: saver.save_checkpoint(epoch, metric), 'epoch')
            if procs.is_primary:
                reporting.write_summary(run_dir, progress.history)
            _logger.info(reporting.epoch_line(row))
            if should_stop():
                raise Interrupted()
    finally:
        stop.uninstall()
    if progress.history:
        value, weights, epoch = best_of(progress.history, config['eval_metric'])
        _logger.info(f"Finished: best {config['eval_metric']} {value:.2f} ({weights} weights) at epoch {epoch}; "
                     f"run folder {run_dir}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
