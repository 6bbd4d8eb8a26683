"""Interruptions are non-events: killed at any moment and re-run, a run ends bit-identical to an uninterrupted one."""
import json
import os
import re
import shutil
import signal
import subprocess

import pytest
import torch
import yaml

import train
import validate
from training import builtin_data, checkpoint
from training.reporting import TIMING_COLUMNS, best_of

import conftest
from conftest import MODEL, assert_same_weights, load, run_train, summary

# workers, Mixup/CutMix, random erasing, drop path and EMA on; a recovery checkpoint every 2 of the 10 steps
EXACT = ['-j', '1', '--mixup', '0.4', '--cutmix', '1.0', '--re-prob', '0.5', '--drop-path-rate', '0.1',
         '--recovery-interval', '2', '--deterministic']


def run_until(data, output, pattern, sig, *args):
    return conftest.run_until(data, output, pattern, sig, *EXACT, *args)


def run_here(data, output, *args):
    return conftest.run_captured(data, output, *EXACT, *args)


def assert_same_run(run_dir, reference):
    final, expected = load(run_dir / 'last.pth.tar'), load(reference / 'last.pth.tar')
    assert_same_weights(final['state_dict'], expected['state_dict'])
    assert_same_weights(final['state_dict_ema'], expected['state_dict_ema'])
    rows, expected_rows = summary(run_dir), summary(reference)
    assert len(rows) == len(expected_rows)
    for row, expected_row in zip(rows, expected_rows):
        assert {k: v for k, v in row.items() if k not in TIMING_COLUMNS} == \
               {k: v for k, v in expected_row.items() if k not in TIMING_COLUMNS}


@pytest.fixture(scope='module')
def reference(shapes, tmp_path_factory):
    output = tmp_path_factory.mktemp('reference')
    rc, log = run_here(shapes, output)
    assert rc == 0, log
    return output / 'run'


def test_checkpoint_holds_everything_to_continue(reference):
    state = load(reference / 'last.pth.tar')
    assert set(state['rng']) >= {'python', 'numpy', 'torch'}
    assert state['progress']['global_step'] == 10 and state['progress']['step'] == 0
    assert state['saver']['best_metric'] is not None and state['saver']['checkpoint_files']
    assert set(state['versions']) == {'torch', 'timm', 'git'} and state['versions']['torch'] == torch.__version__
    assert state['config']['recovery_interval'] == 2 and state['world_size'] == 1
    assert len(state['progress']['history']) == 2


def test_sigkill_at_three_moments_then_rerun_is_bit_exact(shapes, tmp_path, reference):
    moments = [
        r'epoch 0 step 3/5',  # mid-epoch, one step after a recovery checkpoint
        r'epoch 0 step 5/5',  # at the epoch boundary, before its evaluation and checkpoint
        r'Saving recovery checkpoint recovery-1-1',  # as a save starts (the kill lands before its file is written)
    ]
    for moment in moments:
        rc, log = run_until(shapes, tmp_path, moment, signal.SIGKILL)
        assert rc == -signal.SIGKILL, log
    rc, log = run_here(shapes, tmp_path)
    assert rc == 0, log
    assert 'Resuming' in log
    assert_same_run(tmp_path / 'run', reference)


def test_sigterm_saves_a_recovery_checkpoint_and_exits_75_and_the_cost_adds_up_across_the_resume(shapes, tmp_path,
                                                                                                 reference):
    price = ['--price-per-hour', '3']
    rc, log = run_until(shapes, tmp_path, r'epoch 1 step 3/5', signal.SIGTERM, *price)
    assert rc == train.EXIT_INTERRUPTED, log
    assert 'SIGTERM received' in log and 'run the same command again to continue' in log
    saved = re.findall(r'Saving recovery checkpoint (recovery-1-\d)', log)[-1]
    state = load(tmp_path / 'run' / f'{saved}.pth.tar')
    assert state['progress']['epoch'] == 1 and state['progress']['step'] >= 3
    spent_before = state['progress']['device_seconds']
    assert spent_before == pytest.approx(state['progress']['seconds']) and spent_before > 0  # one process
    rc, log = run_here(shapes, tmp_path, *price)
    assert rc == 0 and f'Resuming {tmp_path}/run/{saved}.pth.tar' in log
    assert_same_run(tmp_path / 'run', reference)
    rows = summary(tmp_path / 'run')
    total = 0.0
    for row in rows:  # device-hours: each epoch's seconds, on one process, the one before the kill included
        total += row['gpu_hours']
        assert row['gpu_hours'] == pytest.approx(row['epoch_seconds'] / 3600)
        assert (row['total_gpu_hours'], row['cost'], row['total_cost']) == pytest.approx((total, 3 * row['gpu_hours'],
                                                                                           3 * total))
    assert rows[1]['gpu_hours'] * 3600 > spent_before
    assert f"; {total:.3f} CPU-hours, ${3 * total:,.2f}" in log.split('Finished: ')[1].splitlines()[0]


def test_changed_recipe_is_refused_with_its_differences_unless_allowed(shapes, tmp_path, capsys):
    assert run_train(shapes, tmp_path, '--epochs', '1') == 0
    assert run_train(shapes, tmp_path, '--epochs', '2', '--lr', '2.0e-3', '-b', '8') == 2
    err = capsys.readouterr().err
    assert 'would change the experiment (batch_size: 16 -> 8; lr: 0.001 -> 0.002; epochs: 1 -> 2)' in err
    assert '--allow-config-change' in err
    assert run_train(shapes, tmp_path, '--epochs', '2', '--lr', '2.0e-3', '--allow-config-change') == 0
    assert 'resuming with a changed setting: lr: 0.001 -> 0.002' in (tmp_path / 'run' / 'log.txt').read_text()
    assert [r['epoch'] for r in summary(tmp_path / 'run')] == [0, 1]


def test_resume_refuses_a_checkpoint_of_another_model_or_class_count(shapes, tmp_path, capsys):
    assert run_train(shapes, tmp_path, '--epochs', '1', '--model', 'resnet50_custom', experiment='other') == 0
    other = tmp_path / 'other' / 'last.pth.tar'
    assert run_train(shapes, tmp_path, '--epochs', '1', '--resume', str(other)) == 2
    assert f'holds resnet50_custom with 10 classes; this run trains {MODEL} with 10 classes' in capsys.readouterr().err
    five = builtin_data.generate(tmp_path / 'five', train_per_class=4, val_per_class=1, image_size=32)
    for name in builtin_data.CLASSES[5:]:
        shutil.rmtree(five / 'train' / name)
        shutil.rmtree(five / 'val' / name)
    assert run_train(five, tmp_path, '--epochs', '1', '--model', 'resnet50_custom', '--resume', str(other)) == 2
    assert 'holds resnet50_custom with 10 classes; this run trains resnet50_custom with 5 classes' in \
        capsys.readouterr().err


def test_a_finished_run_keeps_no_recovery_files_and_its_rerun_changes_nothing(shapes, tmp_path, reference):
    assert not list(reference.glob('recovery*'))
    assert 'deleted its recovery files (recovery-1-1.pth.tar, recovery-1-3.pth.tar)' in \
        (reference / 'log.txt').read_text()
    subprocess.run(['cp', '-a', str(reference), str(tmp_path / 'run')], check=True)
    last = (tmp_path / 'run' / 'last.pth.tar').read_bytes()
    rc, log = run_here(shapes, tmp_path)
    assert rc == 0 and f'The run in {tmp_path}/run is finished (2 epochs): nothing left to train' in log, log
    best = f'{tmp_path}/run/model_best.pth.tar'  # the end says where the model is, and what to do with it
    assert f'Best model: {best}. Next: python validate.py --checkpoint {best}; python tools/export.py' in log
    assert (tmp_path / 'run' / 'last.pth.tar').read_bytes() == last
    assert summary(tmp_path / 'run') == summary(reference)
    assert not list((tmp_path / 'run').glob('recovery*'))


def test_only_the_final_epochs_checkpoint_deletes_the_recovery_files_and_only_ours(tmp_path):
    from training.checkpoint import RunCheckpointSaver

    model = torch.nn.Linear(4, 3)
    saver = RunCheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint_dir=str(tmp_path),
                               recovery_dir=str(tmp_path))

    def state(epoch: int, step: int) -> dict:
        return dict(saver.snapshot(), config={'model': 'tiny', 'epochs': 3}, progress={'epoch': epoch, 'step': step})
    (tmp_path / 'recovery-old.pth.tar').write_bytes(b'mine')
    saver.save_mid_epoch(1, 2, state(1, 2))
    saver.save_epoch(1, 50.0, state(2, 0))
    saver.save_mid_epoch(2, 2, state(2, 2))
    assert sorted(p.name for p in tmp_path.glob('recovery*')) == ['recovery-1-2.pth.tar', 'recovery-2-2.pth.tar',
                                                                  'recovery-old.pth.tar']
    saver.save_epoch(2, 60.0, state(3, 0))
    assert sorted(p.name for p in tmp_path.glob('recovery*')) == ['recovery-old.pth.tar']
    assert load(tmp_path / 'last.pth.tar')['progress'] == {'epoch': 3, 'step': 0}


def test_start_over_needs_the_flag_and_then_begins_afresh(shapes, tmp_path):
    assert run_train(shapes, tmp_path, '--epochs', '1') == 0
    first = summary(tmp_path / 'run')
    assert run_train(shapes, tmp_path, '--epochs', '1') == 0  # the same command again: finished, nothing changes
    assert summary(tmp_path / 'run') == first
    assert run_train(shapes, tmp_path, '--epochs', '1', '--seed', '7', '--start-over') == 0
    again = summary(tmp_path / 'run')
    assert len(again) == 1 and again[0]['train_loss'] != first[0]['train_loss']
    assert not (tmp_path / 'run' / 'previous.pth.tar').exists()


def test_explicit_resume_path_continues_from_that_checkpoint(shapes, tmp_path, reference):
    shutil.copytree(reference, tmp_path / 'old')
    rc, log = run_here(shapes, tmp_path, '--resume', str(tmp_path / 'old' / 'previous.pth.tar'))
    assert rc == 0 and 'Resuming' in log and 'epoch 1, step 0/5' in log
    assert_same_run(tmp_path / 'run', reference)


def test_initial_checkpoint_starts_a_new_schedule_from_its_weights(shapes, tmp_path, reference):
    source = load(reference / 'last.pth.tar')
    assert run_train(shapes, tmp_path, '--epochs', '1', '--lr', '1.0e-12', '--initial-checkpoint',
                     str(reference / 'last.pth.tar'), '--initial-weights', 'raw', '--no-model-ema') == 0
    state = load(tmp_path / 'run' / 'last.pth.tar')
    assert state['progress']['global_step'] == 5 and len(state['progress']['history']) == 1
    for name in ('conv1.0.weight', 'layer4.0.conv2.weight', 'fc.weight'):
        assert torch.allclose(state['state_dict'][name], source['state_dict'][name], atol=1e-6)


def test_ema_top1_after_an_interruption_equals_the_logged_value(shapes, tmp_path, reference):
    rc, _ = run_until(shapes, tmp_path, r'epoch 1 step 2/5', signal.SIGKILL)
    assert rc == -signal.SIGKILL
    logged = summary(tmp_path / 'run')[0]['ema_val_top1']
    out = tmp_path / 'ema.json'
    assert validate.main(['--checkpoint', str(tmp_path / 'run' / 'last.pth.tar'), '--weights', 'ema', '-j', '0',
                          '--device', 'cpu', '--results-file', str(out)]) == 0
    assert json.loads(out.read_text())['top1'] == pytest.approx(logged, abs=0.01)
    assert logged == summary(reference)[0]['ema_val_top1']


def test_a_truncated_last_checkpoint_and_its_hard_links_fall_back_to_previous_with_a_warning(shapes, tmp_path,
                                                                                            reference):
    """`last` shares its file with the other names of its epoch (`model_best` when that epoch was the best): damage to
    it damages them all. `previous` is the epoch before, another file, so the run resumes from it."""
    subprocess.run(['cp', '-a', str(reference), str(tmp_path / 'run')], check=True)  # keeps the hard links
    run_dir = tmp_path / 'run'
    last, previous = run_dir / 'last.pth.tar', run_dir / 'previous.pth.tar'
    best_epoch = best_of(summary(run_dir), 'top1')[2]
    assert (run_dir / 'model_best.pth.tar').stat().st_ino == (last if best_epoch == 1 else previous).stat().st_ino
    assert last.stat().st_ino != previous.stat().st_ino
    with open(last, 'r+b') as f:  # truncated in place, with its hard links
        f.truncate(last.stat().st_size // 2)
    rc, log = run_here(shapes, tmp_path)
    assert rc == 0, log
    assert 'WARNING: skipping checkpoint last.pth.tar' in log
    assert re.search(r'Resuming \S+previous.pth.tar: epoch 1, step 0/5', log)
    assert_same_run(run_dir, reference)


def test_renamed_or_swapped_class_folders_are_refused_on_resume(shapes, tmp_path, capsys):
    data = tmp_path / 'data'
    shutil.copytree(shapes, data)
    assert run_train(data, tmp_path, '--epochs', '1') == 0
    assert load(tmp_path / 'run' / 'last.pth.tar')['data']['class_names'][:2] == ['checker', 'circle']
    for split in ('train', 'val'):  # the same counts, but labels 1-9 now name other classes
        os.rename(data / split / 'circle', data / split / 'zcircle')
    assert run_train(data, tmp_path, '--epochs', '2') == 2
    err = capsys.readouterr().err
    assert "class names: 9 of 10 labels name another class (label 1: 'circle' -> 'cross'" in err
    assert '--allow-config-change' in err
    for split in ('train', 'val'):  # names as before, but two folders trade their images
        os.rename(data / split / 'zcircle', data / split / 'circle')
        (data / split / 'square' / '00000.jpg').rename(data / split / 'circle' / 'from-square.jpg')
        (data / split / 'circle' / '00000.jpg').rename(data / split / 'square' / 'from-circle.jpg')
    assert run_train(data, tmp_path, '--epochs', '2') == 2
    assert 'data files: the list of training images and their labels changed' in capsys.readouterr().err


class RunsACommand:
    """A malicious pickle: unpickling it would run a shell command."""

    def __reduce__(self):
        return os.system, ('echo pwned',)


@pytest.mark.parametrize('refused, named', [('fraction', 'fractions.Fraction'), ('command', 'posix.system')])
def test_a_checkpoint_a_safe_load_refuses_stops_the_run_naming_the_class_and_stays(shapes, tmp_path, capsys, refused,
                                                                                   named):
    import fractions
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    value = fractions.Fraction(1, 10) if refused == 'fraction' else RunsACommand()
    torch.save({'progress': {'epoch': 0, 'step': 1}, 'lr': value}, run_dir / 'last.pth.tar')
    assert run_train(shapes, tmp_path) == 2
    assert f'holds objects that a safe load refuses ({named})' in capsys.readouterr().err
    assert (run_dir / 'last.pth.tar').exists()


def test_a_checkpoint_of_another_trainer_in_the_run_folder_stops_the_run_in_one_line(shapes, tmp_path, capsys):
    import argparse  # timm's train.py pickles its arguments: a safe load allows that one class
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    torch.save({'progress': {'epoch': 0, 'step': 1}, 'args': argparse.Namespace(lr=0.1)}, run_dir / 'last.pth.tar')
    assert run_train(shapes, tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'is not a checkpoint of train.py' in err[0]
    assert (run_dir / 'last.pth.tar').exists()


@pytest.mark.parametrize('content', ['state dict', 'timm checkpoint', 'tensor'])
def test_a_file_of_another_program_under_a_checkpoint_name_stops_the_run_in_one_line(shapes, tmp_path, capsys,
                                                                                         content):
    import argparse
    weights = {'conv1.weight': torch.zeros(4, 3, 7, 7)}
    saved = {'state dict': weights, 'tensor': torch.zeros(3),
             'timm checkpoint': {'epoch': 3, 'arch': 'resnet50', 'state_dict': weights, 'optimizer': {},
                                 'version': 2, 'args': argparse.Namespace(model='resnet50'), 'metric': 50.0}}[content]
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    torch.save(saved, run_dir / 'checkpoint-3.pth.tar')
    assert run_train(shapes, tmp_path) == 2
    why = 'it holds a Tensor, not a dict' if content == 'tensor' else 'it holds no training progress'
    assert capsys.readouterr().err.strip().splitlines() == [
        f'train.py: error: {run_dir}/checkpoint-3.pth.tar is not a checkpoint of train.py ({why}); move it out of the '
        'run folder, or use --initial-checkpoint']
    assert sorted(p.name for p in run_dir.iterdir()) == ['.train.lock', 'checkpoint-3.pth.tar']


def test_a_users_files_in_the_run_folder_are_neither_resumed_nor_set_aside(tmp_path):
    torch.save({'conv1.weight': torch.zeros(4, 3, 7, 7)}, tmp_path / 'pretrained.pth.tar')
    (tmp_path / 'recovery-old.pth.tar').write_bytes(b'PK\x03\x04 not the rest of a zip')
    assert checkpoint.newest_valid(tmp_path) == (None, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['pretrained.pth.tar', 'recovery-old.pth.tar']


def test_damaged_checkpoints_alone_never_restart_the_run_silently(shapes, tmp_path, capsys):
    assert run_train(shapes, tmp_path, '--epochs', '1') == 0
    for path in (tmp_path / 'run').glob('*.pth.tar'):
        path.write_bytes(b'PK\x03\x04 not the rest of a zip')
    for _ in range(2):  # the second run sees only *.corrupt files: still no fresh start
        assert run_train(shapes, tmp_path, '--epochs', '1') == 2
        assert 'holds checkpoints but none loads; pass --start-over' in capsys.readouterr().err
    assert run_train(shapes, tmp_path, '--epochs', '1', '--start-over') == 0


def test_an_unfinished_first_save_does_not_block_the_start(shapes, tmp_path):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'recovery_tmp.pth.tar').write_bytes(b'PK\x03\x04 half written')
    assert run_train(shapes, tmp_path, '--epochs', '1') == 0
    assert len(summary(run_dir)) == 1


def test_allowed_changes_take_effect_on_resume(shapes, tmp_path):
    assert run_train(shapes, tmp_path, '--epochs', '1', '--no-model-ema') == 0
    assert run_train(shapes, tmp_path, '--epochs', '2', '--weight-decay', '0.01', '--allow-config-change') == 0
    state = load(tmp_path / 'run' / 'last.pth.tar')
    assert sorted(g['weight_decay'] for g in state['optimizer']['param_groups']) == [0.0, 0.01]
    assert 'state_dict_ema' in state
    assert 'the EMA starts from the current weights' in (tmp_path / 'run' / 'log.txt').read_text()


def test_a_repeated_signal_within_the_grace_period_is_the_same_notice(monkeypatch, tmp_path, capfd):
    import logging
    from training.distributed import Processes, StopRequest

    exits = []
    monkeypatch.setattr(os, '_exit', exits.append)
    log = logging.FileHandler(tmp_path / 'log.txt')
    logging.getLogger().addHandler(log)
    try:
        stop = StopRequest(Processes(0, 1, 0, torch.device('cpu')))
        stop._handle(signal.SIGTERM, None)
        stop._handle(signal.SIGTERM, None)  # torchrun's forwarded copy
        assert stop.agreed() == [True] and exits == []
        stop.received_at -= StopRequest.REPEAT_GRACE + 1
        stop._handle(signal.SIGINT, None)  # a real second request
    finally:
        logging.getLogger().removeHandler(log)
        log.close()
    assert exits == [128 + signal.SIGINT]
    said = 'SIGINT received again: exiting at once, without saving; the next run resumes from the newest checkpoint'
    assert said in capfd.readouterr().err and said in (tmp_path / 'log.txt').read_text()


def test_the_device_path_resumes_exactly_and_decode_auto_keeps_the_checkpoints_choice(shapes, tmp_path):
    """decode: gpu at a cpu_decode_share, with the CPU as the device: killed mid-epoch and re-run with decode: auto (on
    a CPU device auto alone would take the CPU path), it keeps the device path and the share, and ends where an
    uninterrupted run ends."""
    one_epoch = ('--epochs', '1', '--recovery-interval', '1')
    gpu = ('--decode', 'gpu', '--cpu-decode-share', '0.5', *one_epoch)
    rc, log = run_here(shapes, tmp_path / 'reference', *gpu)
    assert rc == 0, log
    rc, log = run_until(shapes, tmp_path, r'epoch 0 step 3/5', signal.SIGKILL, *gpu)
    assert rc == -signal.SIGKILL, log
    rc, log = run_here(shapes, tmp_path, *one_epoch)
    assert rc == 0 and re.search(r'Resuming \S+recovery-0-\d.pth.tar', log), log
    assert 'Input path: decode gpu, cpu_decode_share 0.5 (kept from the checkpoint' in log
    assert_same_run(tmp_path / 'run', tmp_path / 'reference' / 'run')
    assert load(tmp_path / 'run' / 'last.pth.tar')['config']['cpu_decode_share'] == 0.5


def test_decode_auto_on_a_cpu_device_is_the_cpu_path_bit_for_bit(shapes, tmp_path, reference):
    rc, log = run_here(shapes, tmp_path, '--decode', 'cpu')
    assert rc == 0, log
    assert_same_run(tmp_path / 'run', reference)
    saved = yaml.safe_load((reference / 'config.yaml').read_text())
    assert (saved['decode'], saved['cpu_decode_share']) == ('cpu', None)
    assert load(reference / 'last.pth.tar')['config']['decode'] == 'cpu'
    assert 'Input path: decode cpu (the training device is cpu' in (reference / 'log.txt').read_text()


def test_a_checkpoint_written_in_the_background_holds_the_state_of_its_snapshot(tmp_path):
    """Training goes on while a checkpoint is written: the file holds the weights, EMA and optimizer state of the
    moment the save was asked for, not what the steps since changed in place."""
    import copy
    from timm.utils import ModelEmaV3
    from training.checkpoint import BackgroundSave, RunCheckpointSaver

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    ema = ModelEmaV3(model, decay=0.5)

    def train_step():
        model(torch.randn(8, 4)).square().sum().backward()
        optimizer.step()
        ema.update(model)
    train_step()
    saver = RunCheckpointSaver(model, optimizer, model_ema=ema, checkpoint_dir=str(tmp_path),
                               recovery_dir=str(tmp_path))
    expected = copy.deepcopy(dict(model=model.state_dict(), ema=ema.module.state_dict(),
                                  optimizer=optimizer.state_dict()))
    state = dict(saver.snapshot(), config={'model': 'tiny', 'epochs': 2}, progress={'epoch': 1, 'step': 0})
    train_step()  # before the write starts: only a copy keeps the snapshot's values
    writing = BackgroundSave()
    writing.start(lambda: saver.save_epoch(0, 50.0, state))
    assert writing.wait() is None
    saved = load(tmp_path / 'last.pth.tar')
    assert_same_weights(saved['state_dict'], expected['model'])
    assert_same_weights(saved['state_dict_ema'], expected['ema'])
    for i, moments in expected['optimizer']['state'].items():
        assert_same_weights(saved['optimizer']['state'][i], moments)
    assert not torch.equal(saved['state_dict']['0.weight'], model.state_dict()['0.weight'])
    assert saved['state_dict']._metadata == model.state_dict()._metadata  # BatchNorm's state-dict version


def test_a_background_save_hands_its_result_and_its_bug_to_the_training_thread():
    from training.checkpoint import BackgroundSave

    writing = BackgroundSave()
    assert writing.wait() is None  # nothing in flight
    writing.start(lambda: 'disk full')
    assert writing.wait() == 'disk full'
    writing.start(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        writing.wait()
