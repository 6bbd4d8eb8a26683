"""timm both ways: its args.yaml trains here, our checkpoints load in timm's loaders, its checkpoints in validate.py.

tests/fixtures/timm_args.yaml is data written by timm's own train.py (timm 1.0.31) into the folder of a tiny run, not
code: its data_dir and output are that run's, so the tests give --data-dir and --output.
"""
import argparse
import json
import pathlib

import pytest
import timm
import torch
import yaml
from timm.utils import CheckpointSaver, ModelEmaV3

import train
import validate
from training import checkpoint
from training.config import parse_config, saved_config

from conftest import REPO, assert_same_weights, load, summary

TIMM_ARGS = REPO / 'tests' / 'fixtures' / 'timm_args.yaml'


@pytest.fixture(scope='module')
def run_dir(shapes, tmp_path_factory):
    """Our train.py on timm's args.yaml as it is (timm's small test_resnet), except where the data is and where runs
    go."""
    output = tmp_path_factory.mktemp('runs')
    assert train.main(['-c', str(TIMM_ARGS), '--data-dir', str(shapes), '--output', str(output)]) == 0
    return output / 'tiny'


def test_timm_args_yaml_trains_and_its_run_folder_speaks_our_names(run_dir):
    timm_args = yaml.safe_load(TIMM_ARGS.read_text())
    saved = yaml.safe_load((run_dir / 'config.yaml').read_text())
    assert (saved['re_prob'], saved['re_mode'], saved['auto_augment'], saved['drop_path_rate']) == \
        (timm_args['reprob'], timm_args['remode'], timm_args['aa'], timm_args['drop_path'])
    assert (saved['lr'], saved['batch_size'], saved['epochs'], saved['model_ema_decay']) == \
        (timm_args['lr'], timm_args['batch_size'], timm_args['epochs'], timm_args['model_ema_decay'])
    assert not set(saved) & {'aa', 'reprob', 'remode', 'drop_path', 'lr_base', 'pin_mem', 'layer_decay'}
    assert len(summary(run_dir)) == timm_args['epochs']
    assert saved_config(parse_config(['-c', str(run_dir / 'config.yaml')])) == saved  # a recipe of ours now


def test_our_checkpoint_loads_with_timms_load_checkpoint(run_dir):
    state = load(run_dir / 'last.pth.tar')
    model = timm.create_model('test_resnet', num_classes=10)
    timm.models.load_checkpoint(model, str(run_dir / 'last.pth.tar'))  # EMA weights first, as timm does
    assert_same_weights(model.state_dict(), state['state_dict_ema'])
    timm.models.load_checkpoint(model, str(run_dir / 'last.pth.tar'), use_ema=False)
    assert_same_weights(model.state_dict(), state['state_dict'])


def test_timm_pretrained_file_loads_our_checkpoint_and_a_plain_state_dict(run_dir, tmp_path):
    """resnet50_custom's pretrained_cfg (first conv, classifier, class count) is what timm's loader works from."""
    state = load(run_dir / 'last.pth.tar')  # our checkpoint format, holding resnet50_custom weights
    for key in ('state_dict', 'state_dict_ema'):
        state[key] = timm.create_model('resnet50_custom', num_classes=10, zero_init_last=False).state_dict()
    ours, plain = tmp_path / 'last.pth.tar', tmp_path / 'weights.pth'
    torch.save(state, ours)
    torch.save(state['state_dict'], plain)
    for path, weights in ((ours, state['state_dict_ema']), (plain, state['state_dict'])):
        model = timm.create_model('resnet50_custom', pretrained=True, num_classes=10,
                                  pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
        assert_same_weights(model.state_dict(), weights)
    # a head of another class count: timm keeps the backbone and starts the classifier afresh
    model = timm.create_model('resnet50_custom', pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(plain), num_classes=10))
    assert torch.equal(model.state_dict()['layer4.2.conv3.weight'], state['state_dict']['layer4.2.conv3.weight'])
    assert model.fc.out_features == 3


def timm_checkpoint(run_dir, folder) -> pathlib.Path:
    """A checkpoint written by timm's own CheckpointSaver (as timm's train.py does) holding our run's weights and
    timm's args, a pickled argparse.Namespace."""
    state = load(run_dir / 'last.pth.tar')
    model = timm.create_model('test_resnet', num_classes=10)
    model.load_state_dict(state['state_dict'])
    ema = ModelEmaV3(model)
    ema.module.load_state_dict(state['state_dict_ema'])
    args = argparse.Namespace(**yaml.safe_load(TIMM_ARGS.read_text()))
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=args, model_ema=ema,
                            checkpoint_dir=str(folder), recovery_dir=str(folder), max_history=1)
    saver.save_checkpoint(epoch=0, metric=50.0)
    return folder / 'last.pth.tar'


def evaluate_file(*args: str, out) -> dict:
    assert validate.main(['-j', '0', '--device', 'cpu', *args, '--results-file', str(out)]) == 0
    return json.loads(out.read_text())


def test_validate_evaluates_a_checkpoint_of_timms_train_as_ours(run_dir, shapes, tmp_path):
    path = timm_checkpoint(run_dir, tmp_path)
    with pytest.raises(Exception):  # what the allowance is for: a plain safe load refuses the Namespace
        torch.load(path, weights_only=True)
    theirs = evaluate_file('--checkpoint', str(path), '--data-dir', str(shapes), out=tmp_path / 'theirs.json')
    ours = evaluate_file('--checkpoint', str(run_dir / 'last.pth.tar'), '--weights', 'ema', out=tmp_path / 'ours.json')
    assert theirs['model'] == 'test_resnet' and theirs['weights'] == 'ema'
    assert (theirs['img_size'], theirs['crop_pct']) == (32, 1.0)  # from timm's args
    assert (theirs['top1'], theirs['top5'], theirs['loss'], theirs['images']) == \
        (ours['top1'], ours['top5'], ours['loss'], ours['images'])


def bad_files(run_dir, tmp_path) -> dict:
    state = load(run_dir / 'last.pth.tar')
    files = {'pickled': {'state_dict': state['state_dict'], 'where': pathlib.PurePosixPath('/x')},
             'optimizer': state['optimizer'], 'tensor': torch.zeros(3)}
    for name, content in files.items():
        torch.save(content, tmp_path / f'{name}.pth')
    torch.save(state['state_dict'], tmp_path / 'plain.pth')
    return {name: str(tmp_path / f'{name}.pth') for name in (*files, 'plain')}


@pytest.mark.parametrize('name, flags, message', [
    ('pickled', (), 'holds objects that a safe load refuses (pathlib.PurePosixPath)'),
    ('optimizer', (), 'holds no model weights (no state_dict; its keys: state, param_groups)'),
    ('tensor', (), 'is not a checkpoint: it holds a Tensor, not a dict'),
    ('plain', (), 'is a plain state dict: pass --model'),
    ('plain', ('--model', 'resnet50_custom'), 'does not fit resnet50_custom'),
])
def test_a_wrong_checkpoint_gets_one_line(run_dir, shapes, tmp_path, capsys, name, flags, message):
    path = bad_files(run_dir, tmp_path)[name]
    assert validate.main(['-j', '0', '--device', 'cpu', '--checkpoint', path, '--data-dir', str(shapes), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_weights_of_a_deit_style_checkpoint_are_found_under_model(tmp_path):
    weights = {'fc.weight': torch.ones(2, 3)}
    assert checkpoint.weights_from({'model': weights, 'epoch': 3}, 'ema', tmp_path, '--weights raw') is weights
