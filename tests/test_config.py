from pathlib import Path

import pytest
import yaml

import train
from training.config import OPTIONS, UserError, parse_config, save_config

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
    (['--lr'], 'expected one argument'),
    (['-c', 'no/such/recipe.yaml'], 'recipe not found: no/such/recipe.yaml'),
])
def test_bad_command_line_stops_with_one_line_and_exit_code_2(capsys, argv, message):
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


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


def test_cross_option_checks():
    with pytest.raises(UserError, match='warmup_epochs must be shorter than epochs'):
        parse_config(['--epochs', '2', '--warmup-epochs', '2'])
    with pytest.raises(UserError, match='re_prob must be between 0 and 1'):
        parse_config(['--re-prob', '1.5'])


def test_readme_documents_every_option():
    readme = (REPO / 'README.md').read_text()
    missing = [o.name for o in OPTIONS if f'`{o.name}`' not in readme and f'`{o.flag}' not in readme]
    assert not missing
