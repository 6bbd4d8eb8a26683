import re
import shlex
from pathlib import Path

import pytest
import yaml

import train
from training.config import OPTIONS, UserError, experiment_changes, parse_config, save_config, saved_config

from conftest import REPO

RECIPES = sorted((REPO / 'recipes').glob('*.yaml'))


@pytest.mark.parametrize('recipe', RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_loads_validates_and_documents_itself(recipe):
    config = parse_config(['-c', str(recipe)])
    assert config['recipe'] == recipe.stem == config['experiment']
    header = recipe.read_text().splitlines()[:8]
    assert header[0].startswith('# ')
    assert any('Command: python train.py -c recipes/' + recipe.name in line for line in header)
    assert any('Expected' in line for line in header)
    assert any('Hardware' in line for line in header)


def test_course_recipe_holds_the_documented_settings():
    config = parse_config(['-c', str(REPO / 'recipes/rn50_130ep.yaml')])
    expected = dict(model='resnet50_custom', batch_size=128, opt='momentum', lr=0.1, momentum=0.9,
                    weight_decay=1e-4, sched='cosine', epochs=130, img_size=224, crop_pct=0.875, smoothing=0.1,
                    mixup=0.4, cutmix=1.0, color_jitter=[0.4, 0.4, 0.4, 0.1], re_prob=0.25, scale=[0.08, 1.0],
                    hflip=0.5, model_ema=True, model_ema_decay=0.9999, amp=True)
    assert {k: config[k] for k in expected} == expected
    assert config['drop_path_rate'] > 0
    assert config['data_dir'] is None  # no machine path: $IMAGENET_DIR or data/imagenet


def write_recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / 'recipe.yaml'
    path.write_text(text)
    return str(path)


def test_command_line_beats_recipe_beats_defaults(tmp_path):
    recipe = write_recipe(tmp_path, 'lr: 0.3\nepochs: 7\nwarmup_epochs: 2\n')
    config = parse_config(['-c', recipe, '--epochs', '9'])
    assert config['epochs'] == 9  # command line
    assert config['lr'] == 0.3 and config['warmup_epochs'] == 2.0  # recipe
    assert config['weight_decay'] == next(o.default for o in OPTIONS if o.name == 'weight_decay')  # default


def test_yaml_float_without_a_dot_is_a_number(tmp_path):
    config = parse_config(['-c', write_recipe(tmp_path, 'lr: 5e-4\nweight_decay: 1e-5\n')])
    assert config['lr'] == 5e-4 and isinstance(config['lr'], float)
    assert config['weight_decay'] == 1e-5


@pytest.mark.parametrize('text, message', [
    ('lrr: 0.1\n', 'unknown option lrr; did you mean lr?'),
    ('wieght_decay: 0.1\n', 'did you mean weight_decay?'),
    ('lr: fast\n', "lr: expected a number, got 'fast'"),
    ('epochs: 1.5\n', "epochs: expected an integer, got 1.5"),
    ('amp: maybe\n', "amp: expected true or false, got 'maybe'"),
    ('scale: [0.08]\n', 'scale: expected 2 values, got 1'),
    ('sched: plateau\n', 'sched must be one of cosine'),
    ('resume: last.pth.tar\n', 'resume is an action'),
    ('- a list\n', 'must hold a mapping'),
    ('lr: 0.1\nepochs: 3\nlr: 0.2\n', 'lr is given twice (lines 1 and 3)'),
    ('interpolation: random\n', 'random is for training only: set train_interpolation to random'),
    ('lr: 0.1\n  epochs: 2\n', 'is not valid YAML (line 2, column 9): mapping values are not allowed here'),
    ('learning_rate: 0.1\n', 'unknown option learning_rate; did you mean lr?'),
])
def test_bad_recipe_stops_with_one_line_and_exit_code_2(tmp_path, capsys, text, message):
    assert train.main(['-c', write_recipe(tmp_path, text)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize('argv, message', [
    (['--lrr', '0.1'], 'unknown option --lrr; did you mean --lr?'),
    (['--batch_size', '8'], 'did you mean --batch-size?'),
    (['--epoch', '3'], 'did you mean --epochs?'),  # no silent prefix match
    (['--learning-rate', '0.1'], 'unknown option --learning-rate; did you mean --lr?'),
    (['-j', '-1'], "workers: expected an integer of 0 or more, got '-1'"),
    (['--lr'], 'expected one argument'),
    (['-c', 'no/such/recipe.yaml'], 'recipe not found: no/such/recipe.yaml'),
    (['-c', str(REPO / 'recipes')], f"recipe {REPO / 'recipes'} is a directory, not a YAML file"),
])
def test_bad_command_line_stops_with_one_line_and_exit_code_2(capsys, argv, message):
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize('text, argv, message', [
    ('', ['-b', '-4'], "command line: batch_size: expected a positive integer, got '-4'"),
    ('batch_size: 0\n', ['-b', '16'], 'recipe.yaml: batch_size: expected a positive integer, got 0'),
    ('lr: -0.1\n', ['-b', '256'], 'recipe.yaml: lr: expected a positive number, got -0.1'),
    ('sched: step\n', ['--decay-epochs', '0'], "decay_epochs: expected a positive number, got '0'"),
    ('', ['--val-img-size', '0'], "val_img_size: expected a positive integer, got '0'"),
    ('', ['--re-count', '0'], "re_count: expected a positive integer, got '0'"),
    ('', ['--warmup-epochs', '-1'], "warmup_epochs: expected a number of 0 or more, got '-1'"),
    ('', ['--model-ema-decay', '1'], "model_ema_decay: expected a number in [0, 1), got '1'"),
])
def test_a_value_out_of_range_stops_before_it_is_used(tmp_path, capsys, text, argv, message):
    assert train.main(['-c', write_recipe(tmp_path, text), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_help_lists_every_option_once_in_its_group(capsys, monkeypatch):
    monkeypatch.setenv('COLUMNS', '120')
    with pytest.raises(SystemExit) as exit_info:
        train.main(['--help'])
    assert exit_info.value.code == 0
    sections, flags = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line.endswith(':') and not line.startswith(' '):
            flags = sections.setdefault(line[:-1], [])
        elif (flags is not None) and re.match(r'  -', line):
            flags.append(line.split()[0].rstrip(','))  # the first flag of an option's entry
    assert list(sections) == ['options', 'data', 'model', 'input size and preprocessing',
                              'augmentation and regularisation', 'optimisation and schedule', 'EMA and SWA',
                              'knowledge distillation', 'evaluation and checkpoints', 'execution and distributed',
                              'cost estimate (--dry-run)', 'logging', 'actions']
    listed = [flag for group in sections.values() for flag in group]
    assert sorted(listed) == sorted(['-h', '-c', *(o.flag for o in OPTIONS)])
    assert all(o.flag in sections[o.group] for o in OPTIONS)


def test_train_interpolation_takes_random_and_interpolation_stays_for_evaluation():
    config = parse_config(['--interpolation', 'bicubic', '--train-interpolation', 'random'])
    assert (config['interpolation'], config['train_interpolation']) == ('bicubic', 'random')
    assert parse_config([])['train_interpolation'] is None  # null: training uses interpolation


def test_batch_size_override_rescales_lr_by_the_recipes_rule(tmp_path):
    linear = write_recipe(tmp_path, 'batch_size: 256\nlr: 0.2\nlr_scale: linear\n')
    assert parse_config(['-c', linear, '-b', '1024'])['lr'] == pytest.approx(0.8)
    assert parse_config(['-c', linear, '-b', '1024', '--lr', '0.5'])['lr'] == 0.5  # an explicit lr wins
    assert parse_config(['-c', linear])['lr'] == 0.2
    sqrt = write_recipe(tmp_path, 'batch_size: 2048\nlr: 8.0e-3\nlr_scale: sqrt\n')
    assert parse_config(['-c', sqrt, '-b', '512'])['lr'] == pytest.approx(4e-3)


def test_saved_config_replays_to_the_same_configuration(tmp_path):
    config = parse_config(['-c', str(REPO / 'recipes/rn50_130ep.yaml'), '-b', '256', '--epochs', '3'])
    save_config(config, tmp_path / 'config.yaml')
    saved = yaml.safe_load((tmp_path / 'config.yaml').read_text())
    assert 'resume' not in saved and 'start_over' not in saved  # actions are never replayed
    replayed = parse_config(['-c', str(tmp_path / 'config.yaml')])
    assert replayed['lr'] == pytest.approx(0.2) and replayed['lr_rescaled_from'] is None
    assert {k: replayed[k] for k in saved} == {k: config[k] for k in saved}
    assert replayed['recipe'] == 'rn50_130ep'


def test_config_yaml_header_replays_the_run_in_a_new_folder(tmp_path):
    output = tmp_path / 'my runs'
    config = parse_config(['-c', str(REPO / 'recipes/rn50_130ep.yaml'), '-b', '256', '--output', str(output)])
    run_dir = output / config['experiment']
    run_dir.mkdir(parents=True)
    save_config(config, run_dir / 'config.yaml')
    header = [line for line in (run_dir / 'config.yaml').read_text().splitlines() if line.startswith('#')]
    replay = next(line for line in header if 'replay it in a new run folder: ' in line)
    command = shlex.split(replay.split('new run folder: ', 1)[1])
    assert command[:2] == ['python', 'train.py']
    replayed = parse_config(command[2:])
    assert Path(replayed['output'], replayed['experiment']) == output / 'rn50_130ep-replay'
    assert experiment_changes(saved_config(config), replayed) == []


def test_cross_option_checks():
    with pytest.raises(UserError, match='warmup_epochs must be shorter than epochs'):
        parse_config(['--epochs', '2', '--warmup-epochs', '2'])
    with pytest.raises(UserError, match=r're_prob: expected a number between 0 and 1'):
        parse_config(['--re-prob', '1.5'])
    with pytest.raises(UserError, match=r'scale must be \[min, max\]'):
        parse_config(['--scale', '1.0', '0.5'])


def test_readme_documents_every_option():
    readme = (REPO / 'README.md').read_text()
    missing = [o.name for o in OPTIONS if f'`{o.name}`' not in readme and f'`{o.flag}' not in readme]
    assert not missing


# timm's args.yaml as a recipe. tests/fixtures/timm_args.yaml is data, written by timm's own train.py (timm 1.0.31)
# into the run folder of a tiny run (test_resnet, 1 epoch, 32 px, RandAugment, Mixup/CutMix, random erasing, EMA).
TIMM_ARGS = REPO / 'tests' / 'fixtures' / 'timm_args.yaml'


def timm_args(tmp_path: Path, **changes) -> str:
    """The fixture args.yaml with some values changed (None removes the key)."""
    data = yaml.safe_load(TIMM_ARGS.read_text())
    data.update(changes)
    path = tmp_path / 'timm_run' / 'args.yaml'
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}))
    return str(path)


def test_timm_args_yaml_reads_as_is_in_our_names(tmp_path, capsys):
    timm = yaml.safe_load(TIMM_ARGS.read_text())
    config = parse_config(['-c', str(TIMM_ARGS), '--output', str(tmp_path)])
    renamed = dict(aa='auto_augment', reprob='re_prob', remode='re_mode', recount='re_count', drop='drop_rate',
                   drop_path='drop_path_rate')
    assert {ours: config[ours] for ours in renamed.values()} == {ours: timm[key] for key, ours in renamed.items()}
    shared = ['model', 'num_classes', 'img_size', 'crop_pct', 'batch_size', 'epochs', 'opt', 'lr', 'weight_decay',
              'sched', 'warmup_epochs', 'warmup_lr', 'min_lr', 'smoothing', 'mixup', 'cutmix', 'mixup_prob',
              'mixup_switch_prob', 'mixup_mode', 'model_ema', 'model_ema_decay', 'hflip', 'vflip', 'scale', 'ratio',
              'color_jitter', 'train_interpolation', 'seed', 'momentum', 'clip_mode', 'decay_milestones', 'workers',
              'train_split', 'val_split', 'checkpoint_hist', 'log_interval', 'experiment', 'amp', 'channels_last']
    assert {k: config[k] for k in shared} == {k: timm[k] for k in shared}
    assert (config['interpolation'], config['initial_checkpoint'], config['torchcompile']) == (None, None, False)
    assert config['lr_scale'] == 'none'  # timm never rescales an lr it is given
    assert (config['recipe'], config['experiment']) == ('timm_args', 'tiny')
    assert "timm's batch_size 8 is per GPU; read as the global batch" in capsys.readouterr().err
    saved = saved_config(config)
    assert not set(saved) & {'aa', 'reprob', 'drop_path', 'lr_base', 'pin_mem'}  # saved in our names only


@pytest.mark.parametrize('opt, batch, lr', [('sgd', 64, 0.1 * 64 / 256), ('adamw', 64, 0.1 * (64 / 256) ** 0.5)])
def test_timm_lr_base_scales_to_the_batch_by_timms_rule(tmp_path, opt, batch, lr):
    config = parse_config(['-c', timm_args(tmp_path, lr=None, opt=opt, batch_size=batch), '--output', str(tmp_path)])
    assert config['lr'] == pytest.approx(lr)
    assert config['lr_scale'] == ('sqrt' if opt == 'adamw' else 'linear')
    bigger = parse_config(['-c', timm_args(tmp_path, lr=None, opt=opt, batch_size=batch), '--output', str(tmp_path),
                           '-b', str(4 * batch)])  # as timm on 4 GPUs
    assert bigger['lr'] == pytest.approx(lr * (4 if opt == 'sgd' else 2))


def test_args_of_older_timm_versions_read_too(tmp_path):
    path = timm_args(tmp_path, apex_amp=False, native_amp=True, bn_tf=False, jsd=False, amp=True)
    config = parse_config(['-c', path, '--output', str(tmp_path / 'ours')])
    assert config['amp'] is True and config['amp_dtype'] == 'float16'  # timm's default AMP type


def test_timm_input_size_sets_the_image_size(tmp_path):
    path = timm_args(tmp_path, input_size=[3, 48, 48], experiment='')
    config = parse_config(['-c', path, '--output', str(tmp_path / 'ours')])
    assert config['img_size'] == 48
    assert config['recipe'] == config['experiment'] == 'timm_run'  # an args.yaml is named by its run folder


@pytest.mark.parametrize('per_update', [True, False])
def test_timm_sched_on_updates_is_read_and_the_per_epoch_default_is_noted(tmp_path, capsys, per_update):
    config = parse_config(['-c', timm_args(tmp_path, sched_on_updates=per_update), '--output', str(tmp_path)])
    assert config['sched'] == 'cosine'
    noted = "timm's sched_on_updates false sets the lr once per epoch; train.py sets it after every update"
    assert (noted in capsys.readouterr().err) == (not per_update)


def test_timm_aug_repeats_and_bce_target_thresh_are_read_as_ours(tmp_path):
    for changes in (dict(aug_repeats=3), dict(bce_loss=True, bce_target_thresh=0.2)):
        config = parse_config(['-c', timm_args(tmp_path, **changes), '--output', str(tmp_path)])
        assert {k: config[k] for k in changes} == changes


@pytest.mark.parametrize('changes, message', [
    (dict(layer_decay=0.65), "timm option layer_decay: 0.65 is not supported by train.py (only timm's default, None,"),
    (dict(cooldown_epochs=10), "timm option cooldown_epochs: 10 is not supported by train.py (only timm's default, 0,"),
    (dict(torchcompile='aot_eager'), "torchcompile: 'aot_eager': train.py compiles with inductor only"),
    (dict(input_size=[3, 32, 48]), 'input_size [3, 32, 48]: train.py takes 3-channel square images'),
    (dict(resume='last.pth.tar'), "resume 'last.pth.tar': resuming is an action, give --resume"),
    (dict(sched='plateau'), 'sched must be one of cosine'),
    (dict(lr=None, lr_base_scale='cube'), 'lr_base_scale must be linear or sqrt'),
    (dict(layer_dekay=0.65), 'unknown option layer_dekay; did you mean'),
])
def test_timm_args_we_cannot_honour_stop_with_one_line(tmp_path, capsys, changes, message):
    assert train.main(['-c', timm_args(tmp_path, **changes), '--output', str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_timm_args_would_not_write_into_the_timm_run_folder(tmp_path, capsys):
    path = timm_args(tmp_path, output=str(tmp_path), experiment='timm_run')  # where timm wrote it
    assert train.main(['-c', path]) == 2
    assert 'is a timm run (it holds args.yaml); give --output or --experiment' in capsys.readouterr().err
