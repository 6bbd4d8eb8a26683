"""What the recipes schedule: image size per epoch (progressive resizing), FFCV's lr schedule, the EMA's interval and
its rescaling with the batch size, BCE's target threshold, and the plan that --dry-run prints."""
import json
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import train
from training.config import UserError, parse_config, save_config
from training.data import (BatchLayout, ImageSizes, TrainBatchSampler, create_train_loader, image_samples, image_sizes,
                           open_image_folder)
from training.distributed import Processes
from training.data.device_path import create_gpu_train_loader
from training.reporting import TIMING_COLUMNS, duration

from conftest import assert_same_weights, load, lr_schedule, run_train, spawn_train, summary

CPU = torch.device('cpu')
DATA_CFG = dict(input_size=(3, 64, 64), interpolation='bilinear', mean=(0.485, 0.456, 0.406),
                std=(0.229, 0.224, 0.225), crop_pct=0.875, crop_mode='center')


def write_recipe(tmp_path, text: str) -> str:
    path = tmp_path / 'recipe.yaml'
    path.write_text(text)
    return str(path)


def ffcv_resolution(epoch, min_res, max_res, end_ramp, start_ramp):
    """FFCV's ImageNetTrainer.get_resolution (libffcv/ffcv-imagenet, train_imagenet.py), the reference."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    return int(np.round(np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0] / 32)) * 32


# (epochs, start_ramp, end_ramp, min_res, max_res): FFCV's rn50_configs/rn50_16_epochs.yaml and rn50_88_epochs.yaml,
# and a wider ramp whose middle sizes round both ways
@pytest.mark.parametrize('epochs, first, last, start, final', [(16, 11, 13, 160, 192), (88, 65, 76, 160, 192),
                                                                (40, 3, 30, 128, 256)])
def test_image_size_per_epoch_is_ffcvs_ramp(epochs, first, last, start, final):
    sizes = ImageSizes(final, start, (first, last))
    expected = [ffcv_resolution(e, start, final, last, first) for e in range(epochs)]
    assert [sizes.at(e) for e in range(epochs)] == expected
    runs = sizes.ranges(epochs)
    assert [e for a, b, _ in runs for e in range(a, b + 1)] == list(range(epochs))
    assert all(sizes.at(e) == size for a, b, size in runs for e in range(a, b + 1))
    assert ImageSizes(final).ranges(epochs) == [(0, epochs - 1, final)]


@pytest.mark.parametrize('argv, message', [
    (['--img-size-start', '160'], 'img_size_start and resize_epochs go together'),
    (['--resize-epochs', '1', '2'], 'img_size_start and resize_epochs go together'),
    (['--img-size-start', '160', '--resize-epochs', '5', '3'], 'resize_epochs must be [start, end] with start <= end'),
    (['--img-size-start', '160', '--resize-epochs', '5', '101'], 'resize_epochs ends at epoch 101, after the last'),
    (['--img-size', '128', '--img-size-start', '160', '--resize-epochs', '1', '2', '--dry-run'],
     'img_size_start 160 is larger than the final training size 128'),
    (['--sched', 'ffcv_step', '--warmup-epochs', '1'], 'sched ffcv_step has no warmup and ends at 0'),
    (['--bce-target-thresh', '0.2'], 'bce_target_thresh applies to the BCE loss'),
    (['--bce-loss', '--bce-target-thresh', '1.5'], 'bce_target_thresh: expected a number between 0 and 1'),
    (['--model-ema-interval', '0'], 'model_ema_interval: expected a positive integer'),
    (['--throughput', '0', '--dry-run'], 'throughput: expected a positive number'),
])
def test_inconsistent_schedule_settings_stop_with_one_line(capsys, argv, message):
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def progressive(*args: str) -> dict:
    return parse_config(['--img-size', '64', '--img-size-start', '32', '--resize-epochs', '0', '1', *args])


def test_cpu_loader_trains_each_epoch_at_its_size_with_the_same_workers(shapes):
    config = progressive('-j', '1')
    layout = BatchLayout.create(8, 1, None)
    loader, sampler = create_train_loader(open_image_folder(shapes, 'train'), config, DATA_CFG, layout, 0, CPU,
                                          image_sizes(config, 64))
    try:
        first = next(iter(loader))[0]
        workers = [w.pid for w in loader.loader._iterator._workers]  # torch keeps persistent workers there
        sampler.set_position(1, 3)  # as a run resumed in the middle of epoch 1
        resumed = [x for x, _ in loader]
        assert [w.pid for w in loader.loader._iterator._workers] == workers
    finally:
        loader.close()
    # each size is timm's training transform at that size: the batches of a fixed-size run at the same position
    for size, epoch, step, batch in ((32, 0, 0, first), (64, 1, 3, resumed[0])):
        fixed, fixed_sampler = create_train_loader(open_image_folder(shapes, 'train'), parse_config(['-j', '0']),
                                                   dict(DATA_CFG, input_size=(3, size, size)), layout, 0, CPU)
        fixed_sampler.set_position(epoch, step)
        assert batch.shape == (8, 3, size, size) and torch.equal(batch, next(iter(fixed))[0])
    assert len(resumed) == sampler.steps_per_epoch - 3


@pytest.mark.parametrize('cpu_share', [0.0, 0.5])
def test_gpu_decoding_trains_each_epoch_at_its_size(shapes, cpu_share):
    config = progressive('-j', '0')
    layout = BatchLayout.create(8, 1, None)
    samples = image_samples(open_image_folder(shapes, 'train'))
    loader, sampler = create_train_loader(open_image_folder(shapes, 'train'),
                                          dict(config, decode='gpu', cpu_decode_share=cpu_share), DATA_CFG, layout, 0,
                                          CPU, image_sizes(config, 64))
    first = next(iter(loader))[0]
    sampler.set_position(1, 3)
    resumed = next(iter(loader))[0]
    for size, epoch, step, batch in ((32, 0, 0, first), (64, 1, 3, resumed)):
        fixed_sampler = TrainBatchSampler(len(samples), layout, 0, config['seed'])
        fixed_sampler.set_position(epoch, step)
        fixed = create_gpu_train_loader(samples, dict(parse_config(['-j', '0']), cpu_decode_share=cpu_share),
                                        dict(DATA_CFG, input_size=(3, size, size)), fixed_sampler, CPU)
        assert batch.shape == (8, 3, size, size) and torch.equal(batch, next(iter(fixed))[0])


# 2 epochs of 5 steps: 32 px, then 40 px; one EMA update, after the 10th and last step (timm's tiny test_resnet)
RESIZED = ('--img-size-start', '32', '--img-size', '40', '--resize-epochs', '0', '1', '--model-ema-interval', '10',
           '--model', 'test_resnet', '--recovery-interval', '2', '--deterministic')


@pytest.fixture(scope='module')
def resized(shapes, tmp_path_factory):
    output = tmp_path_factory.mktemp('resized')
    assert run_train(shapes, output, *RESIZED) == 0
    return output / 'run'


def test_a_run_logs_its_image_size_per_epoch_and_updates_the_ema_every_n_steps(resized):
    run_dir = resized
    assert [row['img_size'] for row in summary(run_dir)] == [32, 40]
    log = (run_dir / 'log.txt').read_text()
    assert 'Epoch 0: training images of 32 px' in log and 'Epoch 1: training images of 40 px' in log
    state = load(run_dir / 'last.pth.tar')
    config = parse_config(['-c', str(run_dir / 'config.yaml')])
    raw, ema = state['state_dict'], state['state_dict_ema']
    for name, initial in train.build_model(config, 10).named_parameters():
        expected = torch.lerp(initial.detach(), raw[name], 1 - config['model_ema_decay'])
        assert torch.allclose(ema[name], expected, atol=1e-6), name


def test_a_run_killed_in_a_resized_epoch_resumes_at_its_size_exactly(shapes, tmp_path, resized):
    proc = spawn_train(shapes, tmp_path, *RESIZED)
    for line in proc.stdout:
        if 'epoch 1 step 3/5' in line:  # after the recovery checkpoint of step 1 of epoch 1
            proc.kill()
            break
    proc.stdout.read()
    assert proc.wait() == -signal.SIGKILL
    assert run_train(shapes, tmp_path, *RESIZED) == 0
    assert 'Resuming' in (tmp_path / 'run' / 'log.txt').read_text()
    assert summary(tmp_path / 'run')[1]['img_size'] == 40
    for key in ('state_dict', 'state_dict_ema'):
        assert_same_weights(load(tmp_path / 'run' / 'last.pth.tar')[key], load(resized / 'last.pth.tar')[key])
    rows, expected = summary(tmp_path / 'run'), summary(resized)
    assert [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows] == \
           [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in expected]


def ffcv_cyclic_lrs(lr, epochs, lr_peak_epoch, iters) -> list:
    """FFCV's lr of every iteration: get_cyclic_lr per epoch, interpolated within the epoch as train_loop does."""
    def get_cyclic_lr(epoch):
        return np.interp([epoch], [0, lr_peak_epoch, epochs], [1e-4 * lr, lr, 0])[0]
    return [np.interp(ix, [0, iters], [get_cyclic_lr(e), get_cyclic_lr(e + 1)])
            for e in range(epochs) for ix in range(iters)]


def test_triangular_schedule_is_ffcvs_cyclic_lr_at_every_step():
    config = parse_config(['--sched', 'triangular', '--lr', '1.7', '--warmup-lr', '1.7e-4', '--warmup-epochs', '2',
                           '--epochs', '16', '--min-lr', '0'])
    lr_at = lr_schedule(config, steps_per_epoch=7)
    assert [lr_at(k) for k in range(16 * 7)] == pytest.approx(ffcv_cyclic_lrs(1.7, 16, 2, 7), rel=1e-9, abs=1e-12)
    assert lr_at(16 * 7) == 0.0


def ffcv_step_lrs(lr, epochs, step_length, step_ratio, iters) -> list:
    """FFCV's lr of every iteration: get_step_lr per epoch, interpolated within the epoch as train_loop does."""
    def get_step_lr(epoch):
        return 0 if epoch >= epochs else step_ratio ** (epoch // step_length) * lr
    return [np.interp(ix, [0, iters], [get_step_lr(e), get_step_lr(e + 1)])
            for e in range(epochs) for ix in range(iters)]


def test_ffcv_step_schedule_is_ffcvs_step_lr_at_every_step():
    config = parse_config(['--sched', 'ffcv_step', '--lr', '0.5', '--decay-epochs', '3', '--decay-rate', '0.2',
                           '--epochs', '8'])
    lr_at = lr_schedule(config, steps_per_epoch=5)
    expected = ffcv_step_lrs(0.5, 8, 3, 0.2, 5)
    assert [lr_at(k) for k in reversed(range(8 * 5))] == pytest.approx(expected[::-1], rel=1e-9, abs=1e-12)
    assert lr_at(8 * 5) == 0.0


def test_command_line_batch_size_and_interval_rescale_the_ema_decay_to_the_same_horizon_in_images(tmp_path):
    recipe = write_recipe(tmp_path, 'batch_size: 1024\nlr: 0.5\nmodel_ema: true\nmodel_ema_decay: 0.99998\n'
                                    'model_ema_interval: 32\n')
    config = parse_config(['-c', recipe, '-b', '256'])
    # the weight left on the recipe's starting point after n images is the same: decay ** (n / images per update)
    images = 1024 * 32 * 100
    assert config['model_ema_decay'] ** (images / (256 * 32)) == pytest.approx(0.99998 ** (images / (1024 * 32)))
    assert config['ema_decay_rescaled_from'] == (0.99998, 1024, 32) and config['lr'] == pytest.approx(0.125)
    every_step = parse_config(['-c', recipe, '-b', '256', '--model-ema-interval', '1'])['model_ema_decay']
    assert every_step ** (images / 256) == pytest.approx(0.99998 ** (images / (1024 * 32)))
    assert parse_config(['-c', recipe, '-b', '256', '--model-ema-decay', '0.9'])['model_ema_decay'] == 0.9
    assert parse_config(['-c', recipe])['ema_decay_rescaled_from'] is None
    lr_line, ema_line = train.rescaling_lines(config)
    assert lr_line == 'batch_size 1024 -> 256: lr 0.5 -> 0.125 (linear rule)'
    assert ema_line.startswith(f"batch_size 1024 -> 256: model_ema_decay 0.99998 -> {config['model_ema_decay']:.8g} ")
    save_config(config, tmp_path / 'config.yaml')
    assert yaml.safe_load((tmp_path / 'config.yaml').read_text())['model_ema_decay'] == config['model_ema_decay']
    replayed = parse_config(['-c', str(tmp_path / 'config.yaml')])
    assert replayed['model_ema_decay'] == config['model_ema_decay'] and replayed['ema_decay_rescaled_from'] is None


def test_trainer_takes_the_bce_target_threshold_and_ema_interval():
    config = parse_config(['--model', 'resnet18', '--bce-loss', '--bce-target-thresh', '0.2', '--model-ema',
                           '--model-ema-interval', '4'])
    t = train.build_trainer(config, Processes(0, 1, 0, CPU), BatchLayout.create(8, 1, None),
                            train.build_model(config, 10), 10, steps_per_epoch=5)
    logits, soft = torch.randn(4, 10), torch.softmax(torch.randn(4, 10) * 3, dim=1)
    assert t.ema_interval == 4
    assert t.loss_fn(logits, soft).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, (soft > 0.2).float()).item(), rel=1e-6)


def dry_run(capsys, *argv) -> str:
    assert train.main([*argv, '--dry-run']) == 0
    return capsys.readouterr().out


def test_dry_run_prints_the_plan_of_a_recipe_with_accumulation_and_writes_nothing(shapes, tmp_path, capsys,
                                                                                   monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    recipe = write_recipe(tmp_path, 'batch_size: 32\nlr: 0.4\nepochs: 3\nimg_size: 64\nimg_size_start: 32\n'
                                    'resize_epochs: [1, 2]\nmax_batch_per_device: 4\nmodel_ema: true\n'
                                    'model_ema_decay: 0.999\nmodel_ema_interval: 4\n')
    throughput, price = 0.01, 3.0
    out = dry_run(capsys, '-c', recipe, '-b', '16', '--data-dir', str(shapes), '--output', str(tmp_path / 'runs'),
                  '--throughput', str(throughput), '--price-per-hour', str(price))
    images = len(open_image_folder(shapes, 'train'))
    steps = images // 16
    seconds = 3 * steps * 16 / (throughput * 2)
    assert 'global batch:   16 = 2 GPU(s) x 2 accumulated x 4 per device' in out  # 8 per GPU, at most 4 at once
    assert 'lr:             0.2 (cosine' in out
    assert f'decay {0.999 ** 0.5:.8g} per update, every 4 optimizer step(s)' in out
    assert 'batch_size 32 -> 16: lr 0.4 -> 0.2 (linear rule)' in out
    assert 'image size:     32 px epochs 0-1, 64 px epoch 2; validation 64 px' in out
    assert f'train images:   {images:,} (counted at {shapes})' in out
    assert f'steps:          {steps} per epoch, {3 * steps} in all ({steps * 16} images per epoch' in out
    assert f'expected time:  {duration(seconds)} on 2 GPU(s)' in out
    assert f'= {seconds * 2 / 3600 * price:,.2f}' in out
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('world_size, args, message', [
    ('0', [], "WORLD_SIZE must be a number of processes, 1 or more, got '0'"),
    ('-2', [], "WORLD_SIZE must be a number of processes, 1 or more, got '-2'"),
    ('two', [], "WORLD_SIZE must be a number of processes, 1 or more, got 'two'"),
    ('1', ['-b', '4096'], 'the training set (80 images) is smaller than one batch of 4096')])
def test_dry_run_refuses_what_the_run_refuses_in_one_line(shapes, capsys, monkeypatch, world_size, args, message):
    monkeypatch.setenv('WORLD_SIZE', world_size)
    assert train.main(['--data-dir', str(shapes), *args, '--dry-run']) == 2
    err = capsys.readouterr().err
    assert err == f'train.py: error: {message}\n'


def test_dry_run_without_the_dataset_prints_what_it_can(tmp_path, capsys):
    out = dry_run(capsys, '--data-dir', str(tmp_path / 'missing'), '-b', '256', '--output', str(tmp_path / 'runs'))
    assert 'global batch:   256 = 1 GPU(s) x 1 accumulated x 256 per device' in out
    assert f"train images:   unknown: no dataset at {tmp_path / 'missing'}" in out
    assert 'steps:' not in out and not (tmp_path / 'runs').exists()


def test_dry_run_takes_the_image_count_from_a_prepared_imagenet_manifest(tmp_path, capsys):
    split = dict(images=1_281_167, classes=1000, sha256='0' * 64)
    (tmp_path / 'manifest.json').write_text(json.dumps(dict(
        sha256='1' * 64, imagenet='full', images=1_331_167, settings={},
        splits=dict(train=split, val=dict(split, images=50_000)))))
    out = dry_run(capsys, '--data-dir', str(tmp_path), '-b', '1024')
    assert f'train images:   1,281,167 (manifest of tools/prepare_imagenet.py at {tmp_path})' in out
    assert f'steps:          {1_281_167 // 1024:,} per epoch' in out
    assert 'throughput not given: pass --throughput (img/s per GPU) from tools/benchmark.py' in out


@pytest.mark.parametrize('opt, pct_start, momentum', [('momentum', 0.3, [0.85, 0.95]), ('adamw', 0.25, [0.8, 0.9]),
                                                      ('momentum', 0.5, None)])
def test_onecycle_follows_torchs_one_cycle_lr_step_by_step(opt, pct_start, momentum):
    epochs, steps_per_epoch, lr = 3, 7, 0.4
    config = parse_config(['--sched', 'onecycle', '--opt', opt, '--lr', str(lr), '--epochs', str(epochs),
                           '--onecycle-pct-start', str(pct_start), '--onecycle-div-factor', '10',
                           '--onecycle-final-div-factor', '100',
                           *(['--onecycle-momentum', *map(str, momentum)] if momentum else
                             ['--onecycle-momentum', 'none'])])
    ours = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9) if opt == 'momentum' else \
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    theirs = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9) if opt == 'momentum' else \
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = train.build_scheduler(config, ours, steps_per_epoch)
    cycled = dict(base_momentum=momentum[0], max_momentum=momentum[1]) if momentum else {}
    reference = torch.optim.lr_scheduler.OneCycleLR(
        theirs, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=pct_start, div_factor=10,
        final_div_factor=100, cycle_momentum=momentum is not None, **cycled)
    key = 'betas' if opt == 'adamw' else 'momentum'
    for step in range(epochs * steps_per_epoch):
        scheduler.step_update(num_updates=step)
        assert ours.param_groups[0]['lr'] == pytest.approx(theirs.param_groups[0]['lr'], rel=1e-12), step
        assert ours.param_groups[0][key] == pytest.approx(theirs.param_groups[0][key], rel=1e-12), step
        theirs.step()
        reference.step()
    assert ours.param_groups[0]['lr'] == pytest.approx(lr / 10 / 100, rel=1e-9)


@pytest.mark.parametrize('args, message', [
    (['--warmup-epochs', '1'], 'sched onecycle warms up by itself (onecycle_pct_start): set warmup_epochs 0'),
    (['--onecycle-momentum', '0.95', '0.85'], 'onecycle_momentum is [base, max], base <= max'),
])
def test_onecycle_settings_it_cannot_follow_are_one_line(capsys, args, message):
    assert train.main(['--sched', 'onecycle', '--epochs', '3', *args, '--dry-run']) == 2
    assert capsys.readouterr().err == f'train.py: error: {message}\n'


def test_onecycle_momentum_without_momentum_in_the_optimizer_is_one_line():
    config = parse_config(['--sched', 'onecycle', '--opt', 'adagrad'])
    optimizer = torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(UserError, match="onecycle_momentum cycles SGD's momentum or Adam's beta1, which this optimizer "
                                        'has not: set onecycle_momentum null'):
        train.build_scheduler(config, optimizer, 5)
    config['onecycle_momentum'] = None
    assert train.build_scheduler(config, optimizer, 5).total_steps == 5 * config['epochs']
