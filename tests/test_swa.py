"""Stochastic weight averaging: the mean of the epoch ends from swa_start_epoch on, its BatchNorm statistics recomputed,
evaluated and saved beside raw and EMA, its lr schedule, and an exact resume."""
import itertools
import json
import re
import signal

import pytest
import safetensors.torch
import torch
from torch.optim.swa_utils import SWALR, update_bn

import train
import validate
from tools import export
from training.config import parse_config
from training.data import SWA_BN, BatchLayout, build_loaders, derive_seed, locate_dataset, open_datasets, seed_all
from training.distributed import Processes
from training.reporting import TIMING_COLUMNS, ranking_metric

from conftest import assert_same_weights, load, lr_schedule, run_captured, run_train, run_until, summary

# TINY's model, which has what SWA touches (BatchNorm, drop path). 3 epochs of 5 steps, averaged from epoch 1 on, with
# the lr annealed to swa_lr; a worker, drop path and a recovery checkpoint every 2 steps, so that the resume test has
# what makes an exact resume hard
SWA = ['--epochs', '3', '--swa-start-epoch', '1', '--swa-lr', '5.0e-4', '--swa-bn-batches', '2',
       '-j', '1', '--drop-path-rate', '0.1', '--recovery-interval', '2', '--checkpoint-hist', '3', '--deterministic']




@pytest.fixture(scope='module')
def reference(shapes, tmp_path_factory):
    output = tmp_path_factory.mktemp('swa')
    rc, log = run_captured(shapes, output, *SWA)
    assert rc == 0, log
    return output / 'run'


def parameter_names(state: dict) -> list:
    model = train.build_model(state['config'], state['data']['classes'])
    return [name for name, _ in model.named_parameters()]


def test_the_average_is_the_mean_of_the_raw_weights_at_the_epoch_ends_from_swa_start_epoch(reference):
    before, first, second = (load(reference / f'checkpoint-{epoch}.pth.tar') for epoch in range(3))
    assert 'state_dict_swa' not in before and 'swa_n_averaged' not in before
    assert (first['swa_n_averaged'], second['swa_n_averaged']) == (1, 2)
    for name in parameter_names(second):
        assert torch.equal(first['state_dict_swa'][name], first['state_dict'][name]), name
        mean = (first['state_dict'][name] + second['state_dict'][name]) / 2
        torch.testing.assert_close(second['state_dict_swa'][name], mean, rtol=1e-6, atol=1e-7)
    assert not torch.equal(second['state_dict_swa']['fc.weight'], second['state_dict']['fc.weight'])


def first_batches(run_dir, data, epoch: int, steps: int) -> list:
    """The first training batches of an epoch from a new loader of the run's settings."""
    config = dict(load(run_dir / 'last.pth.tar')['config'], data_dir=str(data), workers=0)
    datasets = open_datasets(*locate_dataset(config['data_dir'], config['dataset']), config['train_split'],
                             config['val_split'], config['num_classes'])
    procs = Processes(0, 1, 0, torch.device('cpu'))
    layout = BatchLayout.create(config['batch_size'], 1, config['max_batch_per_device'])
    loaders = build_loaders(config, datasets, train.build_model(config, datasets.num_classes), layout, procs)
    loaders.sampler.set_position(epoch, 0)
    try:
        return [(x.clone(), y.clone()) for x, y in itertools.islice(loaders.train, steps)]
    finally:
        loaders.train.close()
        loaders.val.close()


def test_batchnorm_statistics_of_the_average_are_recomputed_on_the_epochs_first_batches(reference, shapes):
    state = load(reference / 'last.pth.tar')
    swa, config = state['state_dict_swa'], state['config']
    batches = first_batches(reference, shapes, epoch=2, steps=2)
    assert len(batches) == 2 and batches[0][0].shape == (16, 3, 32, 32)

    # the first BatchNorm by hand: the mean over the batches of each batch's mean and unbiased variance
    model = train.build_model(config, 10)
    model.load_state_dict(swa)
    with torch.no_grad():
        features = [model.conv1(x) for x, _ in batches]
    torch.testing.assert_close(swa['bn1.running_mean'], torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0))
    torch.testing.assert_close(swa['bn1.running_var'], torch.stack([f.var((0, 2, 3)) for f in features]).mean(0))
    assert int(swa['bn1.num_batches_tracked']) == 2
    # every layer: torch's update_bn on those batches, each forward's drop path drawn from the run's stream
    def seeded_images():
        for i, (x, _) in enumerate(batches):
            seed_all(derive_seed(config['seed'], SWA_BN, 2, i, 0))  # epoch 2, step i, micro-batch 0
            yield x
    update_bn(seeded_images(), model)
    assert_same_weights(model.state_dict(), swa)
    # not the average of the raw weights' statistics, which describe other weights
    previous = load(reference / 'previous.pth.tar')['state_dict']
    plain = (previous['bn1.running_mean'] + state['state_dict']['bn1.running_mean']) / 2
    assert (swa['bn1.running_mean'] - plain).abs().max() > 1e-3


def test_swa_columns_log_line_curves_and_ranking(reference):
    rows = summary(reference)
    assert [row['swa_val_top1'] is None for row in rows] == [True, False, False]
    assert all(row[f'swa_val_{k}'] is not None for row in rows[1:] for k in ('loss', 'top1', 'top5'))
    log = (reference / 'log.txt').read_text()
    for row in rows[1:]:
        assert (f"epoch {int(row['epoch'])} done" in log) and \
            (f"SWA top-1 {row['swa_val_top1']:.2f} top-5 {row['swa_val_top5']:.2f}" in log)
    assert (reference / 'curves.png').is_file()  # drawn with the SWA gap of epoch 0
    state = load(reference / 'last.pth.tar')
    assert state['metric'] == max(rows[2][c] for c in ('val_top1', 'ema_val_top1', 'swa_val_top1'))


def test_the_best_of_raw_ema_and_swa_ranks_the_epoch():
    row = dict(val_top1=10.0, ema_val_top1=12.0, swa_val_top1=15.0, val_loss=2.0, ema_val_loss=1.5, swa_val_loss=1.7)
    assert ranking_metric(row, 'top1') == (15.0, 'swa')
    assert ranking_metric(row, 'loss') == (1.5, 'ema')
    assert ranking_metric(dict(row, swa_val_top1=None), 'top1') == (12.0, 'ema')  # before swa_start_epoch


def test_validate_and_export_take_the_swa_weights(reference, tmp_path, capsys):
    out = tmp_path / 'swa.json'
    assert validate.main(['--checkpoint', str(reference / 'last.pth.tar'), '--weights', 'swa', '-j', '0', '--device',
                          'cpu', '--results-file', str(out)]) == 0
    results, logged = json.loads(out.read_text()), summary(reference)[2]
    assert results['weights'] == 'swa'
    assert results['top1'] == pytest.approx(logged['swa_val_top1'], abs=0.01)
    assert results['loss'] == pytest.approx(logged['swa_val_loss'], rel=1e-5)

    assert export.main(['--checkpoint', str(reference / 'last.pth.tar'), '--out', str(tmp_path / 'export'),
                        '--weights', 'swa']) == 0
    exported = safetensors.torch.load_file(tmp_path / 'export' / 'model.safetensors')
    assert_same_weights(exported, load(reference / 'last.pth.tar')['state_dict_swa'])
    assert f"- top-1: {logged['swa_val_top1']:.2f} % (swa weights" in (tmp_path / 'export' / 'README.md').read_text()

    capsys.readouterr()
    assert validate.main(['--checkpoint', str(reference / 'checkpoint-0.pth.tar'), '--weights', 'swa']) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"validate.py: error: {reference / 'checkpoint-0.pth.tar'} holds no SWA weights (its run averages from epoch "
        '1 on); pass --weights raw for its raw weights']


@pytest.mark.parametrize('args, message', [
    (['--epochs', '2', '--swa-start-epoch', '2'],
     'swa_start_epoch 2 is not before the end of the schedule (epochs 2, the last is 1): SWA would average nothing'),
    (['--swa-lr', '1.0e-3'], 'swa_lr anneals the lr from swa_start_epoch on: set swa_start_epoch, or drop swa_lr'),
])
def test_swa_that_cannot_work_is_refused_in_one_line(shapes, tmp_path, capsys, args, message):
    assert run_train(shapes, tmp_path, *args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f'train.py: error: {message}']
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('sched, anneal_epochs', [('cosine', 2), ('onecycle', 1), ('cosine', 0)])
def test_swa_lr_anneals_from_the_schedules_lr_as_torchs_swalr_step_by_step(sched, anneal_epochs):
    steps_per_epoch, start_epoch, epochs = 7, 3, 6
    config = parse_config(['--sched', sched, '--epochs', str(epochs), '--lr', '0.1', '--swa-start-epoch',
                           str(start_epoch), '--swa-lr', '0.02', '--swa-anneal-epochs', str(anneal_epochs)])
    lr_at, schedule_at = lr_schedule(config, steps_per_epoch), lr_schedule(dict(config, swa_lr=None), steps_per_epoch)
    start = start_epoch * steps_per_epoch
    assert [lr_at(step) for step in range(start)] == [schedule_at(step) for step in range(start)]
    # torch's SWALR, built at the first step of SWA and stepped once an optimizer step instead of once an epoch
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=schedule_at(start))
    reference = SWALR(optimizer, swa_lr=0.02, anneal_epochs=anneal_epochs * steps_per_epoch, anneal_strategy='cos')
    for step in range(start, epochs * steps_per_epoch + 1):
        assert lr_at(step) == pytest.approx(optimizer.param_groups[0]['lr'], rel=1e-9), step
        optimizer.step()
        reference.step()
    assert lr_at(epochs * steps_per_epoch) == pytest.approx(0.02, rel=1e-12)


def test_interrupted_twice_and_rerun_the_swa_weights_are_bit_identical(shapes, tmp_path, reference):
    # SIGTERM while epoch 1's evaluation is pending: the recovery checkpoint holds the SWA update of its last step
    rc, log = run_until(shapes, tmp_path, r'epoch 1 step 5/5', signal.SIGTERM, *SWA)
    assert rc == train.EXIT_INTERRUPTED, log
    assert 'Saving recovery checkpoint recovery-1-5' in log
    saved = load(tmp_path / 'run' / 'recovery-1-5.pth.tar')
    assert (saved['progress']['step'], saved['swa_n_averaged']) == (5, 1)
    # SIGKILL mid-epoch 2: resumed from recovery-2-2, or from epoch 1's end when the kill cut that save short
    rc, log = run_until(shapes, tmp_path, r'epoch 2 step 3/5', signal.SIGKILL, *SWA)
    assert rc == -signal.SIGKILL, log
    rc, log = run_captured(shapes, tmp_path, *SWA)
    assert rc == 0 and re.search(r'Resuming \S+(recovery-2-2|last).pth.tar: epoch 2', log), log

    final, expected = load(tmp_path / 'run' / 'last.pth.tar'), load(reference / 'last.pth.tar')
    for key in ('state_dict', 'state_dict_ema', 'state_dict_swa'):
        assert_same_weights(final[key], expected[key])
    assert final['swa_n_averaged'] == expected['swa_n_averaged'] == 2
    for row, expected_row in zip(summary(tmp_path / 'run'), summary(reference), strict=True):
        assert {k: v for k, v in row.items() if k not in TIMING_COLUMNS} == \
               {k: v for k, v in expected_row.items() if k not in TIMING_COLUMNS}
