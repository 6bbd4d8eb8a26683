import errno
import hashlib
import re
from pathlib import Path

import pytest
import timm
import torch
import yaml
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import train
from training import builtin_data
from training.config import parse_config
from training.reporting import SUMMARY_COLUMNS, TIMING_COLUMNS

from conftest import MODEL, assert_same_weights, load, run_args, run_train, summary


@pytest.fixture(scope='module')
def two_epochs(shapes, tmp_path_factory):
    output = tmp_path_factory.mktemp('runs')
    assert run_train(shapes, output, '--checkpoint-hist', '2') == 0
    return output / 'run'


def test_two_epochs_write_checkpoints_and_summary_rows(two_epochs):
    names = {p.name for p in two_epochs.iterdir()}
    assert {'last.pth.tar', 'previous.pth.tar', 'model_best.pth.tar', 'checkpoint-0.pth.tar',
            'checkpoint-1.pth.tar', 'config.yaml', 'log.txt', 'summary.csv'} <= names
    rows = summary(two_epochs)
    assert [r['epoch'] for r in rows] == [0, 1]
    for row in rows:
        # SWA is off, and no price_per_hour was given: no cost, the GPU-hours alone
        unset = [c for c in SUMMARY_COLUMNS if c.startswith('swa_') or c in ('cost', 'total_cost')]
        assert all(row[c] is not None for c in SUMMARY_COLUMNS if c not in unset)
        assert all(row[c] is None for c in unset)
        assert 0 <= row['val_top1'] <= row['val_top5'] <= 100
    assert rows[1]['train_loss'] < rows[0]['train_loss']  # it learns
    assert rows[1]['lr'] < rows[0]['lr']  # cosine, stepped every step


def test_checkpoint_is_timm_layout_with_plain_config_and_distinct_ema(two_epochs):
    state = load(two_epochs / 'last.pth.tar')  # weights_only=True: nothing pickled
    assert state['arch'] == MODEL and state['epoch'] == 1 and state['version'] == 2
    assert {'state_dict', 'state_dict_ema', 'optimizer', 'metric', 'saver', 'config', 'progress'} <= set(state)
    assert state['config']['model'] == MODEL and state['config']['batch_size'] == 16
    assert yaml.safe_load((two_epochs / 'config.yaml').read_text()) == state['config']
    assert state['progress']['epoch'] == 2 and state['progress']['global_step'] == 10
    raw, ema = state['state_dict'], state['state_dict_ema']
    assert raw.keys() == ema.keys()
    assert not torch.equal(raw['fc.weight'], ema['fc.weight'])
    rows = summary(two_epochs)
    assert state['metric'] == pytest.approx(max(rows[1]['val_top1'], rows[1]['ema_val_top1']))


def test_log_has_step_lines_with_loss_lr_speed_data_wait_and_eta(two_epochs):
    log = (two_epochs / 'log.txt').read_text()
    steps = re.findall(r'epoch (\d+) step (\d+)/5  loss ([\d.]+)  lr ([\d.e-]+)  (\d+) img/s  data wait (\d+)%  '
                       r'eta epoch \S+ run \S+', log)
    assert len(steps) == 10
    assert 'epoch 1 done' in log


def test_saved_config_replays_the_same_run(two_epochs):
    output = two_epochs.parent
    assert train.main(['-c', str(two_epochs / 'config.yaml'), '--experiment', 'replay']) == 0
    replay = output / 'replay'
    for a, b in zip(summary(two_epochs), summary(replay), strict=True):
        assert {k: v for k, v in a.items() if k not in TIMING_COLUMNS} == \
               {k: v for k, v in b.items() if k not in TIMING_COLUMNS}
    assert_same_weights(load(two_epochs / 'last.pth.tar')['state_dict'], load(replay / 'last.pth.tar')['state_dict'])


def test_loss_follows_the_targets():
    assert isinstance(train.build_loss(bce=False, smoothing=0.1, mixing=True), SoftTargetCrossEntropy)
    assert isinstance(train.build_loss(bce=False, smoothing=0.1, mixing=False), LabelSmoothingCrossEntropy)
    assert isinstance(train.build_loss(bce=False, smoothing=0.0, mixing=False), torch.nn.CrossEntropyLoss)
    assert train.build_mixup(parse_config([]), 10, micro_batch=16) is None
    assert train.build_mixup(parse_config(['--cutmix', '1.0']), 10, micro_batch=16) is not None


def test_mixing_path_trains_with_bce_random_erasing_drop_path_and_clipping(shapes, tmp_path):
    assert run_train(shapes, tmp_path, '--epochs', '1', '--mixup', '0.4', '--cutmix', '1.0', '--re-prob', '0.5',
                     '--drop-path-rate', '0.1', '--color-jitter', '0.4', '0.4', '0.4', '0.1', '-j', '1',
                     '--clip-grad', '2.0', '--bce-loss') == 0
    row = summary(tmp_path / 'run')[0]
    assert 0 < row['train_loss'] < 10 and row['val_top1'] is not None


def test_builtin_data_run_learns(tmp_path):
    """The input pipeline, loss and schedule learn the shapes."""
    data = builtin_data.generate(tmp_path / 'shapes', seed=1, train_per_class=50, val_per_class=20, image_size=32)
    rc = run_train(data, tmp_path, '--epochs', '8', '-b', '32', '--lr', '1.0e-2',
                   '--warmup-epochs', '1',
                   '--scale', '0.6', '1.0', '--color-jitter', '0.2', '-j', '1', '--no-model-ema',
                   '--log-interval', '10')
    assert rc == 0
    rows = summary(tmp_path / 'run')
    assert max(r['val_top1'] for r in rows) >= 70.0  # chance is 10%


def test_deterministic_mode_is_each_runs_own_setting_in_one_process(shapes, tmp_path):
    assert run_train(shapes, tmp_path, '--epochs', '1', '--deterministic', experiment='exact') == 0
    assert torch.are_deterministic_algorithms_enabled()
    assert run_train(shapes, tmp_path, '--epochs', '1', experiment='fast') == 0
    assert not torch.are_deterministic_algorithms_enabled()


def test_nonfinite_loss_stops_and_leaves_the_last_good_checkpoint(shapes, tmp_path, capsys):
    assert run_train(shapes, tmp_path, '--epochs', '1') == 0
    last = tmp_path / 'run' / 'last.pth.tar'
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    rc = run_train(shapes, tmp_path, '--epochs', '2', '--lr', '1.0e30', '--allow-config-change')
    assert rc == 3
    assert re.search(r'non-finite loss at epoch 1, step \d', capsys.readouterr().out)
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before
    assert not list((tmp_path / 'run').glob('recovery-*'))


def test_missing_dataset_says_where_it_looked(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv('IMAGENET_DIR', raising=False)
    monkeypatch.chdir(tmp_path)
    assert train.main(['--output', str(tmp_path), '--device', 'cpu']) == 2
    err = capsys.readouterr().err.strip()
    assert err == ('train.py: error: no dataset at data/imagenet (set --data-dir or IMAGENET_DIR): expected '
                   'data/imagenet/train/<synset>/*.JPEG and data/imagenet/val/<synset>/*.JPEG')
    monkeypatch.setenv('IMAGENET_DIR', str(tmp_path / 'imagenet'))
    assert train.main(['--output', str(tmp_path), '--device', 'cpu']) == 2
    assert f'no dataset at {tmp_path}/imagenet' in capsys.readouterr().err


def test_unwritable_output_fails_before_training(shapes, tmp_path, capsys):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    assert run_train(shapes, blocker) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'cannot write to the run folder' in err[0]


@pytest.mark.parametrize('what', ['config.yaml', 'run folder'])
def test_a_disk_full_at_the_start_is_one_line_and_exit_74(shapes, tmp_path, capsys, monkeypatch, what):
    write_text, mkdir = Path.write_text, Path.mkdir

    def full_write(path, *args, **kwargs):
        if path.name.endswith('.tmp'):
            raise OSError(errno.ENOSPC, 'No space left on device', str(path))
        return write_text(path, *args, **kwargs)

    def full_mkdir(path, *args, **kwargs):
        if path.name == 'run':
            raise OSError(errno.ENOSPC, 'No space left on device', str(path))
        return mkdir(path, *args, **kwargs)
    if what == 'config.yaml':  # config.yaml goes first through a .tmp file
        monkeypatch.setattr(Path, 'write_text', full_write)
        failed = tmp_path / 'run' / 'config.yaml.tmp'
    else:
        monkeypatch.setattr(Path, 'mkdir', full_mkdir)
        failed = tmp_path / 'run'
    assert run_train(shapes, tmp_path, '--epochs', '1') == 74
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f'train.py: error: No space left on device: {failed}; nothing of this start is saved')
    assert not (tmp_path / 'run' / 'config.yaml.tmp').exists()


def test_torch_compile_trains_and_saves_clean_state_dicts(shapes, tmp_path):
    # TINY's model: inductor compiles its small graph in a fraction of ResNet-50's time; the wrapping is the same
    assert run_train(shapes, tmp_path, '--epochs', '1', '--torchcompile') == 0
    state = load(tmp_path / 'run' / 'last.pth.tar')
    for key in ('state_dict', 'state_dict_ema'):
        assert not [k for k in state[key] if k.startswith(('_orig_mod.', 'module.'))]
    assert state['state_dict'].keys() == timm.create_model(MODEL).state_dict().keys()
    assert summary(tmp_path / 'run')[0]['train_loss'] < 10


def test_batch_size_override_rescales_lr_and_says_so(shapes, tmp_path):
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text('batch_size: 16\nlr: 1.0e-3\nlr_scale: sqrt\n')
    argv = [arg for arg in run_args(shapes, tmp_path) if arg not in ('--lr', '1.0e-3', '-b', '16')]
    assert train.main(['-c', str(recipe), *argv, '-b', '8', '--epochs', '1']) == 0
    log = (tmp_path / 'run' / 'log.txt').read_text()
    assert 'batch_size 16 -> 8: lr 0.001 -> 0.000707107 (sqrt rule)' in log
    assert load(tmp_path / 'run' / 'last.pth.tar')['config']['lr'] == pytest.approx(1e-3 / 2 ** 0.5)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_mixed_precision_and_channels_last(shapes, tmp_path, dtype):
    # TINY's model: the CPU's float16 backward is slow (a ResNet-50 step of 16 images of 32 px:
    # 12.5 s), and the path is the same for any model. Not at 16 px: layer4's stride-2 conv then gets a 1x1 input, and
    # torch 2.14's CPU bfloat16 weight gradient of that reads memory it never wrote (NaN after a test freed NaNs there)
    assert run_train(shapes, tmp_path, '--epochs', '1', '--amp', '--amp-dtype', dtype, '--channels-last',
                     '--clip-grad', '1.0') == 0
    state = load(tmp_path / 'run' / 'last.pth.tar')
    assert ('amp_scaler' in state) == (dtype == 'float16')  # the grad scaler, for float16 only
    assert all(torch.isfinite(v).all() for v in state['state_dict'].values() if v.is_floating_point())
    assert 0 < summary(tmp_path / 'run')[0]['train_loss'] < 10


@pytest.mark.parametrize('opt, fused', [('adamw', True), ('momentum', True), ('sgd', True), ('lamb', False)])
def test_optimizer_is_timms_update_fused_where_torch_has_a_fused_kernel(opt, fused):
    """Three steps of build_optimizer's optimizer and of timm's factory's, from the same gradients: the same weights."""
    config = parse_config(['--model', MODEL, '--opt', opt, '--lr', '0.05', '--weight-decay', '0.05'])
    models = [train.build_model(config, 10) for _ in range(2)]
    ours = train.build_optimizer(config, models[0])
    reference = timm.optim.create_optimizer_v2(models[1], opt=opt, lr=0.05, weight_decay=0.05,
                                               momentum=config['momentum'], filter_bias_and_bn=True)
    assert bool(ours.defaults.get('fused')) is fused
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in zip(*(m.parameters() for m in models)):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        ours.step()
        reference.step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
